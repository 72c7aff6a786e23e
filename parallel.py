"""Running on several GPUs, and what the ranks agree on (docs/scaling.md):
- torchrun set-up (init_distributed), FSDP2 sharding with per-block compile (shard), DDP (wrap);
- autocast, the one context for mixed precision; gather and share, the rank-0 gather and
  broadcast helpers;
- what the ranks agree on in train.py's loop: signals (StopSignal), health (agree), the DDP check;
- the per-GPU memory plan of a training step (memory_plan; plan_memory for train.py):
    python train.py --dataset imagenet --model L --dry_run --gpus 8 --gpu_mem 80   # no GPU needed
"""
import datetime
import os
import signal
import warnings

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from cli import DataError, die, print0
from model import Block, MixerBlock, SphereEncoder


def init_distributed(device, timeout_s=7200):
    """torchrun's env -> (world, rank, device) and a process group; TF32 on.

    `cuda`: cuda:LOCAL_RANK (a cuda:N is kept in one process). timeout_s: a rank's wait in a
    collective (NCCL's 10 min is short of rank 0's writes).
    """
    world, rank, local = (int(os.environ.get(k, d)) for k, d in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)))
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DataError(f"--device {device} but no GPU is visible; use --device cpu")
        if world > 1 or device == "cuda":
            device = f"cuda:{local}"
        elif int(device.split(":")[1]) >= torch.cuda.device_count():
            raise DataError(f"--device {device}, but only {torch.cuda.device_count()} GPU(s) are visible")
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    # Under torchrun, even of one process, join a process group.
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return world, rank, device


def autocast(device, bf16=None):
    """The one mixed-precision context: bf16 autocast on device's type; bf16 None: on a GPU only."""
    on = device.startswith("cuda") if bf16 is None else bf16
    return torch.autocast(device.split(":")[0], torch.bfloat16, enabled=on)


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


def shard(model, device, world, compile_blocks=False, bf16=None):
    """FSDP2: a unit per block and per Mixer, then the rest.

    Under bf16 (GPU): bf16 compute, fp32 grad reduction; units keep their inputs' dtype (the
    stream's is model.py's). compile_blocks: compile each Block and MixerBlock first (FSDP2's
    hooks can't be traced).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = dist.init_device_mesh(device.split(":")[0], (world,))
    # The training precision (--precision); by default bf16 on a GPU.
    bf16 = device.startswith("cuda") if bf16 is None else bf16
    mp = (MixedPrecisionPolicy(torch.bfloat16, torch.float32, cast_forward_inputs=False)
          if bf16 else MixedPrecisionPolicy())
    for m in model.modules():
        if compile_blocks and isinstance(m, (Block, MixerBlock)):
            m.compile()
    for unit in [*model.encoder.vit.blocks, *model.decoder.vit.blocks, model.encoder.mixer, model.decoder.mixer, model]:
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    # forward() returns chunk/view outputs; we never modify them in place, which is what FSDP
    # warns about.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


def wrap(model, device, world, fsdp=False, compile_model=False, bf16=None):
    """The net a training step calls: under --fsdp the model itself, sharded in place (shard);
    else DDP under torchrun (buffers are constants, grads are bucket views), compiled whole with
    compile_model."""
    if fsdp:
        shard(model, device, world, compile_blocks=compile_model, bf16=bf16)
        return model
    net = model
    if dist.is_initialized():
        net = DDP(model, device_ids=[device] if device.startswith("cuda") else None,
                  forward_sync_buffers=False, gradient_as_bucket_view=True)
    return torch.compile(net) if compile_model else net


class StopSignal:
    """SIGTERM (a cluster's notice) or SIGINT (Ctrl-C): finish the step, write last.pt, exit
    PREEMPTED; a second Ctrl-C stops at once. Set before the loader's workers start: they inherit
    it, so live until the save."""
    def __enter__(self):
        self.got, self.old = None, {s: signal.signal(s, self) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    # torchrun forwards Slurm's TERM, so a SIGTERM may arrive twice: only a second SIGINT stops
    # at once.
    def __call__(self, signum, frame):
        if self.got == "SIGINT" == signal.Signals(signum).name:
            raise KeyboardInterrupt
        self.got = self.got or signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


# The exit code of a run stopped by a signal once last.pt is written; resume it with --resume.
PREEMPTED = 3


def agree(bad_step, timed_save, signalled, bad, device):
    """At a sync step: the ranks agree (MAX) on the first non-finite step, a timed save, a signal;
    bad merged."""
    flags = torch.cat([bad_step.float().view(1), torch.tensor([float(timed_save), float(signalled)], device=device)])
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, bad)
        bad[:] = dict.fromkeys(sum(found, []))
    first_bad, timed_save, signalled = flags.tolist()
    return int(first_bad), bool(timed_save), bool(signalled)


def ddp_check(model, world):
    """Safety net at the end: DDP must have kept every replica identical."""
    flat = torch.cat([p.detach().flatten().float() for p in model.parameters()])
    dist.broadcast(ref := flat.clone(), 0)
    same = torch.tensor(float(torch.equal(ref, flat)), device=flat.device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    print0(f"DDP check: parameters identical on all {world} ranks: {bool(same.item())}")


# --- The memory plan: what a training step holds per GPU, before it runs.
# Activations are what the forward saves for backward (Eq. 4-10: the encoder on x and D(v_NOISY),
# the decoder on 2B), counted per op of model.py, with fp32 streams and norms (s = 4 bytes).
# Measured on CPU: the bytes a VGG-LPIPS call saves per image pixel, keyed by a (bytes per element).
LPIPS_PER_PIXEL = {2: 1339, 4: 2439}
# Measured: the bytes a ConvNeXt-Small call saves per (224px) image, keyed by a.
CONVNEXT_PER_IMAGE = {2: 46.3e6, 4: 90.2e6}
GIB = 2 ** 30


def activation_bytes(cfg, a=2, fused_norm=True, grad_ckpt=False):
    """(held, recomputed) bytes per training image: saved for backward, and live while grad_ckpt
    recomputes a block.

    a: bytes of matmul/attention tensors (bf16 2, fp32 4); fused_norm: RMSNorm saves its input and
    1/rms (CUDA), not also its normalized input (CPU).
    """
    s, N, HW = 4, cfg.grid ** 2, cfg.image_size ** 2
    # Per channel, a norm saves its input (and, unfused, its normalized input).
    norm = s * (1 if fused_norm else 2)

    # Per token of a Block: 2 norms and 2 modulations (fp32); 11 D-wide bf16 tensors (qkv in/out 4,
    # rope q k 2, sdpa out, proj in/out, w12 in, w3 out) and 4 hidden-wide ones.
    def block(D, heads):
        hidden = int(2 / 3 * cfg.mlp_ratio * D)
        return 2 * norm * D + 2 * s * D + 11 * a * D + 4 * a * hidden + 4 * heads + 8

    # Per token of a Mixer block: 2 norms, the token mix's 4 D-wide tensors, the channel mix's 6.
    def mixer(D):
        return 2 * norm * D + 10 * a * D

    # Per token of a ViT: its blocks (under grad_ckpt only their fp32 inputs), the final norm and
    # the head's input.
    def vit(D, depth, heads):
        return (depth * s * D if grad_ckpt else depth * block(D, heads)) + (norm + s + a) * D

    def mix(D):
        return (cfg.mixer_depth * s * D if grad_ckpt else cfg.mixer_depth * mixer(D)) + norm * D

    enc = N * (vit(cfg.enc_width, cfg.enc_depth, cfg.enc_heads) + mix(cfg.latent_dim) + 2 * a * cfg.enc_width)
    dec = N * (vit(cfg.dec_width, cfg.dec_depth, cfg.dec_heads) + mix(cfg.dec_width) + a * cfg.latent_dim)
    # Pixels: patchify x2, pixel heads x2, the losses. Latents: spherify, noise, cosine.
    pixels = 3 * HW * (2 * a + 2 * (2 * a + s) + 4 * s)
    latents = 12 * s * N * cfg.latent_dim
    # Held at the end of the forward; under grad_ckpt the backward adds a block recomputed on 2B.
    held = 2 * enc + 2 * dec + pixels + latents
    widest = max(block(cfg.enc_width, cfg.enc_heads), block(cfg.dec_width, cfg.dec_heads), mixer(cfg.dec_width))
    return held, (2 * N * widest if grad_ckpt else 0)


def memory_plan(cfg, params, batch, world, gpu_mem_gb, grad_accum=None, grad_ckpt=None,
                fsdp=False, ema=False, perceptual=False, convnext=False, a=2):
    """Per-GPU plan {micro, grad_accum, grad_ckpt, parts (GiB), est_gb, fits}: flags given (not
    None) kept, the rest chosen to fit 85% of gpu_mem_gb, with no recompute down to micro-batch 8,
    then with grad_ckpt."""
    per_gpu = batch // world
    fixed = {"weights+grads+AdamW (fp32)": 16 * params / (world if fsdp else 1),
             "bf16 weight copies": 2 * params if a == 2 and not fsdp else 0,
             "EMA": 4 * params if ema else 0,
             "CUDA context, workspaces": 1.5 * GIB,
             "LPIPS/ConvNeXt weights": (30e6 * 4 if perceptual else 0)
                                       + (50e6 * 6 if convnext else 0)}
    # The perceptual losses' activations.
    per_image = ((2 * LPIPS_PER_PIXEL[a] * cfg.image_size ** 2 if perceptual else 0)
                 + (2 * CONVNEXT_PER_IMAGE[a] if convnext else 0))

    def plan(micro, ckpt):
        activations = micro * sum(activation_bytes(cfg, a, grad_ckpt=ckpt))
        parts = {**fixed, f"activations ({micro} images)": activations, "perceptual activations": micro * per_image}
        parts = {k: v / GIB for k, v in parts.items() if v}
        est = sum(parts.values())
        return dict(micro=micro, grad_accum=per_gpu // micro, grad_ckpt=ckpt, parts=parts,
                    est_gb=est, fits=est <= 0.85 * gpu_mem_gb)

    micros = ([m for m in range(per_gpu, 0, -1) if per_gpu % m == 0] if grad_accum is None else [per_gpu // grad_accum])
    options = [plan(m, c) for c in ([grad_ckpt] if grad_ckpt is not None else [False, True]) for m in micros]
    fit = [p for p in options if p["fits"]]
    # The best plan that fits: no recompute with a micro-batch of at least 8 (or all of per_gpu),
    # then the largest micro-batch. When none fits: the last option, the smallest, fits=False.
    best = lambda p: (not p["grad_ckpt"] and p["micro"] >= min(per_gpu, 8), p["micro"])
    return max(fit, key=best, default=options[-1])


def plan_memory(args, cfg, world, device):
    """train.py: fit a step to the GPU (memory_plan) -> (--grad_accum, --grad_ckpt); flags given
    win. Prints the plan (--dry_run: part by part); a plan that cannot fit stops here, saying what
    would."""
    gpus, gpu = args.gpus or world, device.startswith("cuda")
    if args.batch_size % (gpus * (args.grad_accum or 1)):
        die(f"--batch_size {args.batch_size} must be a multiple of GPUs x --grad_accum = "
            f"{gpus * (args.grad_accum or 1)}")
    # On a CPU: one micro-batch, no recompute.
    if not (gpu or args.dry_run):
        return args.grad_accum or 1, bool(args.grad_ckpt)
    mem = args.gpu_mem or (torch.cuda.get_device_properties(device).total_memory / GIB if gpu else 80.0)
    with torch.device("meta"):
        params = SphereEncoder(cfg).num_params()
    perc = dict(fsdp=args.fsdp, ema=args.ema > 0, perceptual=args.w[1] > 0 or args.w[3] > 0,
                convnext=args.convnext > 0, a=2 if args.precision == "bf16" else 4)
    plan = memory_plan(cfg, params, args.batch_size, gpus, mem, args.grad_accum, args.grad_ckpt, **perc)
    line = (f"plan: micro_batch={plan['micro']} grad_accum={plan['grad_accum']} grad_ckpt="
            f"{'on' if plan['grad_ckpt'] else 'off'} est_gb={plan['est_gb']:.1f}")
    if args.dry_run:
        print(f"memory plan per GPU: {args.model} {args.dataset} {cfg.image_size}px, "
              f"batch {args.batch_size} over {gpus} GPU(s){' (FSDP)' if args.fsdp else ''}, "
              f"{mem:.0f} GB each (fits: <= 85%)")
        for k, v in plan["parts"].items():
            print(f"  {k:<32} {v:7.2f} GB")
    if not plan["fits"]:
        auto = memory_plan(cfg, params, args.batch_size, gpus, mem, **perc)
        fix = (f"--grad_accum {auto['grad_accum']} "
               f"{'--grad_ckpt' if auto['grad_ckpt'] else '--no-grad_ckpt'}"
               if auto["fits"] else "--fsdp, more GPUs, a smaller --model or --image_size")
        die(f"a step needs ~{plan['est_gb']:.0f} GB per GPU ({line[6:]}), more than 85% of {mem:.0f} GB; try {fix}")
    print0(line)
    return plan["grad_accum"], plan["grad_ckpt"]
