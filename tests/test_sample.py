"""sample.py: Algorithm 1, CFG, outputs and bad input."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import evaluate
import sample
from conftest import ROOT, randomize_zero_inits
from model import SphereEncoder
from spherify import generate, guidance_scales
from spherify import spherify


@pytest.fixture
def model(tiny_cfg):
    torch.manual_seed(0)
    return randomize_zero_inits(SphereEncoder(tiny_cfg)).eval()


def noise(m, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, m.cfg.grid, m.cfg.grid, m.cfg.latent_dim, generator=g)


def test_one_step_is_decode_of_spherified_noise(model):
    e, y = noise(model), torch.tensor([0, 1, 2, 3])
    xs = generate(model, e, y, steps=1)
    assert len(xs) == 1 and xs[0].shape == (4, 3, 32, 32)
    torch.testing.assert_close(xs[0], model.decode(spherify(e), y))            # Eq. 3
    assert xs[0].min() >= -1 and xs[0].max() <= 1


def test_steps_are_deterministic_and_refine(model):
    e, y = noise(model), torch.tensor([0, 1, 2, 3])
    a = generate(model, e, y, 4, generator=torch.Generator().manual_seed(1))
    b = generate(model, e, y, 4, generator=torch.Generator().manual_seed(1))
    assert len(a) == 4 and all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[0], a[-1])


def test_latent_norm_is_sqrt_L_at_every_step(model, monkeypatch):
    seen = []
    real = model.decode
    monkeypatch.setattr(model, "decode", lambda v, y=None: seen.append(v.flatten(1).norm(dim=1)) or real(v, y))
    generate(model, noise(model), torch.tensor([0, 1, 2, 3]), 4, gamma=1.0)
    L = model.cfg.latent_size
    assert len(seen) == 4
    for n in seen:
        torch.testing.assert_close(n, torch.full_like(n, L ** 0.5), rtol=1e-4, atol=0)


def test_shared_vs_independent_noise(model, monkeypatch):
    e, y = noise(model), torch.tensor([0, 1, 2, 3])
    draws = []
    real = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *a, **k: draws.append(1) or real(*a, **k))
    shared = generate(model, e, y, 4, noise="shared", generator=torch.Generator().manual_seed(1))
    assert len(draws) == 1                                                       # one e' for all re-encodes
    indep = generate(model, e, y, 4, noise="independent", generator=torch.Generator().manual_seed(1))
    assert len(draws) == 1 + 3                                                   # a fresh e' each step
    torch.testing.assert_close(shared[1], indep[1])                             # same first e'
    assert not torch.allclose(shared[3], indep[3])


@pytest.mark.parametrize("position", ["pixel", "latent", "combo"])
def test_cfg_one_equals_no_guidance(model, position):
    e, y = noise(model), torch.tensor([0, 1, 2, 3])
    plain = generate(model, e, y, 3, generator=torch.Generator().manual_seed(2))
    for scale in (1.0, 0.5):                                                     # guidance only for s > 1 [released]
        guided = generate(model, e, y, 3, cfg_scale=scale, cfg_position=position, generator=torch.Generator().manual_seed(2))
        for p, q in zip(plain, guided):
            torch.testing.assert_close(p, q)
    strong = generate(model, e, y, 3, cfg_scale=2.0, cfg_position=position, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(plain[-1], strong[-1])


def test_pixel_cfg_formula(model):
    e, y = noise(model), torch.tensor([0, 1, 2, 3])
    v = spherify(e)
    cond, unc = model.decode(v, y), model.decode(v, None)
    expected = (unc + 1.5 * (cond - unc)).clamp(-1, 1)
    torch.testing.assert_close(generate(model, e, y, 1, cfg_scale=1.5, cfg_position="pixel")[0], expected)
    assert guidance_scales(1.6, "combo") == pytest.approx((1.6 ** 0.5, 1.6 ** 0.5))   # App. C.1: product = s


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    import train
    out = str(tmp_path_factory.mktemp("ck"))
    train.main(["--max_steps", "2", "--batch_size", "8", "--sample_every", "100", "--out_dir", out])
    return os.path.join(out, "last.pt")


def run(*args):
    return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cli_grid_per_step_and_npz_round_trip(ckpt, tmp_path):
    out, npz = str(tmp_path / "g.png"), str(tmp_path / "s.npz")
    r = run("--ckpt", ckpt, "--steps", "1,2", "--n", "10", "--classes", "3,5", "--per_step", "--out", out,
            "--npz", npz, "--out_dir", str(tmp_path / "single"))
    assert r.returncode == 0, r.stderr
    from PIL import Image
    for f in ("g_1step.png", "g_2step.png", "g_2step_per_step.png"):
        Image.open(tmp_path / f).verify()
    d = np.load(str(tmp_path / "s_2step.npz"))
    assert d["arr_0"].shape == (10, 32, 32, 3) and d["arr_0"].dtype == np.uint8
    assert d["labels"].tolist() == [3] * 5 + [5] * 5                             # balanced, grouped
    assert len(os.listdir(tmp_path / "single_1step")) == 10


def test_class_ids_are_checked_against_the_model(ckpt, capsys):       # flag domains: tests/test_flags.py
    with pytest.raises(SystemExit) as exc:
        sample.main(["--ckpt", ckpt, "--classes", "3,10"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and "class ids must be in 0..9, got 3,10" in err


def test_cli_missing_and_corrupt_checkpoint(tmp_path, capsys):
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    for name, words in (("nope.pt", "no checkpoint"), ("bad.pt", "is not a PyTorch checkpoint")):
        with pytest.raises(SystemExit) as exc:
            sample.main(["--ckpt", str(tmp_path / name)])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and words in err


def test_frechet_distance_hand_values():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert evaluate.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # N(0, I) vs N(mu, 4 I) in 3D: |mu|^2 + tr(I + 4I - 2 * 2I) = |mu|^2 + 3
    b = rng.normal(size=(4000, 3)) * 2 + np.array([1.0, 2.0, 0.0])
    assert evaluate.frechet_distance(a, b) == pytest.approx(5.0 + 3.0, rel=0.1)


def test_toy_scores_offline_with_a_stand_in_classifier():
    from data import ToyShapes
    from evaluate import ToyClassifier
    torch.manual_seed(0)
    clf = ToyClassifier().eval()                                                 # random weights: exercises the path
    ds = ToyShapes()
    real = torch.stack([ds[i][0] for i in range(64)])
    labels = torch.arange(64) % 10
    same = evaluate.toy_scores(real, labels, clf)                                  # the reference images themselves
    assert same["toy_fd"] == pytest.approx(0.0, abs=1e-3)
    noise = evaluate.toy_scores(torch.rand(64, 3, 32, 32) * 2 - 1, labels, clf)
    assert noise["toy_fd"] > same["toy_fd"] + 1e-3 and 0 <= noise["class_acc"] <= 1
    assert same["colour_spread"] == pytest.approx(1.0)
    clf.forward = lambda im: torch.nn.functional.one_hot(torch.full((len(im),), 3), 10).float()  # says "ring"
    per = evaluate.toy_scores(real, labels, clf)["per_class"]                     # 7 of each class 0-3, 6 of 4-9
    assert list(per) == ds.classes and per["ring"] == 1.0 and sum(per.values()) == 1.0
    assert evaluate.toy_scores(real * 0.5, labels, clf)["colour_spread"] == pytest.approx(0.5)   # washed-out colours


def test_toy_recon_scores_colour_gap_and_class_accuracy():
    from data import ToyShapes
    x = torch.stack([ToyShapes()[i][0] for i in range(8)])

    class Shift(torch.nn.Linear):                                               # D(f(E(x))) = x + 0.2 on channel 0
        rms = x.pow(2).flatten(1).mean(1).add(1e-6).sqrt().view(-1, 1, 1, 1)   # undoes spherify for these 8

        def encode(self, x, y=None):
            return x

        def decode(self, v, y=None):
            return v * self.rms + torch.tensor([0.2, 0.0, 0.0]).view(1, 3, 1, 1)
    m = Shift(1, 1)
    says = lambda c: lambda im: torch.nn.functional.one_hot(torch.full((len(im),), c), 10).float()  # always class c
    err, acc, per_class = evaluate.toy_recon_scores(m, says(3), n=8)              # labels of images 0..7: i % 10
    assert err == pytest.approx(0.2 / 3 * 127.5, rel=1e-4) and acc == pytest.approx(1 / 8)
    assert per_class == {name: float(name == "ring") for name in ToyShapes.classes[:8]}


def test_flowers_samples_with_independent_noise_unless_told(ckpt, tmp_path, capsys, monkeypatch):
    """The model card evaluates Flowers with --cache_sampling_noise False: a fresh e' per step."""
    ck = torch.load(ckpt, weights_only=True)
    torch.save({**ck, "args": {**ck["args"], "dataset": "flowers"}}, tmp_path / "flowers.pt")
    seen = []
    monkeypatch.setattr(sample, "generate", lambda m, e, y, steps, *a, **kw:         # a[4]: the noise argument
                        seen.append(a[4]) or [torch.zeros(len(e), 3, 32, 32)])
    for path, flags, noise in [(tmp_path / "flowers.pt", [], "independent"), (ckpt, [], "shared"),
                               (tmp_path / "flowers.pt", ["--noise", "shared"], "shared")]:
        sample.main(["--ckpt", str(path), "--n", "2", "--steps", "2", "--out", str(tmp_path / "g.png"), *flags])
        assert seen.pop() == noise and ("--noise independent, as the model card" in capsys.readouterr().out) == (
            noise == "independent")


def test_missing_inception_weights_fail_before_sampling(ckpt, tmp_path, capsys, monkeypatch):
    def offline(*args, **kw):
        raise RuntimeError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))                     # no cached weights
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(sample, "generate", None)                                # never reached
    with pytest.raises(SystemExit) as exc:
        sample.main(["--ckpt", ckpt, "--is", "--out", str(tmp_path / "g.png")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1
    assert "FID/IS need the Inception weights (<urlopen error" in err and err.endswith("--inception_weights PATH")


def test_bad_inception_weights_file_is_named(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sample, "generate", None)                                # never reached
    (tmp_path / "w.pth").write_text("not weights")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")        # tensors, but not Inception's
    for name, message in [("w.pth", "--inception_weights: {!r} is not a PyTorch checkpoint (not a zip archive"),
                          ("other.pth", "--inception_weights {!r}: not torch-fidelity's Inception weights")]:
        with pytest.raises(SystemExit) as exc:
            sample.main(["--ckpt", ckpt, "--is", "--inception_weights", str(tmp_path / name)])
        assert exc.value.code == 2
        assert message.format(str(tmp_path / name)) in capsys.readouterr().err


def test_bad_ref_fails_before_sampling(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sample, "generate", None)                                # never reached
    with pytest.raises(SystemExit) as exc:
        sample.main(["--ckpt", ckpt, "--fid", "--ref", str(tmp_path / "nope")])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().endswith("is neither an image folder nor an .npz reference batch (arr_0 uint8 "
                                                    "NHWC) or statistics (mu, sigma)")


def test_ema_weights_are_sampled_unless_raw_weights(ckpt, tmp_path, capsys):
    ck = torch.load(ckpt, weights_only=True)
    ema = {k: v + 0.05 * torch.randn_like(v) for k, v in ck["model"].items()}
    torch.save({**ck, "ema": ema}, tmp_path / "ema.pt")                          # train.py --ema
    torch.save({**ck, "model": ema}, tmp_path / "ema_as_model.pt")               # no "ema": its "model" is used

    def npz(path, *flags):
        out = str(tmp_path / "s.npz")
        sample.main(["--ckpt", str(path), "--n", "4", "--steps", "1", "--out", str(tmp_path / "g.png"), "--npz", out, *flags])
        return np.load(out)["arr_0"]
    with_ema = npz(tmp_path / "ema.pt")
    assert f"using the EMA weights of {tmp_path / 'ema.pt'} (--raw_weights for the trained ones)" in capsys.readouterr().out
    assert np.array_equal(with_ema, npz(tmp_path / "ema_as_model.pt"))
    raw = npz(tmp_path / "ema.pt", "--raw_weights")
    assert "EMA" not in capsys.readouterr().out
    assert np.array_equal(raw, npz(ckpt)) and not np.array_equal(raw, with_ema)


def test_torchrun_sharded_sampling_equals_one_process_and_outlasts_dist_timeout(ckpt, tmp_path):
    one, two = str(tmp_path / "one.npz"), str(tmp_path / "two.npz")
    args = ["--ckpt", ckpt, "--num_samples", "12", "--batch_size", "4", "--steps", "1,2", "--out", str(tmp_path / "g.png")]
    sample.main([*args, "--npz", one])
    # rank 0 writes 4 s after the group is gone: ranks waiting in a collective for it would die at --dist_timeout 3
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29631",
                        "sample.py", *args, "--npz", two, "--device", "cpu", "--dist_timeout", "3"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "SPHERE_POST_DELAY": "4"})
    assert r.returncode == 0, r.stderr[-2000:]
    for s in (1, 2):
        a, b = np.load(one.replace(".npz", f"_{s}step.npz")), np.load(two.replace(".npz", f"_{s}step.npz"))
        assert b["arr_0"].shape == (12, 32, 32, 3)
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
    assert not list(tmp_path.glob("*.tmp"))


def test_toy_classifier_is_the_same_judge_for_every_run(tmp_path):
    from evaluate import toy_classifier
    torch.manual_seed(1)                                                        # whatever the caller's RNG state
    a = toy_classifier(str(tmp_path / "a.pt"), steps=2).state_dict()
    torch.rand(100)
    b = toy_classifier(str(tmp_path / "b.pt"), steps=2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("flag, value, folder", [("--out", "f/grid.png", "f"), ("--npz", "f/s.npz", "f"),
                                                  ("--out_dir", "f", "f"), ("--out_dir", "f/pngs", "f/pngs")])
def test_an_unwritable_output_stops_before_sampling(ckpt, tmp_path, capsys, monkeypatch, flag, value, folder):
    monkeypatch.setattr(sample, "generate", None)                                # never reached
    (tmp_path / "f").write_text("a file, not a folder")
    with pytest.raises(SystemExit) as exc:
        sample.main(["--ckpt", ckpt, flag, str(tmp_path / value)])
    assert exc.value.code == 2
    assert f"cannot write to {flag} {str(tmp_path / folder)!r}: " in capsys.readouterr().err


def test_a_bad_flag_found_after_loading_leaves_no_folder(ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", ckpt, "--classes", "99", "--out", str(tmp_path / "a/g.png"), "--out_dir",
                     str(tmp_path / "b"), "--npz", str(tmp_path / "c/s.npz")])
    assert "class ids must be in 0..9" in capsys.readouterr().err and os.listdir(tmp_path) == []
