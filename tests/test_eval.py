"""sample.py's evaluation end to end, offline: a stand-in Inception (random weights, Kaiming-initialized convolutions,
made here) through --fid --rfid --is --prc on a tiny checkpoint: finite metrics, the reference's statistics cached
and reused, 2 processes (torchrun, gloo) = 1 process, --ref statistics = the images they came from."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import evaluate
import sample
import train
from conftest import ROOT
from data import ToyShapes

pytestmark = pytest.mark.xdist_group("eval")                    # one worker: the runs share the module's fixtures


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """torch-fidelity's Inception with its weight loading skipped, convolutions Kaiming-normal (ReLU gain): its pool
    features (~0.3) tell images apart (its own init gives ~1e-8, alike for every image)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    mp = pytest.MonkeyPatch()
    mp.setattr(fe, "load_state_dict_from_url", lambda *a, **kw: {})
    mp.setattr(torch.nn.Module, "load_state_dict", lambda self, sd, **kw: None)
    torch.manual_seed(0)
    net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    mp.undo()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    path = str(tmp_path_factory.mktemp("inception") / "stand-in.pth")
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ck"))
    train.main(["--max_steps", "1", "--batch_size", "8", "--model", "tiny", "--sample_every", "100", "--num_workers",
                "0", "--out_dir", out])
    return os.path.join(out, "last.pt")


def toy_u8(n, start=0):
    return evaluate.Images([ToyShapes()[start + i] for i in range(n)])


def test_stand_in_features_tell_images_apart(weights):
    net = evaluate.inception(type("A", (), {"inception_weights": evaluate.load_inception(weights)}), "cpu")
    feats = lambda ims: evaluate.features(ims, net, "cpu", 0, 1, "test")["2048"]
    real, noise = feats(toy_u8(12)), feats(evaluate.Images(torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)))
    assert 0.05 < real.abs().mean() < 5 and real.std(0).mean() > 1e-3           # not ~1e-8, not alike
    same = evaluate.fid(evaluate.statistics(real), evaluate.statistics(real))
    apart = evaluate.fid(evaluate.statistics(real), evaluate.statistics(noise))
    assert abs(same) < 1e-3 * apart and apart > 1, (same, apart)


def test_fid_rfid_is_prc_cached_sharded_and_from_statistics(ckpt, weights, tmp_path, capsys, monkeypatch):
    """8 reference images (an ADM batch), 10 samples (IS: 10 splits) at 1 and 2 steps."""
    monkeypatch.setenv("TQDM_MININTERVAL", "0")
    ref = str(tmp_path / "ref.npz")
    np.savez(ref, arr_0=torch.stack([toy_u8(8, 500)[i] for i in range(8)]).permute(0, 2, 3, 1).numpy())
    common = ["--ckpt", ckpt, "--num_samples", "10", "--batch_size", "4", "--inception_weights", weights,
              "--device", "cpu"]
    every = lambda cache: ["--fid", "--rfid", "--is", "--prc", "--ref", ref, "--fid_cache", str(tmp_path / cache)]
    rows = lambda name: json.load(open(tmp_path / f"{name}_metrics.json"))["rows"]
    metrics = lambda name: {(r["cfg"], r["steps"]): r for r in rows(name)}

    def one(name, *flags):
        sample.main([*common, *flags, "--out", str(tmp_path / f"{name}.png")])
        return capsys.readouterr(), metrics(name)
    out, first = one("a", "--steps", "1,2", *every("c1"))
    assert "reference features" in out.err and "reconstructions" in out.err and "img/s" in out.err
    assert list(first) == [(1.0, 1), (1.0, 2)] and "gFID" in out.out and "precision" in out.out   # the table
    few = "warning: FID of 10 samples and 8 reference images is biased upward by an amount that depends on N"
    assert out.err.count(few) == 1                                              # once, not per row
    for row in first.values():
        assert set(row) == {"cfg", "steps", "gFID", "rFID", "IS", "IS_std", "precision", "recall", "samples",
                            "reference_images"}
        assert all(np.isfinite(v) for v in row.values()) and row["gFID"] > 0 and 0 <= row["recall"] <= 1
        assert (row["samples"], row["reference_images"]) == (10, 8)
    (cache,) = os.listdir(tmp_path / "c1")
    out, again = one("b", "--steps", "1", *every("c1"))                        # the cache: no reference extraction
    assert "reference features" not in out.err and f"reference statistics: read {tmp_path / 'c1' / cache}" in out.out
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29641",
                        "sample.py", *common, "--steps", "1,2", *every("c2"), "--out", str(tmp_path / "c.png")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and "reference features" in r.stderr, r.stderr[-3000:]   # sharded, its own extraction
    two = metrics("c")
    for k in first:
        for m in first[k]:
            assert k not in again or again[k][m] == pytest.approx(first[k][m], rel=1e-5, abs=1e-7)
            assert two[k][m] == pytest.approx(first[k][m], rel=1e-3, abs=1e-5), (k, m)
    with np.load(tmp_path / "c1" / cache) as f:                                # --ref statistics of those images
        np.savez(tmp_path / "stats.npz", mu=f["mu"], sigma=f["sigma"])
    one("d", "--steps", "1", "--fid", "--ref", str(tmp_path / "stats.npz"))
    for k, row in metrics("d").items():
        assert row["gFID"] == pytest.approx(first[k]["gFID"], rel=1e-6)


def test_evaluate_scores_an_npz_as_sample_py_does(ckpt, weights, tmp_path, capsys):
    """DiT's workflow: sample.py --npz, then evaluate.py on the file: the same gFID and IS as
    sample.py --fid --is scores on the same samples."""
    ref = str(tmp_path / "ref.npz")
    np.savez(ref, arr_0=torch.stack([toy_u8(8, 500)[i] for i in range(8)]).permute(0, 2, 3, 1).numpy())
    common = ["--inception_weights", weights, "--fid_cache", str(tmp_path / "cache"), "--device", "cpu"]
    sample.main(["--ckpt", ckpt, "--num_samples", "10", "--batch_size", "4", "--steps", "2", "--fid", "--is",
                 "--ref", ref, "--npz", str(tmp_path / "s.npz"), "--out", str(tmp_path / "a.png"), *common])
    evaluate.main([str(tmp_path / "s.npz"), "--fid", "--is", "--ref", ref, *common])
    assert f"wrote {tmp_path / 's_metrics.json'}" in capsys.readouterr().out
    (drawn,), (scored,) = (json.load(open(tmp_path / f))["rows"] for f in ("a_metrics.json", "s_metrics.json"))
    assert scored["samples"] == drawn["samples"] == 10 and scored["reference_images"] == 8
    for k in ("gFID", "IS"):
        assert scored[k] == pytest.approx(drawn[k], rel=1e-4), k


def test_prc_refuses_a_statistics_ref(ckpt, tmp_path, capsys, monkeypatch):
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    monkeypatch.setattr(sample, "generate", None)                                # never reached
    with pytest.raises(SystemExit) as exc:
        sample.main(["--ckpt", ckpt, "--prc", "--ref", str(tmp_path / "stats.npz"), "--out", str(tmp_path / "g.png")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "--prc needs reference images" in err


def test_default_reference_is_ref_count_training_images_drawn_with_a_seed():
    ds, stats, name = evaluate.reference(None, {"dataset": "toy"}, 32, count=40)
    assert len(ds) == 40 and stats is None and name == "sphere-toy-builtin-32px-40"
    idx = ds.items.indices
    assert idx == sorted(idx) and idx != list(range(40))
    assert idx == evaluate.reference(None, {"dataset": "toy"}, 32, 40)[0].items.indices             # the same draw
    assert len(evaluate.reference(None, {"dataset": "toy"}, 32, count=10 ** 6)[0]) == 10_000   # all, when fewer


def test_samples_become_uint8_by_floor_as_the_release_saves_them():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 0.9999, 1.0, 1.5])
    assert evaluate.to_uint8(x).tolist() == [0, 0, 127, 191, 254, 255, 255]      # floor(127.5 (x + 1)), clamped
