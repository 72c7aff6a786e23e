"""Checkpoints (docs/reference.md Sec. 5): plain dicts {model, ema?, optimizer, step, config, args,
rng, bad_images} of tensors and builtins, so torch.load(weights_only=True) reads them.

Writes are atomic (a kill or a full disk leaves the old file whole); a bad file is a one-line
DataError naming the cause, never a traceback. Besides train.py's checkpoints this module holds
read_checkpoint (the safe load of any file a user hands in), the atomic writers save_npz and
save_json, and ckpt_dir (a checkpoint's folder, where the scripts write by default).
"""
import json
import os
import re
import shutil
import tempfile
import time
import zipfile
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_optimizer_state_dict)

from cli import DataError, die, print0
from data import build_dataset
from model import Config, SphereEncoder

# Test hook: seconds a save pauses mid-write, so that a test can kill the process in that window.
SAVE_DELAY = float(os.environ.get("SPHERE_SAVE_DELAY", 0))


def read_checkpoint(path):
    """torch.load(path, weights_only=True) of any file a user hands in (nothing is trusted).

    The file is memory-mapped, so tensors nobody reads (e.g. the optimizer state in sample.py)
    stay on disk. Missing, not a zip, truncated or corrupt -> DataError.
    """
    if not os.path.isfile(path):
        raise DataError(f"no checkpoint at {path!r}" + (" (that is a folder)" if os.path.isdir(path) else ""))
    with open(path, "rb") as f:
        head = f.read(8)
    # torch.save wrote a pickle before PyTorch 1.6 and writes a zip archive since. A zip archive
    # keeps its directory at its end, so a truncated one is no longer a zip file.
    legacy = head.startswith(b"\x80\x02\x8a\x0al\xfc\x9c")
    if not head.startswith(b"PK") and not legacy:
        raise DataError(f"{path!r} is not a PyTorch checkpoint (not a zip archive; it starts with {head!r})")
    if not legacy and not zipfile.is_zipfile(path):
        raise DataError(f"{path!r} is truncated (a zip archive without its end: an interrupted copy or write?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=not legacy)
    except Exception as err:
        # Say what is wrong in one line, never with torch's weights_only paragraph.
        if found := re.search(r"GLOBAL ([\w.]+)", str(err)):
            # The file holds a pickled object, which is never unpickled. Python 3.12 names
            # io.open _io.open: it is reported as io.open on every Python.
            name = re.sub(r"^_io\.", "io.", found[1])
            raise DataError(f"{path!r} is refused: it holds a pickled {name}, and loading a "
                            "pickled object can run code (every file is read as data: tensors "
                            "and builtins only)") from None
        cause = re.search(r"WeightsUnpickler error: (.*)", str(err))
        raise DataError(f"{path!r} is corrupt: {cause[1] if cause else str(err).splitlines()[0][:200]}") from None


def save_checkpoint(obj, path, write=None, what="checkpoint"):
    """Atomic (tmp, fsync, rename); failure -> DataError.

    write(obj, file): torch.save, or another writer (save_npz, save_json).
    """
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            # torch.save is looked up at call time, not bound as the default, so a patched one
            # (a test's full disk) is the one used.
            (write or torch.save)(obj, f)
            # SAVE_DELAY (tests): pause while part of the file is still buffered, not yet on disk.
            time.sleep(SAVE_DELAY)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if os.path.lexists(tmp):
            os.remove(tmp)
        kept = (f"the previous {what} is intact" if os.path.isfile(path) else f"no {what} written yet")
        raise DataError(f"cannot write {what} {path!r}: {err.strerror or err}; {kept}") from None


def save_npz(arrays, path, what="npz"):
    """np.savez of {name: array}, atomic like every save (sample.py --npz, the FID reference's
    cache)."""
    save_checkpoint(arrays, path, write=lambda a, f: np.savez(f, **a), what=what)


def save_json(obj, path, what="json"):
    """obj as indented JSON, atomic like every save (sample.py's metrics)."""
    save_checkpoint(obj, path, write=lambda o, f: f.write(json.dumps(o, indent=1).encode()), what=what)


def ckpt_dir(path):
    """The folder of a checkpoint: where sample.py, viz.py and edit.py write by default."""
    return os.path.dirname(os.path.abspath(path))


def load_checkpoint(path):
    """A train.py checkpoint as a plain dict; any other file -> DataError, one line naming the
    cause."""
    ckpt = read_checkpoint(path)
    keys = list(ckpt) if isinstance(ckpt, dict) else []
    if not {"model", "config", "args"} <= set(keys):
        what = f"{type(ckpt).__name__} with keys {keys[:5]}{' ...' if len(keys) > 5 else ''}"
        if {"model", "epoch"} <= set(keys):
            what += ("; it looks like a checkpoint of the authors' release: convert it with python convert.py IN OUT")
        elif keys and all(torch.is_tensor(v) for v in ckpt.values()):
            what = f"bare state_dict of {len(keys)} tensors ({keys[0]!r}, ...)"
        raise DataError(f"{path!r} is a PyTorch file but not a train.py checkpoint: a {what}")
    return ckpt


def load_weights(model, sd, path):
    """sd into model (train.py --init_from); another model's tensors -> DataError naming the first
    that differs."""
    own = model.state_dict()
    for k in [*own, *(k for k in sd if k not in own)]:
        shapes = [tuple(t[k].shape) if k in t else "none" for t in (sd, own)]
        if shapes[0] != shapes[1]:
            raise DataError(f"{path!r} does not fit this run's model: {k} is {shapes[0]} there, "
                            f"{shapes[1]} here (drop --model, --image_size, --patch_size, "
                            "--latent_dim, or use data with the checkpoint's classes)")
    model.load_state_dict(sd)


def load_model(path, device="cpu", ema=True):
    """A SphereEncoder (eval mode) and its training args from a train.py checkpoint: the EMA
    weights when it has them (train.py --ema) and ema is set, else the trained ones."""
    ckpt = load_checkpoint(path)
    ema = ema and "ema" in ckpt
    if ema:
        print0(f"using the EMA weights of {path} (--raw_weights for the trained ones)")
    try:
        model = SphereEncoder(Config(**ckpt["config"]))
        model.load_state_dict(ckpt["ema" if ema else "model"])
    except (TypeError, RuntimeError) as err:
        raise DataError(f"checkpoint {path!r} does not match its config: {str(err).splitlines()[0]}") from None
    return model.to(device).eval(), ckpt["args"]


def load_model_and_data(args):
    """viz.py, edit.py: the model of --ckpt (EMA weights unless --raw_weights), its training args,
    the images of --dataset (default: the checkpoint's)."""
    model, targs = load_model(args.ckpt, args.device, ema=not args.raw_weights)
    return model, targs, build_dataset(args.dataset or targs["dataset"],
                                       args.data_dir or targs.get("data_dir"),
                                       model.cfg.image_size)[0]


def check_writable(folder, flag):
    """Fail early, in one line naming the flag: folder (made if missing) must take a new file."""
    try:
        os.makedirs(folder, exist_ok=True)
        # A real write, not a permission check: root ignores chmod.
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        die(f"cannot write to {flag} {folder!r}: {err.strerror or err}")


def check_out_dir(args, params=0):
    """Fail early: --out_dir must be writable with room for a checkpoint (4 bytes x params x 3,
    4 with EMA)."""
    check_writable(args.out_dir, "--out_dir")
    need, free = 4 * params * (4 if args.ema > 0 else 3), shutil.disk_usage(args.out_dir).free
    room = (f"only {free / 2 ** 20:.0f} MB free in {args.out_dir!r}, a checkpoint needs about {need / 2 ** 20:.0f} MB")
    if free < need:
        die(f"{room}; free some space or choose another --out_dir")
    if free < 3 * need:
        print(f"warning: {room}", flush=True)


class Checkpointer:
    """last.pt: full (FQN-keyed) weights, optimizer, EMA, step, config, args, every rank's RNG,
    bad images."""
    def __init__(self, model, opt, ema, cfg, args, world, rank, device):
        self.model, self.opt, self.ema, self.cfg, self.args = model, opt, ema, cfg, args
        self.world, self.rank, self.device = world, rank, device
        self.path, self.saved_step = os.path.join(args.out_dir, "last.pt"), None

    def restore(self, ckpt):
        """The optimizer, EMA and this rank's RNG from ckpt -> (step, bad images)."""
        set_optimizer_state_dict(self.model, self.opt, ckpt["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        # The learning-rate multipliers and weight decay are this run's flags, not the saved ones.
        for group, mult in zip(self.opt.param_groups, (self.args.enc_lr_mult, 1.0)):
            group["lr_mult"], group["weight_decay"] = mult, self.args.weight_decay
        if self.ema is not None and "ema" in ckpt:
            self.ema.load_state_dict(ckpt["ema"])
        # Each rank takes its own saved RNG state: on the same world size the resume is exact.
        rng = ckpt["rng"][self.rank] if self.rank < len(ckpt["rng"]) else {}
        if len(ckpt["rng"]) != self.world:
            print0(f"note: saved by {len(ckpt['rng'])} process(es), resumed on {self.world}: "
                   "the weights and step carry over, the data order and noise differ from an "
                   "uninterrupted run's")
        if "cpu" in rng:
            torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and self.device.startswith("cuda"):
            torch.cuda.set_rng_state(rng["cuda"])
        self.saved_step = ckpt["step"]
        return ckpt["step"], list(ckpt.get("bad_images", []))

    def save(self, step, bad):
        """Rank 0 writes last.pt (every rank joins the gathers) -> under FSDP the gathered weights,
        for the grids."""
        rng = {"cpu": torch.get_rng_state()}
        if self.device.startswith("cuda"):
            rng["cuda"] = torch.cuda.get_rng_state()
        rngs = [rng] * self.world
        if self.world > 1:
            dist.all_gather_object(rngs, rng)
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = get_model_state_dict(self.model, options=full)
        osd = get_optimizer_state_dict(self.model, self.opt, options=full)
        # The full state dict is on rank 0 only (the other ranks get {}).
        gathered = sd if self.args.fsdp else None
        if self.rank > 0:
            return gathered
        obj = {"model": sd, "optimizer": osd, "step": step, "config": asdict(self.cfg),
               "args": vars(self.args), "rng": rngs, "bad_images": bad,
               **({"ema": self.ema.state_dict()} if self.ema is not None else {})}
        # A full disk raises DataError here; the previous last.pt stays whole.
        save_checkpoint(obj, self.path)
        self.saved_step = step
        if self.args.keep_every and step % self.args.keep_every == 0:
            save_checkpoint(obj, os.path.join(self.args.out_dir, f"ckpt_{step:07d}.pt"))
        return gathered
