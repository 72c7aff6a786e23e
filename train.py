"""Train a Sphere Encoder, from one CPU to many GPUs (DDP via torchrun).

Sphere Encoder (arXiv 2602.15030): one step is Eq. 4-10 (SphereEncoder.forward + losses.py),
hyperparameters per Sec. 3, 6, App. C.2, D and ../shared/REFERENCE.md Sec. 3-5.

    python train.py                                            # tiny model, toy data, CPU, minutes
    python train.py --dataset cifar10 --data_dir data/cifar10  # Sphere-L on CIFAR-10
    torchrun --nproc_per_node=8 train.py --dataset imagenet --data_dir /data/imagenet
    python train.py --resume --out_dir out/toy                 # continue from out/toy/last.pt

Writes to --out_dir: last.pt (atomic), ckpt_<step>.pt copies, samples_<step>.png (rows = classes,
Algorithm 1), recon_<step>.png (originals over reconstructions) and log.jsonl.
"""
import argparse
import itertools
import json
import math
import os
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from copy import deepcopy
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from data import DataError, build_dataset
from losses import LossWeights, load_perceptual, sphere_losses
from model import Config, SphereEncoder, make_config
from sample import generate
from spherify import noise_levels, sigma_max, spherify

# Per-dataset defaults (REFERENCE.md Sec. 2-5). Each entry is overridden by the flag of the same
# name; base_lr (the peak lr at global batch 256, scaled linearly with --batch_size, Sec. 5) by --lr,
# w (Eq. 10's weights: recon dist, recon perc, con dist, con perc, lat-con) by --weights.
DATASETS = {
    "toy":      dict(model="tiny", image_size=32, alpha=80, band=85, epochs=2.5, warmup_epochs=0.25, batch_size=64,
                     base_lr=1.6e-2, w=(1.0, 0.0, 0.5, 0.0, 0.1), num_workers=0),  # ours: CPU quick start (lr 4e-3 at batch 64), no LPIPS
    "cifar10":  dict(model="L", image_size=32, alpha=80, band=85, epochs=5000, warmup_epochs=10, batch_size=256,
                     base_lr=1e-4, w=(1.0, 1.0, 0.5, 0.5, 0.1), num_workers=4),
    "imagenet": dict(model="L", image_size=256, alpha=85, band=89, epochs=800, warmup_epochs=5, batch_size=256,
                     base_lr=1e-4, w=(50.0, 1.0, 25.0, 1.0, 0.1), num_workers=8),
    "flowers":  dict(model="L", image_size=256, alpha=85, band=89, epochs=1000, warmup_epochs=10, batch_size=256,
                     base_lr=1e-4, w=(25.0, 1.0, 1.0, 1.0, 0.1), num_workers=8),
    # any ImageFolder tree: 256px settings of Flowers; at <= 64px use --alpha 80 --band 85 (our choice)
    "folder":   dict(model="L", image_size=256, alpha=85, band=89, epochs=1000, warmup_epochs=10, batch_size=256,
                     base_lr=1e-4, w=(25.0, 1.0, 1.0, 1.0, 0.1), num_workers=8),
}


def die(msg, code=2):
    """Bad input: one clear line on stderr and exit code 2, no traceback."""
    print(f"{os.path.basename(sys.argv[0])}: error: {msg}", file=sys.stderr)
    sys.exit(code)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = die
    p.add_argument("--dataset", default="toy", choices=list(DATASETS))
    p.add_argument("--data_dir", default=None, help="dataset root (not needed for toy)")
    p.add_argument("--download", action="store_true", help="let torchvision download cifar10/flowers")
    p.add_argument("--unconditional", action="store_true", help="ignore labels (train without classes)")
    p.add_argument("--model", default=None, help="size: tiny, S, B, L, XL (default per dataset)")
    p.add_argument("--image_size", type=int, default=None)
    p.add_argument("--alpha", type=float, default=None, help="max noise angle in degrees, sigma_max = tan(alpha) (Eq. 11-12)")
    p.add_argument("--band", type=float, default=None, help="top of the angle-mixing band in degrees (App. C.2); <= alpha: off")
    p.add_argument("--p_band", type=float, default=0.1, help="probability of a noise draw from the band (App. C.2)")
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--max_steps", type=int, default=None, help="optimizer steps; overrides --epochs")
    p.add_argument("--warmup_epochs", type=float, default=None)
    p.add_argument("--batch_size", type=int, default=None, help="global batch over all GPUs and accumulation")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches per step on each GPU")
    p.add_argument("--lr", type=float, default=None, help="peak decoder lr (default: table lr x batch/256)")
    p.add_argument("--min_lr", type=float, default=1e-6, help="end of the cosine decay at batch 256, scaled like lr")
    p.add_argument("--enc_lr_mult", type=float, default=0.1, help="encoder lr = this x decoder lr [released]")
    p.add_argument("--weight_decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--p_drop", type=float, default=0.1, help="label dropout to the null class (Sec. 2.4)")
    p.add_argument("--weights", type=float, nargs=5, default=None, metavar="W",
                   help="loss weights: recon dist, recon perc, con dist, con perc, lat-con (Eq. 10)")
    p.add_argument("--perceptual_weight", type=float, default=None, help="set both perceptual weights (0 = no LPIPS)")
    p.add_argument("--convnext", type=float, default=0.0,
                   help="mix ConvNeXt-S logit MSE into the perceptual loss, (LPIPS + w ConvNeXt)/(1 + w); "
                        "the release uses 0.1 (needs its ImageNet weights)")
    p.add_argument("--ema", type=float, default=0.0, help="EMA decay, e.g. 0.9997; 0 = off (App. D)")
    p.add_argument("--out_dir", default=None, help="default: out/<dataset>")
    p.add_argument("--resume", action="store_true", help="continue from <out_dir>/last.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num_workers", type=int, default=None)
    p.add_argument("--log_every", type=int, default=50)
    p.add_argument("--ckpt_every", type=int, default=500, help="write last.pt every N steps")
    p.add_argument("--keep_every", type=int, default=0, help="also keep ckpt_<step>.pt every N steps (0 = never)")
    p.add_argument("--sample_every", type=int, default=500, help="sample and reconstruction grids every N steps")
    p.add_argument("--sample_steps", type=int, default=4, help="Algorithm 1 steps for the grids")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--grad_ckpt", action="store_true", help="activation checkpointing per block")
    p.add_argument("--fsdp", action="store_true", help="shard weights, grads and AdamW state over processes (FSDP2)")
    p.add_argument("--wandb", action="store_true", help="log to Weights & Biases")
    args = p.parse_args(argv)
    for k, v in DATASETS[args.dataset].items():                             # fill per-dataset defaults
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.perceptual_weight is not None:
        args.w = [args.w[0], args.perceptual_weight, args.w[2], args.perceptual_weight, args.w[4]]
    args.w = list(args.weights or args.w)
    args.out_dir = args.out_dir or os.path.join("out", args.dataset)
    for name in ("batch_size", "grad_accum", "image_size", "log_every", "ckpt_every", "sample_every", "sample_steps"):
        if getattr(args, name) <= 0:
            die(f"--{name} must be positive, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 0:
        die(f"--max_steps must be >= 0, got {args.max_steps}")
    return args


# ----------------------------------------------------------------------------- helpers
class ResumableSampler(DistributedSampler):
    """DistributedSampler (shuffled by seed + epoch) that can start mid-epoch, so a resumed run
    sees exactly the samples an uninterrupted run would."""
    start = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self):
        return super().__len__() - self.start


def lr_range(args):
    """(peak, min) lr: both scale linearly with the global batch / 256 (Sec. 5 [released]);
    --lr sets the peak as given."""
    scale = args.batch_size / 256
    return (args.lr if args.lr is not None else args.base_lr * scale), args.min_lr * scale


def get_lr(step, peak, warmup, total, min_lr):
    """Linear warmup, then cosine decay that reaches min_lr at step total - warmup and holds it
    to the end (REFERENCE.md Sec. 2 LR [released]: the decay spans total - 2 warmup steps)."""
    if step < warmup:
        return peak * (step + 1) / (warmup + 1)
    t = (step - warmup) / max(1, total - 2 * warmup)
    return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def save_checkpoint(obj, path):
    """Atomic: write a temp file, then rename over the old one; a crash leaves the old file."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    """A checkpoint as a plain dict (weights_only=True); bad input -> DataError (one line)."""
    if not os.path.isfile(path):
        raise DataError(f"no checkpoint at {path!r}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise DataError(f"cannot read checkpoint {path!r}: {str(err).splitlines()[0]}") from None


@torch.no_grad()
def save_grids(model, x, args, step, device):
    """samples_<step>.png: rows = classes (up to 10), Algorithm 1 from fixed noise;
    recon_<step>.png: a row of training images over their reconstructions (null class, r = 0)."""
    from torchvision.utils import save_image
    cfg, was_training = model.cfg, model.training
    model.eval()
    g = torch.Generator(device).manual_seed(1234)                           # same noise every time
    n_rows, n_cols = max(1, min(cfg.num_classes, 10)), 8
    labels = None
    if cfg.num_classes:
        rows = torch.linspace(0, cfg.num_classes - 1, n_rows).round().long()
        labels = rows.repeat_interleave(n_cols).to(device)
    e = torch.randn(n_rows * n_cols, cfg.grid, cfg.grid, cfg.latent_dim, generator=g, device=device)
    imgs = generate(model, e, labels, args.sample_steps, sigma_max(args.alpha), generator=g)[-1]
    save_image(imgs * 0.5 + 0.5, os.path.join(args.out_dir, f"samples_{step:07d}.png"), nrow=n_cols)
    x = x[:n_cols]
    recon = model.decode(spherify(model.encode(x))).float()                # D(f(E(x))): null class, r = 0
    save_image(torch.cat([x, recon]) * 0.5 + 0.5, os.path.join(args.out_dir, f"recon_{step:07d}.png"), nrow=n_cols)
    model.train(was_training)


def shard(model, device, world):
    """FSDP2: one unit per transformer block and per Mixer, then the rest; bf16 compute with fp32
    gradient reduction on GPU. Parameters, gradients and AdamW state are split over the world."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.split(":")[0], (world,))
    mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if device.startswith("cuda") else MixedPrecisionPolicy()
    for unit in [*model.encoder.vit.blocks, *model.decoder.vit.blocks, model.encoder.mixer, model.decoder.mixer, model]:
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    # forward() returns chunk/view outputs; we never modify them in place, which is what FSDP warns about
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


# ----------------------------------------------------------------------------- main
def main(argv=None):
    args = get_args(argv)
    # --- distributed: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE
    world, rank, local = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    device = args.device
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            die("--device cuda but no GPU is visible; use --device cpu")
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    master = rank == 0
    print0 = lambda *a: master and print(*a, flush=True)
    if args.fsdp and world == 1:
        die("--fsdp shards over processes: launch with torchrun --nproc_per_node=N (N >= 2)")
    if args.fsdp and args.ema > 0:
        die("--ema is not supported with --fsdp")
    if args.wandb:                                                          # fail on every rank, not just rank 0
        try:
            import wandb
        except ImportError:
            die("--wandb needs the wandb package: pip install wandb")
    micro, rem = divmod(args.batch_size, world * args.grad_accum)
    if micro == 0 or rem:
        die(f"--batch_size {args.batch_size} must be a positive multiple of GPUs x --grad_accum = {world * args.grad_accum}")

    # --- data
    try:
        ds, num_classes = build_dataset(args.dataset, args.data_dir, args.image_size, args.unconditional, args.download)
        ckpt = load_checkpoint(os.path.join(args.out_dir, "last.pt")) if args.resume else None
    except DataError as err:
        die(str(err))
    steps_per_epoch = len(ds) // args.batch_size
    if steps_per_epoch == 0:
        die(f"the dataset has {len(ds)} images, fewer than one global batch of {args.batch_size}")
    max_steps = args.max_steps if args.max_steps is not None else int(args.epochs * steps_per_epoch)
    warmup = int(args.warmup_epochs * steps_per_epoch)
    sampler = ResumableSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(ds, batch_size=micro, sampler=sampler, num_workers=args.num_workers, drop_last=True,
                        pin_memory=device.startswith("cuda"), persistent_workers=args.num_workers > 0,
                        generator=torch.Generator().manual_seed(args.seed))

    # --- model, optimizer (encoder at 0.1x lr, its own param group [released])
    cfg = Config(**ckpt["config"]) if ckpt else make_config(args.model, args.dataset, image_size=args.image_size,
                                                            num_classes=num_classes)
    if cfg.num_classes != num_classes:
        die(f"the checkpoint's model has {cfg.num_classes} classes, the data {num_classes}")
    torch.manual_seed(args.seed)                                            # the same init on every rank (FSDP shards it)
    model = SphereEncoder(cfg).to(device)
    torch.manual_seed(args.seed + rank)                                     # per-rank noise, flips, dropout
    model.set_grad_checkpointing(args.grad_ckpt)
    if ckpt:
        model.load_state_dict(ckpt["model"])
    if args.fsdp:
        shard(model, device, world)
    lr, min_lr = lr_range(args)
    opt = torch.optim.AdamW([{"params": model.encoder.parameters(), "lr_mult": args.enc_lr_mult},
                             {"params": model.decoder.parameters(), "lr_mult": 1.0}],
                            lr=lr, betas=(0.9, 0.95), weight_decay=args.weight_decay,
                            fused=device.startswith("cuda"))
    ema = deepcopy(model).requires_grad_(False) if args.ema > 0 else None
    step = 0
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)         # FQN-keyed: same for DDP and FSDP
    if ckpt:
        set_optimizer_state_dict(model, opt, ckpt["optimizer"], options=StateDictOptions(full_state_dict=True))
        for group, mult in zip(opt.param_groups, (args.enc_lr_mult, 1.0)):   # this run's flags, not the saved ones
            group["lr_mult"], group["weight_decay"] = mult, args.weight_decay
        if ema is not None and "ema" in ckpt:
            ema.load_state_dict(ckpt["ema"])
        step = ckpt["step"]
        rng = ckpt["rng"][rank] if rank < len(ckpt["rng"]) else None        # same world size: exact resume
        if rng is not None:
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and device.startswith("cuda"):
                torch.cuda.set_rng_state(rng["cuda"])
        print0(f"resumed from {args.out_dir}/last.pt at step {step}")
    net = DDP(model, device_ids=[local] if device.startswith("cuda") else None) if world > 1 and not args.fsdp else model
    net = torch.compile(net) if args.compile else net
    perceptual = None
    if args.w[1] > 0 or args.w[3] > 0:
        try:
            perceptual = load_perceptual(args.convnext).to(device)
        except RuntimeError as err:
            die(str(err))
    else:
        print0("warning: training WITHOUT the perceptual (LPIPS) loss term (its weight is 0); "
               "the paper uses it: --perceptual_weight 1 once VGG-16 weights are available")
    weights = LossWeights(*args.w)
    band = args.band if args.band > args.alpha else None
    autocast = torch.autocast("cuda", torch.bfloat16) if device.startswith("cuda") else nullcontext()
    os.makedirs(args.out_dir, exist_ok=True)
    print0(f"{args.dataset}: {len(ds)} images, {num_classes} classes | model {args.model}: "
           f"{model.num_params() / 1e6:.1f}M params, latent {cfg.grid}x{cfg.grid}x{cfg.latent_dim} | "
           f"{world} process(es) x {args.grad_accum} accum x {micro} = batch {args.batch_size} | "
           f"{max_steps} steps, lr {lr:.2e}, alpha {args.alpha} band {band} | {device}")
    if args.wandb and master:
        wandb.init(project="sphere-encoder", config=vars(args))

    saved_step = step if ckpt else None                                     # for the non-finite-loss message

    def save(step):
        nonlocal saved_step
        saved_step = step
        rng = {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if device.startswith("cuda") else {})}
        rngs = [None] * world
        dist.all_gather_object(rngs, rng) if world > 1 else rngs.__setitem__(0, rng)
        sd, osd = get_model_state_dict(model, options=full), get_optimizer_state_dict(model, opt, options=full)
        if master:                                                          # the full (unsharded) state
            obj = {"model": sd, "optimizer": osd, "step": step,
                   "config": asdict(cfg), "args": vars(args), "rng": rngs}
            if ema is not None:
                obj["ema"] = ema.state_dict()
            path = os.path.join(args.out_dir, "last.pt")
            save_checkpoint(obj, path)
            if args.keep_every and step % args.keep_every == 0:
                shutil.copyfile(path, path + ".copy")
                os.replace(path + ".copy", os.path.join(args.out_dir, f"ckpt_{step:07d}.pt"))

    def batches(step):                                                     # endless, resumable
        epoch, skip = divmod(step, steps_per_epoch)
        while True:
            sampler.set_epoch(epoch)
            sampler.start = skip * args.grad_accum * micro
            yield from itertools.islice(loader, (steps_per_epoch - skip) * args.grad_accum)
            epoch, skip = epoch + 1, 0

    # --- the loop
    data = batches(step)
    bad_step = torch.tensor(-1, device=device)                              # first non-finite step, no sync
    log_path, t0, seen = os.path.join(args.out_dir, "log.jsonl"), time.time(), 0
    bar = tqdm(total=max_steps, initial=step, disable=not master, dynamic_ncols=True)
    model.train()
    while step < max_steps:
        lr_now = get_lr(step, lr, warmup, max_steps, min_lr)
        for group in opt.param_groups:
            group["lr"] = lr_now * group["lr_mult"]
        for i in range(args.grad_accum):
            x, y = next(data)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x = torch.where(torch.rand(len(x), 1, 1, 1, device=device) < 0.5, x.flip(3), x)  # h-flip (Sec. 3)
            sigma, sigma_sub = noise_levels(len(x), args.alpha, band, args.p_band, device=device)  # Eq. 5, C.2
            sync_now = world == 1 or i == args.grad_accum - 1                # reduce grads only on the last micro-batch
            sync = nullcontext() if sync_now or args.fsdp else net.no_sync()
            if args.fsdp:
                model.set_requires_gradient_sync(sync_now)
            with sync, autocast:
                z, x_NOISY, x_noisy, z_re = net(x, y if num_classes else None, sigma, sigma_sub, args.p_drop)  # Eq. 4-9
                losses = sphere_losses(x, z, x_NOISY, x_noisy, z_re, weights, perceptual)                      # Eq. 10
            (losses["total"] / args.grad_accum).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: DTensor
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - args.ema)
        bad_step = torch.where((bad_step < 0) & ~torch.isfinite(losses["total"].detach()), step, bad_step)
        step += 1
        seen += args.batch_size
        bar.update(1)

        last = step == max_steps
        if step % args.log_every == 0 or step % args.ckpt_every == 0 or last:
            if world > 1:
                dist.all_reduce(bad_step, op=dist.ReduceOp.MAX)
            if bad_step.item() >= 0:
                die(f"non-finite loss at step {bad_step.item()}; stopped. The last good checkpoint "
                    f"({'step ' + str(saved_step) if saved_step else 'none yet'}) is untouched in {args.out_dir}", code=1)
        if step % args.log_every == 0 or last:
            logs = torch.stack([losses[k].detach().float() for k in ("total", "recon", "pix_con", "lat_con")] + [grad_norm.float()])
            if world > 1:
                dist.all_reduce(logs, op=dist.ReduceOp.AVG)
            dt, t0 = time.time() - t0, time.time()
            rec = dict(step=step, **dict(zip(("loss", "recon", "pix_con", "lat_con", "grad_norm"), logs.tolist())),
                       lr=lr_now, img_per_s=seen / dt)
            seen = 0
            if master:
                bar.write(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()))
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                if args.wandb:
                    wandb.log(rec, step=step)
        if step % args.ckpt_every == 0 or last:
            save(step)
        if step % args.sample_every == 0 or last:
            plain = ema or model
            if args.fsdp:                                                   # sample from a gathered copy on rank 0
                sd = get_model_state_dict(model, options=full)
                if master:
                    plain = SphereEncoder(cfg).to(device)
                    plain.load_state_dict(sd)
            if master:
                save_grids(plain, x, args, step, device)
    bar.close()

    if world > 1 and not args.fsdp:   # safety net: DDP must have kept every replica identical
        flat = torch.cat([p.detach().flatten().float() for p in model.parameters()])
        ref = flat.clone()
        dist.broadcast(ref, 0)
        same = torch.tensor(float(torch.equal(ref, flat)), device=device)
        dist.all_reduce(same, op=dist.ReduceOp.MIN)
        print0(f"DDP check: parameters identical on all {world} ranks: {bool(same.item())}")
    if world > 1:
        dist.destroy_process_group()
    print0(f"done: {step} steps, checkpoint {os.path.join(args.out_dir, 'last.pt')}")


if __name__ == "__main__":
    main()
