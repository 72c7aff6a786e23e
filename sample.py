"""Generate images with a trained Sphere Encoder (arXiv 2602.15030): Alg. 1 / Sec. 2.4, Eq. 13 noise
schedule, classifier-free guidance (App. C.1). Step 1 decodes D(f(e)), later steps re-encode and re-noise.
    python sample.py --ckpt out/toy/last.pt --steps 4
    torchrun --nproc_per_node=8 sample.py --ckpt x.pt --num_samples 50000 --npz samples.npz  # sharded
    python sample.py --ckpt x.pt --num_samples 50000 --fid --ref VIRTUAL_imagenet256_labeled.npz --inception_weights W
"""
import hashlib
import os
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torchvision import transforms as T
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.utils import save_image

from checkpoint import check_writable, load_model, read_checkpoint, save_checkpoint
from data import (ANGLE, COUNT, WEIGHT, DataError, ToyShapes, build_dataset, die, int_list, number, parser, progress,
                  resize_crop, script, toy_classifier)
from parallel import init_distributed
from spherify import generate, reconstruct, sigma_max

POST_DELAY = float(os.environ.get("SPHERE_POST_DELAY", 0))   # tests: rank 0's writing outlasts --dist_timeout


class Images(torch.utils.data.Dataset):
    """torch-fidelity's input, uint8 (3, H, W): from uint8 (N, 3, H, W) or a training set ((x in [-1, 1], y) items)."""
    def __init__(self, items): self.items = items
    def __len__(self): return len(self.items)

    def __getitem__(self, i):
        x = self.items[i]
        x = x[0] if isinstance(x, tuple) else x
        return x if x.dtype == torch.uint8 else (x * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)


def cache_name(kind, path, image_size, count):
    """torch-fidelity's statistics cache key, from what they are computed from: two trees never share one."""
    where = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:10] if path else "builtin"
    return f"sphere-{kind}-{where}-{image_size}px-{count}"


def reference(ref, train_args, size):
    """FID reference as (uint8 images (3, size, size), cache name): --ref, an ADM .npz batch (arr_0, uint8 NHWC) or
    an image folder tree (any depth and sizes; resized and center-cropped as in training), else the training set."""
    if ref is None:
        ds, _ = build_dataset(train_args["dataset"], train_args.get("data_dir"), size)
        return Images(ds), cache_name(train_args["dataset"], train_args.get("data_dir"), size, len(ds))
    if os.path.isdir(ref):
        from torch_fidelity.datasets import ImagesPathDataset                  # reads a list of files as RGB
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(ref, followlinks=True) for f in fs
                       if f.lower().endswith(IMG_EXTENSIONS))
        ds = ImagesPathDataset(files, T.Compose([*resize_crop(size), T.PILToTensor()]))   # as training, uint8
    elif ref.endswith(".npz") and os.path.isfile(ref):
        try:
            x = np.load(ref)["arr_0"]
        except Exception as err:                                            # no arr_0, not a zip, truncated, ...
            raise DataError(f"--ref {ref!r} is not an ADM reference batch ({str(err).splitlines()[0]})") from None
        if x.dtype != np.uint8 or x.shape[1:] != (size, size, 3):
            raise DataError(f"--ref {ref!r}: arr_0 is {x.dtype} {x.shape}; this model's are uint8 "
                            f"(N, {size}, {size}, 3)")
        ds = Images(torch.from_numpy(x).permute(0, 3, 1, 2))               # (N, 3, S, S)
    else:
        raise DataError(f"--ref {ref!r} is neither an image folder nor an .npz reference batch (arr_0 uint8 NHWC)")
    if len(ds) == 0:
        raise DataError(f"--ref {ref!r} holds no images")
    return ds, cache_name("ref", ref, size, len(ds))


INCEPTION = ("put torch-fidelity's Inception weights weights-inception-2015-12-05-6726825d.pth somewhere and pass "
             "--inception_weights PATH")


def load_inception(weights):
    """The Inception weights file for torch-fidelity (--inception_weights, else torch hub's cached download), checked
    before sampling (offline fails now) and read as data first: torch-fidelity's own torch.load would run any code
    pickled in it. A file unlike the official one (SHA-256 6726825d...) is warned about. -> the path to use."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3 as url
    from torch_fidelity.utils import create_feature_extractor
    official = url.rsplit("-", 1)[1].split(".")[0]                          # the name's hash: 6726825d
    flag = "--inception_weights"
    path = weights or os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))   # hub's cache
    if not os.path.isfile(path):                                            # the download torch-fidelity would make,
        try:                                                                # hash-checked (its own is not)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(url, path, hash_prefix=official, progress=False)
        except Exception as err:                                            # offline, a wrong hash
            raise DataError(f"FID/IS need the Inception weights ({str(err).splitlines()[0]}): {INCEPTION}") from None
    try:
        read_checkpoint(path)                                               # weights_only: a pickled object is refused
    except DataError as err:
        raise DataError(f"{flag if weights else 'the cached Inception weights'}: {err}") from None
    with open(path, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    if not sha.startswith(official):
        print(f"warning: {path} is not the official Inception weights (SHA-256 {sha[:8]}..., the official file's "
              f"begins {official}): FID/IS are not comparable with published numbers", flush=True)
    try:
        create_feature_extractor("inception-v3-compat", ["2048"], cuda=False, verbose=False,
                                 feature_extractor_weights_path=path)
    except Exception as err:                                                # a state dict of another network
        raise DataError(f"{flag} {path!r}: not torch-fidelity's Inception weights ({str(err).splitlines()[0]})") from None
    return path


def fidelity(samples, args, ref):
    """FID / IS of uint8 samples (N, 3, H, W) by torch-fidelity; ref: reference()'s (images, cache name)."""
    import torch_fidelity
    images, cache = ref or (None, None)                                     # FID: statistics cached by name
    kw = dict(input1=Images(samples), input2=images, input2_cache_name=cache, fid=args.fid, isc=args.is_,
              verbose=False, cuda=torch.cuda.is_available(), feature_extractor_weights_path=args.inception_weights)
    try:
        return torch_fidelity.calculate_metrics(**kw)
    except Exception as err:                                                # an unreadable --ref image, ...
        raise DataError(f"torch-fidelity failed ({str(err).splitlines()[0]}); offline, {INCEPTION}") from None


def frechet_distance(f1, f2):
    """Frechet distance between Gaussians fitted to two feature sets (N, D): the formula of FID."""
    from scipy import linalg
    mu1, mu2, s1, s2 = f1.mean(0), f2.mean(0), np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real))


def class_accuracy(classifier, images, labels):
    """The toy classifier's accuracy on images (N, C, H, W) asked to be labels (N,): (overall, {class: acc.})."""
    hit = (torch.cat([classifier(b) for b in images.split(256)]).argmax(1) == labels).float()   # (N,)
    return hit.mean().item(), {ToyShapes.classes[c]: hit[labels == c].mean().item() for c in labels.unique().tolist()}


@torch.no_grad()
def toy_scores(samples, labels, classifier):
    """Toy scores of samples (N, C, H, W): Frechet distance in toy-classifier features, class accuracy (overall
    and per class), colour spread (per-channel std against the data's)."""
    ref = torch.stack([ToyShapes()[i][0] for i in range(len(samples))])                  # the first N toy images
    feats = lambda x: torch.cat([classifier.body(b) for b in x.split(256)]).double().numpy()
    acc, per_class = class_accuracy(classifier, samples, labels)
    std = lambda x: x.transpose(0, 1).flatten(1).std(1)                     # (C,)
    return {"toy_fd": frechet_distance(feats(samples), feats(ref)), "class_acc": acc, "per_class": per_class,
            "colour_spread": (std(samples) / std(ref)).mean().item()}


@torch.no_grad()
def toy_recon_scores(model, classifier, n=500, batch=250):
    """Reconstructions D(f(E(x))) of toy images: (mean |mean colour of x - of D(f(E(x)))| over images and
    channels in 0-255 units, the toy classifier's class accuracy on them, the same per class)."""
    x = torch.stack([ToyShapes()[i][0] for i in range(n)]).to(next(model.parameters()).device)   # toy images 0..n-1
    rec = torch.cat([reconstruct(model, b) for b in x.split(batch)])        # Eq. 2
    acc, per_class = class_accuracy(classifier, rec.cpu().clamp(-1, 1), torch.arange(n) % 10)   # labels: i % 10
    return ((rec.mean((2, 3)) - x.mean((2, 3))).abs().mean() * 127.5).item(), acc, per_class


@script
def main(argv=None):
    """Labels are balanced over the chosen classes and grouped, so grid rows are classes. Under torchrun the
    batches are dealt round-robin and gathered on rank 0; batch i is seeded by (seed, i) on any world size."""
    p = parser(__doc__, dist=True)
    p.add_argument("--ckpt", required=True, help="a train.py checkpoint (last.pt)")
    p.add_argument("--steps", type=int_list, default="4", help="decoder passes; a list like 1,2,4 sweeps (rank 0 "
                   "holds every value's samples until it writes them)")
    p.add_argument("--num_samples", "--n", dest="n", type=COUNT, help="default: 8 per class, or 64")
    p.add_argument("--classes", type=int_list, default="all", help="'all' or a list like 3,5 (balanced over them)")
    p.add_argument("--cfg", type=number(1.0), default=1.0, help="CFG scale; 1 = off (ImageNet: 1.4 combo)")
    p.add_argument("--cfg_position", default="combo", choices=["pixel", "latent", "combo"])
    p.add_argument("--gamma", type=WEIGHT, default=0.0, help="Eq. 13 decay; 0 = fixed r = 1 (best)")
    p.add_argument("--noise", default="shared", choices=["shared", "independent"])
    p.add_argument("--alpha", type=ANGLE, default=None, help="noise angle, degrees (default: the training alpha)")
    p.add_argument("--seed", type=number(0, 2 ** 32 - 1, cast=int), default=0)
    p.add_argument("--batch_size", type=COUNT, default=64)
    p.add_argument("--out", help="grid PNG (default: <ckpt dir>/samples.png; a --steps sweep adds _<N>step)")
    p.add_argument("--per_step", action="store_true", help="also save a grid of every step's images")
    p.add_argument("--out_dir", default=None, help="also save each sample as a PNG here")
    p.add_argument("--npz", default=None, help="save samples as arr_0 (uint8 NHWC) + labels (ADM/DiT FID format)")
    p.add_argument("--fid", action="store_true", help="FID against the training set / --ref (torch-fidelity)")
    p.add_argument("--is", dest="is_", action="store_true", help="Inception Score (torch-fidelity)")
    p.add_argument("--ref", help="FID reference (default: the training set): an image folder tree (resized and cropped "
                   "as in training) or an ADM .npz batch (VIRTUAL_imagenet256_labeled.npz)")
    p.add_argument("--inception_weights", default=None, help="local Inception weights for torch-fidelity")
    p.add_argument("--raw_weights", action="store_true", help="the trained weights, not the EMA ones (train.py --ema)")
    p.add_argument("--toy_metrics", action="store_true", help="toy data: offline scores in a toy classifier's features")
    args = p.parse_args(argv)
    if min(args.steps or [0]) < 1:
        die(f"argument --steps: must be integers >= 1 like 1,2,4, got {','.join(map(str, args.steps or ['all']))}")
    root, ext = os.path.splitext(args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "samples.png"))
    if Image.registered_extensions().get(ext.lower()) not in Image.SAVE:
        die(f"argument --out: must be an image file name like grid.png, got {args.out!r}")
    if args.inception_weights and not os.path.isfile(args.inception_weights):   # before sampling, not after
        die(f"argument --inception_weights: no file {args.inception_weights!r}")
    world, rank, device = init_distributed(args.device, args.dist_timeout)
    model, train_args = load_model(args.ckpt, device, ema=not args.raw_weights)
    cfg = model.cfg
    if cfg.num_classes == 0 and (args.cfg != 1.0 or args.classes is not None):
        die("--cfg and --classes need a class-conditional model; this one is unconditional (use --cfg 1)")
    classes = list(range(cfg.num_classes)) if args.classes is None else args.classes
    if any(not 0 <= c < cfg.num_classes for c in classes):
        die(f"class ids must be in 0..{cfg.num_classes - 1}, got {','.join(map(str, classes))}")
    if args.toy_metrics and train_args["dataset"] != "toy":
        die("--toy_metrics is for models trained on the toy data")
    clf = args.toy_metrics and rank == 0 and toy_classifier(os.path.join(os.path.dirname(os.path.abspath(args.ckpt)),
                                                                         "toy_classifier_seed0.pt"))   # fail now
    ref = reference(args.ref, train_args, cfg.image_size) if args.fid and rank == 0 else None   # bad --ref: fail now
    if (args.fid or args.is_) and rank == 0:
        args.inception_weights = load_inception(args.inception_weights)     # no or bad weights: fail now too
    suffixes = {s: f"_{s}step" if len(args.steps) > 1 else "" for s in args.steps}   # a --steps sweep: a file each
    if rank == 0:                                                           # rank 0 writes: its folders, checked now
        check_writable(os.path.dirname(os.path.abspath(root)), "--out")
        for suffix in suffixes.values() if args.out_dir else []:
            check_writable(args.out_dir + suffix, "--out_dir")
        if args.npz:
            check_writable(os.path.dirname(os.path.abspath(args.npz)), "--npz")
    n = args.n or (8 * len(classes) if 0 < len(classes) <= 32 else 64)
    sigma = sigma_max(args.alpha if args.alpha is not None else train_args["alpha"])
    labels = torch.tensor([classes[i * len(classes) // n] for i in range(n)] if cfg.num_classes else [-1] * n)
    starts = range(0, n, args.batch_size)[rank::world]                      # this rank's batches
    results = []                                                            # rank 0: (steps, uint8 (n, C, H, W), first)
    for steps in args.steps:
        mine, first = [], None
        for i in progress(starts, desc=f"{steps} step(s)", leave=False, disable=rank > 0):
            g = torch.Generator(device).manual_seed(args.seed * 1_000_003 + i)
            y = labels[i:i + args.batch_size]                              # (b,); -1: unconditional
            e = torch.randn(len(y), cfg.grid, cfg.grid, cfg.latent_dim, generator=g, device=device)
            with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=device.startswith("cuda")):
                xs = generate(model, e, y.to(device) if cfg.num_classes else None, steps, sigma, args.gamma, args.cfg,
                              args.cfg_position, args.noise, generator=g)
            mine.append((i, ((xs[-1].float() * 0.5 + 0.5) * 255).round().clamp(0, 255).to(torch.uint8).cpu()))
            if i == 0:                                                      # each step's image, first 16 samples
                first = torch.stack([x[:16].float().cpu() for x in xs])   # (steps, 16, C, H, W)
        if world > 1:
            parts = [None] * world if rank == 0 else None
            dist.gather_object(mine, parts, dst=0)
            mine = sum(parts, []) if rank == 0 else []
        if rank == 0:
            results.append((steps, torch.cat([x for _, x in sorted(mine, key=lambda m: m[0])]), first))
    if dist.is_initialized():              # rank 0 writes and scores alone, with no rank waiting in a collective
        dist.destroy_process_group()
        if rank > 0:
            return
    time.sleep(POST_DELAY)
    if clf:
        err, acc, per_class = toy_recon_scores(model, clf)
        print(f"reconstructions: colour error {err:.1f} / 255 (mean colour per image and channel), class accuracy "
              f"{acc:.3f}\n  per class: " + ", ".join(f"{k} {v:.2f}" for k, v in per_class.items()))
    for steps, u8, first in results:
        suffix = suffixes[steps]
        by_class = cfg.num_classes and len(classes) <= 32 and n <= 512
        save_image(u8[:512] / 255, root + suffix + ext, nrow=max(1, n // len(classes)) if by_class else 16)
        print(f"wrote {root}{suffix}{ext} ({n} samples, {steps} step(s), cfg {args.cfg} {args.cfg_position})")
        if args.per_step:                                                   # rows = samples, columns = steps
            save_image(first.transpose(0, 1).flatten(0, 1) * 0.5 + 0.5, f"{root}{suffix}_per_step{ext}", nrow=steps)
            print(f"wrote {root}{suffix}_per_step{ext} (rows: {first.shape[1]} samples, columns: steps 1..{steps})")
        if args.out_dir:
            for j, x in enumerate(u8):
                save_image(x / 255, os.path.join(args.out_dir + suffix, f"{j:06d}.png"))
        if args.npz:
            path = args.npz.removesuffix(".npz") + suffix + ".npz"
            save_checkpoint(dict(arr_0=u8.permute(0, 2, 3, 1).numpy(), labels=labels.numpy()), path,   # atomic
                            write=lambda arrays, f: np.savez(f, **arrays), what="npz")
            print(f"wrote {path}: arr_0 {tuple(u8.shape[i] for i in (0, 2, 3, 1))} uint8 NHWC")
        if clf:
            m = toy_scores(u8 / 255 * 2 - 1, labels, clf)
            print(f"steps {steps}: toy_fd {m['toy_fd']:.3f} (lower is better), class accuracy {m['class_acc']:.3f}, "
                  f"colour spread {m['colour_spread']:.2f} (data: 1)")
            print("  per class: " + ", ".join(f"{k} {v:.2f}" for k, v in m["per_class"].items()))
        if args.fid or args.is_:                                            # a DataError ends with exit 2
            metrics = fidelity(u8, args, ref)
            print(f"steps {steps}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))


if __name__ == "__main__":
    main()
