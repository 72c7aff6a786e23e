"""Benchmark one training step and sampling: img/s, TFLOP/s, MFU, memory, where the time goes.
A step (Eq. 4-10) runs the encoder twice (x, and E(D(v_NOISY)) of Eq. 9) and the decoder on 2B, so
FLOPs/img = 3 x (2 enc + 2 dec forward); the estimate is checked against torch's FlopCounterMode. MFU vs
known GPUs' bf16 peak and a matmul measured now. Under torchrun only the step; --batch_size is per GPU.
    python bench.py                                   # tiny preset on the CPU
    python bench.py --model L --dataset imagenet --batch_size 32 --compile   # on a GPU
    torchrun --nproc_per_node=8 bench.py --model XL --dataset imagenet --batch_size 16 --fsdp --grad_ckpt
"""
import time

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from cli import COUNT, die, parser, print0, script
from losses import LossWeights, load_perceptual, sphere_losses
from model import LATENTS, SIZES, SphereEncoder, make_config
from parallel import init_distributed, wrap
from spherify import generate, noise_levels

# Dense bf16 peak FLOP/s by GPU name. The first key found in the device name wins, so the longer
# names come first ("H100 PCIe" before "H100", "GB200" before "B200").
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H100": 989e12,
             "H200": 989e12, "GB200": 2500e12, "B200": 2250e12, "A100": 312e12}


def timed(fn, device, iters):
    """Median wall time of fn() over iters runs, after one warm-up (which also compiles)."""
    def once():
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t
    once()
    return sorted(once() for _ in range(iters))[iters // 2]


def bench(args, mode, world, dev, measured, known):
    """One mode's train step (eager, or compiled as train.py --compile), printed: time, memory, FLOP
    estimate, MFU. Eager on one process also where the time goes (each part alone, fwd + bwd), the
    FLOPs counted by torch to check the estimate (math SDPA, so attention is counted) and the
    sampling speed."""
    cfg = make_config(args.model, args.dataset)
    cuda, compiled = dev.startswith("cuda"), mode == "compile"
    torch.manual_seed(0)
    model = SphereEncoder(cfg).to(dev)
    model.set_grad_checkpointing(args.grad_ckpt)
    # Wrapped as train.py does: FSDP or DDP under torchrun, compiled in mode "compile".
    net = wrap(model, dev, world, args.fsdp, compiled)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=cuda)
    # Random VGG weights cost the same as the trained ones.
    perceptual = load_perceptual(pretrained=False).to(dev) if args.perceptual else None
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=cuda)
    B = args.batch_size
    x = torch.rand(B, 3, cfg.image_size, cfg.image_size, device=dev) * 2 - 1
    y = torch.randint(0, cfg.num_classes, (B,), device=dev) if cfg.num_classes else None
    w = LossWeights(1.0, 1.0 if perceptual else 0.0, 0.5, 0.5 if perceptual else 0.0, 0.1)

    def step():
        sigma, sub = noise_levels(B, 80, 85, device=dev)
        with autocast:
            losses = sphere_losses(x, *net(x, y, sigma, sub), w, perceptual)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t_step = timed(step, dev, args.iters)
    mem = f"{torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB per GPU" if cuda else "n/a on CPU"
    flops_est = 3 * 2 * sum(model.flops_per_image().values())
    tflops = flops_est * world * B / t_step                             # over all processes
    par = f", {'FSDP' if args.fsdp else 'DDP'} x {world}" if world > 1 else ""
    # Under FSDP the parameters are DTensors, whose numel is the global size: num_params() counts
    # the whole model, not one shard.
    print0(f"\n[{mode}{', grad_ckpt' if args.grad_ckpt else ''}{par}] "
           f"{args.model} / {args.dataset}: "
           f"{model.num_params() / 1e6:.1f}M params, batch {B} per process")
    print0(f"  train: {world * B / t_step:.1f} img/s, step {t_step * 1e3:.1f} ms, peak memory {mem}")
    print0(f"  achieved {tflops / 1e12:.3f} TFLOP/s | "
           f"MFU vs measured matmul {tflops / (world * measured):.1%}"
           + (f" | MFU vs bf16 peak {tflops / (world * known):.1%}" if known else ""))
    # The rest (the split, the FLOP count, sampling) runs once: eager, on one process.
    if world > 1 or compiled:
        return
    z = torch.randn(2 * B, cfg.grid, cfg.grid, cfg.latent_dim, device=dev)
    split = time_split(model, opt, perceptual, autocast, x, y, z, dev, args.iters)
    counted = count_flops(model, autocast, x, y, w, dev)
    print(f"  FLOPs/img (train step): estimate {flops_est / 1e9:.2f} G, "
          f"counted {counted / 1e9:.2f} G (ratio {flops_est / max(counted, 1):.3f})")
    print("  time split: " + ", ".join(f"{k} {v / sum(split.values()):.0%}" for k, v in split.items()))
    speed = sampling_speed(net, z, y, B, autocast, dev, args.iters)
    print("  sampling img/s: " + ", ".join(f"{s} step(s) {v:.1f}" for s, v in speed.items()))


def time_split(model, opt, perceptual, autocast, x, y, z, dev, iters):
    """Where the time of a train step goes: {part: seconds}, each part alone, forward and backward
    (the decoder on the 2B latents z), then the optimizer step."""
    def fwd_bwd(fn):
        return timed(lambda: autocast(fn)().float().square().mean().backward(), dev, iters)
    split = {"encoder (x2)": 2 * fwd_bwd(lambda: model.encode(x, y)),
             "decoder (2B)": fwd_bwd(lambda: model.decode(z, None if y is None else y.repeat(2)))}
    if perceptual is not None:
        xx = torch.cat([x, x]).requires_grad_()
        split["perceptual (2B)"] = fwd_bwd(lambda: perceptual(xx, torch.cat([x, x])))
    # The optimizer steps on the gradients that the parts just left.
    split["optimizer"] = timed(opt.step, dev, iters)
    model.zero_grad(set_to_none=True)
    return split


def count_flops(model, autocast, x, y, w, dev):
    """The FLOPs torch counts in one image's train step (math SDPA, so attention is counted)."""
    with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH), autocast:
        sigma, sub = noise_levels(1, 80, 85, device=dev)
        out = model(x[:1], None if y is None else y[:1], sigma, sub)
        sphere_losses(x[:1], *out, w)["total"].backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops()


def sampling_speed(net, z, y, B, autocast, dev, iters):
    """Images a second that generate() makes from the noise e = z[:B], with 1, 2 and 4 steps:
    {steps: img/s}."""
    with torch.inference_mode(), autocast:
        return {steps: B / timed(lambda: generate(net, z[:B], y, steps), dev, iters) for steps in (1, 2, 4)}


@script
def main(argv=None):
    p = parser(__doc__, dist=True)
    p.add_argument("--model", default="tiny", choices=list(SIZES))
    p.add_argument("--dataset", default="toy", choices=list(LATENTS), help="the latent shape")
    p.add_argument("--batch_size", type=COUNT, default=16)
    p.add_argument("--iters", type=COUNT, default=5)
    p.add_argument("--perceptual", action="store_true", help="include LPIPS (random VGG weights: same cost)")
    p.add_argument("--compile", action="store_true", help="also the train step compiled as train.py --compile")
    p.add_argument("--grad_ckpt", action="store_true", help="activation checkpointing per block (less memory)")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard with FSDP2 instead of DDP")
    args = p.parse_args(argv)
    world, _, dev = init_distributed(args.device, args.dist_timeout)
    if args.fsdp and world == 1:
        die("--fsdp needs a torchrun launch with 2 or more processes")
    name = (torch.cuda.get_device_name() if dev.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)")
    known = next((v for k, v in PEAK_BF16.items() if k in name), None)
    # What the machine reaches on a large matmul, in the training dtype.
    n, dtype = (8192, torch.bfloat16) if dev.startswith("cuda") else (1024, torch.float32)
    a, b = torch.randn(2, n, n, device=dev, dtype=dtype)
    measured = 2 * n ** 3 / timed(lambda: a @ b, dev, args.iters)                     # FLOP/s
    print0(f"machine: {name} | measured matmul {measured / 1e12:.3f} TFLOP/s"
           + (f" | bf16 peak {known / 1e12:.0f} TFLOP/s" if known else ""))
    for mode in (["eager", "compile"] if args.compile else ["eager"]):
        bench(args, mode, world, dev, measured, known)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
