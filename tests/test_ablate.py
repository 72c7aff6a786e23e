"""ablate.py --quick end to end: a sampling study (schemes) and a training study (band) write a line for every
variant x seed x sampling x steps, a table and a plot; a rerun trains and judges nothing; a killed run resumes."""
import json
import math
import os
import types

import torch

import ablate
import sample
import train
from model import make_config


def rows(path):
    return [json.loads(line) for line in open(path)]


def test_quick_studies_hold_every_variant_and_a_rerun_skips_them(tmp_path, monkeypatch):
    out = str(tmp_path)
    for study in ("schemes", "band"):                                      # band reuses schemes' base runs
        ablate.main([study, "--quick", "--out_dir", out])
    for study in ("schemes", "band"):
        s, folder = ablate.STUDIES[study], tmp_path / study
        got = rows(folder / "results.jsonl")
        assert len(got) == len(s.variants) * 2 * len(s.sampling) * len(ablate.STEPS)   # 2 seeds
        assert {(r["variant"], r["seed"], r["sampling"], r["steps"]) for r in got} == {
            (v, seed, k, t) for v in s.variants for seed in (0, 1) for k in s.sampling for t in ablate.STEPS}
        assert all(0 <= r["class_acc"] <= 1 and isinstance(r["toy_fd"], float) for r in got)   # 40 samples: FD may be nan
        table = (folder / "table.md").read_text()
        assert all(f"| {v} | " in table for v in s.variants) and s.claim in table
        assert (folder / f"{study}.png").stat().st_size > 0
    assert len(os.listdir(tmp_path / "runs")) == 2 + 2 * 2                 # base x 2 seeds shared, 2 more x 2 seeds
    before = {study: (tmp_path / study / "results.jsonl").read_text() for study in ("schemes", "band")}
    monkeypatch.setattr(train, "main", None)                               # a rerun trains nothing ...
    monkeypatch.setattr(ablate, "judge", None)                             # ... and judges nothing
    for study in ("schemes", "band"):
        ablate.main([study, "--quick", "--out_dir", out])
        assert (tmp_path / study / "results.jsonl").read_text() == before[study]
    # a run killed before its end: no done marker, no results; it resumes from its last.pt
    run = ablate.run_dir(out, ablate.STUDIES["band"].variants["no mixing"], 1, True)
    os.remove(os.path.join(run, "done"))
    kept = [r for r in rows(tmp_path / "band" / "results.jsonl") if (r["variant"], r["seed"]) != ("no mixing", 1)]
    (tmp_path / "band" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    calls = []
    monkeypatch.setattr(train, "main", calls.append)
    monkeypatch.setattr(ablate, "judge", lambda *a: {("no CFG", 1): {"toy_fd": 1.0, "class_acc": 0.5}})
    ablate.main(["band", "--quick", "--out_dir", out])
    assert len(calls) == 1 and calls[0][-1] == "--resume" and calls[0][calls[0].index("--out_dir") + 1] == run
    assert len(rows(tmp_path / "band" / "results.jsonl")) == len(kept) + 1


def test_table_keeps_steps_apart_when_the_plot_axis_is_another_field():
    # alpha's x is the training angle: each of its table rows is still one variant x step count, averaged over seeds
    got = [dict(variant=f"alpha {a}", sampling="no CFG", steps=t, train_alpha=float(a), seed=k, toy_fd=a + t + k)
           for a in (30, 80) for t in (1, 4) for k in (0, 1)]
    lines = ablate.summarize(got, ablate.STUDIES["alpha"]).splitlines()
    assert lines[2] == "| variant | sampling | steps | train_alpha | seeds | toy_fd |"
    assert lines[4:] == [f"| alpha {a} | no CFG | {t} | {float(a)} | 2 | {a + t + 0.5:.3f} ({a + t:.3f}-{a + t + 1:.3f}) |"
                         for a in (30, 80) for t in (1, 4)]


def test_compression_angles_keep_the_noise_per_latent_number_and_the_base_sits_on_both_lines():
    base = math.tan(math.radians(80)) ** 2 / (16 * 128)                    # tan(alpha)^2 / L of the 4x4x128 base
    assert ablate.matched(128) == 80
    for d in (16, 32, 64, 256):                                            # degrees are rounded: within 6 %
        assert abs(math.tan(math.radians(ablate.matched(d))) ** 2 / (16 * d) / base - 1) < 0.06
    row = lambda v, g="4x4": dict(variant=v, grid=g)
    assert ablate.lines(row("4x4x128")) == ["4x4 grid, alpha 80", "4x4 grid, tan(alpha) ~ sqrt(L)"]
    assert ablate.lines(row("4x4x32 at 71 deg")) == ["4x4 grid, tan(alpha) ~ sqrt(L)"]
    assert ablate.lines(row("8x8x16", "8x8")) == ["8x8 grid, alpha 80"]


def test_prior_study_draws_e_from_the_truncated_gaussian(monkeypatch):
    seen = []
    fake = lambda model, e, y, T, sigma, *a, generator=None, **kw: seen.append(e) or [torch.zeros(len(e), 3, 32, 32)] * T
    monkeypatch.setattr(sample, "generate", fake)
    model = types.SimpleNamespace(cfg=make_config("tiny", "toy"))
    for settings in ({"truncate": 0.5}, {}):
        assert set(ablate.samples(model, {"alpha": 80}, 20, [1, 2], settings)) == {1, 2}
    cut, full = seen                                                        # (20, 4, 4, 128) each
    assert cut.shape == full.shape == (20, 4, 4, 128)
    assert cut.abs().max() <= 0.5 and cut.std() > 0.25                      # uniform-like on [-0.5, 0.5]: std 0.27
    assert full.abs().max() > 3 and abs(full.std() - 1) < 0.05
