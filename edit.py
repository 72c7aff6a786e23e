"""Image editing with a trained Sphere Encoder (arXiv 2602.15030), one PNG grid per command, of training images by
index: Eq. 2 (reconstruction), Sec. 4 / Fig. 6 (noise-corner grid), Sec. 5 (crossover, conditional manipulation).
    python edit.py recon      --ckpt out/toy/last.pt --images 0,1,2,3
    python edit.py grid       --ckpt out/toy/last.pt --target 3     # Fig. 6: noise-corner interpolation
    python edit.py crossover  --ckpt out/toy/last.pt --images 0,5
    python edit.py manipulate --ckpt out/toy/last.pt --images 0,1,2 --target 7
"""
import os

import torch
from PIL import Image
from torchvision.utils import save_image

from checkpoint import load_model_and_data
from data import COUNT, PROB, STEPS, WEIGHT, die, int_list, number, parser, script
from spherify import generate, reconstruct, refine, sampling_r, sigma_max


def corner_grid(model, alpha, n=8, y=None, steps=4, generator=None, device="cpu"):
    """Sec. 4 / Fig. 6: n x n bilinear grid between 4 noise corners, Algorithm 1 (no CFG): (n * n, C, H, W)."""
    c = torch.randn(4, model.cfg.grid, model.cfg.grid, model.cfg.latent_dim, generator=generator, device=device)
    t = torch.linspace(0, 1, n, device=device)
    u, w = t.view(n, 1, 1, 1, 1), t.view(1, n, 1, 1, 1)                     # rows, columns
    e = (1 - u) * (1 - w) * c[0] + (1 - u) * w * c[1] + u * (1 - w) * c[2] + u * w * c[3]
    labels = None if y is None else torch.full((n * n,), y, device=device)
    return generate(model, e.flatten(0, 1), labels, steps, sigma_max(alpha), generator=generator)[-1]


def rounds(r, gamma, n):
    """Eq. 13 over n rounds (steps 2..n+1 of Algorithm 1): r_k = r (1 - k/n)^gamma, k = 1..n."""
    return [r * sampling_r(t, n + 1, gamma) for t in range(2, n + 2)]


def crossover(model, xa, xb, alpha, steps=10, r=0.25, gamma=1.0, y=None, generator=None):
    """Sec. 5: left half of xa, right half of xb, then rounds blend the seam: [stitched] + each round."""
    W = xa.shape[-1]
    x = torch.cat([xa[..., : W // 2], xb[..., W // 2:]], dim=-1)
    return [x] + refine(model, x, y, rounds(r, gamma, steps), sigma_max(alpha), generator=generator)


def manipulate(model, x, target, alpha, steps=4, r=1.0, gamma=0.0, generator=None):
    """Sec. 5: encode/decode x under the target class, `steps` rounds (r = 1, gamma = 0, no CFG)."""
    return refine(model, x, target, rounds(r, gamma, steps), sigma_max(alpha), generator=generator)


@script
@torch.no_grad()
def main(argv=None):
    p = parser(__doc__)
    p.add_argument("command", choices=["recon", "grid", "crossover", "manipulate"])
    p.add_argument("--ckpt", default="out/toy/last.pt")
    p.add_argument("--images", type=int_list, default="0,1,2,3", help="dataset indices, comma-separated")
    p.add_argument("--dataset", default=None, help="default: the checkpoint's")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--raw_weights", action="store_true", help="the trained weights, not the EMA ones (train.py --ema)")
    p.add_argument("--target", type=STEPS, default=None, help="the class (required for manipulate)")
    p.add_argument("--steps", type=COUNT, default=None, help="rounds (crossover 10, manipulate 4); grid: steps (4)")
    p.add_argument("--r", type=PROB, default=None, help="noise sigma = r sigma_max (crossover 0.25, manipulate 1)")
    p.add_argument("--gamma", type=WEIGHT, default=None, help="Eq. 13 decay (crossover 1, manipulate 0)")
    p.add_argument("--seed", type=number(0, 2 ** 32 - 1, cast=int), default=0)
    p.add_argument("--out", default=None, help="PNG (default: <ckpt dir>/<command>.png)")
    args = p.parse_args(argv)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), f"{args.command}.png")
    if Image.registered_extensions().get(os.path.splitext(out)[1].lower()) not in Image.SAVE:
        die(f"argument --out: must be an image file name like edit.png, got {args.out!r}")
    idx = args.images or []
    model, targs, ds = load_model_and_data(args)
    if any(not 0 <= i < len(ds) for i in idx):
        die(f"--images must be in 0..{len(ds) - 1}")
    need = {"crossover": 2}.get(args.command, 1)
    if len(idx) < need:
        die(f"{args.command} needs {need} images in --images")
    if args.command == "manipulate" and args.target is None:
        die("manipulate needs --target CLASS")
    if args.target is not None and not 0 <= args.target < model.cfg.num_classes:
        die(f"--target must be a class in 0..{model.cfg.num_classes - 1} (the model has {model.cfg.num_classes})")
    x = torch.stack([ds[i][0] for i in idx]).to(args.device)
    g, alpha = torch.Generator(args.device).manual_seed(args.seed), targs["alpha"]
    kw = {k: v for k, v in (("steps", args.steps), ("r", args.r), ("gamma", args.gamma)) if v is not None}
    if args.command == "recon":                                              # rows: originals, reconstructions
        grid, nrow = torch.cat([x, reconstruct(model, x)]), len(x)
    elif args.command == "grid":                                             # Fig. 6: bilinear between 4 corners
        grid, nrow = corner_grid(model, alpha, y=args.target, steps=args.steps or 4, generator=g, device=args.device), 8
    elif args.command == "crossover":                                        # stitched, then each round
        xs = [x[:1], x[1:2]] + crossover(model, x[:1], x[1:2], alpha, generator=g, **kw)
        grid, nrow = torch.cat(xs), len(xs)
    else:                                                                    # rows: input, then each round
        xs = [x] + manipulate(model, x, torch.full((len(x),), args.target, device=x.device), alpha, generator=g, **kw)
        grid, nrow = torch.stack(xs, 1).flatten(0, 1), len(xs)
    save_image(grid * 0.5 + 0.5, out, nrow=nrow)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
