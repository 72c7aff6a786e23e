"""Train a Sphere Encoder, one CPU to many GPUs (arXiv 2602.15030): a step is Eq. 4-10; settings per
Sec. 3, 6, App. C.2, D and docs/reference.md Sec. 3-5.
    python train.py                                            # tiny model, toy data, CPU, minutes
    python train.py --dataset cifar10 --data_dir data/cifar10  # Sphere-L on CIFAR-10
    torchrun --nproc_per_node=8 train.py --dataset imagenet --data_dir /data/imagenet
    python train.py --resume --out_dir out/toy                 # continue from out/toy/last.pt
    python train.py --init_from out/toy/last.pt --out_dir out/ft   # a new run from its weights (fine-tuning)
Writes to --out_dir: last.pt, ckpt_<step>.pt, samples_<step>.png (Algorithm 1), recon_<step>.png, log.jsonl.
"""
import argparse
import json
import math
import os
import time
from contextlib import nullcontext
from copy import deepcopy

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torchvision.utils import save_image

from checkpoint import Checkpointer, check_out_dir, check_writable, load_checkpoint, load_weights
from data import (ANGLE, COUNT, DECAY, POSITIVE, PROB, STEPS, WEIGHT, Guarded, build_dataset, build_loader,
                  default_workers, die, folder_settings, parser, print0, progress, script, subset)
from losses import LossWeights, distance, load_perceptual, sphere_losses
from model import SIZES, Config, SphereEncoder, make_config
from parallel import PREEMPTED, StopSignal, agree, ddp_check, fit_to_gpu, init_distributed, wrap
from spherify import generate, noise_levels, reconstruct, refine, sigma_max

# Per-dataset defaults (docs/reference.md Sec. 2-5), each overridden by the flag of its name; base_lr (the peak lr at
# global batch 256, scaled with --batch_size, Sec. 5) by --lr; w (Eq. 10: recon dist, recon perc, con dist, con perc,
# lat-con) by --weights. toy: ours, a CPU quick start without LPIPS (lr 1e-2 at batch 32; docs/experiments.md Recipe E).
DATASETS = {
    "toy":      dict(model="tiny", image_size=32, alpha=80, band=85, epochs=16, warmup_epochs=0.25, batch_size=32,
                     base_lr=8e-2, w=(50.0, 0.0, 25.0, 0.0, 1.0), num_workers=0),
    "cifar10":  dict(model="L", image_size=32, alpha=80, band=85, epochs=5000, warmup_epochs=10, batch_size=256,
                     base_lr=1e-4, w=(1.0, 1.0, 0.5, 0.5, 0.1)),
    "imagenet": dict(model="L", image_size=256, alpha=85, band=89, epochs=800, warmup_epochs=5, batch_size=256,
                     base_lr=1e-4, w=(50.0, 1.0, 25.0, 1.0, 0.1)),
    "flowers":  dict(model="L", image_size=256, alpha=85, band=89, epochs=1000, warmup_epochs=10, batch_size=256,
                     base_lr=1e-4, w=(25.0, 1.0, 1.0, 1.0, 0.1)),
}


def folder_defaults(args):
    """--dataset folder: CIFAR-10's settings (<= 64px) or Flowers' at the size a few images show (or --image_size);
    a line says which."""
    found = folder_settings(args.data_dir)
    px = found["image_size"]
    size = args.image_size or ((32 if px <= 48 else 64) if px <= 64 else (128 if px < 192 else 256))
    like, name = ("cifar10", "CIFAR-10's") if size <= 64 else ("flowers", "Flowers'")
    taken = ", ".join(f"--{k} {DATASETS[like][k]}" for k in ("model", "alpha", "band", "epochs", "batch_size")
                      if getattr(args, k) is None)
    classes = f"in {found['num_classes']} classes" if found["num_classes"] else "and no class subfolder (unconditional)"
    print0(f"folder: {found['num_images']} images {classes}, ~{px}px -> {name} settings at {size}px: {taken} "
           f"(each a flag)")
    return {**DATASETS[like], "image_size": size}


def get_args(argv=None):
    p = parser(__doc__, dist=True)
    p.add_argument("--dataset", choices=[*DATASETS, "folder"], help="default: toy (or the checkpoint's)")
    p.add_argument("--data_dir", help="dataset root (not needed for toy)")
    p.add_argument("--download", action="store_true", help="let torchvision download cifar10/flowers")
    p.add_argument("--unconditional", action="store_true", help="ignore labels (train without classes)")
    p.add_argument("--max_samples", type=COUNT, help="train on a fixed random subset of N images (seed 0)")
    p.add_argument("--model", choices=list(SIZES), help="size (default per dataset)")
    p.add_argument("--image_size", type=COUNT)
    p.add_argument("--patch_size", type=COUNT, help="P: an (H/P) x (W/P) x d latent (default per dataset; Tab. 5)")
    p.add_argument("--latent_dim", type=COUNT, help="d; the ratio 3HW/L = 3P^2/d (App. C.5: best near 1.5, 3)")
    p.add_argument("--alpha", type=ANGLE, help="max angle (deg), sigma_max = tan(alpha) (Eq. 11-12)")
    p.add_argument("--band", type=ANGLE, help="top of the mixing band (deg, >= alpha; = alpha: off; App. C.2)")
    p.add_argument("--p_band", type=PROB, default=0.1, help="probability of a band draw (App. C.2)")
    p.add_argument("--epochs", type=POSITIVE)
    p.add_argument("--max_steps", type=STEPS, help="optimizer steps; overrides --epochs")
    p.add_argument("--warmup_epochs", type=WEIGHT, help="linear warmup, < --epochs")
    p.add_argument("--batch_size", type=COUNT, help="global batch over all GPUs and accumulation")
    p.add_argument("--grad_accum", type=COUNT, help="micro-batches a step per GPU (default: GPU: planned, CPU: 1)")
    p.add_argument("--lr", type=POSITIVE, help="peak decoder lr (default: table lr x batch/256)")
    p.add_argument("--min_lr", type=WEIGHT, default=1e-6, help="end of the cosine decay at batch 256, scaled like lr")
    p.add_argument("--enc_lr_mult", type=WEIGHT, default=0.1, help="encoder lr = this x decoder lr [released]")
    p.add_argument("--weight_decay", type=WEIGHT, default=0.0)
    p.add_argument("--clip", type=POSITIVE, default=1.0, help="gradient-norm clip")
    p.add_argument("--p_drop", type=PROB, default=0.1, help="label dropout to the null class (Sec. 2.4)")
    p.add_argument("--weights", type=WEIGHT, nargs=5, metavar="W", help="Eq. 10: recon dist, perc, con dist, perc, lat")
    p.add_argument("--perceptual_weight", type=WEIGHT, help="set both perceptual weights (0 = no LPIPS)")
    p.add_argument("--convnext", type=WEIGHT, default=0.0, help="(LPIPS + w ConvNeXt)/(1 + w); released 0.1")
    p.add_argument("--ema", type=DECAY, default=0.0, help="EMA decay in [0, 1), e.g. 0.9997; 0 = off (App. D)")
    p.add_argument("--out_dir", help="default: out/<dataset>")
    p.add_argument("--resume", action="store_true", help="continue from <out_dir>/last.pt")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out_dir that holds a run")
    p.add_argument("--init_from", metavar="CKPT", help="start a new run from this checkpoint's weights (ours or "
                   "convert.py's): its model unless --model, a fresh optimizer and schedule; --resume wins")
    p.add_argument("--init_ema", action="store_true", help="--init_from: its EMA weights (a train.py --ema run)")
    p.add_argument("--wandb", action="store_true", help="also log to Weights & Biases (WANDB_MODE=offline: no network)")
    p.add_argument("--seed", type=STEPS, default=0)
    p.add_argument("--num_workers", type=STEPS, help="loader processes (default: from the CPUs)")
    p.add_argument("--max_bad_frac", type=PROB, default=0.001, help="stop past this fraction unreadable")
    p.add_argument("--log_every", type=COUNT, default=50)
    p.add_argument("--ckpt_every", type=COUNT, help="last.pt every N steps (default: <= 1%% of the time saving)")
    p.add_argument("--keep_every", type=STEPS, default=0, help="also keep ckpt_<step>.pt every N steps (0 = never)")
    p.add_argument("--sample_every", type=COUNT, default=500, help="sample and reconstruction grids every N steps")
    p.add_argument("--sample_steps", type=COUNT, default=4, help="Algorithm 1 steps for the grids")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--precision", choices=["bf16", "fp32"], help="bf16: autocast (default on GPU); fp32 (CPU)")
    p.add_argument("--grad_ckpt", action=argparse.BooleanOptionalAction, help="recompute in backward (GPU: planned)")
    p.add_argument("--dry_run", action="store_true", help="print the per-GPU memory plan and exit")
    p.add_argument("--gpus", type=COUNT, help="--dry_run: GPUs to plan for (default: the processes launched)")
    p.add_argument("--gpu_mem", type=POSITIVE, help="GB per GPU to plan for (default: the GPU's, or 80)")
    p.add_argument("--fsdp", action="store_true", help="shard weights, grads and AdamW state over processes (FSDP2)")
    args = p.parse_args(argv)
    args.out_dir = args.out_dir or os.path.join("out", args.dataset or "toy")
    path, ckpt = os.path.join(args.out_dir, "last.pt"), None
    if args.resume:                    # what the flags leave unset comes from the checkpoint; a conflict stops
        if not os.path.exists(path):
            die(f"--resume, but there is no {path} to resume from (drop --resume to start a new run)")
        ckpt = load_checkpoint(path)
        for k in ("dataset", "model", "image_size", "patch_size", "latent_dim", "data_dir"):
            saved, given = ckpt["args"].get(k), getattr(args, k)
            if given is not None and given != saved and k != "data_dir":   # a moved data set is fine
                die(f"--{k} {given} conflicts with --resume: {path} was trained with --{k} {saved} "
                    f"(drop the flag, or use another --out_dir)")
            setattr(args, k, saved if given is None else given)
    elif os.path.exists(path) and not (args.overwrite or args.dry_run):   # a second run never eats the first
        die(f"{args.out_dir} already holds a run (last.pt at step {load_checkpoint(path)['step']}): continue it "
            f"with --resume, or start a new one with another --out_dir (--overwrite replaces it)")
    if args.init_from and not args.resume:   # its model (unless --model), data set and size, unless flags say
        ckpt = load_checkpoint(args.init_from)
        if args.init_ema and "ema" not in ckpt:
            die(f"--init_ema, but {args.init_from} has no EMA weights (its run had no --ema)")
        if args.dataset is None:
            args.dataset, args.data_dir = ckpt["args"].get("dataset"), args.data_dir or ckpt["args"].get("data_dir")
        args.image_size, args.model = args.image_size or ckpt["config"]["image_size"], args.model or "init_from"
    args.dataset = args.dataset or "toy"
    if args.dataset == "toy" and args.data_dir:                             # never trains on the toy set instead
        die(f"--data_dir {args.data_dir} needs --dataset (folder, {', '.join(k for k in DATASETS if k != 'toy')}): "
            f"the toy set is embedded")
    defaults = DATASETS.get(args.dataset) or (folder_defaults(args) if args.data_dir else DATASETS["flowers"])
    vars(args).update({k: v for k, v in defaults.items() if getattr(args, k, None) is None})   # flags given win
    args.num_workers = default_workers() if args.num_workers is None else args.num_workers
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") or args.dry_run else "fp32")
    args.w = list(args.weights or args.w)
    if args.perceptual_weight is not None and args.weights is None:            # --weights wins
        args.w[1] = args.w[3] = args.perceptual_weight
    if args.band < args.alpha:
        p.error(f"--band {args.band} is below --alpha {args.alpha}: the band lies above alpha (= alpha: no band)")
    if args.warmup_epochs >= args.epochs:
        p.error(f"--warmup_epochs {args.warmup_epochs} must be below --epochs {args.epochs}")
    if not any(args.w):
        p.error("--weights are all 0: nothing to train")
    if args.gpus and not args.dry_run:                                      # a run plans for what torchrun launched
        p.error("--gpus is for --dry_run; a run plans for the processes it has (torchrun --nproc_per_node)")
    return args, ckpt


def lr_range(args):
    """(peak, min) lr, both x global batch / 256 (Sec. 5 [released]); --lr sets the peak as given."""
    scale = args.batch_size / 256
    return (args.lr if args.lr is not None else args.base_lr * scale), args.min_lr * scale


def get_lr(step, peak, warmup, total, min_lr):
    """Linear warmup, cosine to min_lr at total - warmup, then held (docs/reference.md Sec. 5 [released])."""
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    t = (step - warmup) / max(1, total - 2 * warmup)
    return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def setup_data(args, ckpt, world, device):
    """Data (Guarded), model config, memory plan (fit_to_gpu; --dry_run exits) -> ds, cfg, micro, max_steps, warmup."""
    ds, num_classes = (None, None) if args.dry_run else build_dataset(args.dataset, args.data_dir, args.image_size,
                                                                     args.unconditional, args.download)
    classes = {"num_classes": num_classes} if ds else {}
    shape = {k: getattr(args, k) for k in ("patch_size", "latent_dim") if getattr(args, k, None)}   # Tab. 5
    if ckpt and not args.resume and args.model == "init_from":             # its model at this run's size, classes
        cfg = Config(**{**ckpt["config"], "image_size": args.image_size, **shape, **classes})   # a misfit: one line
    else:
        cfg = Config(**ckpt["config"]) if ckpt else make_config(args.model, args.dataset, image_size=args.image_size,
                                                                **shape, **classes)
    if ds is not None and args.max_samples:                               # the same N images on every run
        ds = torch.utils.data.Subset(ds, subset(len(ds), args.max_samples))
    if ds is not None and cfg.num_classes != num_classes:
        die(f"the checkpoint's model has {cfg.num_classes} classes, the data {num_classes}")
    if cfg.image_size % cfg.patch_size:
        die(f"--image_size {cfg.image_size} must be a multiple of --patch_size {cfg.patch_size} (the latent is a grid)")
    fit_to_gpu(args, cfg, world, device)                                    # sets --grad_accum, --grad_ckpt
    steps_per_epoch = len(ds) // args.batch_size
    if steps_per_epoch == 0:
        die(f"the dataset has {len(ds)} images, fewer than one global batch of {args.batch_size}")
    max_steps = args.max_steps if args.max_steps is not None else int(args.epochs * steps_per_epoch)
    micro, warmup = args.batch_size // (world * args.grad_accum), int(args.warmup_epochs * steps_per_epoch)
    return Guarded(ds), cfg, micro, max_steps, warmup


def build_model(cfg, args, world, rank, device, ckpt):
    """Model (FSDP-sharded or not), AdamW, EMA, Checkpointer, the net the step calls, and the resumed step."""
    torch.manual_seed(args.seed)                                            # the same init on every rank
    model = SphereEncoder(cfg).to(device)
    torch.manual_seed(args.seed + rank)                                     # per-rank noise, flips, dropout
    model.set_grad_checkpointing(args.grad_ckpt)
    check_out_dir(args, model.num_params())
    if ckpt:                                                                # --resume, or --init_from's weights
        load_weights(model, ckpt["model" if args.resume or not args.init_ema else "ema"],
                     os.path.join(args.out_dir, "last.pt") if args.resume else args.init_from)
    ema = deepcopy(model).requires_grad_(False) if args.ema > 0 else None   # before DDP's hooks
    net = wrap(model, device, world, args.fsdp, args.compile, bf16=args.precision == "bf16")   # before AdamW: FSDP
    # AdamW (0.9, 0.95), the encoder at --enc_lr_mult x the decoder's lr in its own group [released]
    opt = torch.optim.AdamW([{"params": model.encoder.parameters(), "lr_mult": args.enc_lr_mult},
                             {"params": model.decoder.parameters(), "lr_mult": 1.0}], lr=1.0, betas=(0.9, 0.95),
                            weight_decay=args.weight_decay, fused=device.startswith("cuda"))
    checkpointer = Checkpointer(model, opt, ema, cfg, args, world, rank, device)
    step, bad = checkpointer.restore(ckpt) if ckpt and args.resume else (0, [])   # bad: unreadable images
    return model, opt, ema, checkpointer, net, step, bad


@torch.no_grad()
def save_grids(model, ema, x, args, step, device, master, sd=None, n=8):
    """Called on every rank (FSDP gathers the weights); rank 0 writes samples_<step>.png (a row a class, up to 10;
    Algorithm 1, fixed noise) and recon_<step>.png (rows: x, D(f(E(x))), then D(f(f(E(x)) + r sigma_max e)) at r = 0.5
    and 1, fixed e) from the EMA or the model, under FSDP from a copy built on `meta` given the gathered weights (sd:
    the checkpoint's gather, if this step saved one) and the model's buffers."""
    if args.fsdp and sd is None:                                            # a collective: on every rank
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not master:
        return
    if args.fsdp:
        with torch.device("meta"), torch.random.fork_rng(devices=[]):       # no init, no training noise drawn
            copy = SphereEncoder(model.cfg)
        copy.load_state_dict(sd, assign=True)
        for name, buf in model.named_buffers():                             # positions, RoPE: not sharded
            module, _, attr = name.rpartition(".")
            setattr(copy.get_submodule(module), attr, buf)
        model = copy.to(device)
    model = ema or model
    cfg, was_training = model.cfg, model.training
    model.eval()
    g = torch.Generator(device).manual_seed(1234)                           # same noise every time
    rows = torch.linspace(0, cfg.num_classes - 1, min(cfg.num_classes, 10)).round().long()   # one class a row
    labels = rows.repeat_interleave(n).to(device) if cfg.num_classes else None
    e = torch.randn(max(1, len(rows)) * n, cfg.grid, cfg.grid, cfg.latent_dim, generator=g, device=device)
    with torch.autocast(device.split(":")[0], torch.bfloat16, enabled=args.precision == "bf16"):
        imgs = generate(model, e, labels, args.sample_steps, sigma_max(args.alpha), generator=g)[-1]
        x = x[:n]
        recon = [reconstruct(model, x)] + [refine(model, x, None, [r], sigma_max(args.alpha),   # Eq. 2: D(f(E(x)))
                 generator=torch.Generator(device).manual_seed(1234))[0] for r in (0.5, 1.0)]   # Eq. 4 at r sigma_max
    save_image(imgs * 0.5 + 0.5, os.path.join(args.out_dir, f"samples_{step:07d}.png"), nrow=n)
    save_image(torch.cat([x, *recon]) * 0.5 + 0.5, os.path.join(args.out_dir, f"recon_{step:07d}.png"), nrow=len(x))
    model.train(was_training)


def hflip(x):
    """Sec. 3: each image (B, C, H, W) mirrored left-right with probability 1/2, the draw on x's device."""
    return torch.where(torch.rand(len(x), 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)


def micro_batches(data, args, ds, bad, bar, device):
    """The step's --grad_accum micro-batches (x, y) on the device, h-flipped (Sec. 3); bad images named once."""
    for _ in range(args.grad_accum):
        x, y, replaced = next(data)
        for j in dict.fromkeys(replaced[replaced >= 0].tolist()).keys() - set(bad):
            bad.append(j)
            bar.write(f"warning: unreadable image skipped (the next one used instead): {ds.path(j)}")
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        yield hflip(x), y


def train_step(net, model, opt, ema, batches, loss_fn, args):
    """One optimizer step over the micro-batches, gradients reduced across ranks on the last one only; clip,
    AdamW, EMA. -> the last micro-batch's losses, the gradient norm (a DTensor under FSDP), its images."""
    for i, (x, y) in enumerate(batches):
        last = i == args.grad_accum - 1
        if args.fsdp:
            model.set_requires_gradient_sync(last)
        with nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync():   # DDP
            losses = loss_fn(x, y)
            (losses["total"] / args.grad_accum).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if ema is not None:
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - args.ema)
    return losses, grad_norm, x


def check_health(first_bad, bad, ds, args, saved_step):
    """A non-finite loss or too many unreadable images: the message to stop with, else None."""
    if first_bad >= 0:
        saved = f"step {saved_step}" if saved_step else "none yet"
        return (f"non-finite loss at step {first_bad}; stopped. The last good checkpoint ({saved}) is untouched in "
                f"{args.out_dir}")
    if len(bad) > args.max_bad_frac * len(ds):
        return (f"{len(bad)} unreadable images, more than --max_bad_frac {args.max_bad_frac} of {len(ds)} (first: "
                f"{', '.join(ds.path(j) for j in bad[:3])}); list them all with python data.py --check --dataset "
                f"{args.dataset} --data_dir {args.data_dir}")


@torch.no_grad()
def diagnostics(x, out, perceptual):
    """From the step's last micro-batch, unweighted: the distance and perceptual parts of Eq. 7 (D(v_noisy) vs x) and
    Eq. 8 (D(v_NOISY) vs D(v_noisy)); recon_psnr, the PSNR (dB, images in [0, 1]) of D(v_noisy) vs x; z_rms, z_rms_std:
    the batch mean and std of the encoder's latent RMS ||z|| / sqrt(L) before spherify (Eq. 1). LPIPS: recomputed."""
    x, x_noisy, x_NOISY = x.float(), out["x_noisy"].float(), out["x_NOISY"].float()
    rms = out["z"].float().pow(2).flatten(1).mean(1).sqrt()                 # (B,)
    mse = (x_noisy - x).div(2).pow(2).flatten(1).mean(1)                    # (B,), on the [0, 1] scale
    parts = {"recon_dist": distance(x_noisy, x), "con_dist": distance(x_NOISY, x_noisy)}
    if perceptual is not None:
        parts |= {"recon_perc": perceptual(x_noisy, x), "con_perc": perceptual(x_NOISY, x_noisy)}
    return {**{k: v.mean() for k, v in parts.items()}, "recon_psnr": (-10 * mse.clamp_min(1e-10).log10()).mean(),
            "z_rms": rms.mean(), "z_rms_std": rms.std(correction=0)}


def log_step(losses, grad_norm, extra, step, lr, img_per_s, bad, args, bar, master, run=None):
    """Loss terms, grad norm and diagnostics (extra), averaged over ranks: a line under the progress bar, a record in
    log.jsonl, and in Weights & Biases' run (--wandb)."""
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm   # FSDP: a DTensor
    vals = {"loss": losses["total"], **{k: losses[k] for k in ("recon", "pix_con", "lat_con")}, "grad_norm": grad_norm,
            **extra}
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


@script
def main(argv=None):
    args, ckpt = get_args(argv)
    world, rank, device = init_distributed(args.device, args.dist_timeout)
    master = rank == 0
    if args.fsdp and not dist.is_initialized() and not args.dry_run:
        die("--fsdp shards over processes: launch with torchrun --nproc_per_node=N")
    if args.fsdp and args.ema > 0:
        die("--ema is not supported with --fsdp")
    if not args.dry_run:
        check_writable(args.out_dir, "--out_dir")                          # before the data; room: build_model
        if master and not args.resume and os.path.exists(log := os.path.join(args.out_dir, "log.jsonl")):
            os.remove(log)                                                  # a new run starts a new log
    run = None
    if args.wandb and master and not args.dry_run:                         # optional: not in requirements.txt
        try:
            import wandb
        except ImportError:
            die("--wandb needs the wandb package: pip install wandb (or drop --wandb)")
        run = wandb.init(project="sphere-encoder", name=os.path.basename(os.path.abspath(args.out_dir)),
                         dir=args.out_dir, config=vars(args))
    ds, cfg, micro, max_steps, warmup = setup_data(args, ckpt, world, device)   # --dry_run: plan, exit
    lr, min_lr = lr_range(args)
    # --- model, optimizer, EMA, checkpoint, the loss
    model, opt, ema, checkpointer, net, step, bad = build_model(cfg, args, world, rank, device, ckpt)
    if ckpt:
        print0(f"resumed from {checkpointer.path} at step {step}" if args.resume else
               f"started from the {'EMA ' if args.init_ema else ''}weights of {args.init_from}")
    del ckpt                                                                # the resumed weights: not kept in RAM
    if not (perceptual := args.w[1] > 0 or args.w[3] > 0):
        print0("warning: training WITHOUT the paper's perceptual (LPIPS) loss term: --perceptual_weight 1 adds it")
    try:
        perceptual = load_perceptual(args.convnext).to(device) if perceptual else None
    except RuntimeError as err:                                             # no VGG weights offline: what to do
        die(str(err))
    band = args.band if args.band > args.alpha else None

    def loss_fn(x, y):                                                      # Eq. 4-10 on one micro-batch
        sigma, sigma_sub = noise_levels(len(x), args.alpha, band, args.p_band, device=device)   # Eq. 5, App. C.2
        with torch.autocast(device.split(":")[0], torch.bfloat16, enabled=args.precision == "bf16"):   # model.py
            z, x_NOISY, x_noisy, z_re = net(x, y if cfg.num_classes else None, sigma, sigma_sub, args.p_drop,
                                            pix_con=args.w[2] > 0 or args.w[3] > 0, lat_con=args.w[4] > 0)  # Eq. 4-9
            losses = sphere_losses(x, z, x_NOISY, x_noisy, z_re, LossWeights(*args.w), perceptual)      # Eq. 10
        x_rec = x_NOISY if x_noisy is None else x_noisy                     # what Eq. 7 compared with x
        return {**losses, "z": z.detach(), "x_noisy": x_rec.detach(), "x_NOISY": x_NOISY.detach()}  # for the log
    print0(f"{args.dataset}: {len(ds)} images, {cfg.num_classes} classes | model {args.model}: "
           f"{model.num_params() / 1e6:.1f}M params, latent {cfg.grid}x{cfg.grid}x{cfg.latent_dim} (ratio 3HW/L "
           f"{3 * cfg.patch_size ** 2 / cfg.latent_dim:.3g}) | "
           f"{world} process(es) x {args.grad_accum} accum x {micro} = batch {args.batch_size} | "
           f"{max_steps} steps, lr {lr:.2e}, alpha {args.alpha} band {band} | {device}")
    # --- the loop; it syncs the ranks only at log and checkpoint steps (and on a signal in one process)
    data = build_loader(ds, args, world, rank, device, micro, step)
    logged, t0, saved_at, save_s = step, time.time(), time.time(), 0.0
    bad_step = torch.tensor(-1, device=device)                              # first non-finite step, no sync
    due = lambda every: step % every == 0 or step == max_steps              # every N steps, and the last
    with (progress(total=max_steps, initial=step, disable=not master, dynamic_ncols=True) as bar,
          StopSignal() as signals):                                         # closed, restored on any exit
        stop = lambda msg, code=2: bar.close() or die(msg, code)           # the error on a line of its own
        while step < max_steps:
            lr_now = get_lr(step, lr, warmup, max_steps, min_lr)
            for group in opt.param_groups:
                group["lr"] = lr_now * group["lr_mult"]
            losses, grad_norm, x = train_step(net, model, opt, ema, micro_batches(data, args, ds, bad, bar, device),
                                              loss_fn, args)
            bad_step = torch.where((bad_step < 0) & ~torch.isfinite(losses["total"].detach()), step, bad_step)
            step += 1
            bar.update(1)
            if not (due(args.log_every) or due(args.sample_every) or (args.ckpt_every and due(args.ckpt_every))
                    or (world == 1 and signals.got)):
                continue
            timed_save = (master and not args.ckpt_every                    # rank 0's clock: it writes the file
                          and time.time() - saved_at >= max(60.0, 100 * save_s))   # <= 1% of the time saving
            first_bad, timed_save, signalled = agree(bad_step, timed_save, signals.got is not None, bad, device)
            if msg := check_health(first_bad, bad, ds, args, checkpointer.saved_step):
                stop(msg, code=1 if first_bad >= 0 else 2)
            if due(args.log_every):
                log_step(losses, grad_norm, diagnostics(x, losses, perceptual), step, lr_now,
                         (step - logged) * args.batch_size / (time.time() - t0), bad, args, bar, master, run)
                logged, t0 = step, time.time()
            sd = None
            if (due(args.ckpt_every) if args.ckpt_every else timed_save or step == max_steps) or signalled:
                t, sd = time.time(), checkpointer.save(step, bad)           # full disk: DataError (bar closed first)
                saved_at, save_s = time.time(), time.time() - t
            if signalled:
                stop(f"stopped by {signals.got or 'a signal on another rank'} at step {step}; {checkpointer.path} "
                     f"written: continue with --resume --out_dir {args.out_dir}", code=PREEMPTED)
            if due(args.sample_every):
                save_grids(model, ema, x, args, step, device, master, sd)
    if dist.is_initialized():
        if not args.fsdp:
            ddp_check(model, world)
        dist.barrier()                 # leave together: rank 0 may still be writing grids while the others finish
        dist.destroy_process_group()
    if run is not None:
        run.finish()
    print0(f"done: {step} steps, checkpoint {checkpointer.path}")


if __name__ == "__main__":
    main()
