"""Generate images with a trained Sphere Encoder (arXiv 2602.15030): Algorithm 1 / Sec. 2.4, the
Eq. 13 noise schedule, classifier-free guidance (App. C.1). Step 1 decodes D(f(e)); each later step
re-encodes, re-noises and decodes again.
    python sample.py --ckpt out/toy/last.pt --steps 4
    torchrun --nproc_per_node=8 sample.py --ckpt x.pt --num_samples 50000 --npz samples.npz
    torchrun --nproc_per_node=8 sample.py --ckpt x.pt --num_samples 50000 --fid --rfid --is --prc \\
        --inception_weights W
Under torchrun each rank draws its share of the batches and rank 0 writes. With metrics, each rank
also extracts the Inception features of its samples and rank 0 scores them (evaluate.py).
"""
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from PIL import Image
from torchvision.utils import save_image

import evaluate
from checkpoint import check_writable, ckpt_dir, load_model, save_json, save_npz
from cli import ANGLE, COUNT, NONNEG, SEED, classes_list, die, number, parser, print0, progress
from cli import script, steps_list
from parallel import autocast, gather, init_distributed
from spherify import generate, sigma_max

# A test hook: rank 0's writing outlasts --dist_timeout, to show that no rank waits for it.
POST_DELAY = float(os.environ.get("SPHERE_POST_DELAY", 0))


def get_args(argv):
    p = parser(__doc__, dist=True)
    p.add_argument("--ckpt", required=True, help="a train.py checkpoint (last.pt)")
    p.add_argument("--steps", type=steps_list, default="4", help="decoder passes; a list like 1,2,4 "
                   "sweeps (rank 0 holds every value's samples until it writes them)")
    p.add_argument("--num_samples", "--n", dest="n", type=COUNT, help="default: 8 per class, or 64")
    p.add_argument("--classes", type=classes_list, default="all",
                   help="'all' or a list like 3,5 (balanced over them)")
    p.add_argument("--cfg", type=lambda t: [number(1.0)(v) for v in t.split(",")], default=[1.0],
                   help="CFG scale; 1 = off (ImageNet: 1.4 combo); a list like 1,1.4,1.6 sweeps (Tab. 9)")
    p.add_argument("--cfg_position", default="combo", choices=["pixel", "latent", "combo"])
    p.add_argument("--gamma", type=NONNEG, default=0.0, help="Eq. 13 decay; 0 = fixed r = 1 (best)")
    p.add_argument("--noise", default=None, choices=["shared", "independent"], help="re-encoding noise "
                   "e' (default: shared; Flowers: independent, as the model card evaluates)")
    p.add_argument("--alpha", type=ANGLE, default=None, help="noise angle, degrees (default: the training alpha)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--batch_size", type=COUNT, default=64)
    p.add_argument("--out", help="grid PNG (default: <ckpt dir>/samples.png; a --steps sweep adds "
                   "_<N>step, a --cfg sweep _cfg<S>); with metrics also <out>_metrics.json")
    p.add_argument("--per_step", action="store_true", help="also save a grid of every step's images")
    p.add_argument("--out_dir", default=None, help="also save each sample as a PNG here")
    p.add_argument("--npz", default=None, help="save samples as arr_0 (uint8 NHWC) + labels (ADM/DiT FID format)")
    evaluate.add_flags(p)                                   # --fid, --rfid, --is, --prc, --ref, ...
    p.add_argument("--raw_weights", action="store_true",
                   help="the trained weights, not the EMA ones (train.py --ema)")
    p.add_argument("--toy_metrics", action="store_true",
                   help="toy data: offline scores in a toy classifier's features")
    args = p.parse_args(argv)
    args.root, args.ext = os.path.splitext(args.out or os.path.join(ckpt_dir(args.ckpt), "samples.png"))
    if Image.registered_extensions().get(args.ext.lower()) not in Image.SAVE:
        die(f"argument --out: must be an image file name like grid.png, got {args.out!r}")
    evaluate.check_flags(args)                              # before sampling, not after
    args.settings = [(c, s) for c in args.cfg for s in args.steps]      # a sweep: every pair
    return args


def check_model(args, num_classes, dataset):
    """What the flags ask of this model -> the classes to sample. On Flowers the noise e' is fresh
    at every step by default, as the model card evaluates it (--cache_sampling_noise False)."""
    if num_classes == 0 and (any(c != 1 for c in args.cfg) or args.classes is not None):
        die("--cfg and --classes need a class-conditional model; this one is unconditional (use --cfg 1)")
    classes = list(range(num_classes)) if args.classes is None else args.classes
    if any(not 0 <= c < num_classes for c in classes):
        die(f"class ids must be in 0..{num_classes - 1}, got {','.join(map(str, classes))}")
    if args.toy_metrics and dataset != "toy":
        die("--toy_metrics is for models trained on the toy data")
    if args.noise is None:
        args.noise = "independent" if dataset == "flowers" else "shared"
        if args.noise == "independent":
            print0("flowers: a fresh noise e' at every step (--noise independent, as the model card "
                   "evaluates Flowers)")
    return classes


def suffix(args, scale, steps):
    """A sweep writes a file per setting: _cfg<S> for a --cfg list, _<N>step for a --steps list."""
    return ((f"_cfg{scale:g}" if len(args.cfg) > 1 else "") + (f"_{steps}step" if len(args.steps) > 1 else ""))


def generate_batches(model, batches, steps, sigma, gamma=0.0, cfg_scale=1.0, cfg_position="combo",
                     noise="shared", bf16=None):
    """Algorithm 1 over batches of (noise e (b, h, w, d), labels (b,) or None, generator): yields
    each batch's images after every step. Each caller draws its own noise (sample.py a generator per
    batch, ablate.py one for all, train.py's grids fixed noise). bf16: autocast; None: on a GPU."""
    for e, y, g in batches:
        with torch.inference_mode(), autocast(str(e.device), bf16):
            xs = generate(model, e, y, steps, sigma, gamma, cfg_scale, cfg_position, noise, generator=g)
        yield xs


@dataclass
class Run:
    """One (CFG scale, steps) setting's samples, gathered on rank 0."""
    cfg_scale: float
    steps: int
    images: torch.Tensor        # uint8 (n, C, H, W)
    first: torch.Tensor         # (steps, 16, C, H, W): every step's image of the first 16 samples
    features: dict              # Inception features {name: (n, width)}; {} when not scored


def draw(model, args, labels, sigma, device, rank, world, ev=None):
    """Every setting's samples and (ev) their Inception features, gathered on rank 0 -> [Run]
    (other ranks: []). Batches are dealt round-robin; batch i is seeded by (seed, i), any world size."""
    cfg, runs = model.cfg, []
    starts = range(0, len(labels), args.batch_size)[rank::world]        # this rank's batches

    def batches():
        for i in starts:
            g = torch.Generator(device).manual_seed(args.seed * 1_000_003 + i)
            y = labels[i:i + args.batch_size]                           # (b,); -1: unconditional
            e = torch.randn(len(y), cfg.grid, cfg.grid, cfg.latent_dim, generator=g, device=device)
            yield e, y.to(device) if cfg.num_classes else None, g
    for scale, steps in args.settings:
        mine, first = [], None
        desc = f"cfg {scale:g}, {steps} step(s)" + (", Inception" if ev else "")
        total = sum(len(labels[i:i + args.batch_size]) for i in starts)
        with progress(total=total, unit="img", leave=False, desc=desc, disable=rank > 0) as bar:
            xss = generate_batches(model, batches(), steps, sigma, args.gamma, scale, args.cfg_position, args.noise)
            for i, xs in zip(starts, xss):
                # uint8 as saved; Inception then runs in fp32 (generate_batches left autocast).
                u8 = evaluate.to_uint8(xs[-1])
                mine.append((i, u8.cpu(), ev.features(u8) if ev else {}))
                if i == 0:                                  # (steps, 16, C, H, W)
                    first = torch.stack([x[:16].float().cpu() for x in xs])
                bar.update(len(u8))
        parts = gather(mine, world)                         # rank 0: every rank's, in rank order
        if rank == 0:
            mine = sorted(sum(parts, []), key=lambda m: m[0])
            f = {k: torch.cat([m[2][k] for m in mine]) for k in mine[0][2]}
            runs.append(Run(scale, steps, torch.cat([m[1] for m in mine]), first, f))
    return runs


def write(run, args, labels, classes, num_classes):
    """Rank 0 writes one setting's grid (a row a class) and, as asked, per-step grid, PNGs, .npz."""
    n, ext, name = len(labels), args.ext, args.root + suffix(args, run.cfg_scale, run.steps)
    by_class = num_classes and len(classes) <= 32 and n <= 512
    save_image(run.images[:512] / 255, name + ext, nrow=max(1, n // len(classes)) if by_class else 16)
    print(f"wrote {name}{ext} ({n} samples, {run.steps} step(s), cfg {run.cfg_scale} {args.cfg_position})")
    if args.per_step:                                       # rows: samples, columns: steps
        grid = run.first.transpose(0, 1).flatten(0, 1) * 0.5 + 0.5
        save_image(grid, f"{name}_per_step{ext}", nrow=run.steps)
        print(f"wrote {name}_per_step{ext} (rows: {run.first.shape[1]} samples, columns: steps 1..{run.steps})")
    if args.out_dir:
        for j, x in enumerate(run.images):
            save_image(x / 255, os.path.join(args.out_dir + suffix(args, run.cfg_scale, run.steps), f"{j:06d}.png"))
    if args.npz:
        path = args.npz.removesuffix(".npz") + suffix(args, run.cfg_scale, run.steps) + ".npz"
        save_npz(dict(arr_0=run.images.permute(0, 2, 3, 1).numpy(), labels=labels.numpy()), path)
        print(f"wrote {path}: arr_0 {tuple(run.images.shape[i] for i in (0, 2, 3, 1))} uint8 NHWC")


@script
def main(argv=None):
    # Parse the flags, start the processes, load the model (its EMA weights when it has them).
    args = get_args(argv)
    world, rank, device = init_distributed(args.device, args.dist_timeout)
    model, train_args = load_model(args.ckpt, device, ema=not args.raw_weights)
    classes = check_model(args, model.cfg.num_classes, train_args["dataset"])
    judge = None                                    # --toy_metrics: read or trained now
    if args.toy_metrics and rank == 0:
        judge = evaluate.toy_classifier(os.path.join(ckpt_dir(args.ckpt), "toy_classifier_seed0.pt"))
    # Check what can fail before sampling: the evaluation (Inception, reference), the folders.
    scored = args.fid or args.rfid or args.is_ or args.prc
    size = model.cfg.image_size
    ev = evaluate.Evaluation(args, train_args, size, device, rank, world) if scored else None
    if rank == 0:
        check_writable(os.path.dirname(os.path.abspath(args.root)), "--out")
        for scale, steps in args.settings if args.out_dir else []:
            check_writable(args.out_dir + suffix(args, scale, steps), "--out_dir")
        if args.npz:
            check_writable(os.path.dirname(os.path.abspath(args.npz)), "--npz")
    if ev:
        ev.prepare(model)                                           # reference statistics, rFID
    # Sample: labels balanced over the classes and grouped, so that grid rows are classes.
    n = args.n or (8 * len(classes) if 0 < len(classes) <= 32 else 64)
    labels = torch.tensor([classes[i * len(classes) // n] for i in range(n)] if classes else [-1] * n)
    sigma = sigma_max(args.alpha if args.alpha is not None else train_args["alpha"])
    runs = draw(model, args, labels, sigma, device, rank, world, ev)
    if dist.is_initialized():   # rank 0 writes and scores alone, no rank waiting for it
        dist.destroy_process_group()
        if rank > 0:
            return
    time.sleep(POST_DELAY)
    # Write every setting's images, then score them.
    if judge is not None:
        evaluate.toy_report(judge, model)
    table = []
    for run in runs:
        write(run, args, labels, classes, model.cfg.num_classes)
        if judge is not None:
            evaluate.toy_line(judge, run.images / 255 * 2 - 1, labels, run.steps)
        if ev:
            table.append({"cfg": run.cfg_scale, "steps": run.steps, **ev.scores(run.features)})
    if table:
        evaluate.print_table(table)
        n_ref = table[0]["reference_images"]                # all, if fewer than --ref_count; IS: none
        path, ref = args.root + "_metrics.json", args.ref or n_ref and f"{train_args['dataset']} x {n_ref}"
        save_json({"samples": n, "reference": ref, "rows": table}, path, what="metrics")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
