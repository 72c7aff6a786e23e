"""Generate images with a trained Sphere Encoder (arXiv 2602.15030): Alg. 1 / Sec. 2.4, Eq. 13 noise
schedule, classifier-free guidance (App. C.1). Step 1 decodes D(f(e)), later steps re-encode and re-noise.
    python sample.py --ckpt out/toy/last.pt --steps 4
    torchrun --nproc_per_node=8 sample.py --ckpt x.pt --num_samples 50000 --npz samples.npz  # sharded
    torchrun --nproc_per_node=8 sample.py --ckpt x.pt --num_samples 50000 --fid --rfid --is --prc --inception_weights W
FID, rFID, IS, precision/recall: every rank extracts Inception features of its own samples, reconstructions and
share of the reference; rank 0 gathers them and scores (the reference's statistics are cached in --fid_cache).
"""
import hashlib
import json
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
from data import (ANGLE, COUNT, WEIGHT, DataError, ToyShapes, build_dataset, default_workers, die, int_list, number,
                  parser, print0, progress, resize_crop, script, subset, toy_classifier)
from parallel import init_distributed
from spherify import generate, reconstruct, sigma_max

POST_DELAY = float(os.environ.get("SPHERE_POST_DELAY", 0))   # tests: rank 0's writing outlasts --dist_timeout


class Images(torch.utils.data.Dataset):
    """Inception's input, uint8 (3, H, W): from uint8 (N, 3, H, W) or a training set ((x in [-1, 1], y) items,
    rounded: the data's own 8-bit values)."""
    def __init__(self, items): self.items = items
    def __len__(self): return len(self.items)

    def __getitem__(self, i):
        x = self.items[i]
        x = x[0] if isinstance(x, tuple) else x
        return x if x.dtype == torch.uint8 else (x * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)


def to_uint8(x):
    """Generated images in [-1, 1] -> uint8 as the release and ADM save them: floor(127.5 (x + 1)), not rounded."""
    return (x.float() * 127.5 + 127.5).clamp(0, 255).to(torch.uint8)       # to(uint8) truncates: floor for x >= 0


def cache_name(kind, path, image_size, count):
    """The reference statistics' cache key, from what they are computed from: two trees never share one."""
    where = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:10] if path else "builtin"
    return f"sphere-{kind}-{where}-{image_size}px-{count}"


def reference(ref, train_args, size, count=50_000):
    """FID reference as (uint8 images (3, size, size) or None, statistics {mu, sigma} or None, cache name): --ref, an
    ADM .npz batch (arr_0, uint8 NHWC), a statistics .npz (mu, sigma: the release's fid_stats_*.npz) or an image
    folder tree (any depth and sizes; resized and center-cropped as in training); else `count` training images
    drawn at random with seed 0 (the paper's 50K; all of them if the set is smaller)."""
    if ref is None:
        ds, _ = build_dataset(train_args["dataset"], train_args.get("data_dir"), size)
        if len(ds) > count:                                                 # the draw of train.py --max_samples
            ds = torch.utils.data.Subset(ds, sorted(subset(len(ds), count)))
        return Images(ds), None, cache_name(train_args["dataset"], train_args.get("data_dir"), size, len(ds))
    if os.path.isdir(ref):
        from torch_fidelity.datasets import ImagesPathDataset                  # reads a list of files as RGB
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(ref, followlinks=True) for f in fs
                       if f.lower().endswith(IMG_EXTENSIONS))
        ds = ImagesPathDataset(files, T.Compose([*resize_crop(size), T.PILToTensor()]))   # as training, uint8
    elif ref.endswith(".npz") and os.path.isfile(ref):
        try:
            with np.load(ref) as f:                                         # mu, sigma: the model card's reference
                is_stats = {"mu", "sigma"} <= set(f.files)
                stats = {k: f[k].astype(np.float64) for k in ("mu", "sigma")} if is_stats else None
                x = None if stats else f["arr_0"]
        except Exception as err:                                            # no arr_0, not a zip, truncated, ...
            raise DataError(f"--ref {ref!r} is not an ADM reference batch ({str(err).splitlines()[0]})") from None
        if stats is not None:
            if stats["mu"].shape != (2048,) or stats["sigma"].shape != (2048, 2048):
                raise DataError(f"--ref {ref!r}: mu {stats['mu'].shape}, sigma {stats['sigma'].shape}; Inception's "
                                f"pool features need (2048,) and (2048, 2048)")
            return None, stats, None
        if x.dtype != np.uint8 or x.shape[1:] != (size, size, 3):
            raise DataError(f"--ref {ref!r}: arr_0 is {x.dtype} {x.shape}; this model's are uint8 "
                            f"(N, {size}, {size}, 3)")
        ds = Images(torch.from_numpy(x).permute(0, 3, 1, 2))               # (N, 3, S, S)
    else:
        raise DataError(f"--ref {ref!r} is neither an image folder nor an .npz reference batch (arr_0 uint8 NHWC) "
                        f"or statistics (mu, sigma)")
    if len(ds) == 0:
        raise DataError(f"--ref {ref!r} holds no images")
    return ds, None, cache_name("ref", ref, size, len(ds))


INCEPTION = ("put torch-fidelity's Inception weights weights-inception-2015-12-05-6726825d.pth somewhere and pass "
             "--inception_weights PATH")
FEATURES = {"2048": 2048, "logits_unbiased": 1008}       # Inception's pool features (FID, PRC), logits (IS): widths


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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
    if not (sha := sha256(path)).startswith(official):
        print0(f"warning: {path} is not the official Inception weights (SHA-256 {sha[:8]}..., the official file's "
               f"begins {official}): FID/IS are not comparable with published numbers")
    try:
        create_feature_extractor("inception-v3-compat", ["2048"], cuda=False, verbose=False,
                                 feature_extractor_weights_path=path)
    except Exception as err:                                                # a state dict of another network
        raise DataError(f"{flag} {path!r}: not torch-fidelity's Inception weights "
                        f"({str(err).splitlines()[0]})") from None
    return path


def inception(args, device):
    """torch-fidelity's Inception on this rank's device, of the weights load_inception checked on this rank."""
    from torch_fidelity.utils import create_feature_extractor
    return create_feature_extractor("inception-v3-compat", list(FEATURES), cuda=False, verbose=False,
                                    feature_extractor_weights_path=args.inception_weights).to(device)


@torch.inference_mode()
def features(images, net, device, rank, world, desc, batch_size=64, model=None):
    """Inception features {name: (n, width)} of this rank's contiguous share of images (uint8 (3, H, W) items),
    with a progress bar (rank 0's share); model: of its reconstructions D(f(E(x))) (Eq. 2) instead."""
    lo, hi = rank * len(images) // world, (rank + 1) * len(images) // world
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(images, range(lo, hi)), batch_size,
                                         num_workers=default_workers(4))
    out = {k: [torch.empty(0, d)] for k, d in FEATURES.items()}
    with progress(total=hi - lo, desc=desc, unit="img", disable=rank > 0) as bar:
        try:
            for x in loader:
                x = x.to(device)
                if model is not None:
                    with torch.autocast("cuda", torch.bfloat16, enabled=device.startswith("cuda")):
                        x = to_uint8(reconstruct(model, x.float() / 127.5 - 1))
                for k, f in zip(FEATURES, net(x)):
                    out[k].append(f.float().cpu())
                bar.update(len(x))
        except Exception as err:                                            # an unreadable reference image, ...
            raise DataError(f"{desc}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    return {k: torch.cat(v) for k, v in out.items()}


def gather(obj, world):
    """Every rank's obj, on rank 0 as a list in rank order (other ranks: None)."""
    if world == 1:
        return [obj]
    parts = [None] * world if dist.get_rank() == 0 else None
    dist.gather_object(obj, parts, dst=0)
    return parts


def share(obj):
    """Rank 0's obj on every rank."""
    if dist.is_initialized():
        dist.broadcast_object_list(box := [obj], src=0)
        return box[0]
    return obj


def statistics(f):
    """FID's Gaussian of pool features (N, 2048): {mu, sigma} in float64."""
    f = f.double().numpy()
    return {"mu": f.mean(0), "sigma": np.cov(f, rowvar=False)}


def fid(stats, ref):
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    return fid_statistics_to_metric(stats, ref, verbose=False)["frechet_inception_distance"]


def scores(f, ref, args, rfid=None):
    """The metrics of one set of samples' features f: gFID, rFID (given), IS, precision and recall (torch-fidelity's
    metric functions; PRC of Inception pool features, k = 3, as ADM's evaluator)."""
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric
    out = {"gFID": fid(statistics(f["2048"]), ref)} if args.fid else {}
    if rfid is not None:
        out["rFID"] = rfid
    if args.is_:
        out["IS"], out["IS_std"] = isc_features_to_metric(f["logits_unbiased"]).values()
    if args.prc:
        m = prc_features_to_metric(f["2048"], torch.from_numpy(ref["f2048"]), save_cpu_ram=True, verbose=False)
        out["precision"], out["recall"] = m["precision"], m["recall"]
    return out


def reference_statistics(images, net, args, device, rank, world, cache):
    """Rank 0: the reference's {mu, sigma, f2048 (--prc)}, read from the cache file when it holds them, else
    extracted by every rank (its share), gathered and cached; other ranks: None."""
    hit = None
    if rank == 0 and os.path.isfile(cache):
        try:
            with np.load(cache) as f:
                hit = {k: f[k] for k in f.files} if "f2048" in f.files or not args.prc else None
        except Exception as err:                                            # unreadable: extracted again
            print(f"warning: {cache} unreadable ({str(err).splitlines()[0]}): extracting the reference again")
    if share(hit is not None):
        print0(f"reference statistics: read {cache}")
        return hit
    parts = gather(features(images, net, device, rank, world, "reference features", args.batch_size)["2048"], world)
    if rank > 0:
        return None
    f = torch.cat(parts)
    stats = {**statistics(f), **({"f2048": f.numpy()} if args.prc else {})}
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    save_checkpoint(stats, cache, write=lambda arrays, fh: np.savez(fh, **arrays), what="statistics")
    print(f"reference statistics of {len(f)} images: wrote {cache}", flush=True)
    return stats


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
    ref = ToyShapes().images(range(len(samples)))                                      # the first N toy images
    feats = lambda x: torch.cat([classifier.body(b) for b in x.split(256)]).double().numpy()
    acc, per_class = class_accuracy(classifier, samples, labels)
    std = lambda x: x.transpose(0, 1).flatten(1).std(1)                     # (C,)
    return {"toy_fd": frechet_distance(feats(samples), feats(ref)), "class_acc": acc, "per_class": per_class,
            "colour_spread": (std(samples) / std(ref)).mean().item()}


@torch.no_grad()
def toy_recon_scores(model, classifier, n=500, batch=250):
    """Reconstructions D(f(E(x))) of toy images: (mean |mean colour of x - of D(f(E(x)))| over images and
    channels in 0-255 units, the toy classifier's class accuracy on them, the same per class)."""
    x = ToyShapes().images(range(n)).to(next(model.parameters()).device)   # toy images 0..n-1
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
    p.add_argument("--cfg", type=lambda t: [number(1.0)(v) for v in t.split(",")], default=[1.0],
                   help="CFG scale; 1 = off (ImageNet: 1.4 combo); a list like 1,1.4,1.6 sweeps (Tab. 9)")
    p.add_argument("--cfg_position", default="combo", choices=["pixel", "latent", "combo"])
    p.add_argument("--gamma", type=WEIGHT, default=0.0, help="Eq. 13 decay; 0 = fixed r = 1 (best)")
    p.add_argument("--noise", default=None, choices=["shared", "independent"],
                   help="re-encoding noise e' (default: shared; Flowers: independent, as the model card evaluates)")
    p.add_argument("--alpha", type=ANGLE, default=None, help="noise angle, degrees (default: the training alpha)")
    p.add_argument("--seed", type=number(0, 2 ** 32 - 1, cast=int), default=0)
    p.add_argument("--batch_size", type=COUNT, default=64)
    p.add_argument("--out", help="grid PNG (default: <ckpt dir>/samples.png; a --steps sweep adds _<N>step, a --cfg "
                   "sweep _cfg<S>); with metrics also <out>_metrics.json")
    p.add_argument("--per_step", action="store_true", help="also save a grid of every step's images")
    p.add_argument("--out_dir", default=None, help="also save each sample as a PNG here")
    p.add_argument("--npz", default=None, help="save samples as arr_0 (uint8 NHWC) + labels (ADM/DiT FID format)")
    p.add_argument("--fid", action="store_true", help="gFID of the samples against the reference")
    p.add_argument("--rfid", action="store_true", help="rFID: the reference's (or, with statistics as --ref, "
                   "--ref_count training images') reconstructions D(f(E(x))) against the reference")
    p.add_argument("--is", dest="is_", action="store_true", help="Inception Score")
    p.add_argument("--prc", action="store_true", help="precision and recall (Kynkaanniemi et al. 2019; k = 3)")
    p.add_argument("--ref", help="reference (default: --ref_count training images): an image folder tree (resized and "
                   "cropped as in training), an ADM .npz batch (VIRTUAL_imagenet256_labeled.npz) or a statistics .npz "
                   "(mu, sigma: the release's fid_stats_*.npz)")
    p.add_argument("--ref_count", type=COUNT, default=50_000, help="training images drawn (seed 0) as the reference")
    p.add_argument("--fid_cache", default=os.path.join(os.path.expanduser("~"), ".cache", "sphere-encoder"),
                   help="folder of the reference's cached statistics")
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
    if cfg.num_classes == 0 and (any(c != 1 for c in args.cfg) or args.classes is not None):
        die("--cfg and --classes need a class-conditional model; this one is unconditional (use --cfg 1)")
    classes = list(range(cfg.num_classes)) if args.classes is None else args.classes
    if any(not 0 <= c < cfg.num_classes for c in classes):
        die(f"class ids must be in 0..{cfg.num_classes - 1}, got {','.join(map(str, classes))}")
    if args.toy_metrics and train_args["dataset"] != "toy":
        die("--toy_metrics is for models trained on the toy data")
    if args.noise is None:                                                  # the model card's --cache_sampling_noise
        args.noise = "independent" if train_args["dataset"] == "flowers" else "shared"
        if args.noise == "independent":
            print0("flowers: a fresh noise e' at every step (--noise independent, as the model card evaluates Flowers)")
    clf = args.toy_metrics and rank == 0 and toy_classifier(os.path.join(os.path.dirname(os.path.abspath(args.ckpt)),
                                                                         "toy_classifier_seed0.pt"))   # fail now
    scored, ref = args.fid or args.rfid or args.is_ or args.prc, None
    if args.fid or args.rfid or args.prc:                                   # every rank: its share; bad --ref: fail now
        ref_images, ref, key = reference(args.ref, train_args, cfg.image_size, args.ref_count)
        if args.prc and ref_images is None:
            die(f"--prc needs reference images (their features), not statistics: --ref {args.ref!r} holds mu, sigma")
        recon_images = ref_images if ref_images is not None or not args.rfid else \
            reference(None, train_args, cfg.image_size, args.ref_count)[0]
    if scored:                                                              # no or bad weights: fail now too
        if rank == 0:
            args.inception_weights = load_inception(args.inception_weights)
        checked = share(args.inception_weights)                             # each rank reads the file as data first
        if rank > 0:
            args.inception_weights = load_inception(checked)
        net = inception(args, device)
    runs = [(c, s) for c in args.cfg for s in args.steps]
    suffixes = {(c, s): (f"_cfg{c:g}" if len(args.cfg) > 1 else "") + (f"_{s}step" if len(args.steps) > 1 else "")
                for c, s in runs}                                           # a sweep: a file each
    if rank == 0:                                                           # rank 0 writes: its folders, checked now
        check_writable(os.path.dirname(os.path.abspath(root)), "--out")
        for suffix in suffixes.values() if args.out_dir else []:
            check_writable(args.out_dir + suffix, "--out_dir")
        if args.npz:
            check_writable(os.path.dirname(os.path.abspath(args.npz)), "--npz")
    if (args.fid or args.rfid or args.prc) and ref is None:                 # the reference, extracted or cached
        cache = os.path.join(args.fid_cache, f"{key}-inception{sha256(args.inception_weights)[:8]}.npz")
        ref = reference_statistics(ref_images, net, args, device, rank, world, cache)
    if args.rfid:                                                           # Eq. 2, this rank's share of the images
        rec = gather(features(recon_images, net, device, rank, world, "reconstructions", args.batch_size, model), world)
        rfid = rank == 0 and fid(statistics(torch.cat([r["2048"] for r in rec])), ref)
    n = args.n or (8 * len(classes) if 0 < len(classes) <= 32 else 64)
    sigma = sigma_max(args.alpha if args.alpha is not None else train_args["alpha"])
    labels = torch.tensor([classes[i * len(classes) // n] for i in range(n)] if cfg.num_classes else [-1] * n)
    starts = range(0, n, args.batch_size)[rank::world]                      # this rank's batches
    results = []                                                  # rank 0: (cfg, steps, uint8 (n, C, H, W), first, f)
    for scale, steps in runs:
        mine, first = [], None
        desc = f"cfg {scale:g}, {steps} step(s)" + (", Inception" if scored else "")
        with progress(total=sum(len(labels[i:i + args.batch_size]) for i in starts), unit="img", leave=False,
                      desc=desc, disable=rank > 0) as bar:
            for i in starts:
                g = torch.Generator(device).manual_seed(args.seed * 1_000_003 + i)
                y = labels[i:i + args.batch_size]                          # (b,); -1: unconditional
                e = torch.randn(len(y), cfg.grid, cfg.grid, cfg.latent_dim, generator=g, device=device)
                with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=device.startswith("cuda")):
                    xs = generate(model, e, y.to(device) if cfg.num_classes else None, steps, sigma, args.gamma,
                                  scale, args.cfg_position, args.noise, generator=g)
                u8 = to_uint8(xs[-1])                                       # Inception in fp32, as the reference
                with torch.inference_mode():
                    f = dict(zip(FEATURES, (t.float().cpu() for t in net(u8)))) if scored else {}
                mine.append((i, u8.cpu(), f))
                if i == 0:                                                  # each step's image, first 16 samples
                    first = torch.stack([x[:16].float().cpu() for x in xs])   # (steps, 16, C, H, W)
                bar.update(len(y))
        parts = gather(mine, world)
        if rank == 0:
            mine = sorted(sum(parts, []), key=lambda m: m[0])
            results.append((scale, steps, torch.cat([m[1] for m in mine]), first,
                            {k: torch.cat([m[2][k] for m in mine]) for k in FEATURES} if scored else None))
    if dist.is_initialized():              # rank 0 writes and scores alone, with no rank waiting in a collective
        dist.destroy_process_group()
        if rank > 0:
            return
    time.sleep(POST_DELAY)
    if clf:
        err, acc, per_class = toy_recon_scores(model, clf)
        print(f"reconstructions: colour error {err:.1f} / 255 (mean colour per image and channel), class accuracy "
              f"{acc:.3f}\n  per class: " + ", ".join(f"{k} {v:.2f}" for k, v in per_class.items()))
    table = []
    for scale, steps, u8, first, f in results:
        suffix = suffixes[scale, steps]
        by_class = cfg.num_classes and len(classes) <= 32 and n <= 512
        save_image(u8[:512] / 255, root + suffix + ext, nrow=max(1, n // len(classes)) if by_class else 16)
        print(f"wrote {root}{suffix}{ext} ({n} samples, {steps} step(s), cfg {scale} {args.cfg_position})")
        if args.per_step:                                                   # rows = samples, columns = steps
            save_image(first.transpose(0, 1).flatten(0, 1) * 0.5 + 0.5, f"{root}{suffix}_per_step{ext}", nrow=steps)
            print(f"wrote {root}{suffix}_per_step{ext} (rows: {first.shape[1]} samples, columns: steps 1..{steps})")
        if args.out_dir:
            for j, x in enumerate(u8):
                save_image(x / 255, os.path.join(args.out_dir + suffix, f"{j:06d}.png"))
        if args.npz:
            path = args.npz.removesuffix(".npz") + suffix + ".npz"
            save_checkpoint(dict(arr_0=u8.permute(0, 2, 3, 1).numpy(), labels=labels.numpy()), path,   # atomic
                            write=lambda arrays, fh: np.savez(fh, **arrays), what="npz")
            print(f"wrote {path}: arr_0 {tuple(u8.shape[i] for i in (0, 2, 3, 1))} uint8 NHWC")
        if clf:
            m = toy_scores(u8 / 255 * 2 - 1, labels, clf)
            print(f"steps {steps}: toy_fd {m['toy_fd']:.3f} (lower is better), class accuracy {m['class_acc']:.3f}, "
                  f"colour spread {m['colour_spread']:.2f} (data: 1)")
            print("  per class: " + ", ".join(f"{k} {v:.2f}" for k, v in m["per_class"].items()))
        if scored:
            table.append({"cfg": scale, "steps": steps, **scores(f, ref, args, rfid if args.rfid else None)})
    if table:                                                               # the summary, and a JSON file of it
        cols = list(table[0])
        print("  ".join(f"{c:>9}" for c in cols))
        for row in table:
            print("  ".join(f"{v:>9.4g}" for v in row.values()))
        path = root + "_metrics.json"
        save_checkpoint({"samples": n, "reference": args.ref or f"{train_args['dataset']} x {args.ref_count}",
                         "rows": table}, path, write=lambda obj, fh: fh.write(json.dumps(obj, indent=1).encode()),
                        what="metrics")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
