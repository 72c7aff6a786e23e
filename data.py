"""The data: a procedural toy set (the default, no download), CIFAR-10, ImageNet, Flowers-102 and
any folder of images, each yielding (image (3, H, W) in [-1, 1], int label); the resize and crop of
Sec. 3 (the h-flip is in train.py); a loader that starts at any step, so a resumed run sees what an
uninterrupted one would. Unreadable files are skipped (Guarded); hidden files and folders (.name,
__MACOSX) are never images.
    python data.py --check --dataset folder --data_dir D   # list every unreadable image of a tree
"""
import itertools
import math
import os
import sys

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from cli import COUNT, DataError, die, parser, progress


def default_workers(cap=8):
    """DataLoader workers: the CPUs this process may use, less one for the main process, at most
    cap."""
    if hasattr(os, "sched_getaffinity"):
        cpus = len(os.sched_getaffinity(0))
    else:
        cpus = os.cpu_count() or 1
    return max(0, min(cap, cpus - 1))


class ToyShapes(torch.utils.data.Dataset):
    """10 classes, 5 shapes and 5 textures, random colours, position, size, period; image i from
    seed i."""
    classes = ["disc", "square", "triangle", "ring", "cross", "h-stripes", "v-stripes", "checker", "diagonal", "dots"]

    def __init__(self, size=10_000, image_size=32, seed=0):
        self.size, self.image_size, self.seed = size, image_size, seed

    def __len__(self):
        return self.size

    def images(self, indices):
        """The images of items `indices` (any i >= 0, also past len), stacked: (n, 3, H, W)."""
        return torch.stack([self[i][0] for i in indices])

    def __getitem__(self, i):
        """(image (3, n, n) in [-1, 1], label i % 10): two colours mixed by an anti-aliased
        signed-distance mask."""
        rng, n = np.random.default_rng([self.seed, i]), self.image_size
        y, x = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
        cx, cy = rng.uniform(0.35, 0.65, 2) * n                     # shape centre
        r = rng.uniform(0.18, 0.32) * n                             # shape size
        t = rng.uniform(0.06, 0.1) * n                              # stroke thickness
        p = rng.uniform(0.15, 0.3) * n                              # texture period
        ph = rng.uniform(0, 2 * math.pi)                            # texture phase
        dx, dy = x - cx, y - cy
        # A sine wave of period p, scaled to be about the signed distance to a stripe's edge.
        wave = lambda u: np.sin(2 * math.pi * u / p + ph) * p / math.pi
        # The signed distance to the edge of class i % 10's shape or texture: < 0 inside.
        # Only the class's own entry is called.
        sdf = {
            0: lambda: np.hypot(dx, dy) - r,                        # disc
            1: lambda: np.maximum(abs(dx), abs(dy)) - 0.85 * r,     # square
            # triangle: the intersection of 3 half-planes
            2: lambda: np.maximum(np.maximum(-dy - r / 2,
                                             (np.sqrt(3) * dx + dy) / 2 - r / 2),
                                  (-np.sqrt(3) * dx + dy) / 2 - r / 2),
            3: lambda: abs(np.hypot(dx, dy) - r) - t,               # ring
            # cross: the union of a horizontal and a vertical bar
            4: lambda: np.minimum(np.maximum(abs(dx) - r, abs(dy) - t),
                                  np.maximum(abs(dx) - t, abs(dy) - r)),
            5: lambda: -wave(y),                                    # horizontal stripes
            6: lambda: -wave(x),                                    # vertical stripes
            # checkerboard: the sign of the product of a wave along x and one along y; the
            # distance to the nearer of their edges
            7: lambda: (-np.sign(np.sin(2 * math.pi * x / p + ph)
                                 * np.sin(2 * math.pi * y / p + ph))
                        * np.minimum(abs(wave(x)), abs(wave(y)))),
            8: lambda: -wave((x + y) / math.sqrt(2)),               # diagonal stripes
            # dots: the distance to the nearest point of a grid of period p through the
            # centre, less a radius of p / 4
            9: lambda: np.hypot((x - cx + p / 2) % p - p / 2,
                                (y - cy + p / 2) % p - p / 2) - p / 4,
        }[i % 10]()
        mask = np.clip(0.5 - sdf, 0, 1)[None]                       # (1, n, n): 1 inside, 0 outside
        fg, bg = rng.uniform(0, 1, (2, 3, 1, 1)).astype(np.float32)
        # Colours too alike: the background is moved away from the foreground, so that the shape
        # stays visible.
        if np.abs(fg - bg).sum() < 0.9:
            bg = np.where(fg > 0.5, fg - 0.6, fg + 0.6).clip(0, 1).astype(np.float32)
        return torch.from_numpy(((mask * fg + (1 - mask) * bg) * 2 - 1).astype(np.float32)), i % 10


class Guarded(torch.utils.data.Dataset):
    """Unreadable item i -> the next readable one, as (x, y, bad = i) (else bad = -1); resume
    stays exact."""
    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        for k in range(len(self)):
            try:
                return (*self.ds[(i + k) % len(self)], i if k else -1)
            except Exception:
                # PIL raises OSError, SyntaxError, ...: on to the next item.
                continue
        raise DataError("no image in the data set can be read")

    def path(self, i):
        return self.ds.samples[i][0] if hasattr(self.ds, "samples") else f"item {i}"


# What --data_dir holds for each data set (the README's "Data" table).
WHERE = {"cifar10": "the extracted 'cifar-10-batches-py/' folder",
         "flowers": "'flowers-102/' (102flowers.tgz extracted, imagelabels.mat, setid.mat)",
         "imagenet": "a train/ subfolder of class folders of images",
         "folder": "class subfolders of images, or images and no subfolder (unconditional)"}


# --- folders of images, as people have them: hidden entries (.ipynb_checkpoints/, .DS_Store, Mac's
# __MACOSX/ with its ._x.png copies) are neither classes nor images.

def hidden(name):
    return name.startswith(".") or name == "__MACOSX"


def skipped(root):
    """What a folder scan leaves out, for the folder's line:
    '.ipynb_checkpoints/, __MACOSX/, 3 hidden files'."""
    folders, files = [], 0
    for top, dirs, names in os.walk(root, followlinks=True):
        folders += [os.path.relpath(os.path.join(top, d), root) + "/" for d in dirs if hidden(d)]
        # Pruned in place: os.walk does not go inside what is skipped.
        dirs[:] = [d for d in dirs if not hidden(d)]
        files += sum(hidden(n) for n in names)
    return ", ".join(folders + ([f"{files} hidden file{'s' * (files > 1)}"] if files else []))


def image_files(root, class_to_idx):
    """[(path, class)] of the visible images under each class folder of root ("": root itself),
    sorted."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
    visible = lambda p: not any(map(hidden, os.path.relpath(p, root).split(os.sep)))
    ok = lambda p: p.lower().endswith(IMG_EXTENSIONS) and visible(p)
    return make_dataset(root, class_to_idx, is_valid_file=ok)


def find_classes(root):
    """The class folders of root, hidden ones left out: (names, {name: index})."""
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not hidden(e.name))
    if not classes:
        raise FileNotFoundError(f"Couldn't find any class folder in {root}.")
    return classes, {c: i for i, c in enumerate(classes)}


def flat(root):
    """A folder of images without (visible) subfolders: an unconditional set's usual layout
    (Animal-Faces)."""
    return os.path.isdir(root) and not any(e.is_dir() and not hidden(e.name) for e in os.scandir(root))


class Folder(torch.utils.data.Dataset):
    """A tree of class folders of images (ImageFolder's layout), or a flat folder of images, all of
    label 0 and no classes (the model is unconditional). Hidden entries are skipped."""
    def __init__(self, root, transform, allow_flat=True):
        self.classes, index = ([], {"": 0}) if allow_flat and flat(root) else find_classes(root)
        self.samples, self.transform = image_files(root, index), transform  # [(path, class)]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from torchvision.datasets.folder import default_loader
        path, label = self.samples[i]
        return self.transform(default_loader(path)), label


def resize_crop(image_size):
    """Training's resize (short side; nearest up to 64px, else bicubic [released]) and center crop
    (Sec. 3)."""
    from torchvision import transforms as T
    mode = T.InterpolationMode.NEAREST if image_size <= 64 else T.InterpolationMode.BICUBIC
    return [T.Resize(image_size, interpolation=mode, antialias=True), T.CenterCrop(image_size)]


def build_dataset(name, data_dir=None, image_size=32, unconditional=False, download=False):
    """The training set for `name`. Returns (dataset, num_classes);
    num_classes 0 = unconditional."""
    from torchvision import datasets, transforms as T
    if name not in ("toy", *WHERE):
        raise DataError(f"unknown dataset {name!r}")
    if name != "toy" and not download and not (data_dir and os.path.isdir(data_dir)):
        raise DataError(f"{name} expected in a folder ({WHERE[name]}), but --data_dir {data_dir!r} is not a folder")
    to_unit = T.Normalize([0.5] * 3, [0.5] * 3)                             # [0, 1] -> [-1, 1]
    tf = T.Compose([*resize_crop(image_size), T.ToTensor(), to_unit])
    try:
        if name == "toy":
            ds = ToyShapes(image_size=image_size)
        elif name == "cifar10":
            ds = datasets.CIFAR10(data_dir, train=True, transform=tf, download=download)
        elif name == "flowers":
            # All 8,189 images of train + val + test (our choice: the paper does not say).
            splits = [datasets.Flowers102(data_dir, split=s, transform=tf, download=download)
                      for s in ("train", "val", "test")]
            ds = torch.utils.data.ConcatDataset(splits)
            ds.classes = list(range(102))
        else:
            root = os.path.join(data_dir, "train") if name == "imagenet" else data_dir
            ds = Folder(root, tf, allow_flat=name == "folder")      # ImageNet: class folders only
    except Exception as err:
        # Missing files, no class folders, or no images.
        hint = (", or add --download on a machine with internet" if name in ("cifar10", "flowers") else "")
        raise DataError(f"no images found for {name} in {data_dir!r} ({str(err).splitlines()[0]}); "
                        f"it should hold {WHERE[name]}{hint}") from None
    # num_classes 0: train.py ignores the labels.
    return ds, 0 if unconditional else len(ds.classes)


def folder_settings(data_dir, n=8):
    """What a tree of class folders or a flat folder (0 classes) holds: {image_size: the median
    short side of n images spread over it, num_classes, num_images}.
    DataError (one line) when none of those n can be read."""
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS
    is_flat = flat(data_dir)
    # files: [(path, class)], sorted, no empty class.
    try:
        files = image_files(data_dir, {"": 0} if is_flat else find_classes(data_dir)[1])
    except OSError as err:
        # No folder, no class folders, or no images.
        if not os.path.isdir(data_dir):
            why = "no such folder"
        elif is_flat:
            why = "no image in it"
        else:
            # torchvision's message names the classes: its first sentence, reworded.
            why = str(err).split(". ")[0].replace("Found no valid file", "no image")
        raise DataError(f"{data_dir!r} is not a folder of class subfolders of images, nor of "
                        f"images ({why}; image files end in {' '.join(IMG_EXTENSIONS)})") from None
    sides, why = [], ""
    # n images, spread over the classes.
    for path, _ in files[::max(1, len(files) // n)][:n]:
        try:
            with Image.open(path) as im:
                sides.append(min(im.size))
        except Exception as err:
            # PIL raises OSError, SyntaxError, ...: the first failure is reported.
            why = why or f"{path}: {type(err).__name__}"
    if not sides:
        raise DataError(f"none of the {min(n, len(files))} images sampled in {data_dir!r} can be read (first: {why})")
    return dict(image_size=sorted(sides)[len(sides) // 2],
                num_classes=0 if is_flat else files[-1][1] + 1, num_images=len(files))


def subset(total, n):
    """--max_samples: the indices of n of total images, a fixed random draw (seed 0): about
    class-balanced."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(0))[:n].tolist()


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start mid-epoch: a resumed run sees what an uninterrupted one
    would."""
    start = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self):
        return super().__len__() - self.start


def build_loader(ds, args, world, rank, device, micro, step):
    """The micro-batches from global step `step` on, endless: a resumed run sees what an
    uninterrupted one would."""
    steps_per_epoch = len(ds) // args.batch_size
    sampler = ResumableSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(ds, batch_size=micro, sampler=sampler, num_workers=args.num_workers,
                        drop_last=True, pin_memory=device.startswith("cuda"),
                        persistent_workers=args.num_workers > 0,
                        generator=torch.Generator().manual_seed(args.seed))
    epoch, skip = divmod(step, steps_per_epoch)
    # The loader's workers start at the first next(), not before.
    while True:
        sampler.set_epoch(epoch)
        sampler.start = skip * args.grad_accum * micro
        yield from itertools.islice(loader, (steps_per_epoch - skip) * args.grad_accum)
        epoch, skip = epoch + 1, 0


def check(args):
    """data.py --check: read every item as training would; exit 1 if any fails."""
    ds = Guarded(build_dataset(args.dataset, args.data_dir, args.image_size)[0])
    if args.data_dir and (left_out := skipped(args.data_dir)):
        print(f"skipped: {left_out}")
    bad = []
    for i in progress(range(len(ds)), desc="reading", unit="img"):
        try:
            ds.ds[i]
        except Exception as err:
            bad.append(ds.path(i))
            why = str(err).splitlines()[0] if str(err) else ""
            tqdm.write(f"unreadable: {bad[-1]} ({type(err).__name__}: {why})")
    advice = ": remove or replace them before training" if bad else ""
    print(f"{len(bad)} of {len(ds)} images unreadable{advice}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    p = parser(__doc__, device=False)
    p.add_argument("--dataset", default="toy", choices=["toy", *WHERE])
    p.add_argument("--data_dir", default=None)
    p.add_argument("--image_size", type=COUNT, default=32)
    p.add_argument("--check", action="store_true", required=True, help="read every image, list the unreadable ones")
    try:
        check(p.parse_args())
    except DataError as err:
        die(str(err))
