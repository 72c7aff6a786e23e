"""Evaluation as the paper reports it (Sec. 3): gFID, rFID, Inception Score, precision and recall
against a reference of 50K training images, in torch-fidelity's Inception features; and, offline,
the toy judge: a small classifier's features for a toy-FD, class accuracy and colour spread (no
download; ablate.py's metric). FID is the Frechet distance of Gaussians fitted to features, with
scipy's sqrtm as in ADM's evaluator (without its offset for a singular product: that gives nan).
    # the reference: x.pt's training images
    python evaluate.py samples.npz --ckpt x.pt --fid --is --prc
    # the reference: an ADM reference batch
    python evaluate.py samples.npz --ref VIRTUAL_imagenet256_labeled.npz --fid --inception_weights W
sample.py --fid ... calls it; under torchrun every rank extracts the features of its share and
rank 0 scores.
"""
import hashlib
import os
import sys

import numpy as np
import torch
from torchvision import transforms as T

from checkpoint import load_model, read_checkpoint, save_json, save_npz
from cli import COUNT, DataError, die, parser, print0, progress, script
from data import ToyShapes, build_dataset, default_workers, hidden, resize_crop, subset
from parallel import autocast, gather, init_distributed, share
from spherify import reconstruct

INCEPTION = ("put torch-fidelity's Inception weights weights-inception-2015-12-05-6726825d.pth "
             "somewhere and pass --inception_weights PATH")
# Below this many samples or reference images, FID is mostly the estimator's bias.
FEW = 10_000
# The widths of Inception's features: pool features (FID, PRC) and logits (IS).
FEATURES = {"2048": 2048, "logits_unbiased": 1008}


class Images(torch.utils.data.Dataset):
    """Inception's input, uint8 (3, H, W): from uint8 (N, 3, H, W) or a training set
    ((x in [-1, 1], y) items, rounded: the data's own 8-bit values)."""
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        x = self.items[i]
        x = x[0] if isinstance(x, tuple) else x
        if x.dtype == torch.uint8:
            return x
        return (x * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)


def to_uint8(x):
    """Generated images in [-1, 1] -> uint8 as the release and ADM save them:
    floor(127.5 (x + 1))."""
    # to(uint8) truncates, which on the clamped, non-negative values is the floor.
    return (x.float() * 127.5 + 127.5).clamp(0, 255).to(torch.uint8)


# --- the reference: training images, an image tree, an ADM batch, or statistics

def cache_name(kind, path, image_size, count):
    """The reference statistics' cache key, from what they are computed from: two trees never
    share one."""
    where = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:10] if path else "builtin"
    return f"sphere-{kind}-{where}-{image_size}px-{count}"


def training_images(train_args, size, count=50_000):
    """`count` training images drawn at random with seed 0 (the paper's 50K; all if fewer):
    (Images, cache name)."""
    ds, _ = build_dataset(train_args["dataset"], train_args.get("data_dir"), size)
    # The same draw as train.py --max_samples.
    if len(ds) > count:
        ds = torch.utils.data.Subset(ds, sorted(subset(len(ds), count)))
    return Images(ds), cache_name(train_args["dataset"], train_args.get("data_dir"), size, len(ds))


def read_stats(ref):
    """An .npz reference: its statistics {mu, sigma} (the release's fid_stats_*.npz), else None and
    its images arr_0 (an ADM batch, uint8 NHWC)."""
    try:
        with np.load(ref) as f:
            if {"mu", "sigma"} <= set(f.files):
                stats = {k: f[k].astype(np.float64) for k in ("mu", "sigma")}
            else:
                return None, f["arr_0"]
    except Exception as err:
        # No arr_0, not a zip, or a truncated file.
        raise DataError(f"--ref {ref!r} is not an ADM reference batch ({str(err).splitlines()[0]})") from None
    if stats["mu"].shape != (2048,) or stats["sigma"].shape != (2048, 2048):
        raise DataError(f"--ref {ref!r}: mu {stats['mu'].shape}, sigma {stats['sigma'].shape}; "
                        f"Inception's pool features need (2048,) and (2048, 2048)")
    return stats, None


def reference(ref, train_args, size, count=50_000):
    """The FID reference as (uint8 images (3, size, size) or None, statistics {mu, sigma} or None,
    cache name). ref: an image folder tree (any depth and sizes, hidden entries skipped; resized
    and center-cropped as in training), an ADM .npz batch or a statistics .npz; None:
    training_images."""
    from torchvision.datasets.folder import IMG_EXTENSIONS
    if ref is None:
        images, name = training_images(train_args, size, count)
        return images, None, name
    if os.path.isdir(ref):
        # torch-fidelity's dataset that reads a list of files as RGB.
        from torch_fidelity.datasets import ImagesPathDataset
        files = []
        for top, dirs, names in os.walk(ref, followlinks=True):
            # Prune the hidden folders in place, so that os.walk does not descend into them.
            dirs[:] = [d for d in dirs if not hidden(d)]
            for name in names:
                if name.lower().endswith(IMG_EXTENSIONS) and not hidden(name):
                    files.append(os.path.join(top, name))
        to_tensor = T.Compose([*resize_crop(size), T.PILToTensor()])       # uint8
        ds = ImagesPathDataset(sorted(files), to_tensor)
    elif ref.endswith(".npz") and os.path.isfile(ref):
        stats, x = read_stats(ref)
        if stats is not None:
            return None, stats, None
        if x.dtype != np.uint8 or x.shape[1:] != (size, size, 3):
            raise DataError(f"--ref {ref!r}: arr_0 is {x.dtype} {x.shape}; this model's are uint8 "
                            f"(N, {size}, {size}, 3)")
        ds = Images(torch.from_numpy(x).permute(0, 3, 1, 2))               # (N, 3, S, S)
    else:
        raise DataError(f"--ref {ref!r} is neither an image folder nor an .npz reference batch "
                        f"(arr_0 uint8 NHWC) or statistics (mu, sigma)")
    if len(ds) == 0:
        raise DataError(f"--ref {ref!r} holds no images")
    return ds, None, cache_name("ref", ref, size, len(ds))


# --- Inception: the weights, checked before anything is sampled; features of a rank's share

def sha256(path):
    """A file's SHA-256, read in chunks (hashlib.file_digest needs Python 3.11)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_inception(weights):
    """The Inception weights file for torch-fidelity (--inception_weights, else torch hub's cached
    download), checked before sampling (offline fails now) and read as data first: torch-fidelity's
    own torch.load would run any code pickled in it. A file unlike the official one (SHA-256
    6726825d...) is warned about. -> the path to use."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3 as url
    from torch_fidelity.utils import create_feature_extractor
    # The hash at the end of the file's name: 6726825d.
    official = url.rsplit("-", 1)[1].split(".")[0]
    flag = "--inception_weights"
    # Without --inception_weights: the file in torch hub's cache.
    path = weights or os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    if not os.path.isfile(path):
        # The download torch-fidelity would make, but hash-checked (its own is not).
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.hub.download_url_to_file(url, path, hash_prefix=official, progress=False)
        except Exception as err:
            # Offline, or a wrong hash.
            raise DataError(f"FID/IS need the Inception weights ({str(err).splitlines()[0]}): {INCEPTION}") from None
    try:
        # Read with weights_only: a pickled object is refused.
        read_checkpoint(path)
    except DataError as err:
        raise DataError(f"{flag if weights else 'the cached Inception weights'}: {err}") from None
    if not (sha := sha256(path)).startswith(official):
        print0(f"warning: {path} is not the official Inception weights (SHA-256 {sha[:8]}..., "
               f"the official file's begins {official}): FID/IS are not comparable with "
               f"published numbers")
    try:
        create_feature_extractor("inception-v3-compat", ["2048"], cuda=False, verbose=False,
                                 feature_extractor_weights_path=path)
    except Exception as err:
        # For example, a state dict of another network.
        raise DataError(f"{flag} {path!r}: not torch-fidelity's Inception weights "
                        f"({str(err).splitlines()[0]})") from None
    return path


def inception(args, device):
    """torch-fidelity's Inception on this rank's device, of the weights load_inception checked on
    this rank."""
    from torch_fidelity.utils import create_feature_extractor
    net = create_feature_extractor("inception-v3-compat", list(FEATURES), cuda=False,
                                   verbose=False,
                                   feature_extractor_weights_path=args.inception_weights)
    return net.to(device)


@torch.inference_mode()
def features(images, net, device, rank, world, desc, batch_size=64, model=None):
    """Inception features {name: (n, width)} of this rank's contiguous share of images (uint8
    (3, H, W) items), with a progress bar (rank 0's share); model: of its reconstructions
    D(f(E(x))) (Eq. 2) instead."""
    lo, hi = rank * len(images) // world, (rank + 1) * len(images) // world
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(images, range(lo, hi)),
                                         batch_size, num_workers=default_workers(4))
    out = {k: [torch.empty(0, d)] for k, d in FEATURES.items()}
    with progress(total=hi - lo, desc=desc, unit="img", disable=rank > 0) as bar:
        try:
            for x in loader:
                x = x.to(device)
                if model is not None:
                    with autocast(device):
                        x = to_uint8(reconstruct(model, x.float() / 127.5 - 1))   # Eq. 2
                for k, f in zip(FEATURES, net(x)):
                    out[k].append(f.float().cpu())
                bar.update(len(x))
        except Exception as err:
            # For example, an unreadable reference image.
            why = str(err).splitlines()[0] if str(err) else ""
            raise DataError(f"{desc}: {type(err).__name__}: {why}") from None
    return {k: torch.cat(v) for k, v in out.items()}


# --- the metrics

def statistics(f):
    """FID's Gaussian of features (N, D): {mu, sigma} in float64."""
    f = f.double().numpy() if torch.is_tensor(f) else np.asarray(f, dtype=np.float64)
    return {"mu": f.mean(0), "sigma": np.cov(f, rowvar=False)}


def fid(stats, ref):
    """The Frechet distance between two Gaussians {mu, sigma}:
    |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2)."""
    from scipy import linalg
    # The mean term |mu1 - mu2|^2.
    mean = ((stats["mu"] - ref["mu"]) ** 2).sum()
    # The trace term tr(S1 + S2 - 2 (S1 S2)^1/2). Through numerical error sqrtm can return a
    # complex matrix; its real part is kept.
    covmean = linalg.sqrtm(stats["sigma"] @ ref["sigma"]).real
    trace = np.trace(stats["sigma"] + ref["sigma"] - 2 * covmean)
    return float(mean + trace)


def frechet_distance(f1, f2):
    """fid of Gaussians fitted to two feature sets (N, D)."""
    return fid(statistics(f1), statistics(f2))


def scores(f, ref, which, rfid=None):
    """The metrics of one set of samples' features f: gFID, rFID (given), IS, precision and recall
    (torch-fidelity's; PRC of Inception pool features, k = 3, as ADM's evaluator).
    which: {fid, is, prc}."""
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric
    out = {"gFID": fid(statistics(f["2048"]), ref)} if "fid" in which else {}
    if rfid is not None:
        out["rFID"] = rfid
    if "is" in which:
        out["IS"], out["IS_std"] = isc_features_to_metric(f["logits_unbiased"]).values()
    if "prc" in which:
        m = prc_features_to_metric(f["2048"], torch.from_numpy(ref["f2048"]), save_cpu_ram=True, verbose=False)
        out["precision"], out["recall"] = m["precision"], m["recall"]
    return out


def reference_statistics(images, net, prc, device, rank, world, cache, batch_size=64):
    """Rank 0: the reference's {mu, sigma, f2048 (prc)}, read from the cache file when it holds
    them, else extracted by every rank (its share), gathered and cached; other ranks: None."""
    hit = None
    if rank == 0 and os.path.isfile(cache):
        try:
            with np.load(cache) as f:
                hit = {k: f[k] for k in f.files} if "f2048" in f.files or not prc else None
        except Exception as err:
            # An unreadable cache: the reference's features are extracted again.
            print(f"warning: {cache} unreadable ({str(err).splitlines()[0]}): extracting the reference again")
    if share(hit is not None):
        print0(f"reference statistics: read {cache}")
        return hit
    parts = gather(features(images, net, device, rank, world, "reference features", batch_size)["2048"], world)
    if rank > 0:
        return None
    f = torch.cat(parts)
    stats = {**statistics(f), **({"f2048": f.numpy()} if prc else {})}
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    save_npz(stats, cache, what="statistics")
    print(f"reference statistics of {len(f)} images: wrote {cache}", flush=True)
    return stats


class Evaluation:
    """sample.py's --fid, --rfid, --is, --prc: set up before sampling, so that bad weights or a bad
    --ref fail before any image is drawn. Every rank: the Inception network (self.net) and its
    share of the reference; rank 0: the reference's statistics (self.ref) and the rFID of its
    reconstructions."""
    def __init__(self, args, train_args, size, device, rank, world):
        # The flag --is is stored as args.is_, since "is" is a Python keyword.
        self.which = {k for k in ("fid", "rfid", "is", "prc") if getattr(args, "is_" if k == "is" else k)}
        self.args, self.device, self.rank, self.world = args, device, rank, world
        self.ref, self.rfid, self.warned = None, None, False
        self.images, self.recon_images = None, None
        # The reference is read now, so that a bad --ref fails before sampling.
        if self.which & {"fid", "rfid", "prc"}:
            self.images, self.ref, self.key = reference(args.ref, train_args, size, args.ref_count)
            if "prc" in self.which and self.images is None:
                raise DataError(f"--prc needs reference images (their features), not statistics: "
                                f"--ref {args.ref!r} holds mu, sigma")
            self.recon_images = self.images
            # Statistics as the reference have no images to reconstruct: rFID of training images.
            if "rfid" in self.which and self.images is None:
                self.recon_images = training_images(train_args, size, args.ref_count)[0]
        # Inception: rank 0 checks (and downloads) the weights, then every rank reads the
        # file as data.
        if rank == 0:
            args.inception_weights = load_inception(args.inception_weights)
        checked = share(args.inception_weights)
        if rank > 0:
            args.inception_weights = load_inception(checked)
        self.net = inception(args, device)

    def prepare(self, model):
        """The reference's statistics (extracted or read from --fid_cache) and rFID, before
        sampling."""
        args, net, dev, rank, world = self.args, self.net, self.device, self.rank, self.world
        if self.which & {"fid", "rfid", "prc"} and self.ref is None:
            weights = sha256(args.inception_weights)[:8]
            cache = os.path.join(args.fid_cache, f"{self.key}-inception{weights}.npz")
            self.ref = reference_statistics(self.images, net, "prc" in self.which, dev, rank, world,
                                            cache, args.batch_size)
        # rFID (Eq. 2): each rank reconstructs its share.
        if "rfid" in self.which:
            f = features(self.recon_images, net, dev, rank, world, "reconstructions", args.batch_size, model)
            parts = gather(f["2048"], world)
            self.rfid = fid(statistics(torch.cat(parts)), self.ref) if rank == 0 else None

    def features(self, u8):
        """Inception features {name: (n, width)} of uint8 samples (n, C, H, W), on the CPU."""
        with torch.inference_mode():
            return dict(zip(FEATURES, (t.float().cpu() for t in self.net(u8))))

    def scores(self, f):
        """A row of the metrics table from the features of one setting's samples, with the number
        of samples and of reference images (None: statistics). Below FEW of either, one warning
        line."""
        n, n_ref = len(f["2048"]), None if self.images is None else len(self.images)
        counts = [(n, "samples")] if self.which & {"fid", "prc"} else []
        counts += [(n_ref, "reference images")] if self.which & {"fid", "rfid", "prc"} else []
        small = [f"{k} {what}" for k, what in counts if k is not None and k < FEW]
        if small and not self.warned:
            print(f"warning: FID of {' and '.join(small)} is biased upward by an amount that "
                  f"depends on N; the paper's numbers use 50,000; compare only at equal N",
                  file=sys.stderr, flush=True)
            self.warned = True
        return {**scores(f, self.ref, self.which, self.rfid), "samples": n, "reference_images": n_ref}


# --- the toy judge: offline, in a small classifier's features

class ToyClassifier(torch.nn.Sequential):
    """A small CNN for the toy classes, the offline stand-in for Inception: head(body(x)),
    body = features."""
    def __init__(self):
        super().__init__()
        nn = torch.nn
        conv = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, 2, 1), nn.GroupNorm(8, o), nn.SiLU())
        self.body = nn.Sequential(conv(3, 32), conv(32, 64), conv(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(128, 10)


def toy_classifier(path, steps=300, device="cpu"):
    """The toy classifier, seeded: trained once (~30 s, CPU) on toy images 10000+ (unseen in
    training), cached at path."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = ToyClassifier().to(device)
    # A cached classifier is read as data, like every file.
    if os.path.isfile(path):
        try:
            net.load_state_dict(read_checkpoint(path))
        except (RuntimeError, TypeError) as err:
            # For example, another network's weights.
            raise DataError(f"{path!r} is not the toy classifier ({str(err).splitlines()[0]}); "
                            f"delete it to retrain it") from None
        return net.eval()
    g = torch.Generator().manual_seed(0)
    ds, opt = ToyShapes(size=10_000 + 128 * steps), torch.optim.Adam(net.parameters(), lr=2e-3)
    for k in range(steps):
        batch = [ds[10_000 + 128 * k + i] for i in range(128)]
        x, y = torch.utils.data.default_collate(batch)                      # (128, 3, 32, 32)
        # Flip a random half of the batch horizontally.
        x = torch.where(torch.rand(len(x), 1, 1, 1, generator=g) < 0.5, x.flip(3), x)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x.to(device)), y.to(device)).backward()
        opt.step()
    torch.save(net.state_dict(), path)
    return net.eval()


def class_accuracy(classifier, images, labels):
    """The toy classifier's accuracy on images (N, C, H, W) asked to be labels (N,):
    (overall, {class: acc.})."""
    logits = torch.cat([classifier(b) for b in images.split(256)])
    hit = (logits.argmax(1) == labels).float()                              # (N,)
    per_class = {ToyShapes.classes[c]: hit[labels == c].mean().item() for c in labels.unique().tolist()}
    return hit.mean().item(), per_class


@torch.no_grad()
def toy_scores(samples, labels, classifier):
    """Toy scores of samples (N, C, H, W): Frechet distance in toy-classifier features, class
    accuracy (overall and per class), colour spread (per-channel std against the data's)."""
    # The reference: the first N toy images.
    ref = ToyShapes().images(range(len(samples)))
    feats = lambda x: torch.cat([classifier.body(b) for b in x.split(256)]).double()
    acc, per_class = class_accuracy(classifier, samples, labels)
    std = lambda x: x.transpose(0, 1).flatten(1).std(1)                     # (C,)
    return {"toy_fd": frechet_distance(feats(samples), feats(ref)), "class_acc": acc,
            "per_class": per_class, "colour_spread": (std(samples) / std(ref)).mean().item()}


@torch.no_grad()
def toy_recon_scores(model, classifier, n=500, batch=250):
    """Reconstructions D(f(E(x))) of toy images 0..n-1: (mean |mean colour of x - of D(f(E(x)))|
    over images and channels in 0-255 units, the toy classifier's class accuracy on them, the same
    per class)."""
    x = ToyShapes().images(range(n)).to(next(model.parameters()).device)
    rec = torch.cat([reconstruct(model, b) for b in x.split(batch)])        # Eq. 2
    # Toy image i has the label i % 10.
    labels = torch.arange(n) % 10
    acc, per_class = class_accuracy(classifier, rec.cpu().clamp(-1, 1), labels)
    return ((rec.mean((2, 3)) - x.mean((2, 3))).abs().mean() * 127.5).item(), acc, per_class


def toy_report(judge, model):
    """sample.py --toy_metrics: the toy judge's scores of the model's reconstructions."""
    err, acc, per_class = toy_recon_scores(model, judge)
    print(f"reconstructions: colour error {err:.1f} / 255 (mean colour per image and channel), "
          f"class accuracy {acc:.3f}\n  per class: "
          + ", ".join(f"{k} {v:.2f}" for k, v in per_class.items()))


def toy_line(judge, samples, labels, steps):
    """sample.py --toy_metrics: the toy judge's scores of one setting's samples (N, C, H, W)."""
    m = toy_scores(samples, labels, judge)
    print(f"steps {steps}: toy_fd {m['toy_fd']:.3f} (lower is better), class accuracy "
          f"{m['class_acc']:.3f}, colour spread {m['colour_spread']:.2f} (data: 1)")
    print("  per class: " + ", ".join(f"{k} {v:.2f}" for k, v in m["per_class"].items()))


# --- the command line: these flags are sample.py's too

def add_flags(p):
    """The evaluation's flags, for evaluate.py and sample.py alike."""
    p.add_argument("--fid", action="store_true", help="gFID of the samples against the reference")
    p.add_argument("--rfid", action="store_true",
                   help="rFID: the reference's (or, with statistics as --ref, --ref_count "
                   "training images') reconstructions D(f(E(x))) against the reference")
    p.add_argument("--is", dest="is_", action="store_true", help="Inception Score")
    p.add_argument("--prc", action="store_true", help="precision and recall (Kynkaanniemi et al. 2019; k = 3)")
    p.add_argument("--ref",
                   help="reference (default: --ref_count training images): an image folder tree "
                   "(resized and cropped as in training), an ADM .npz batch "
                   "(VIRTUAL_imagenet256_labeled.npz) or a statistics .npz (mu, sigma: the "
                   "release's fid_stats_*.npz)")
    p.add_argument("--ref_count", type=COUNT, default=50_000, help="training images drawn (seed 0) as the reference")
    p.add_argument("--fid_cache",
                   default=os.path.join(os.path.expanduser("~"), ".cache", "sphere-encoder"),
                   help="folder of the reference's cached statistics")
    p.add_argument("--inception_weights", default=None, help="local Inception weights for torch-fidelity")


def check_flags(args):
    """What can be checked of the evaluation's flags before any work: the weights file exists."""
    if args.inception_weights and not os.path.isfile(args.inception_weights):
        die(f"argument --inception_weights: no file {args.inception_weights!r}")


def print_table(rows):
    """The metrics, a row per (CFG, steps), as a fixed-width table."""
    print("  ".join(f"{c:>9}" for c in rows[0]))
    for row in rows:
        cell = lambda v: f"{'-':>9}" if v is None else f"{v:>9d}" if isinstance(v, int) else f"{v:>9.4g}"
        print("  ".join(cell(v) for v in row.values()))


def read_samples(path):
    """The samples of an .npz (sample.py --npz, DiT's and ADM's format): arr_0, uint8
    (N, H, W, 3)."""
    try:
        with np.load(path) as f:
            x = f["arr_0"]
    except Exception as err:
        # Not a zip, or no arr_0.
        raise DataError(f"{path!r} is not an .npz of samples ({str(err).splitlines()[0]})") from None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] != 3:
        raise DataError(f"{path!r}: arr_0 is {x.dtype} {x.shape}, not uint8 (N, H, W, 3)")
    return x


@script
def main(argv=None):
    """Score an .npz of samples against a reference; the metrics as a table and a JSON file."""
    p = parser(__doc__)
    p.add_argument("samples", help="an .npz of samples: arr_0 uint8 (N, H, W, 3)")
    p.add_argument("--ckpt", help="the model that drew them: its training images are the default "
                   "reference, and --rfid reconstructs them")
    add_flags(p)
    p.add_argument("--batch_size", type=COUNT, default=64)
    p.add_argument("--out", help="metrics JSON (default: <samples>_metrics.json)")
    args = p.parse_args(argv)
    check_flags(args)
    if not (args.fid or args.rfid or args.is_ or args.prc):
        p.error("nothing to score: add --fid, --rfid, --is or --prc")
    if not args.ckpt and (args.rfid or args.ref is None and (args.fid or args.prc)):
        p.error("--rfid, and a reference of training images, need the model: pass --ckpt (or --ref)")
    x = Images(torch.from_numpy(read_samples(args.samples)).permute(0, 3, 1, 2))   # (N, 3, H, W)
    world, rank, device = init_distributed(args.device)
    model, train_args = load_model(args.ckpt, device) if args.ckpt else (None, {})
    ev = Evaluation(args, train_args, x.items.shape[-1], device, rank, world)
    ev.prepare(model)
    parts = gather(features(x, ev.net, device, rank, world, "sample features", args.batch_size), world)
    if rank > 0:
        return
    row = ev.scores({k: torch.cat([part[k] for part in parts]) for k in FEATURES})
    print_table([row])
    out = args.out or args.samples.removesuffix(".npz") + "_metrics.json"
    ref = args.ref or row["reference_images"] and f"{train_args['dataset']} x {row['reference_images']}"
    save_json({"samples": len(x), "reference": ref, "rows": [row]}, out, what="metrics")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
