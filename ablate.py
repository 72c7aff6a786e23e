"""The paper's claims rerun at laptop scale (arXiv 2602.15030: Tab. 1, 4-6, 9, 10, 14, Fig. 5, 10-11, 20,
App. B, C.1-C.3, C.5, C.6): a study trains its variants on the toy data with train.py (the same short recipe for
all, >= 2 seeds), judges each checkpoint as sample.py --toy_metrics does (toy-FD, class accuracy; plus viz.py's
uniformity U and nearest-neighbour distances where a claim needs them) at 1, 2, 4 and 6 steps, and writes
<out_dir>/<study>/results.jsonl (a line per variant x seed x sampling x steps), table.md (mean and spread over
seeds), <study>.png and a 4-step sample grid per variant. Runs live in <out_dir>/runs/, shared by the studies
that train the same thing; what results.jsonl holds is skipped, a killed run resumes (docs/claims.md).
    python ablate.py steps                       # one study; python ablate.py --help lists them
    python ablate.py all                         # the lab, then <out_dir>/claims.png (one panel a study)
    python ablate.py schemes --quick --out_dir D # every budget shrunk (the tests)
"""
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import matplotlib.pyplot as plt
import torch
from torchvision.utils import save_image

import train
from checkpoint import load_model
from cli import COUNT, parser, print0, progress, script
from data import ToyShapes, subset
from evaluate import toy_classifier, toy_recon_scores, toy_scores
from model import LATENTS
from sample import generate_batches
from spherify import sigma_max, spherify
from viz import uniformity
plt.switch_backend("Agg")

# The lab's recipe: 936 steps of 32 images, about 2 minutes for a run alone.
RECIPE = ["--epochs", "3", "--log_every", "117", "--sample_every", "936"]
QUICK = ["--max_steps", "12", "--batch_size", "8", "--log_every", "6", "--sample_every", "12"]
# The base variant: the quick start's settings (and 2 checkpoints kept).
BASE = ["--keep_every", "234"]
# The step counts every run is judged at.
STEPS = (1, 2, 4, 6)
# Toy images from this index on are seen by no model and no judge.
HELD_OUT = 50_000


def angle(a):
    """A noise-angle variant: alpha and its mixing band, min(alpha + 5, 89) as released
    (docs/reference.md Sec. 3)."""
    return ["--alpha", str(a), "--band", str(min(a + 5, 89))]


def matched(d, base=128):
    """The angle at which a 4 x 4 x d latent keeps the base's noise per image, the base's 128
    channels at 80 deg: tan(alpha) ~ sqrt(L), as the decoder averages the noise over the L numbers
    that carry one image (docs/claims.md)."""
    return round(math.degrees(math.atan(math.tan(math.radians(80)) * math.sqrt(d / base))))


def lines(r):
    """compression's plot lines: the grid, alpha at 80 deg or at matched(d); the base run is on
    both."""
    rule = lambda m: f"{r['grid']} grid, " + ("tan(alpha) ~ sqrt(L)" if m else "alpha 80")
    return [rule("deg" in r["variant"])] + [rule(True)] * (r["variant"] == "4x4x128")


@dataclass
class Study:
    # The paper's words, and where.
    claim: str
    # Variant name -> train.py flags on top of the recipe.
    variants: dict
    # Sampling name -> generate() settings.
    sampling: dict = field(default_factory=lambda: {"no CFG": {}})
    # The plot's x axis, and its series: a row field, fields joined, or row -> its lines' labels.
    x: str = "steps"
    series: str | tuple | Callable = "variant"
    metric: str = "toy_fd"
    # The rows the plot shows, e.g. {"steps": 4}.
    where: dict = field(default_factory=dict)
    # Log-log axes.
    log: bool = False


STUDIES = {
    "steps": Study(
        "Tab. 1, Fig. 5: quality improves with every step 1 -> 2 -> 4 -> 6, "
        "without CFG and with it",
        # The lab's recipe and the quick start's.
        {"3 epochs": BASE, "16 epochs": ["--epochs", "16"]},
        # Without CFG, with it, and at smaller angles: how much a bigger step-2 move helps.
        {"no CFG": {}, "CFG 3 combo": {"cfg": 3.0},
         **{f"sampled at {a} deg": {"alpha": a} for a in (70, 60, 45)}},
        series=("variant", "sampling")),
    "alpha": Study(
        "Sec. 6, Fig. 10-11: generation fails at alpha <= 45 deg while reconstruction is fine; "
        "it improves toward 80-85 deg",
        {f"alpha {a}": BASE if a == 80 else angle(a) for a in (30, 45, 60, 70, 80, 85)},
        x="train_alpha", series="steps"),
    "losses": Study(
        "Tab. 4: reconstruction alone < + pixel consistency < + latent consistency; "
        "reconstruction alone shows artifacts",
        {"recon": ["--weights", "50", "0", "0", "0", "0"],
         "recon + pix_con": ["--weights", "50", "0", "25", "0", "0"],
         "all three": BASE}),
    "band": Study(
        "App. C.2, Tab. 10: mixing [80, 85] deg at p = 0.1 beats no mixing at 1 and 4 steps; "
        "mixing up to 89 does worse",
        {"no mixing": ["--band", "80"], "[80, 85] p 0.1": BASE,
         "[80, 89] p 0.1": ["--band", "89"]}),
    "schemes": Study(
        "Sec. 6, Tab. 6: fixed r (gamma = 0) beats decay (gamma = 1), shared noise beats "
        "independent, at 2, 4 and 6 steps",
        {"base": BASE},
        {f"gamma {g}, {n}": {"gamma": g, "noise": n}
         for g in (0, 1) for n in ("shared", "independent")},
        series="sampling"),
    "cfg": Study(
        "App. C.1, Tab. 9: pixel CFG beats latent CFG; combo is best at a moderate scale",
        # A young model and the quick start's.
        {"base": BASE, "16 epochs": ["--epochs", "16"]},
        {f"{p} {s}": {"cfg": s, "cfg_position": p}
         for p in ("pixel", "latent", "combo") for s in (1.0, 1.5, 2.0, 3.0, 4.0)},
        x="cfg", series=("variant", "cfg_position"), where={"steps": 4}),
    "prior": Study(
        "App. C.6, Tab. 14: generation is insensitive to the noise prior: e from a Gaussian "
        "truncated to [-t, t] scores as from N(0, I)",
        {"base": BASE},
        {"N(0, I)": {}, **{f"truncated at {t}": {"truncate": t} for t in (0.5, 1.0, 2.0)}},
        series="sampling"),
    "uniform": Study(
        "Sec. 6, App. C.3: with no regulariser, encoded latents become nearly as uniform as the "
        "prior",
        # The base's training, with 8 checkpoints kept.
        {"base": ["--keep_every", "117", "--ckpt_every", "117"]},
        x="train_step", series="points", metric="uniformity"),
    "compression": Study(
        "App. C.5, Fig. 20, Tab. 5: the volume ratio 3HW/L is best near 1.5 and 3.0; at one L a "
        "finer latent grid (more tokens, fewer channels) generates better",
        # 4x4 grids at volume ratios 0.75 .. 12; at one L, 8x8 grids with 4x the tokens; and 4x4
        # grids at the angle that keeps the base's noise per image (matched).
        {**{f"4x4x{d}": BASE if d == 128 else ["--latent_dim", str(d)]
            for d in (256, 128, 64, 32, 16)},
         **{f"8x8x{d}": ["--patch_size", "4", "--latent_dim", str(d)] for d in (32, 16)},
         **{f"4x4x{d} at {matched(d)} deg": ["--latent_dim", str(d), *angle(matched(d))]
            for d in (256, 64, 32, 16)}},
        x="ratio", series=lines, where={"steps": 4}, log=True),
    "memorization": Study(
        "App. B: trained much longer, samples sit closer to training images than held-out "
        "images do",
        {"10000 images": BASE, "500 images": ["--max_samples", "500", "--max_steps", "936"]},
        x="variant", series="steps", metric="nn_ratio"),
}


def run_dir(out_dir, flags, seed, quick):
    """A run's folder, named by what it trains: studies that train the same thing share it."""
    name = "_".join(f.lstrip("-") for f in flags) or "default"
    return os.path.join(out_dir, "runs", f"{name}_seed{seed}" + ("_quick" if quick else ""))


def train_run(folder, flags, seed, quick):
    """train.py in this process; a run killed before its end resumes (folder/done marks a
    finished one)."""
    if os.path.exists(os.path.join(folder, "done")):
        return
    resume = ["--resume"] if os.path.exists(os.path.join(folder, "last.pt")) else ["--overwrite"]
    # --quick's budget comes last, so it wins over a variant's flags.
    order = [*flags, *QUICK] if quick else [*RECIPE, *flags]
    train.main([*order, "--seed", str(seed), "--num_workers", "0", "--out_dir", folder, *resume])
    open(os.path.join(folder, "done"), "w").close()


@torch.no_grad()
def samples(model, targs, n, steps, settings, seed=0):
    """n class-balanced samples (labels i % 10) after each of `steps` (Algorithm 1):
    {steps: (n, C, H, W)}."""
    cfg, out = model.cfg, {}
    sig = sigma_max(settings.get("alpha", targs["alpha"]))
    t = settings.get("truncate")                                            # App. C.6
    kw = {("cfg_scale" if k == "cfg" else k): v for k, v in settings.items() if k not in ("alpha", "truncate")}
    # With gamma 0, step t of a T-step run is a t-step run: one run of max(steps) gives them all.
    for T in ([max(steps)] if kw.get("gamma", 0) == 0 else steps):
        g, shape = torch.Generator().manual_seed(seed), (n, cfg.grid, cfg.grid, cfg.latent_dim)
        # App. C.6: e from N(0, I), or from it cut to [-t, t].
        e = (torch.nn.init.trunc_normal_(torch.empty(shape), 0, 1, -t, t, generator=g) if t
             else torch.randn(shape, generator=g))
        y = torch.arange(n) % cfg.num_classes
        # Batches of 250, all drawing on the one generator.
        batches = [(eb, yb, g) for eb, yb in zip(e.split(250), y.split(250))]
        xs = [torch.cat(b) for b in zip(*generate_batches(model, batches, T, sig, bf16=False, **kw))]
        out.update({t: xs[t - 1] for t in steps} if kw.get("gamma", 0) == 0 else {T: xs[-1]})
    return out


def nn_distance(a, b):
    """Mean over a of the L2 distance to its nearest neighbour in b (pixels, [-1, 1]):
    (n, ...), (m, ...) -> float."""
    return torch.cdist(a.flatten(1), b.flatten(1)).min(1).values.mean().item()


def judge(study, s, folder, clf, n):
    """The scores of one trained run: {(sampling, steps): scores}
    (uniform: {(points, train step): U})."""
    model, targs = load_model(os.path.join(folder, "last.pt"))
    # The uniform study: U of f(E(x)) at each kept checkpoint, against the prior's.
    if study == "uniform":
        x, y = ToyShapes().images(range(n)), torch.arange(n) % 10
        prior = spherify(torch.randn(n, model.cfg.latent_dim * model.cfg.grid ** 2,
                                     generator=torch.Generator().manual_seed(0)))
        out = {("prior", 0): {"uniformity": uniformity(prior)["uniformity"]}}
        for f in sorted(f for f in os.listdir(folder) if f.startswith("ckpt_")):
            m = load_model(os.path.join(folder, f))[0]
            v = torch.cat([spherify(m.encode(xb, yb)).flatten(1) for xb, yb in zip(x.split(250), y.split(250))])
            out[("encoded", int(f[5:12]))] = {"uniformity": uniformity(v)["uniformity"]}
        out.update({("prior", k): out[("prior", 0)] for _, k in list(out)})
        return out
    recon = toy_recon_scores(model, clf, n=min(n, 500))
    out = {}
    for name, settings in s.sampling.items():
        for steps, x in samples(model, targs, n, STEPS, settings).items():
            m = toy_scores(x, torch.arange(n) % 10, clf)
            out[(name, steps)] = {**{k: m[k] for k in ("toy_fd", "class_acc", "colour_spread")},
                                  "recon_colour_err": recon[0], "recon_acc": recon[1], **settings}
            # App. B: the samples' nearest neighbours among training and held-out images; the
            # training set is all of the toy data or the run's draw of it.
            if study == "memorization":
                toy, k = ToyShapes(), min(n, 500)
                seen = (subset(len(toy), targs["max_samples"]) if targs.get("max_samples") else range(len(toy)))
                d_train = nn_distance(x[:k], toy.images(seen[:k]))
                d_held = nn_distance(x[:k], toy.images(range(HELD_OUT, HELD_OUT + k)))
                out[(name, steps)].update(nn_train=d_train, nn_held_out=d_held, nn_ratio=d_train / d_held)
    return out


def summarize(rows, s):
    """table.md: a row per variant x sampling x steps (x the study's axis), mean and spread
    (min-max) over seeds."""
    cols = [c for c in dict.fromkeys(["train_step" if s.x == "train_step" else "steps", s.x]) if c != "variant"]
    groups = {}
    for r in rows:
        groups.setdefault((r["variant"], r["sampling"], *(r[c] for c in cols)), []).append(r)
    keys = [k for k in ("toy_fd", "class_acc", "recon_acc", "uniformity", "nn_train",
                        "nn_held_out", "nn_ratio")
            if any(k in r for r in rows)]
    lines = [f"# {s.claim}\n",
             "| variant | sampling | " + " | ".join(cols) + " | seeds | " + " | ".join(keys) + " |",
             "|---" * (3 + len(cols) + len(keys)) + "|"]
    for key, rs in sorted(groups.items(), key=lambda g: tuple(map(str, g[0][:2])) + g[0][2:]):
        cell = lambda k: (f"{statistics.mean(v):.3f} ({min(v):.3f}-{max(v):.3f})"
                          if (v := [r[k] for r in rs if k in r]) else "")
        lines.append("| " + " | ".join(map(str, key)) + f" | {len(rs)} | " + " | ".join(cell(k) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def plot(ax, rows, s, name):
    """The study's metric against its x axis, a line per series: the mean over seeds, the bars
    min to max."""
    series = {}
    for r in (r for r in rows if all(r.get(k) == v for k, v in s.where.items())):
        # A row's series labels: s.series(row), or the fields of a tuple joined, or one field.
        keys = (s.series(r) if callable(s.series)
                else [" / ".join(str(r[k]) for k in s.series) if isinstance(s.series, tuple)
                      else str(r[s.series])])
        for key in keys:
            series.setdefault(key, {}).setdefault(r[s.x], []).append(r[s.metric])
    for label, pts in series.items():
        xs = sorted(pts, key=lambda v: (isinstance(v, str), v))
        mean = [statistics.mean(pts[x]) for x in xs]
        err = [[m - min(pts[x]) for m, x in zip(mean, xs)], [max(pts[x]) - m for m, x in zip(mean, xs)]]
        ax.errorbar([str(x) for x in xs] if s.x == "variant" else xs, mean, yerr=err, marker="o",
                    capsize=3, label=f"{s.series} {label}" if s.series == "steps" else label)
    if s.log:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted({x for pts in series.values() for x in pts}), minor=False)
        ax.xaxis.set_major_formatter("{x:g}")
    note = {"toy_fd": " (lower is better)", "nn_ratio": " (< 1: nearer to training)", "uniformity": " (uniform: -4)"}
    ax.set(xlabel=s.x, ylabel=s.metric + note.get(s.metric, ""),
           title=" ".join([name, *(f"({k} {v})" for k, v in s.where.items())]))
    ax.legend(fontsize=6)


def run_study(name, args, clf):
    """Train what is missing, judge it, append to results.jsonl; then table.md and <name>.png."""
    s, folder = STUDIES[name], os.path.join(args.out_dir, name)
    os.makedirs(folder, exist_ok=True)
    path, t0 = os.path.join(folder, "results.jsonl"), time.time()
    rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    done = {(r["variant"], r["seed"]) for r in rows}
    todo = [] if args.report else [(v, seed) for v in s.variants for seed in range(args.seeds) if (v, seed) not in done]
    for variant, seed in progress(todo, desc=name, unit="run"):
        flags = s.variants[variant]
        run = run_dir(args.out_dir, flags, seed, args.quick)
        train_run(run, flags, seed, args.quick)
        scores = judge(name, s, run, clf, args.n)
        fl = dict(zip(flags, flags[1:]))
        # App. C.5: the patch size and latent width give the volume ratio and the latent grid.
        P, d = (int(fl.get(f"--{k}", LATENTS["toy"][k])) for k in ("patch_size", "latent_dim"))
        new = [dict(study=name, variant=variant, seed=seed, sampling=k[0], steps=k[1],
                    flags=" ".join(flags), train_alpha=float(fl.get("--alpha", 80)),
                    ratio=3 * P * P / d, grid=f"{32 // P}x{32 // P}",
                    **({"points": k[0], "train_step": k[1]} if name == "uniform" else {}), **v)
               for k, v in scores.items()]
        # A whole run's lines in one write: a run is in results.jsonl whole or not at all.
        with open(path, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in new))
        rows += new
        # A 4-step sample grid: what the numbers do not show.
        if name != "uniform":
            model, targs = load_model(os.path.join(run, "last.pt"))
            x = samples(model, targs, 40, [4], next(iter(s.sampling.values())))[4]
            save_image(x * 0.5 + 0.5,
                       os.path.join(folder, f"{variant.replace(' ', '_')}_seed{seed}_4step.png"),
                       nrow=10)
    with open(os.path.join(folder, "table.md"), "w") as f:
        f.write(summarize(rows, s))
    fig, ax = plt.subplots(figsize=(6, 4.2))
    plot(ax, rows, s, name)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, f"{name}.png"), dpi=90)
    plt.close(fig)
    print0(f"{name}: {len(rows)} results in {folder} ({len(todo)} runs trained or judged now, "
           f"{time.time() - t0:.0f} s)")
    return rows


@script
def main(argv=None):
    p = parser(__doc__, device=False)
    p.add_argument("study", choices=[*STUDIES, "all"], help="; ".join(f"{k}: {s.claim}" for k, s in STUDIES.items()))
    p.add_argument("--out_dir", default="out/ablate")
    p.add_argument("--seeds", type=COUNT, default=2, help="training seeds per variant (0..N-1)")
    p.add_argument("--n", type=COUNT, help="samples judged per run and step count (default 500, --quick 40)")
    p.add_argument("--quick", action="store_true", help="12 training steps, 40 samples, a weak judge: the tests")
    p.add_argument("--report", action="store_true", help="train and judge nothing: tables and plots of what is in")
    args = p.parse_args(argv)
    args.n = args.n or (40 if args.quick else 500)
    os.makedirs(args.out_dir, exist_ok=True)
    # The judge of sample.py --toy_metrics.
    clf = toy_classifier(os.path.join(args.out_dir, "toy_classifier"
                                      + ("_quick.pt" if args.quick else "_seed0.pt")),
                         steps=20 if args.quick else 300)
    names = list(STUDIES) if args.study == "all" else [args.study]
    results = {name: run_study(name, args, clf) for name in names}
    # Several studies: their plots in one figure, the README's claims.png.
    if len(names) > 1:
        fig, axes = plt.subplots(2, math.ceil(len(names) / 2), figsize=(4.6 * math.ceil(len(names) / 2), 8))
        for ax, name in zip(axes.flat, names):
            plot(ax, results[name], STUDIES[name], name)
        for ax in axes.flat[len(names):]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(os.path.join(args.out_dir, "claims.png"), dpi=80)
        print0(f"wrote {os.path.join(args.out_dir, 'claims.png')}")


if __name__ == "__main__":
    main()
