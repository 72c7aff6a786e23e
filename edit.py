"""Image editing with a trained Sphere Encoder (arXiv 2602.15030), one PNG grid per command, of your own images
(--image PATH: any size, any format PIL reads) or training images by index (--images): Eq. 2 (reconstruction),
Sec. 4 / Fig. 6 (noise-corner grid; class interpolation), Sec. 5 (crossover, conditional manipulation).
    python edit.py recon      --ckpt out/toy/last.pt --images 0,1,2,3
    python edit.py grid       --ckpt out/toy/last.pt --target 3     # Fig. 6 left: noise-corner interpolation
    python edit.py interp     --ckpt out/toy/last.pt --classes 0,6  # Fig. 6 right: (e0, class a) -> (e1, class b)
    python edit.py crossover  --ckpt out/toy/last.pt --image a.png --image b.jpg --stitch diagonal   # Fig. 9
    python edit.py manipulate --ckpt out/toy/last.pt --image photo.jpg --target 7                   # Fig. 8
"""
import os
import random

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T
from torchvision.utils import save_image

from checkpoint import ckpt_dir, load_model
from cli import COUNT, NONNEG, NONNEG_INT, PROB, SEED, DataError, die, int_list, parser, script
from data import build_dataset, resize_crop
from spherify import generate, reconstruct, refine, sampling_r, sigma_max


def corner_grid(model, alpha, n=8, y=None, steps=4, generator=None, device="cpu"):
    """Sec. 4 / Fig. 6: n x n bilinear grid between 4 noise corners, Algorithm 1 (no CFG):
    (n * n, C, H, W)."""
    c = torch.randn(4, model.cfg.grid, model.cfg.grid, model.cfg.latent_dim, generator=generator, device=device)
    t = torch.linspace(0, 1, n, device=device)
    u, w = t.view(n, 1, 1, 1, 1), t.view(1, n, 1, 1, 1)                     # rows, columns
    e = (1 - u) * (1 - w) * c[0] + (1 - u) * w * c[1] + u * (1 - w) * c[2] + u * w * c[3]
    labels = None if y is None else torch.full((n * n,), y, device=device)
    return generate(model, e.flatten(0, 1), labels, steps, sigma_max(alpha), generator=generator)[-1]


def slerp(a, b, t):
    """The point at t in [0, 1] on the great-circle path from a to b, per sample (a, b not
    parallel): (B, ...), (B, ...) -> (B, ...)."""
    cos = F.cosine_similarity(a.flatten(1), b.flatten(1)).clamp(-1, 1)
    th = torch.acos(cos).view(-1, *[1] * (a.dim() - 1))
    return (torch.sin((1 - t) * th) * a + torch.sin(t * th) * b) / torch.sin(th)


def class_interp(model, alpha, pairs, n=8, steps=4, mode="lerp", generator=None, device="cpu"):
    """Sec. 4 / Fig. 6 right: a row per class pair (a, b), n columns from (e0, a) to (e1, b): e by
    lerp or slerp, the class embedding mixed linearly (a (rows, K+1) weight matrix); Algorithm 1,
    no CFG. A column is one generate() call with the same refinement noise, so the end columns are
    plain generation: (rows * n, C, H, W)."""
    cfg, ab = model.cfg, torch.tensor(pairs, device=device)                 # (rows, 2)
    e0, e1 = torch.randn(2, len(ab), cfg.grid, cfg.grid, cfg.latent_dim, generator=generator, device=device)
    # Each column gets a generator with this seed, so all refine with the same noise.
    seed = int(torch.randint(2 ** 62, (1,), generator=generator, device=device))
    ya, yb = (F.one_hot(ab[:, i], cfg.num_classes + 1).float() for i in (0, 1))   # (rows, K+1)
    cols = []
    for t in torch.linspace(0, 1, n).tolist():
        e = slerp(e0, e1, t) if mode == "slerp" else (1 - t) * e0 + t * e1  # (rows, h, w, d)
        # The class weights mix the two class embeddings.
        y = (1 - t) * ya + t * yb if cfg.num_classes else None
        g = torch.Generator(device).manual_seed(seed)
        cols.append(generate(model, e, y, steps, sigma_max(alpha), generator=g)[-1])
    return torch.stack(cols, 1).flatten(0, 1)


def rounds(r, gamma, n):
    """Eq. 13 over n rounds (steps 2..n+1 of Algorithm 1): r_k = r (1 - k/n)^gamma, k = 1..n."""
    return [r * sampling_r(t, n + 1, gamma) for t in range(2, n + 2)]


# Aliases of stitch's layouts, for --stitch.
STITCH = {"left-right": "horizontal", "top-bottom": "vertical", "diagonal": "tri_forward"}


def stitch(xa, xb, mode="horizontal"):
    """Fig. 9: xa in the left half (horizontal), the top half (vertical), the top-left triangle
    above the '/' diagonal (tri_forward) or the bottom-left one below the '\\' diagonal
    (tri_backward); xb elsewhere: (B, C, H, W)."""
    H, W = xa.shape[-2:]
    # The pixel centres in [0, 1]: i down the rows, j across the columns.
    i, j = torch.meshgrid((torch.arange(H) + 0.5) / H, (torch.arange(W) + 0.5) / W, indexing="ij")
    # Where xa goes in each layout: (H, W).
    a = {"horizontal": j < 0.5, "vertical": i < 0.5, "tri_forward": i + j < 1, "tri_backward": i > j}
    a = a[STITCH.get(mode, mode)]
    return torch.where(a.to(xa.device), xa, xb)


def crossover(model, xa, xb, alpha, steps=10, r=0.25, gamma=1.0, y=None, generator=None, mode="horizontal"):
    """Sec. 5: xa and xb stitched (stitch), then rounds blend the seam: [stitched] + each round."""
    x = stitch(xa, xb, mode)
    return [x] + refine(model, x, y, rounds(r, gamma, steps), sigma_max(alpha), generator=generator)


def manipulate(model, x, target, alpha, steps=4, r=1.0, gamma=0.0, generator=None):
    """Sec. 5: encode/decode x under the target class, `steps` rounds (r = 1, gamma = 0, no CFG)."""
    return refine(model, x, target, rounds(r, gamma, steps), sigma_max(alpha), generator=generator)


def load_image(path, size):
    """Your image as training sees it: any mode (L, P, RGBA on white, CMYK, ...) to RGB, resized and
    center-cropped (Sec. 3): (3, size, size) in [-1, 1]."""
    try:
        with Image.open(path) as im:
            rgba = im.convert("RGBA")
    except (OSError, SyntaxError, ValueError) as err:
        # What PIL raises for a missing file, a file that is not an image, or a broken one.
        raise DataError(f"--image {path!r} cannot be read as an image: {str(err).splitlines()[0]}") from None
    rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
    return T.Compose([*resize_crop(size), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])(rgb)


def get_args(argv):
    """edit.py's command and flags, parsed."""
    p = parser(__doc__)
    p.add_argument("command", choices=["recon", "grid", "interp", "crossover", "manipulate"])
    p.add_argument("--ckpt", default="out/toy/last.pt")
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="your image, any size (repeatable)")
    p.add_argument("--images", type=int_list, default=None,
                   help="dataset indices, comma-separated (default: 0,1,2,3 without --image)")
    p.add_argument("--dataset", default=None, help="default: the checkpoint's")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--raw_weights", action="store_true",
                   help="the trained weights, not the EMA ones (train.py --ema)")
    p.add_argument("--target", type=NONNEG_INT, default=None, help="the class (required for manipulate)")
    p.add_argument("--classes", type=int_list, default=None,
                   help="interp: classes a,b of every row (default: random)")
    p.add_argument("--interp", choices=["lerp", "slerp"], default="lerp", help="interp: how e moves from e0 to e1")
    p.add_argument("--stitch", default="horizontal",
                   choices=["horizontal", "vertical", "tri_forward", "tri_backward", *STITCH],
                   help="crossover: the halves' layout (diagonal = tri_forward)")
    p.add_argument("--steps", type=COUNT, default=None,
                   help="rounds (crossover 10, manipulate 4); grid, interp: steps (4)")
    p.add_argument("--r", type=PROB, default=None, help="noise sigma = r sigma_max (crossover 0.25, manipulate 1)")
    p.add_argument("--gamma", type=NONNEG, default=None, help="Eq. 13 decay (crossover 1, manipulate 0)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--out", default=None, help="PNG (default: <ckpt dir>/<command>.png)")
    return p.parse_args(argv)


def check_classes(args, K):
    """The class flags against the model's K classes: a missing or bad one ends the script (die)."""
    if args.command == "manipulate" and args.target is None:
        die("manipulate needs --target CLASS")
    for flag, ys in (("--target", [args.target]), ("--classes", args.classes or [])):
        if any(y is not None and not 0 <= y < K for y in ys):
            die(f"{flag} must be classes in 0..{K - 1} (the model has {K})")
    if args.classes is not None and len(args.classes) != 2:
        die("--classes takes two classes a,b")


def generated_grid(args, model, K, alpha, g):
    """grid and interp, which start from noise: the grid, 8 images a row."""
    if args.command == "grid":
        # Fig. 6 left: 4 noise corners.
        return corner_grid(model, alpha, y=args.target, steps=args.steps or 4, generator=g, device=args.device)
    # Fig. 6 right: a row per class pair, 4 rows; --classes a,b or a random pair with a != b.
    rng = random.Random(args.seed)
    pairs = [args.classes or rng.sample(range(K), 2) if K > 1 else [0, 0] for _ in range(4)]
    return class_interp(model, alpha, pairs, 8, args.steps or 4, args.interp, g, args.device)


def load_inputs(args, model, targs, idx):
    """The images to edit, on the device: the --image files, then the dataset's images idx."""
    ds = build_dataset(args.dataset or targs["dataset"], args.data_dir or targs.get("data_dir"),
                       model.cfg.image_size)[0] if idx else None
    if any(not 0 <= i < len(ds) for i in idx):
        die(f"--images must be in 0..{len(ds) - 1}")
    x = torch.stack([load_image(f, model.cfg.image_size) for f in args.image]
                    + [ds[i][0] for i in idx]).to(args.device)
    if len(x) < (need := {"crossover": 2}.get(args.command, 1)):
        die(f"{args.command} needs {need} images (--image, --images)")
    return x


def edited_grid(args, model, x, alpha, g):
    """recon, crossover and manipulate, which edit the images x: the grid and its images a row."""
    # The flags given; the others keep the command's defaults.
    kw = {k: v for k, v in (("steps", args.steps), ("r", args.r), ("gamma", args.gamma)) if v is not None}
    if args.command == "recon":
        # Rows: the originals, then their reconstructions.
        grid, nrow = torch.cat([x, reconstruct(model, x)]), len(x)
    elif args.command == "crossover":
        # A row: the two images, stitched, then each round.
        xs = [x[:1], x[1:2]] + crossover(model, x[:1], x[1:2], alpha, generator=g, mode=args.stitch, **kw)
        grid, nrow = torch.cat(xs), len(xs)
    else:
        # A row per image: the input, then each round.
        target = torch.full((len(x),), args.target, device=x.device)
        xs = [x] + manipulate(model, x, target, alpha, generator=g, **kw)
        grid, nrow = torch.stack(xs, 1).flatten(0, 1), len(xs)
    return grid, nrow


@script
@torch.no_grad()
def main(argv=None):
    args = get_args(argv)
    out = args.out or os.path.join(ckpt_dir(args.ckpt), f"{args.command}.png")
    if Image.registered_extensions().get(os.path.splitext(out)[1].lower()) not in Image.SAVE:
        die(f"argument --out: must be an image file name like edit.png, got {args.out!r}")
    model, targs = load_model(args.ckpt, args.device, ema=not args.raw_weights)
    K, idx = model.cfg.num_classes, args.images or ([] if args.image else [0, 1, 2, 3])
    check_classes(args, K)
    g, alpha = torch.Generator(args.device).manual_seed(args.seed), targs["alpha"]
    if args.command in ("grid", "interp"):
        return save(generated_grid(args, model, K, alpha, g), 8, out)
    x = load_inputs(args, model, targs, idx)
    grid, nrow = edited_grid(args, model, x, alpha, g)
    save(grid, nrow, out)


def save(grid, nrow, out):
    save_image(grid * 0.5 + 0.5, out, nrow=nrow)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
