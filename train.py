"""Train a Sphere Encoder, one CPU to many GPUs (arXiv 2602.15030): a step is Eq. 4-10; the settings
follow Sec. 3, 6, App. C.2, D and docs/reference.md Sec. 3-5.
    python train.py                                            # tiny model, toy data, CPU, minutes
    python train.py --dataset cifar10 --data_dir data/cifar10  # Sphere-L on CIFAR-10
    torchrun --nproc_per_node=8 train.py --dataset imagenet --data_dir /data/imagenet
    python train.py --resume --out_dir out/toy                 # continue from out/toy/last.pt
    python train.py --init_from out/toy/last.pt --out_dir out/ft   # a new run from its weights (fine-tuning)
Writes to --out_dir: last.pt, ckpt_<step>.pt, samples_<step>.png (Algorithm 1), recon_<step>.png,
log.jsonl.
"""
import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from copy import deepcopy
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torchvision.utils import save_image

from checkpoint import Checkpointer, check_out_dir, check_writable, load_checkpoint, load_weights
from cli import ANGLE, COUNT, DECAY, NONNEG, NONNEG_INT, POSITIVE, PROB, die, parser, print0, progress, script
from data import Guarded, build_dataset, build_loader, default_workers, folder_settings, skipped, subset
from losses import LossWeights, distance, load_perceptual, sphere_losses
from model import SIZES, Config, SphereEncoder, make_config
from parallel import PREEMPTED, StopSignal, agree, autocast, ddp_check, init_distributed, plan_memory, wrap
from sample import generate_batches
from spherify import noise_levels, reconstruct, refine, sigma_max

# The defaults of each data set (docs/reference.md Sec. 2-5); a flag of the same name overrides
# each one. base_lr is the peak lr at global batch 256, scaled with --batch_size (Sec. 5), and
# overridden by --lr; w are Eq. 10's weights (recon dist, recon perc, con dist, con perc, lat-con),
# overridden by --weights. toy is ours: a CPU quick start without LPIPS (lr 1e-2 at batch 32;
# docs/experiments.md Recipe E).
DATASETS = {
    "toy":      dict(model="tiny", image_size=32, alpha=80, band=85, epochs=16, warmup_epochs=0.25,
                     batch_size=32, base_lr=8e-2, w=(50.0, 0.0, 25.0, 0.0, 1.0), num_workers=0),
    "cifar10":  dict(model="L", image_size=32, alpha=80, band=85, epochs=5000, warmup_epochs=10,
                     batch_size=256, base_lr=1e-4, w=(1.0, 1.0, 0.5, 0.5, 0.1)),
    "imagenet": dict(model="L", image_size=256, alpha=85, band=89, epochs=800, warmup_epochs=5,
                     batch_size=256, base_lr=1e-4, w=(50.0, 1.0, 25.0, 1.0, 0.1)),
    "flowers":  dict(model="L", image_size=256, alpha=85, band=89, epochs=1000, warmup_epochs=10,
                     batch_size=256, base_lr=1e-4, w=(25.0, 1.0, 1.0, 1.0, 0.1)),
}


# --- flags, then the settings they leave unset

def data_and_model_flags(p):
    add = p.add_argument
    add("--dataset", choices=[*DATASETS, "folder"], help="default: toy (or the checkpoint's)")
    add("--data_dir", help="dataset root (not needed for toy)")
    add("--download", action="store_true", help="let torchvision download cifar10/flowers")
    add("--unconditional", action="store_true", help="ignore labels (train without classes)")
    add("--max_samples", type=COUNT, help="train on a fixed random subset of N images (seed 0)")
    add("--recipe", choices=list(DATASETS),
        help="--dataset folder: that data set's settings (model, latent, lr, batch, epochs, "
        "loss weights, angles); toy: the CPU quick start's. Default: CIFAR-10's or Flowers', "
        "by the images' size")
    add("--model", choices=list(SIZES), help="size (default per dataset)")
    add("--image_size", type=COUNT)
    add("--patch_size", type=COUNT, help="P: an (H/P) x (W/P) x d latent (default per dataset; Tab. 5)")
    add("--latent_dim", type=COUNT, help="d; the ratio 3HW/L = 3P^2/d (App. C.5: best near 1.5, 3)")
    add("--alpha", type=ANGLE, help="max angle (deg), sigma_max = tan(alpha) (Eq. 11-12)")
    add("--band", type=ANGLE, help="top of the mixing band (deg, >= alpha; = alpha: off; App. C.2)")
    add("--p_band", type=PROB, default=0.1, help="probability of a band draw (App. C.2)")
    add("--epochs", type=POSITIVE)
    add("--max_steps", type=NONNEG_INT, help="optimizer steps; overrides --epochs")
    add("--warmup_epochs", type=NONNEG, help="linear warmup, < --epochs")
    add("--batch_size", type=COUNT, help="global batch over all GPUs and accumulation")
    add("--grad_accum", type=COUNT, help="micro-batches a step per GPU (default: GPU: planned, CPU: 1)")
    add("--lr", type=POSITIVE, help="peak decoder lr (default: table lr x batch/256)")
    add("--min_lr", type=NONNEG, default=1e-6, help="end of the cosine decay at batch 256, scaled like lr")
    add("--enc_lr_mult", type=NONNEG, default=0.1, help="encoder lr = this x decoder lr [released]")
    add("--weight_decay", type=NONNEG, default=0.0)
    add("--clip", type=POSITIVE, default=1.0, help="gradient-norm clip")
    add("--p_drop", type=PROB, default=0.1, help="label dropout to the null class (Sec. 2.4)")
    add("--weights", type=NONNEG, nargs=5, metavar="W", help="Eq. 10: recon dist, perc, con dist, perc, lat")
    add("--perceptual_weight", type=NONNEG, help="set both perceptual weights (0 = no LPIPS)")
    add("--convnext", type=NONNEG, default=0.0, help="(LPIPS + w ConvNeXt)/(1 + w); released 0.1")
    add("--ema", type=DECAY, default=0.0, help="EMA decay in [0, 1), e.g. 0.9997; 0 = off (App. D)")


def run_flags(p):
    add = p.add_argument
    add("--out_dir", help="default: out/<dataset>")
    add("--resume", action="store_true", help="continue from <out_dir>/last.pt")
    add("--overwrite", action="store_true", help="start over in an --out_dir that holds a run")
    add("--init_from", metavar="CKPT",
        help="start a new run from this checkpoint's weights (ours or convert.py's): its model "
        "unless --model, a fresh optimizer and schedule; --resume wins")
    add("--init_ema", action="store_true", help="--init_from: its EMA weights (a train.py --ema run)")
    add("--wandb", action="store_true", help="also log to Weights & Biases (WANDB_MODE=offline: no network)")
    add("--seed", type=NONNEG_INT, default=0)
    add("--num_workers", type=NONNEG_INT, help="loader processes (default: from the CPUs)")
    add("--max_bad_frac", type=PROB, default=0.001, help="stop past this fraction unreadable")
    add("--log_every", type=COUNT, default=50)
    add("--ckpt_every", type=COUNT, help="last.pt every N steps (default: <= 1%% of the time saving)")
    add("--keep_every", type=NONNEG_INT, default=0, help="also keep ckpt_<step>.pt every N steps (0 = never)")
    add("--sample_every", type=COUNT, default=500, help="sample and reconstruction grids every N steps")
    add("--sample_steps", type=COUNT, default=4, help="Algorithm 1 steps for the grids")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--precision", choices=["bf16", "fp32"], help="bf16: autocast (default on GPU); fp32 (CPU)")
    add("--grad_ckpt", action=argparse.BooleanOptionalAction, help="recompute in backward (GPU: planned)")
    add("--dry_run", action="store_true", help="print the per-GPU memory plan and exit")
    add("--gpus", type=COUNT, help="--dry_run: GPUs to plan for (default: the processes launched)")
    add("--gpu_mem", type=POSITIVE, help="GB per GPU to plan for (default: the GPU's, or 80)")
    add("--fsdp", action="store_true", help="shard weights, grads and AdamW state over processes (FSDP2)")


def get_args(argv=None):
    """The flags, then every setting they leave unset (settings).
    -> (args, the checkpoint to start from)."""
    p = parser(__doc__, dist=True)
    data_and_model_flags(p)
    run_flags(p)
    args = p.parse_args(argv)
    ckpt = settings(args)
    if args.band < args.alpha:
        p.error(f"--band {args.band} is below --alpha {args.alpha}: the band lies above alpha (= alpha: no band)")
    if args.warmup_epochs >= args.epochs:
        p.error(f"--warmup_epochs {args.warmup_epochs} must be below --epochs {args.epochs}")
    if not any(args.w):
        p.error("--weights are all 0: nothing to train")
    # A run plans its memory for the processes torchrun launched, not for a --gpus count.
    if args.gpus and not args.dry_run:
        p.error("--gpus is for --dry_run; a run plans for the processes it has (torchrun --nproc_per_node)")
    return args, ckpt


def settings(args):
    """Fill what the flags leave unset. Precedence, the first that has a value wins:
      1. a flag given on the command line;
      2. the checkpoint's: --resume's run (a conflicting flag stops), or --init_from's data set
         and size;
      3. the data set's row of DATASETS; for --dataset folder --recipe's row, else the row its
         images' size picks (folder_defaults);
      4. argparse's defaults.
    -> the checkpoint (--resume's or --init_from's), or None."""
    args.out_dir = args.out_dir or os.path.join("out", args.dataset or "toy")
    last = os.path.join(args.out_dir, "last.pt")
    if args.resume:
        ckpt = resumed_settings(args, last)
    else:
        # A new run never overwrites one already in --out_dir, unless --overwrite says so.
        if os.path.exists(last) and not (args.overwrite or args.dry_run):
            die(f"{args.out_dir} already holds a run (last.pt at step "
                f"{load_checkpoint(last)['step']}): continue it with --resume, or start a new one "
                f"with another --out_dir (--overwrite replaces it)")
        ckpt = init_settings(args) if args.init_from else None
    args.dataset = args.dataset or "toy"
    if args.recipe and args.dataset != "folder":
        die(f"--recipe is for --dataset folder (--dataset {args.dataset} has its own settings)")
    if args.recipe and not args.data_dir:
        die(f"--recipe {args.recipe} takes its settings for a folder: give it with --data_dir")
    # --data_dir without --dataset stops, rather than quietly train on the embedded toy set.
    if args.dataset == "toy" and args.data_dir:
        others = ", ".join(k for k in DATASETS if k != "toy")
        die(f"--data_dir {args.data_dir} needs --dataset (folder, {others}): the toy set is embedded")
    defaults = (DATASETS.get(args.dataset)
                or (folder_defaults(args, args.recipe) if args.data_dir else DATASETS["flowers"]))
    # A new run from --init_from leaves --model unset, so that it keeps the checkpoint's model
    # (model_config); every other unset flag takes the data set's default.
    keep_model = args.init_from and not args.resume
    vars(args).update({k: v for k, v in defaults.items()
                       if getattr(args, k, None) is None and not (k == "model" and keep_model)})
    args.num_workers = default_workers() if args.num_workers is None else args.num_workers
    on_gpu = args.device.startswith("cuda") or args.dry_run
    args.precision = args.precision or ("bf16" if on_gpu else "fp32")
    args.w = list(args.weights or args.w)
    # --perceptual_weight sets both perceptual weights, unless --weights gives all five.
    if args.perceptual_weight is not None and args.weights is None:
        args.w[1] = args.w[3] = args.perceptual_weight
    return ckpt


def resumed_settings(args, path):
    """--resume: the run's last.pt. Its data set, model and sizes fill the flags left unset; a flag
    that differs stops (a moved --data_dir is fine)."""
    if not os.path.exists(path):
        die(f"--resume, but there is no {path} to resume from (drop --resume to start a new run)")
    ckpt = load_checkpoint(path)
    for k in ("dataset", "recipe", "model", "image_size", "patch_size", "latent_dim", "data_dir"):
        saved, given = ckpt["args"].get(k), getattr(args, k)
        if given is not None and given != saved and k != "data_dir":
            die(f"--{k} {given} conflicts with --resume: {path} was trained with --{k} {saved} "
                f"(drop the flag, or use another --out_dir)")
        setattr(args, k, saved if given is None else given)
    return ckpt


def init_settings(args):
    """--init_from: the checkpoint whose weights start this run. Its data set and image size fill
    the flags left unset; its model is this run's unless --model (model_config)."""
    ckpt = load_checkpoint(args.init_from)
    if args.init_ema and "ema" not in ckpt:
        die(f"--init_ema, but {args.init_from} has no EMA weights (its run had no --ema)")
    if args.dataset is None:
        args.dataset = ckpt["args"].get("dataset")
        args.data_dir = args.data_dir or ckpt["args"].get("data_dir")
        args.recipe = args.recipe or ckpt["args"].get("recipe")
    args.image_size = args.image_size or ckpt["config"]["image_size"]
    # Its model's name, for the log (None for a convert.py checkpoint); model_config takes its config.
    args.model = args.model or ckpt["args"].get("model")
    return ckpt


def folder_defaults(args, recipe=None):
    """--dataset folder: the recipe's settings (--recipe), else CIFAR-10's (<= 64px) or Flowers' at
    the size a few images show (or --image_size). One line says what the folder holds, what its
    scan skipped, and which settings it takes."""
    found = folder_settings(args.data_dir)
    px = found["image_size"]
    if recipe:
        # The recipe's settings, at the recipe's image size unless --image_size.
        like, size = recipe, args.image_size or DATASETS[recipe]["image_size"]
        name = f"the {recipe} recipe's settings (--recipe {recipe})"
    else:
        size = args.image_size or ((32 if px <= 48 else 64) if px <= 64 else (128 if px < 192 else 256))
        like, name = (("cifar10", "CIFAR-10's settings") if size <= 64 else ("flowers", "Flowers' settings"))
    taken = ", ".join(f"--{k} {DATASETS[like][k]}"
                      for k in ("model", "alpha", "band", "epochs", "batch_size")
                      if getattr(args, k) is None)
    n = found["num_classes"]
    classes = f"in {n} classes" if n else "and no class subfolder (unconditional)"
    left_out = skipped(args.data_dir) if int(os.environ.get("RANK", 0)) == 0 else ""   # for print0
    print0(f"folder: {found['num_images']} images {classes}, ~{px}px"
           + (f" (skipped: {left_out})" if left_out else "")
           + f" -> {name} at {size}px: {taken} (each a flag)")
    # A folder's loader reads image files: its workers come from the CPUs, not the toy recipe's 0.
    return {**{k: v for k, v in DATASETS[like].items() if k != "num_workers"}, "image_size": size}


def model_config(args, ckpt, num_classes=None):
    """The model: --resume's as saved; --init_from's (unless --model) at this run's image size,
    latent flags and classes; else make_config. num_classes None: as the config says (--dry_run)."""
    classes = {} if num_classes is None else {"num_classes": num_classes}
    # The latent's shape flags that were given (Tab. 5).
    shape = {k: getattr(args, k) for k in ("patch_size", "latent_dim") if getattr(args, k, None)}
    if ckpt and args.resume:
        cfg = Config(**ckpt["config"])
    elif ckpt and args.model in (None, ckpt["args"].get("model")):
        # --init_from's model with this run's sizes and classes: if its weights then do not fit,
        # load_weights says so in one line.
        cfg = Config(**{**ckpt["config"], "image_size": args.image_size, **shape, **classes})
    else:
        # The latent shape's preset: the recipe's for --dataset folder, else the data set's.
        latent = args.recipe or args.dataset
        cfg = make_config(args.model, latent, image_size=args.image_size, **shape, **classes)
    if num_classes is not None and cfg.num_classes != num_classes:
        die(f"the checkpoint's model has {cfg.num_classes} classes, the data {num_classes}")
    if cfg.image_size % cfg.patch_size:
        die(f"--image_size {cfg.image_size} must be a multiple of --patch_size {cfg.patch_size} (the latent is a grid)")
    return cfg


def lr_range(args):
    """(peak, min) lr, both x global batch / 256 (Sec. 5 [released]); --lr sets the peak as
    given."""
    scale = args.batch_size / 256
    return (args.lr if args.lr is not None else args.base_lr * scale), args.min_lr * scale


def get_lr(step, peak, warmup, total, min_lr):
    """Linear warmup, cosine to min_lr at total - warmup, then held (docs/reference.md Sec. 5
    [released])."""
    # Warmup climbs to peak (step + 1) / (warmup + 1) at its last step, then the cosine starts at peak.
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    # The cosine spans total - 2 warmup steps: it reaches min_lr warmup steps before the end, and holds.
    t = (step - warmup) / max(1, total - 2 * warmup)
    return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


# --- data, model, optimizer

def load_data(args):
    """The training set, Guarded (unreadable images skipped), --max_samples' subset
    -> (dataset, classes)."""
    ds, num_classes = build_dataset(args.dataset, args.data_dir, args.image_size, args.unconditional, args.download)
    # A fixed subset: the same N images on every run.
    if args.max_samples:
        ds = torch.utils.data.Subset(ds, subset(len(ds), args.max_samples))
    return Guarded(ds), num_classes


def schedule(args, num_images, world):
    """(micro-batch per process, total steps, warmup steps) for the global --batch_size."""
    steps_per_epoch = num_images // args.batch_size
    if steps_per_epoch == 0:
        die(f"the dataset has {num_images} images, fewer than one global batch of {args.batch_size}")
    max_steps = args.max_steps if args.max_steps is not None else int(args.epochs * steps_per_epoch)
    micro = args.batch_size // (world * args.grad_accum)
    return micro, max_steps, int(args.warmup_epochs * steps_per_epoch)


def build_model(cfg, args, world, rank, device, ckpt):
    """Model (FSDP-sharded or not), AdamW, EMA, Checkpointer, the net the step calls, and the
    resumed step."""
    # The same seed on every rank gives every rank the same initial weights; a seed per rank then
    # gives each rank its own noise, flips and dropout.
    torch.manual_seed(args.seed)
    model = SphereEncoder(cfg).to(device)
    torch.manual_seed(args.seed + rank)
    model.set_grad_checkpointing(args.grad_ckpt)
    check_out_dir(args, model.num_params())
    # The weights to start from: --resume's, or --init_from's (its EMA's with --init_ema).
    if ckpt:
        load_weights(model, ckpt["model" if args.resume or not args.init_ema else "ema"],
                     os.path.join(args.out_dir, "last.pt") if args.resume else args.init_from)
    # The EMA copy is taken before wrap() adds DDP's hooks to the model, and wrap() comes before
    # AdamW, as FSDP replaces the parameters with their shards.
    ema = deepcopy(model).requires_grad_(False) if args.ema > 0 else None
    net = wrap(model, device, world, args.fsdp, args.compile, bf16=args.precision == "bf16")
    # AdamW (0.9, 0.95), the encoder in its own group at --enc_lr_mult x the decoder's lr
    # [released]. lr=1.0 is a placeholder: every step sets each group's lr to get_lr(step) x its
    # lr_mult.
    opt = torch.optim.AdamW([{"params": model.encoder.parameters(), "lr_mult": args.enc_lr_mult},
                             {"params": model.decoder.parameters(), "lr_mult": 1.0}],
                            lr=1.0, betas=(0.9, 0.95), weight_decay=args.weight_decay,
                            fused=device.startswith("cuda"))
    checkpointer = Checkpointer(model, opt, ema, cfg, args, world, rank, device)
    # A resumed run goes on from its step, with the unreadable images it met so far (bad).
    step, bad = checkpointer.restore(ckpt) if ckpt and args.resume else (0, [])
    return model, opt, ema, checkpointer, net, step, bad


# --- one training step

def hflip(x):
    """Sec. 3: each image (B, C, H, W) mirrored left-right with probability 1/2, the draw on x's
    device."""
    return torch.where(torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)


def micro_batches(data, args, ds, bad, bar, device):
    """The step's --grad_accum micro-batches (x, y) on the device, h-flipped (Sec. 3); bad images
    named once."""
    for _ in range(args.grad_accum):
        x, y, replaced = next(data)
        for j in dict.fromkeys(replaced[replaced >= 0].tolist()).keys() - set(bad):
            bad.append(j)
            bar.write(f"warning: unreadable image skipped (the next one used instead): {ds.path(j)}")
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        yield hflip(x), y


def compute_losses(net, x, y, args, conditional, band, perceptual, device):
    """Eq. 4-10 on one micro-batch: the losses, and for the log z, D(v_noisy) (what Eq. 7 compared
    with x) and D(v_NOISY), detached."""
    # Each image's noise scales for Eq. 4 and 6 (Eq. 5, with App. C.2's band).
    sigma, sigma_sub = noise_levels(len(x), args.alpha, band, args.p_band, device=device)
    lat_con, pix_con = args.w[4] > 0, args.w[2] > 0 or args.w[3] > 0
    with autocast(device, args.precision == "bf16"):
        # The forward pass, Eq. 4-9 (model.py); an unconditional run passes no labels.
        y = y if conditional else None
        z, x_NOISY, x_noisy, z_re = net(x, y, sigma, sigma_sub, args.p_drop, pix_con=pix_con, lat_con=lat_con)
        # The loss terms and their weighted sum (Eq. 7-10).
        losses = sphere_losses(x, z, x_NOISY, x_noisy, z_re, LossWeights(*args.w), perceptual)
    x_rec = x_NOISY if x_noisy is None else x_noisy
    return {**losses, "z": z.detach(), "x_noisy": x_rec.detach(), "x_NOISY": x_NOISY.detach()}


def train_step(net, model, opt, ema, batches, loss_fn, args):
    """One optimizer step over the micro-batches, gradients reduced across ranks on the last one
    only; clip, AdamW, EMA. -> the last micro-batch's losses, the gradient norm (a DTensor under
    FSDP), its images."""
    for i, (x, y) in enumerate(batches):
        last = i == args.grad_accum - 1
        # Reduce the gradients on the last micro-batch only: FSDP by a flag, DDP by no_sync().
        if args.fsdp:
            model.set_requires_gradient_sync(last)
        with nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync():
            losses = loss_fn(x, y)
            (losses["total"] / args.grad_accum).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if ema is not None:
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - args.ema)
    return losses, grad_norm, x


# --- what the loop does at its sync steps: check, log, save, sample

def check_health(first_bad, bad, ds, args, saved_step):
    """A non-finite loss or too many unreadable images: the message to stop with, else None."""
    if first_bad >= 0:
        saved = f"step {saved_step}" if saved_step else "none yet"
        return (f"non-finite loss at step {first_bad}; stopped. The last good checkpoint ({saved}) "
                f"is untouched in {args.out_dir}")
    if len(bad) > args.max_bad_frac * len(ds):
        return (f"{len(bad)} unreadable images, more than --max_bad_frac {args.max_bad_frac} of "
                f"{len(ds)} (first: {', '.join(ds.path(j) for j in bad[:3])}); list them all with "
                f"python data.py --check --dataset {args.dataset} --data_dir {args.data_dir}")


@torch.no_grad()
def diagnostics(x, out, perceptual):
    """From the step's last micro-batch, unweighted: the distance and perceptual parts of Eq. 7
    (D(v_noisy) vs x) and Eq. 8 (D(v_NOISY) vs D(v_noisy)); recon_psnr, the PSNR (dB, images in
    [0, 1]) of D(v_noisy) vs x; z_rms, z_rms_std: the batch mean and std of the encoder's latent
    RMS ||z|| / sqrt(L) before spherify (Eq. 1). LPIPS: recomputed."""
    x, x_noisy, x_NOISY = x.float(), out["x_noisy"].float(), out["x_NOISY"].float()
    rms = out["z"].float().pow(2).flatten(1).mean(1).sqrt()     # (B,)
    mse = (x_noisy - x).div(2).pow(2).flatten(1).mean(1)        # (B,), on the [0, 1] scale
    parts = {"recon_dist": distance(x_noisy, x), "con_dist": distance(x_NOISY, x_noisy)}
    if perceptual is not None:
        parts |= {"recon_perc": perceptual(x_noisy, x), "con_perc": perceptual(x_NOISY, x_noisy)}
    return {**{k: v.mean() for k, v in parts.items()},
            "recon_psnr": (-10 * mse.clamp_min(1e-10).log10()).mean(),
            "z_rms": rms.mean(), "z_rms_std": rms.std(correction=0)}


def log_step(losses, grad_norm, extra, step, lr, img_per_s, bad, args, bar, master, run=None):
    """Loss terms, grad norm and diagnostics (extra), averaged over ranks: a line under the progress
    bar, a record in log.jsonl, and in Weights & Biases' run (--wandb)."""
    # Under FSDP the gradient norm is a DTensor: gather it whole.
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    vals = {"loss": losses["total"], **{k: losses[k] for k in ("recon", "pix_con", "lat_con")},
            "grad_norm": grad_norm, **extra}
    logs = torch.stack([v.detach().float() for v in vals.values()])
    if dist.is_initialized():
        dist.all_reduce(logs, op=dist.ReduceOp.AVG)
    rec = dict(step=step, **dict(zip(vals, logs.tolist())), lr=lr, img_per_s=img_per_s, bad_images=len(bad))
    if master:
        bar.write(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()))
        with open(os.path.join(args.out_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")
        if run is not None:
            run.log(rec, step=step)


@torch.no_grad()
def save_grids(model, ema, x, args, step, device, master, sd=None, n=8):
    """Rank 0 writes samples_<step>.png (a row a class, up to 10; Algorithm 1 from fixed noise) and
    recon_<step>.png (rows: x, D(f(E(x))), then D(f(f(E(x)) + r sigma e)) at r = 0.5 and 1, fixed
    e), of the EMA or the model. Called on every rank: under FSDP the weights are gathered (sd: the
    checkpoint's gather, if this step saved one) into a copy built on `meta`, with the model's
    buffers."""
    # Gathering the sharded weights is a collective, so every rank takes part.
    if args.fsdp and sd is None:
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        sd = get_model_state_dict(model, options=full)
    if not master:
        return
    if args.fsdp:
        # On `meta` no weights are initialised, and fork_rng leaves the training's random state
        # as it was.
        with torch.device("meta"), torch.random.fork_rng(devices=[]):
            copy = SphereEncoder(model.cfg)
        copy.load_state_dict(sd, assign=True)
        # The buffers (positions, RoPE) are not sharded: the copy takes the model's own.
        for name, buf in model.named_buffers():
            module, _, attr = name.rpartition(".")
            setattr(copy.get_submodule(module), attr, buf)
        model = copy.to(device)
    model = ema or model
    cfg, was_training, bf16 = model.cfg, model.training, args.precision == "bf16"
    model.eval()
    # A fixed seed: every grid starts from the same noise, so grids of different steps compare.
    g = torch.Generator(device).manual_seed(1234)
    # A row a class: up to 10 classes, evenly spread.
    rows = torch.linspace(0, cfg.num_classes - 1, min(cfg.num_classes, 10)).round().long()
    labels = rows.repeat_interleave(n).to(device) if cfg.num_classes else None
    e = torch.randn(max(1, len(rows)) * n, cfg.grid, cfg.grid, cfg.latent_dim, generator=g, device=device)
    sigma = sigma_max(args.alpha)
    imgs = next(generate_batches(model, [(e, labels, g)], args.sample_steps, sigma, bf16=bf16))[-1]
    x = x[:n]
    with autocast(device, bf16):
        recon = [reconstruct(model, x)]                         # Eq. 2: D(f(E(x)))
        for r in (0.5, 1.0):                                    # Eq. 4 at noise r sigma
            recon += refine(model, x, None, [r], sigma, generator=torch.Generator(device).manual_seed(1234))
    save_image(imgs * 0.5 + 0.5, os.path.join(args.out_dir, f"samples_{step:07d}.png"), nrow=n)
    save_image(torch.cat([x, *recon]) * 0.5 + 0.5, os.path.join(args.out_dir, f"recon_{step:07d}.png"), nrow=len(x))
    model.train(was_training)


def due(step, every, max_steps):
    """Every `every` steps, and at the last (every None or 0: never)."""
    return bool(every) and (step % every == 0 or step == max_steps)


def stop(bar, msg, code):
    """End the run with msg on a line of its own (the progress bar closed first)."""
    bar.close()
    die(msg, code)


# --- the run

def start(args, master):
    """A new run's --out_dir (writable; its old log.jsonl removed) and, with --wandb, Weights &
    Biases' run."""
    # Fail before loading the data if --out_dir is not writable (build_model checks its room).
    check_writable(args.out_dir, "--out_dir")
    # A new run starts a new log.
    log = os.path.join(args.out_dir, "log.jsonl")
    if master and not args.resume and os.path.exists(log):
        os.remove(log)
    if not (args.wandb and master):
        return None
    # wandb is optional: it is not in requirements.txt.
    try:
        import wandb
    except ImportError:
        die("--wandb needs the wandb package: pip install wandb (or drop --wandb)")
    name = os.path.basename(os.path.abspath(args.out_dir))
    return wandb.init(project="sphere-encoder", name=name, dir=args.out_dir, config=vars(args))


def perceptual_loss(args, device):
    """The perceptual term's network (LPIPS, --convnext), or None with a warning when its weights
    are 0."""
    if not (args.w[1] > 0 or args.w[3] > 0):
        print0("warning: training WITHOUT the paper's perceptual (LPIPS) loss term: --perceptual_weight 1 adds it")
        return None
    try:
        return load_perceptual(args.convnext).to(device)
    except RuntimeError as err:
        # Offline without the VGG weights: the error says what to do, in one line.
        die(str(err))


@dataclass
class Run:
    """What the loop works with, made by setup()."""
    args: argparse.Namespace
    ds: Guarded                             # the training set; unreadable images are skipped
    model: SphereEncoder                    # the weights (sharded in place under FSDP)
    net: torch.nn.Module                    # what a step calls: the model, DDP-wrapped or compiled
    opt: torch.optim.AdamW
    ema: Optional[SphereEncoder]            # --ema's average, or None
    checkpointer: Checkpointer              # writes last.pt
    loss_fn: Callable                       # compute_losses of one micro-batch
    perceptual: Optional[torch.nn.Module]   # LPIPS (for the log's diagnostics too), or None
    wandb: object                           # --wandb's run, or None
    step: int                               # where the run starts: 0, or --resume's step
    bad: list                               # unreadable images met so far
    micro: int                              # micro-batch per process
    max_steps: int
    warmup: int                             # warmup steps
    lr: tuple                               # (peak, min) learning rate
    world: int
    rank: int
    device: str


def setup(args, ckpt, world, rank, device):
    """The run's folder, data, model, memory plan, optimizer and loss, and one line that sums them
    up."""
    wandb_run = start(args, rank == 0)
    ds, num_classes = load_data(args)
    cfg = model_config(args, ckpt, num_classes)
    args.grad_accum, args.grad_ckpt = plan_memory(args, cfg, world, device)
    micro, max_steps, warmup = schedule(args, len(ds), world)
    lr, min_lr = lr_range(args)
    model, opt, ema, checkpointer, net, step, bad = build_model(cfg, args, world, rank, device, ckpt)
    if ckpt:
        print0(f"resumed from {checkpointer.path} at step {step}" if args.resume else
               f"started from the {'EMA ' if args.init_ema else ''}weights of {args.init_from}")
    perceptual = perceptual_loss(args, device)
    band = args.band if args.band > args.alpha else None
    loss_fn = partial(compute_losses, net, args=args, conditional=cfg.num_classes > 0, band=band,
                      perceptual=perceptual, device=device)
    print0(f"{args.dataset}: {len(ds)} images, {cfg.num_classes} classes | "
           f"model {args.model or args.init_from}: {model.num_params() / 1e6:.1f}M params, "
           f"latent {cfg.grid}x{cfg.grid}x{cfg.latent_dim} "
           f"(ratio 3HW/L {3 * cfg.patch_size ** 2 / cfg.latent_dim:.3g}) | "
           f"{world} process(es) x {args.grad_accum} accum x {micro} = batch {args.batch_size} | "
           f"{max_steps} steps, lr {lr:.2e}, alpha {args.alpha} band {band} | {device}")
    return Run(args, ds, model, net, opt, ema, checkpointer, loss_fn, perceptual, wandb_run, step,
               bad, micro, max_steps, warmup, (lr, min_lr), world, rank, device)


def train(r):
    """The loop, a step at a time to max_steps. The ranks sync only at log, sample and checkpoint
    steps (and, in one process, on a signal). -> the last step."""
    args, master, step = r.args, r.rank == 0, r.step
    data = build_loader(r.ds, args, r.world, r.rank, r.device, r.micro, step)
    logged, t0, saved_at, save_s = step, time.time(), time.time(), 0.0
    # The first step with a non-finite loss (-1: none yet), kept on the device: no sync a step.
    bad_step = torch.tensor(-1, device=r.device)
    # On any exit the progress bar is closed and the signal handlers restored.
    with (progress(total=r.max_steps, initial=step, disable=not master, dynamic_ncols=True) as bar,
          StopSignal() as signals):
        while step < r.max_steps:
            # This step's learning rate: warmup, then cosine; the encoder's group at --enc_lr_mult.
            lr = get_lr(step, r.lr[0], r.warmup, r.max_steps, r.lr[1])
            for group in r.opt.param_groups:
                group["lr"] = lr * group["lr_mult"]
            # Forward, backward and update over --grad_accum micro-batches (Eq. 4-10).
            batches = micro_batches(data, args, r.ds, r.bad, bar, r.device)
            losses, grad_norm, x = train_step(r.net, r.model, r.opt, r.ema, batches, r.loss_fn, args)
            finite = torch.isfinite(losses["total"].detach())
            bad_step = torch.where((bad_step < 0) & ~finite, step, bad_step)
            step += 1
            bar.update(1)
            every = (args.log_every, args.sample_every, args.ckpt_every)
            if not (any(due(step, k, r.max_steps) for k in every) or (r.world == 1 and signals.got)):
                continue
            # A sync step. The ranks agree on a non-finite loss, a save due by time (rank 0's
            # clock, as it writes; at most 1% of the time goes to saving) and a signal; then log,
            # save and sample.
            timed_save = (master and not args.ckpt_every and time.time() - saved_at >= max(60.0, 100 * save_s))
            first_bad, timed_save, signalled = agree(bad_step, timed_save, signals.got is not None, r.bad, r.device)
            if msg := check_health(first_bad, r.bad, r.ds, args, r.checkpointer.saved_step):
                stop(bar, msg, 1 if first_bad >= 0 else 2)
            if due(step, args.log_every, r.max_steps):
                img_per_s = (step - logged) * args.batch_size / (time.time() - t0)
                extra = diagnostics(x, losses, r.perceptual)
                log_step(losses, grad_norm, extra, step, lr, img_per_s, r.bad, args, bar, master, r.wandb)
                logged, t0 = step, time.time()
            sd = None
            save = (due(step, args.ckpt_every, r.max_steps) if args.ckpt_every else timed_save or step == r.max_steps)
            # A full disk stops the run with a DataError.
            if save or signalled:
                t, sd = time.time(), r.checkpointer.save(step, r.bad)
                saved_at, save_s = time.time(), time.time() - t
            if signalled:
                stop(bar, f"stopped by {signals.got or 'a signal on another rank'} at step {step}; "
                          f"{r.checkpointer.path} written: continue with --resume --out_dir "
                          f"{args.out_dir}", PREEMPTED)
            if due(step, args.sample_every, r.max_steps):
                save_grids(r.model, r.ema, x, args, step, r.device, master, sd)
    return step


@script
def main(argv=None):
    args, ckpt = get_args(argv)
    world, rank, device = init_distributed(args.device, args.dist_timeout)
    if args.fsdp and not dist.is_initialized() and not args.dry_run:
        die("--fsdp shards over processes: launch with torchrun --nproc_per_node=N")
    if args.fsdp and args.ema > 0:
        die("--ema is not supported with --fsdp")
    # --dry_run prints the per-GPU memory plan, part by part, and trains nothing.
    if args.dry_run:
        plan_memory(args, model_config(args, ckpt), world, device)
        sys.exit(0)
    r = setup(args, ckpt, world, rank, device)
    # The resumed weights are in the model now: the checkpoint need not stay in RAM.
    del ckpt
    step = train(r)
    if dist.is_initialized():
        if not args.fsdp:
            ddp_check(r.model, world)
        # The ranks leave together: rank 0 may still be writing grids while the others finish.
        dist.barrier()
        dist.destroy_process_group()
    if r.wandb is not None:
        r.wandb.finish()
    print0(f"done: {step} steps, checkpoint {r.checkpointer.path}")


if __name__ == "__main__":
    main()
