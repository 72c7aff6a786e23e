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

from data import COUNT, die, parser, print0, script
from losses import LossWeights, load_perceptual, sphere_losses
from model import LATENTS, SIZES, SphereEncoder, make_config
from parallel import init_distributed, wrap
from spherify import generate, noise_levels

PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12, "H100": 989e12, "H200": 989e12,
             "GB200": 2500e12, "B200": 2250e12, "A100": 312e12}   # dense bf16 FLOP/s; the first name found wins


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
    """One mode's train step (eager, or compiled as train.py --compile), printed: time, memory, FLOP estimate, MFU.
    Eager on one process also where the time goes (each part alone, fwd + bwd), the FLOPs counted by torch to check
    the estimate (math SDPA, so attention is counted) and the sampling speed."""
    cfg, cuda, compiled = make_config(args.model, args.dataset), dev.startswith("cuda"), mode == "compile"
    torch.manual_seed(0)
    model = SphereEncoder(cfg).to(dev)
    model.set_grad_checkpointing(args.grad_ckpt)
    net = wrap(model, dev, world, args.fsdp, compiled)              # as train.py: FSDP, DDP, compiled
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=cuda)
    perceptual = load_perceptual(pretrained=False).to(dev) if args.perceptual else None  # random VGG: same cost
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
    print0(f"\n[{mode}{', grad_ckpt' if args.grad_ckpt else ''}{par}] {args.model} / {args.dataset}: "
           f"{model.num_params() / 1e6:.1f}M params, batch {B} per process")   # DTensor numel is the global size
    print0(f"  train: {world * B / t_step:.1f} img/s, step {t_step * 1e3:.1f} ms, peak memory {mem}")
    print0(f"  achieved {tflops / 1e12:.3f} TFLOP/s | MFU vs measured matmul {tflops / (world * measured):.1%}"
           + (f" | MFU vs bf16 peak {tflops / (world * known):.1%}" if known else ""))
    if world > 1 or compiled:          # the step is what we measure; the split, FLOPs, sampling: eager, once
        return

    def fwd_bwd(fn):                                                # where the time goes: each part alone, fwd + bwd
        return timed(lambda: autocast(fn)().float().square().mean().backward(), dev, args.iters)
    z = torch.randn(2 * B, cfg.grid, cfg.grid, cfg.latent_dim, device=dev)
    split = {"encoder (x2)": 2 * fwd_bwd(lambda: model.encode(x, y)),
             "decoder (2B)": fwd_bwd(lambda: model.decode(z, None if y is None else y.repeat(2)))}
    if perceptual is not None:
        xx = torch.cat([x, x]).requires_grad_()
        split["perceptual (2B)"] = fwd_bwd(lambda: perceptual(xx, torch.cat([x, x])))
    split["optimizer"] = timed(opt.step, dev, args.iters)          # on the gradients the parts just left
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH), autocast:
        sigma, sub = noise_levels(1, 80, 85, device=dev)
        sphere_losses(x[:1], *model(x[:1], None if y is None else y[:1], sigma, sub), w)["total"].backward()
    model.zero_grad(set_to_none=True)
    counted = fc.get_total_flops()
    print(f"  FLOPs/img (train step): estimate {flops_est / 1e9:.2f} G, counted {counted / 1e9:.2f} G "
          f"(ratio {flops_est / max(counted, 1):.3f})")
    print("  time split: " + ", ".join(f"{k} {v / sum(split.values()):.0%}" for k, v in split.items()))
    with torch.inference_mode(), autocast:                          # from noise e = z[:B]
        speed = {steps: B / timed(lambda: generate(net, z[:B], y, steps), dev, args.iters) for steps in (1, 2, 4)}
    print("  sampling img/s: " + ", ".join(f"{s} step(s) {v:.1f}" for s, v in speed.items()))


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
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    known = next((v for k, v in PEAK_BF16.items() if k in name), None)
    n, dtype = (8192, torch.bfloat16) if dev.startswith("cuda") else (1024, torch.float32)   # in the training dtype
    a, b = torch.randn(2, n, n, device=dev, dtype=dtype)
    measured = 2 * n ** 3 / timed(lambda: a @ b, dev, args.iters)                         # a large matmul's FLOP/s
    print0(f"machine: {name} | measured matmul {measured / 1e12:.3f} TFLOP/s"
           + (f" | bf16 peak {known / 1e12:.0f} TFLOP/s" if known else ""))
    for mode in (["eager", "compile"] if args.compile else ["eager"]):
        bench(args, mode, world, dev, measured, known)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
