"""Look at the latent sphere of a trained Sphere Encoder: PNG plots and a uniformity number.
Sphere Encoder (arXiv 2602.15030): Sec. 4, Fig. 7 (3D projections, a sphere per class), Eq. 4, 11-12
(noise angle), App. C.2 (angle mixing), Alg. 1 (trajectory); beyond the paper: uniformity vs the prior.
    python train.py && python viz.py      # reads out/toy/last.pt, writes out/toy/viz/*.png
    python viz.py --log out/toy/log.jsonl # the run's losses and grad norm: out/toy/loss.png
"""
import json
import math
import os

import matplotlib.pyplot as plt
import torch

from checkpoint import ckpt_dir, load_model_and_data
from cli import COUNT, die, number, parser, script
from spherify import angle_deg, generate, noise_levels, noisy_latents, sigma_max, spherify
plt.switch_backend("Agg")                  # headless


def project(v, P):
    """Random 3D view of the sphere (Sec. 4): (N, L) @ (L, 3), each point scaled to unit length."""
    return torch.nn.functional.normalize(v.flatten(1) @ P, dim=1)


def uniformity(v, t=2.0):
    """Ours (docs/reference.md Sec. 8): U = log mean_{i<j} exp(-t ||u_i - u_j||^2), u = v / ||v||
    (Wang & Isola), cos_std = std of pairwise cosines x sqrt(L), eff_dim = (sum lambda)^2 /
    sum lambda^2 of the covariance, and the pairwise cosines. Uniform on the sphere: U ~ -4,
    cos_std ~ 1; collapsed: U ~ 0."""
    u = torch.nn.functional.normalize(v.flatten(1).double(), dim=1)       # (n, L)
    i, j = torch.triu_indices(len(u), len(u), offset=1)
    c = (u @ u.T)[i, j]                                                     # pairwise cosines
    # For unit vectors, ||u_i - u_j||^2 = 2 - 2 cos.
    U = torch.logsumexp(-t * (2 - 2 * c), dim=0) - math.log(len(c))
    # The centred latents' (n, n) Gram matrix has the covariance's nonzero eigenvalues, so eff_dim
    # comes from it for any L.
    uc = u - u.mean(0)
    eff_dim = (uc.pow(2).sum() ** 2 / (uc @ uc.T).pow(2).sum()).item()
    return {"uniformity": U.item(), "cos_mean": c.mean().item(),
            "cos_std": (c.std() * math.sqrt(u.shape[1])).item(), "eff_dim": eff_dim, "cos": c}


def save(fig, out):
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def sphere_axes(fig, pos, title):
    ax = fig.add_subplot(*pos, projection="3d", box_aspect=(1, 1, 1))
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    return ax


def plot_spheres(v, y, prior, out, views=3, seed=0):
    """Encoded latents (coloured by class) above prior samples, in `views` random projections."""
    g = torch.Generator().manual_seed(seed)
    fig = plt.figure(figsize=(4 * views, 8))
    for k in range(views):
        P = torch.randn(v.shape[1], 3, generator=g)
        for row, (pts, col, name) in enumerate(((v, y, "encoded images"), (prior, None, "prior f(e)"))):
            ax = sphere_axes(fig, (2, views, row * views + k + 1), f"{name}, projection {k + 1}")
            color = "gray" if col is None else plt.cm.tab10(col.numpy() % 10)
            ax.scatter(*project(pts, P).T, color=color, s=3, alpha=0.6)
    save(fig, out)


def plot_per_class(v, y, out, seed=0):
    """One sphere per class (Fig. 7): in a healthy conditional model each class covers it evenly."""
    P = torch.randn(v.shape[1], 3, generator=torch.Generator().manual_seed(seed))
    classes = y.unique().tolist()[:10]
    fig = plt.figure(figsize=(2.6 * len(classes), 2.8))
    for k, c in enumerate(classes):
        ax = sphere_axes(fig, (1, len(classes), k + 1), f"class {c}")
        ax.scatter(*project(v[y == c], P).T, color=plt.cm.tab10(k % 10), s=4, alpha=0.7)
    save(fig, out)


def plot_noise(v, trajectory, alpha, band, out):
    """Three panels: noisy copies' angle vs sigma (Eq. 11-12), training angles (Eq. 5, App. C.2),
    Algorithm 1's path."""
    fig = plt.figure(figsize=(15, 4.5))
    # Left: the angle between v and its noisy copies, measured and predicted, against sigma.
    ax = fig.add_subplot(1, 3, 1)
    sig = torch.linspace(0, sigma_max(min(band, 89)), 60)
    vv = v[:1].expand(len(sig), -1)
    torch.manual_seed(0)
    v_NOISY, v_noisy = noisy_latents(vv, sig, 0.5 * sig)
    ax.plot(sig, angle_deg(vv, v_NOISY), label="v_NOISY = f(v + sigma e)  (Eq. 4)")
    ax.plot(sig, angle_deg(vv, v_noisy), label="v_noisy, s = 0.5  (Eq. 6)")
    ax.plot(sig, torch.rad2deg(torch.atan(sig)), "k--", lw=1, label="arctan(sigma)  (Eq. 11-12)")
    ax.axvline(sigma_max(alpha), color="gray", lw=0.8)
    ax.set(xlabel="sigma", ylabel="angle to v (degrees)", title=f"noise angle, L = {v.shape[1]}")
    ax.legend(fontsize=7)
    # Middle: the noise angles training draws, each sigma's angle as for large L (Eq. 11-12).
    ax = fig.add_subplot(1, 3, 2)
    s, s_sub = noise_levels(20_000, alpha, band if band > alpha else None, generator=torch.Generator().manual_seed(0))
    ax.hist(torch.rad2deg(torch.atan(s)), bins=90, range=(0, 90), alpha=0.7, label="v_NOISY")
    ax.hist(torch.rad2deg(torch.atan(s_sub)), bins=90, range=(0, 90), alpha=0.7, label="v_noisy")
    ax.set(xlabel="noise angle (degrees)", ylabel="count", title=f"training angles: alpha {alpha:g}, band {band:g}")
    ax.legend(fontsize=7)
    # Right: Algorithm 1's path over the encoded latents, one colour per sample.
    P = torch.randn(v.shape[1], 3, generator=torch.Generator().manual_seed(1))
    ax = sphere_axes(fig, (1, 3, 3), f"Algorithm 1: latent at steps 1..{len(trajectory)}")
    ax.scatter(*project(v[:300], P).T, color="lightgray", s=2, alpha=0.4)
    # Each sample's projected path: (B, steps, 3).
    path = torch.stack([project(t.flatten(1).float().cpu(), P) for t in trajectory], 1)
    for k, pts in enumerate(path):
        ax.plot(*pts.T, "-o", ms=3, color=plt.cm.tab10(k % 10))
        ax.scatter(*pts[-1], marker="*", s=60, color=plt.cm.tab10(k % 10))
    save(fig, out)


def plot_log(path, out):
    """A run's health from train.py's log.jsonl: the loss terms and the gradient norm against
    step, log y."""
    try:
        with open(path) as f:
            recs = [r for r in map(json.loads, filter(str.strip, f)) if isinstance(r, dict) and "step" in r]
    except (OSError, ValueError) as err:
        # The file is missing, unreadable, or not JSON lines.
        die(f"cannot read --log {path!r}: {getattr(err, 'strerror', None) or err}")
    if not recs:
        die(f"--log {path!r} holds no train.py log lines (train.py writes one every --log_every steps)")
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, keys, title in ((axes[0], ("loss", "recon", "pix_con", "lat_con"), "loss terms"),
                            (axes[1], ("grad_norm",), "gradient norm (before clipping)")):
        for k in keys:
            ax.plot([r["step"] for r in recs], [r.get(k, math.nan) for r in recs], label=k)
        ax.set(xlabel="step", yscale="log", title=title)
        ax.legend(fontsize=8)
    save(fig, out)
    print(f"wrote {out} (steps {recs[0]['step']}..{recs[-1]['step']}, {len(recs)} log lines)")


def plot_uniformity(L, stats, out):
    """Pairwise cosines (x sqrt(L)) of encoded latents against the prior's, with the numbers."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("prior", "encoded"):
        ax.hist((stats[name]["cos"] * math.sqrt(L)).numpy(), bins=100, density=True, alpha=0.6,
                label=f"{name}: U {stats[name]['uniformity']:.3f}, "
                      f"cos std {stats[name]['cos_std']:.2f}")
    ax.set(xlabel="pairwise cosine x sqrt(L)", ylabel="density",
           title="coverage of the sphere (uniform: U ~ -4, std ~ 1)")
    ax.legend(fontsize=8)
    save(fig, out)


def get_args(argv):
    """viz.py's flags, parsed."""
    p = parser(__doc__)
    p.add_argument("--ckpt", default="out/toy/last.pt", help="a train.py checkpoint (default: the quick start's)")
    p.add_argument("--dataset", default=None, help="images to encode (default: the checkpoint's dataset)")
    p.add_argument("--data_dir", default=None)
    p.add_argument("--raw_weights", action="store_true", help="the trained weights, not the EMA ones (train.py --ema)")
    # At most 10000 images, as the pairwise cosines take n^2 doubles.
    p.add_argument("--n", type=number(2, 10_000, cast=int), default=1000,
                   help="images to encode (and prior points), at most 10000")
    p.add_argument("--steps", type=COUNT, default=6, help="Algorithm 1 steps for the trajectory")
    p.add_argument("--out", default=None, help="output folder (default: <ckpt dir>/viz; --log: the log's folder)")
    p.add_argument("--log", default=None, help="instead, plot a train.py log.jsonl: losses, grad norm (loss.png)")
    return p.parse_args(argv)


def encode_dataset(model, ds, n, device):
    """v = f(E(x, y)) of n random images of ds (Eq. 1) and their labels y: (n, L), (n,).
    An unconditional model's encode ignores y."""
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].tolist()
    vs, ys = [], []
    for x, y in torch.utils.data.DataLoader(torch.utils.data.Subset(ds, idx), batch_size=256):
        z = model.encode(x.to(device), y.to(device))
        vs.append(spherify(z).flatten(1).float().cpu())
        ys.append(y)
    return torch.cat(vs), torch.cat(ys)


@script
@torch.no_grad()
def main(argv=None):
    args = get_args(argv)
    # A log is plotted without a checkpoint.
    if args.log:
        log_dir = args.out or os.path.dirname(os.path.abspath(args.log))
        return plot_log(args.log, os.path.join(log_dir, "loss.png"))
    if not os.path.isfile(args.ckpt):
        die(f"no checkpoint at {args.ckpt!r}: run `python train.py` first (the quick start), or pass --ckpt")
    model, targs, ds = load_model_and_data(args)
    out = args.out or os.path.join(ckpt_dir(args.ckpt), "viz")
    v, y = encode_dataset(model, ds, args.n, args.device)               # (n, L), (n,)
    # As many prior samples f(e), uniform on the sphere (Eq. 3).
    torch.manual_seed(0)
    prior = spherify(torch.randn_like(v))
    stats = {"encoded": uniformity(v), "prior": uniformity(prior)}
    for name, s in stats.items():
        print(f"{name:>8}: uniformity {s['uniformity']:.3f} (uniform ~ -4) | "
              f"pairwise cos mean {s['cos_mean']:+.4f}, "
              f"std x sqrt(L) {s['cos_std']:.2f} (uniform ~ 1) | "
              f"effective dimensions {s['eff_dim']:.1f}")
    # Algorithm 1's path on the sphere for k = 6 samples (of classes 0, 1, ... if conditional).
    cfg, k, trajectory = model.cfg, 6, []
    e = torch.randn(k, cfg.grid, cfg.grid, cfg.latent_dim, device=args.device)
    labels = torch.arange(k, device=args.device) % cfg.num_classes if cfg.num_classes else None
    generate(model, e, labels, args.steps, sigma_max(targs["alpha"]), trace=trajectory)
    plot_spheres(v, y, prior, os.path.join(out, "sphere.png"))
    plot_per_class(v, y, os.path.join(out, "sphere_per_class.png"))
    plot_noise(v, trajectory, targs["alpha"], targs.get("band") or targs["alpha"], os.path.join(out, "noise.png"))
    plot_uniformity(v.shape[1], stats, os.path.join(out, "uniformity.png"))
    print(f"wrote {out}/sphere.png, sphere_per_class.png, noise.png, uniformity.png")


if __name__ == "__main__":
    main()
