"""viz.py and edit.py on a tiny untrained model: valid PNGs, the uniformity measure, editing, EMA weights."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import edit
import viz
from conftest import ROOT, randomize_zero_inits
from model import SphereEncoder
from spherify import spherify


def test_uniformity_scores_prior_uniform_and_collapse_far():
    torch.manual_seed(0)
    L = 2048
    prior = viz.uniformity(spherify(torch.randn(500, L)))
    assert prior["uniformity"] == pytest.approx(-4.0, abs=0.05)                 # -2t for t = 2
    assert prior["cos_std"] == pytest.approx(1.0, abs=0.05)
    same = viz.uniformity(spherify(torch.randn(1, L)).expand(500, L))
    assert same["uniformity"] == pytest.approx(0.0, abs=1e-6)                   # all latents equal
    centers = spherify(torch.randn(10, L))                                      # one cluster per class
    clusters = spherify(centers.repeat_interleave(50, 0) + 0.3 * torch.randn(500, L))
    c = viz.uniformity(clusters)
    assert c["uniformity"] > -2.5 and c["cos_std"] > 5


def test_effective_dimension_counts_the_directions_filled():
    torch.manual_seed(0)
    L, n, k = 2048, 500, 7
    axes = torch.eye(L)[:k] * L ** 0.5                                          # +-sqrt(L) e_i, i < k: on the sphere,
    assert viz.uniformity(torch.cat([axes, -axes]))["eff_dim"] == pytest.approx(k)   # k equal eigenvalues
    assert viz.uniformity(spherify(torch.randn(n, L)))["eff_dim"] == pytest.approx(n * L / (n + L), rel=0.03)
    low = spherify(torch.randn(n, k) @ torch.randn(k, L))                       # a k-dim subspace, unequal axes
    assert 1 < viz.uniformity(low)["eff_dim"] <= k


@pytest.fixture
def model(tiny_cfg):
    torch.manual_seed(0)
    return randomize_zero_inits(SphereEncoder(tiny_cfg)).eval()


def test_manipulation_to_same_class_without_noise_is_reconstruction(model):
    x, y = torch.rand(3, 3, 32, 32) * 2 - 1, torch.tensor([1, 4, 7])
    out = edit.manipulate(model, x, y, alpha=80, steps=1, r=0.0)
    torch.testing.assert_close(out[-1], edit.reconstruct(model, x, y))
    other = edit.manipulate(model, x, torch.tensor([2, 2, 2]), alpha=80, steps=1, r=0.0)
    assert not torch.allclose(other[-1], out[-1])


def test_crossover_stitches_halves_and_refines(model):
    xa, xb = -torch.ones(1, 3, 32, 32), torch.ones(1, 3, 32, 32)
    xs = edit.crossover(model, xa, xb, alpha=80, steps=3)
    assert len(xs) == 4 and torch.equal(xs[0][..., :16], xa[..., :16]) and torch.equal(xs[0][..., 16:], xb[..., 16:])
    assert edit.rounds(0.25, 1.0, 10) == pytest.approx([0.25 * (1 - k / 10) for k in range(1, 11)])  # Eq. 13
    assert edit.rounds(1.0, 0.0, 4) == [1.0] * 4


def test_corner_grid_interpolates_noise(model):
    g = torch.Generator().manual_seed(0)
    out = edit.corner_grid(model, alpha=80, n=3, y=2, steps=1, generator=g)
    c = torch.randn(4, 8, 8, 8, generator=torch.Generator().manual_seed(0))   # the same corners
    torch.testing.assert_close(out[0], model.decode(spherify(c[:1]), torch.tensor([2]))[0])   # top-left = corner 0
    torch.testing.assert_close(out[8], model.decode(spherify(c[3:]), torch.tensor([2]))[0])   # bottom-right = corner 3
    mid = spherify(((c[0] + c[1] + c[2] + c[3]) / 4)[None])
    torch.testing.assert_close(out[4], model.decode(mid, torch.tensor([2]))[0], rtol=1e-4, atol=1e-5)


def test_plots_write_valid_pngs(model, tmp_path):
    torch.manual_seed(0)
    v, y = spherify(torch.randn(60, model.cfg.latent_size)), torch.arange(60) % 10
    prior = spherify(torch.randn(60, model.cfg.latent_size))
    traj = [spherify(torch.randn(4, model.cfg.latent_size)) for _ in range(3)]
    stats = {"encoded": viz.uniformity(v), "prior": viz.uniformity(prior)}
    viz.plot_spheres(v, y, prior, tmp_path / "a.png")
    viz.plot_per_class(v, y, tmp_path / "b.png")
    viz.plot_noise(v, traj, 80, 85, tmp_path / "c.png")
    viz.plot_uniformity(v.shape[1], stats, tmp_path / "d.png")
    for f in "abcd":
        im = Image.open(tmp_path / f"{f}.png")
        im.verify()
        assert im.size[0] > 200


def test_viz_without_checkpoint_says_what_to_run(tmp_path):
    r = subprocess.run([sys.executable, "viz.py", "--ckpt", str(tmp_path / "none.pt")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "run `python train.py` first" in r.stderr and "Traceback" not in r.stderr


def test_viz_log_plots_a_training_log_without_a_checkpoint(tmp_path, capsys):
    import json
    log = tmp_path / "run" / "log.jsonl"
    log.parent.mkdir()
    recs = [dict(step=s, loss=2 / s ** 0.5, recon=1 / s ** 0.5, pix_con=0.5, lat_con=0.1 / s, grad_norm=3 - s / 50,
                 lr=1e-4, img_per_s=900.0, bad_images=0) for s in range(10, 110, 10)]
    log.write_text("".join(json.dumps(r) + "\n" for r in recs))
    viz.main(["--log", str(log), "--ckpt", str(tmp_path / "none.pt")])    # the checkpoint is not read
    im = Image.open(tmp_path / "run" / "loss.png")
    im.verify()
    assert im.size[0] > 600 and im.size[1] > 200 and "steps 10..100, 10 log lines" in capsys.readouterr().out
    (tmp_path / "empty.jsonl").write_text("\n")
    for path, words in ((tmp_path / "none.jsonl", "No such file"), (tmp_path / "empty.jsonl", "holds no train.py")):
        with pytest.raises(SystemExit) as exc:
            viz.main(["--log", str(path), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and words in err
    assert not (tmp_path / "o").exists()


def test_edit_uses_the_ema_weights_unless_raw_weights(model, tmp_path):
    from dataclasses import asdict
    sd = model.state_dict()
    ema = {k: v * 0.5 for k, v in sd.items()}
    meta = {"config": asdict(model.cfg), "args": {"dataset": "toy", "alpha": 80.0}}
    for name, ck in [("both", {"model": sd, "ema": ema}), ("trained", {"model": sd}), ("ema_only", {"model": ema})]:
        torch.save({**ck, **meta}, tmp_path / f"{name}.pt")

    def recon(name, *flags):
        edit.main(["recon", "--ckpt", str(tmp_path / f"{name}.pt"), "--images", "0,1", "--device", "cpu",
                   "--out", str(tmp_path / "r.png"), *flags])
        return torch.tensor(np.asarray(Image.open(tmp_path / "r.png")))
    with_ema, raw = recon("both"), recon("both", "--raw_weights")
    assert torch.equal(with_ema, recon("ema_only")) and torch.equal(raw, recon("trained"))
    assert not torch.equal(with_ema, raw)


def test_stitch_layouts_and_aliases():
    xa, xb = -torch.ones(1, 3, 4, 4), torch.ones(1, 3, 4, 4)
    a = lambda mode: (edit.stitch(xa, xb, mode)[0, 0] < 0).int().tolist()    # 1 where image a is
    assert a("horizontal") == a("left-right") == [[1, 1, 0, 0]] * 4
    assert a("vertical") == a("top-bottom") == [[1] * 4] * 2 + [[0] * 4] * 2
    assert a("tri_forward") == a("diagonal") == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]   # '/'
    assert a("tri_backward") == [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]]                   # '\'


@pytest.fixture
def photos(tmp_path):
    """Odd sizes and modes a user may hand in: greyscale PNG, RGBA (left half transparent), palette GIF, CMYK JPEG."""
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (41, 57, 4), dtype=np.uint8)
    rgba[:, :28, 3] = 0
    ims = {"grey.png": Image.fromarray(rng.integers(0, 256, (45, 30), dtype=np.uint8), "L"),
           "alpha.png": Image.fromarray(rgba, "RGBA"),
           "pal.gif": Image.fromarray(rng.integers(0, 256, (33, 70, 3), dtype=np.uint8)).convert("P"),
           "cmyk.jpg": Image.fromarray(rng.integers(0, 256, (120, 90, 4), dtype=np.uint8), "CMYK")}
    for name, im in ims.items():
        im.save(tmp_path / name)
    return {name: str(tmp_path / name) for name in ims}


def test_load_image_reads_any_mode_and_size_as_training_does(photos):
    for name, path in photos.items():
        x = edit.load_image(path, 32)
        assert x.shape == (3, 32, 32) and -1 <= x.min() < x.max() <= 1, name
    grey = edit.load_image(photos["grey.png"], 32)
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    alpha = edit.load_image(photos["alpha.png"], 32)                         # short side 41 -> 32: left 28 of 57 cols
    assert torch.all(alpha[:, :, :10] == 1) and not torch.all(alpha[:, :, 20:] == 1)   # transparent: white


def test_edit_takes_your_images(model, photos, tmp_path, capsys):
    from dataclasses import asdict
    ckpt = tmp_path / "t.pt"
    torch.save({"model": model.state_dict(), "config": asdict(model.cfg), "args": {"dataset": "toy", "alpha": 80.0}}, ckpt)
    run = lambda *a: edit.main([*a, "--ckpt", str(ckpt), "--device", "cpu", "--out", str(tmp_path / "o.png")])
    run("manipulate", "--image", photos["cmyk.jpg"], "--target", "3")
    assert Image.open(tmp_path / "o.png").size == (2 + 5 * 34, 2 + 34)       # the input, then 4 rounds
    run("crossover", "--image", photos["alpha.png"], "--image", photos["pal.gif"], "--stitch", "diagonal")
    assert Image.open(tmp_path / "o.png").size == (2 + 13 * 34, 2 + 34)      # a, b, stitched, then 10 rounds
    run("recon", "--image", photos["grey.png"], "--images", "5")              # a file and a training image
    assert Image.open(tmp_path / "o.png").size == (2 + 2 * 34, 2 + 2 * 34)
    for args, words in [(("crossover", "--image", photos["grey.png"]), "crossover needs 2 images"),
                        (("recon", "--image", str(tmp_path / "t.pt")), "cannot be read as an image")]:
        with pytest.raises(SystemExit) as exc:
            run(*args)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and words in err, err


@pytest.mark.parametrize("mode", ["lerp", "slerp"])
def test_class_interp_ends_are_plain_generation(model, mode):
    """Fig. 6 right: the first column is generate(e0, a), the last generate(e1, b); between, the class mix."""
    from spherify import generate, sigma_max
    onehot = torch.nn.functional.one_hot(torch.tensor([2, 5]), 11).float()   # float rows: class weights
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(model.encode(x, onehot), model.encode(x, torch.tensor([2, 5])))
    pairs, n = [[1, 7], [4, 0]], 3
    out = edit.class_interp(model, 80, pairs, n=n, steps=2, mode=mode, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)                                       # the same draws
    e0, e1 = torch.randn(2, 2, 8, 8, 8, generator=g)
    seed = int(torch.randint(2 ** 62, (1,), generator=g))
    plain = lambda e, y: generate(model, e, torch.tensor(y), 2, sigma_max(80),
                                  generator=torch.Generator().manual_seed(seed))[-1]
    out = out.view(2, n, 3, 32, 32)
    torch.testing.assert_close(out[:, 0], plain(e0, [1, 4]))
    torch.testing.assert_close(out[:, -1], plain(e1, [7, 0]))
    assert not torch.allclose(out[:, 1], out[:, 0]) and not torch.allclose(out[:, 1], out[:, -1])
