"""Datasets: a procedural toy set (the default, no download), CIFAR-10, ImageNet, Flowers-102, any
ImageFolder tree; each yields (image (3, H, W) in [-1, 1], int label). The h-flip (Sec. 3) is in train.py;
build_loader feeds training from any step on, so a resumed run sees what an uninterrupted one would.
Bad input never ends in a traceback: die() prints one line, exit 2; unreadable files are skipped (Guarded).
    python data.py --check --dataset folder --data_dir D   # list every unreadable image of a tree
"""
import argparse
import contextlib
import functools
import itertools
import math
import os
import re
import sys
import zipfile

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm


class DataError(Exception):
    """Bad or missing data or checkpoint: the scripts print it with die(), one line."""

def die(msg, code=2):
    """Bad input: one line on stderr, exit code 2, no traceback (also argparse's p.error)."""
    print(f"{os.path.basename(sys.argv[0])}: error: {msg}", file=sys.stderr)
    sys.exit(code)


def read_checkpoint(path):
    """torch.load(path, weights_only=True) of any file a user hands in (nothing is trusted), memory-mapped (tensors
    nobody reads, e.g. the optimizer state in sample.py, stay on disk); missing, not a zip, truncated, corrupt ->
    DataError."""
    if not os.path.isfile(path):
        raise DataError(f"no checkpoint at {path!r}" + (" (that is a folder)" if os.path.isdir(path) else ""))
    with open(path, "rb") as f:
        head = f.read(8)
    legacy = head.startswith(b"\x80\x02\x8a\x0al\xfc\x9c")                     # torch.save before 1.6: a pickle
    if not head.startswith(b"PK") and not legacy:                           # torch.save writes a zip archive
        raise DataError(f"{path!r} is not a PyTorch checkpoint (not a zip archive; it starts with {head!r})")
    if not legacy and not zipfile.is_zipfile(path):                         # the archive's directory is at its end
        raise DataError(f"{path!r} is truncated (a zip archive without its end: an interrupted copy or write?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=not legacy)
    except Exception as err:                                                # never torch's weights_only paragraph
        if found := re.search(r"GLOBAL ([\w.]+)", str(err)):                # a pickled object: never unpickled
            raise DataError(f"{path!r} is refused: it holds a pickled {found[1]}, and loading a pickled object can "
                            f"run code (every file is read as data: tensors and builtins only)") from None
        cause = re.search(r"WeightsUnpickler error: (.*)", str(err))
        raise DataError(f"{path!r} is corrupt: {cause[1] if cause else str(err).splitlines()[0][:200]}") from None


def print0(*args):
    """print, flushed, on rank 0 only: under torchrun one line, not one per process."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, flush=True)


def script(main):
    """Wraps a script's main(argv): a DataError in it ends the script with its one line (die)."""
    @functools.wraps(main)
    def run(argv=None):
        try:
            return main(argv)
        except DataError as err:
            die(str(err))
    return run


def parser(doc, device=True, dist=False):
    """A script's argparse: --help shows its docstring, a bad flag is one line (die); --device (cuda if any);
    dist: --dist_timeout, for the scripts that run under torchrun."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = die
    if device:
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                       help="cuda (under torchrun: cuda:LOCAL_RANK), cuda:N or cpu")
    if dist:
        p.add_argument("--dist_timeout", type=COUNT, default=7200,
                       help="seconds a process waits for the others in a collective (e.g. rank 0 writing last.pt)")
    return p


def int_list(text):
    """An argparse type: integers like 1,2,4 (or 'all': None)."""
    try:
        return None if text == "all" else [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be integers like 1,2,4 (or 'all'), got {text!r}") from None


def number(lo, hi=None, cast=float, lo_open=False, hi_open=False):
    """An argparse type: a finite number (int for cast=int) in [lo, hi] (lo_open, hi_open: open ends; no hi: >= lo);
    else argparse's one-line error naming the flag, like: must be a number in (0, 90), got '95'."""
    what, left, right = "an integer" if cast is int else "a number", "(["[not lo_open], ")]"[not hi_open]
    what += f" {'>' if lo_open else '>='} {lo}" if hi is None else f" in {left}{lo}, {hi}{right}"
    def parse(text):
        with contextlib.suppress(ValueError):                               # not a number: the error below
            v = cast(text)
            if math.isfinite(v) and (v > lo or v == lo and not lo_open) and (
                    hi is None or v < hi or v == hi and not hi_open):
                return v
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return parse


ANGLE, PROB, DECAY = number(0, 90, lo_open=True, hi_open=True), number(0, 1), number(0, 1, hi_open=True)  # degrees
WEIGHT, POSITIVE = number(0), number(0, lo_open=True)                       # loss weights; rates, clips, scales
COUNT, STEPS = number(1, cast=int), number(0, cast=int)                     # counts and sizes; steps, indices


def default_workers(cap=8):
    """DataLoader workers: the CPUs this process may use, less one for the main process, at most cap."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(cap, cpus - 1))


class Lines(tqdm):
    """tqdm for a log file or pipe: a plain line at most every mininterval s and one at the end, never a \\r."""
    monitor_interval = 0                                                    # no monitor thread redrawing

    def display(self, msg=None, pos=None, last=False):
        shown = getattr(self, "shown", (-math.inf, None))                   # (time, n) of the last line
        if msg is None and (self._time() - shown[0] >= self.mininterval or last and shown[1] != self.n):
            self.shown = (self._time(), self.n)
            print(self, file=self.fp, flush=True)

    def clear(self, nolock=False): pass                                     # write(): a line has nothing to erase

    def close(self):
        if not self.disable:
            self._ema_dt = lambda: None                                     # the overall rate, as tqdm's last line
            self.display(last=True)
        self.leave = False                                                  # tqdm's close then writes nothing
        super().close()


def progress(iterable=None, **kw):
    """tqdm(iterable, **kw) on a terminal; to a file or pipe (Slurm, > log) Lines, every TQDM_MININTERVAL s (30)."""
    if getattr(kw.get("file") or sys.stderr, "isatty", lambda: False)():
        return tqdm(iterable, **kw)
    return Lines(iterable, **{"mininterval": float(os.environ.get("TQDM_MININTERVAL", 30)), "ascii": True, **kw})


class ToyShapes(torch.utils.data.Dataset):
    """10 classes, 5 shapes and 5 textures, random colours, position, size, period; image i from seed i."""
    classes = ["disc", "square", "triangle", "ring", "cross", "h-stripes", "v-stripes", "checker", "diagonal", "dots"]

    def __init__(self, size=10_000, image_size=32, seed=0):
        self.size, self.image_size, self.seed = size, image_size, seed
    def __len__(self): return self.size
    def images(self, indices): return torch.stack([self[i][0] for i in indices])   # (n, 3, H, W); any i >= 0

    def __getitem__(self, i):
        """(image (3, n, n) in [-1, 1], label i % 10): two colours mixed by an anti-aliased signed-distance mask."""
        rng, n = np.random.default_rng([self.seed, i]), self.image_size
        y, x = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
        cx, cy = rng.uniform(0.35, 0.65, 2) * n                     # shape centre
        r = rng.uniform(0.18, 0.32) * n                             # shape size
        t = rng.uniform(0.06, 0.1) * n                              # stroke thickness
        p = rng.uniform(0.15, 0.3) * n                              # texture period
        ph = rng.uniform(0, 2 * math.pi)                            # texture phase
        dx, dy = x - cx, y - cy
        wave = lambda u: np.sin(2 * math.pi * u / p + ph) * p / math.pi   # ~ signed distance to a stripe edge
        sdf = {
            0: lambda: np.hypot(dx, dy) - r,                                        # disc
            1: lambda: np.maximum(abs(dx), abs(dy)) - 0.85 * r,                     # square
            2: lambda: np.maximum(np.maximum(-dy - r / 2,                           # triangle: 3 half-planes
                                             (np.sqrt(3) * dx + dy) / 2 - r / 2), (-np.sqrt(3) * dx + dy) / 2 - r / 2),
            3: lambda: abs(np.hypot(dx, dy) - r) - t,                               # ring
            4: lambda: np.minimum(np.maximum(abs(dx) - r, abs(dy) - t),             # cross
                                  np.maximum(abs(dx) - t, abs(dy) - r)),
            5: lambda: -wave(y),                                                    # horizontal stripes
            6: lambda: -wave(x),                                                    # vertical stripes
            7: lambda: -np.sign(np.sin(2 * math.pi * x / p + ph) * np.sin(2 * math.pi * y / p + ph))
                       * np.minimum(abs(wave(x)), abs(wave(y))),                    # checkerboard
            8: lambda: -wave((x + y) / math.sqrt(2)),                               # diagonal stripes
            9: lambda: np.hypot((x - cx + p / 2) % p - p / 2, (y - cy + p / 2) % p - p / 2) - p / 4,  # dots
        }[i % 10]()
        mask = np.clip(0.5 - sdf, 0, 1)[None]                       # (1, n, n): 1 inside, 0 outside
        fg, bg = rng.uniform(0, 1, (2, 3, 1, 1)).astype(np.float32)
        if np.abs(fg - bg).sum() < 0.9:                             # keep the shape visible
            bg = np.where(fg > 0.5, fg - 0.6, fg + 0.6).clip(0, 1).astype(np.float32)
        return torch.from_numpy(((mask * fg + (1 - mask) * bg) * 2 - 1).astype(np.float32)), i % 10


class ToyClassifier(torch.nn.Sequential):
    """A small CNN for the toy classes, sample.py's offline stand-in for Inception: head(body(x)), body = features."""
    def __init__(self):
        super().__init__()
        nn = torch.nn
        conv = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, 2, 1), nn.GroupNorm(8, o), nn.SiLU())
        self.body = nn.Sequential(conv(3, 32), conv(32, 64), conv(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(128, 10)


def toy_classifier(path, steps=300, device="cpu"):
    """The toy classifier, seeded: trained once (~30 s, CPU) on toy images 10000+ (unseen in training), cached."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = ToyClassifier().to(device)
    if os.path.isfile(path):                                                # read as data, like every file
        try:
            net.load_state_dict(read_checkpoint(path))
        except (RuntimeError, TypeError) as err:                            # another network's weights
            raise DataError(f"{path!r} is not the toy classifier ({str(err).splitlines()[0]}); delete it to "
                            f"retrain it") from None
        return net.eval()
    g = torch.Generator().manual_seed(0)
    ds, opt = ToyShapes(size=10_000 + 128 * steps), torch.optim.Adam(net.parameters(), lr=2e-3)
    for k in range(steps):
        x, y = torch.utils.data.default_collate([ds[10_000 + 128 * k + i] for i in range(128)])   # (128, 3, 32, 32)
        x = torch.where(torch.rand(len(x), 1, 1, 1, generator=g) < 0.5, x.flip(3), x)            # h-flip half
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x.to(device)), y.to(device)).backward()
        opt.step()
    torch.save(net.state_dict(), path)
    return net.eval()


class Guarded(torch.utils.data.Dataset):
    """Unreadable item i -> the next readable one, as (x, y, bad = i) (else bad = -1); resume stays exact."""
    def __init__(self, ds): self.ds = ds
    def __len__(self): return len(self.ds)

    def __getitem__(self, i):
        for k in range(len(self)):
            try:
                return (*self.ds[(i + k) % len(self)], i if k else -1)
            except Exception:                                               # PIL: OSError, SyntaxError, ...
                continue
        raise DataError("no image in the data set can be read")

    def path(self, i):
        return self.ds.samples[i][0] if hasattr(self.ds, "samples") else f"item {i}"


WHERE = {"cifar10": "the extracted 'cifar-10-batches-py/' folder",             # what --data_dir holds (README "Data")
         "flowers": "'flowers-102/' (102flowers.tgz extracted, imagelabels.mat, setid.mat)",
         "imagenet": "a train/ subfolder of class folders of images",
         "folder": "class subfolders of images, or images and no subfolder (unconditional)"}


def flat(root):
    """A folder of images without subfolders: an unconditional set's usual layout (like Animal-Faces)."""
    return os.path.isdir(root) and not any(e.is_dir() for e in os.scandir(root))


class FlatFolder(torch.utils.data.Dataset):
    """The images of a flat folder, sorted, each with label 0; no classes (the model is unconditional)."""
    classes = []

    def __init__(self, root, transform):
        from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
        self.samples, self.transform = make_dataset(root, {"": 0}, IMG_EXTENSIONS), transform   # [(path, 0)]
    def __len__(self): return len(self.samples)

    def __getitem__(self, i):
        from torchvision.datasets.folder import default_loader
        return self.transform(default_loader(self.samples[i][0])), 0


def resize_crop(image_size):
    """Training's resize (short side; nearest up to 64px, else bicubic [released]) and center crop (Sec. 3)."""
    from torchvision import transforms as T
    mode = T.InterpolationMode.NEAREST if image_size <= 64 else T.InterpolationMode.BICUBIC
    return [T.Resize(image_size, interpolation=mode, antialias=True), T.CenterCrop(image_size)]


def build_dataset(name, data_dir=None, image_size=32, unconditional=False, download=False):
    """The training set for `name`. Returns (dataset, num_classes); num_classes 0 = unconditional."""
    from torchvision import datasets, transforms as T
    if name not in ("toy", *WHERE):
        raise DataError(f"unknown dataset {name!r}")
    if name != "toy" and not download and not (data_dir and os.path.isdir(data_dir)):
        raise DataError(f"{name} expected in a folder ({WHERE[name]}), but --data_dir {data_dir!r} is not a folder")
    tf = T.Compose([*resize_crop(image_size), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])  # -> [-1, 1]
    try:
        if name == "toy":
            ds = ToyShapes(image_size=image_size)
        elif name == "cifar10":
            ds = datasets.CIFAR10(data_dir, train=True, transform=tf, download=download)
        elif name == "flowers":   # all 8,189 images of train+val+test (our choice: the paper does not say)
            ds = torch.utils.data.ConcatDataset([datasets.Flowers102(data_dir, split=s, transform=tf, download=download)
                                                 for s in ("train", "val", "test")])
            ds.classes = list(range(102))
        else:
            root = os.path.join(data_dir, "train") if name == "imagenet" else data_dir
            ds = FlatFolder(root, tf) if name == "folder" and flat(root) else datasets.ImageFolder(root, tf)
    except Exception as err:                                                # missing files, no class folders / images
        hint = ", or add --download on a machine with internet" if name in ("cifar10", "flowers") else ""
        raise DataError(f"no images found for {name} in {data_dir!r} ({str(err).splitlines()[0]}); "
                        f"it should hold {WHERE[name]}{hint}") from None
    return ds, 0 if unconditional else len(ds.classes)                      # 0: train.py ignores the labels


def folder_settings(data_dir, n=8):
    """What an ImageFolder tree (class subfolders) or a flat folder (0 classes) holds: {image_size: the median short
    side of n images spread over it, num_classes, num_images}. DataError (one line) when none of those n can be read."""
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
    is_flat = flat(data_dir)
    try:                                                                    # [(path, class)]: sorted, no empty class
        files = make_dataset(data_dir, {"": 0} if is_flat else None, extensions=IMG_EXTENSIONS)
    except OSError as err:                                                  # no folder, no class folders or images
        why = ("no such folder" if not os.path.isdir(data_dir) else "no image in it" if is_flat
               else str(err).split(". Supported")[0].replace("Found no valid file", "no image"))   # names the classes
        raise DataError(f"{data_dir!r} is not a folder of class subfolders of images, nor of images ({why}; image "
                        f"files end in {' '.join(IMG_EXTENSIONS)})") from None
    sides, why = [], ""
    for path, _ in files[::max(1, len(files) // n)][:n]:                    # n images, spread over the classes
        try:
            with Image.open(path) as im:
                sides.append(min(im.size))
        except Exception as err:                                            # PIL: OSError, SyntaxError, ...
            why = why or f"{path}: {type(err).__name__}"
    if not sides:
        raise DataError(f"none of the {min(n, len(files))} images sampled in {data_dir!r} can be read (first: {why})")
    return dict(image_size=sorted(sides)[len(sides) // 2], num_classes=0 if is_flat else files[-1][1] + 1,
                num_images=len(files))


def subset(total, n):
    """--max_samples: the indices of n of total images, a fixed random draw (seed 0): about class-balanced."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(0))[:n].tolist()


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start mid-epoch: a resumed run sees what an uninterrupted one would."""
    start = 0

    def __iter__(self): return itertools.islice(super().__iter__(), self.start, None)
    def __len__(self): return super().__len__() - self.start


def build_loader(ds, args, world, rank, device, micro, step):
    """The micro-batches from global step `step` on, endless: a resumed run sees what an uninterrupted one would."""
    steps_per_epoch = len(ds) // args.batch_size
    sampler = ResumableSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(ds, batch_size=micro, sampler=sampler, num_workers=args.num_workers, drop_last=True,
                        pin_memory=device.startswith("cuda"), persistent_workers=args.num_workers > 0,
                        generator=torch.Generator().manual_seed(args.seed))
    epoch, skip = divmod(step, steps_per_epoch)
    while True:                                                             # workers start at the first next()
        sampler.set_epoch(epoch)
        sampler.start = skip * args.grad_accum * micro
        yield from itertools.islice(loader, (steps_per_epoch - skip) * args.grad_accum)
        epoch, skip = epoch + 1, 0


if __name__ == "__main__":                                    # read every item as training would; exit 1 if any fails
    p = parser(__doc__, device=False)
    p.add_argument("--dataset", default="toy", choices=["toy", *WHERE])
    p.add_argument("--data_dir", default=None)
    p.add_argument("--image_size", type=COUNT, default=32)
    p.add_argument("--check", action="store_true", required=True, help="read every image, list the unreadable ones")
    args = p.parse_args()
    try:
        ds = Guarded(build_dataset(args.dataset, args.data_dir, args.image_size)[0])
    except DataError as err:
        die(str(err))
    bad = []
    for i in progress(range(len(ds)), desc="reading", unit="img"):
        try:
            ds.ds[i]
        except Exception as err:
            bad.append(ds.path(i))
            why = str(err).splitlines()[0] if str(err) else ""
            tqdm.write(f"unreadable: {bad[-1]} ({type(err).__name__}: {why})")
    print(f"{len(bad)} of {len(ds)} images unreadable{': remove or replace them before training' if bad else ''}")
    sys.exit(1 if bad else 0)
