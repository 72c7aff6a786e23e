"""Nothing a user hands in is trusted: every file is read as data. A crafted pickle whose unpickling would create a
marker file is given to every path that reads a user's file (each script's --ckpt, --resume, train.py's --init_from,
convert.py, --ref,
the Inception weights of FID/IS and torch hub's cached copy of them, the toy classifier next to a checkpoint): the
marker never appears and the script ends in one line, exit 2. A scan of the sources keeps the next loader honest."""
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import convert
import edit
import evaluate
import sample
import train
import viz
from conftest import ROOT

FAST = ["--batch_size", "8", "--model", "tiny", "--log_every", "1", "--sample_every", "1000", "--num_workers", "0"]


class Plant:
    """Unpickled, it would create the file `marker` (builtins.open): the code a hostile file would run."""
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return open, (self.marker, "w")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("good"))
    train.main(FAST + ["--max_steps", "1", "--out_dir", out])
    return os.path.join(out, "last.pt")


@pytest.fixture
def plant(tmp_path):
    """(a path -> a crafted file there, the marker): a torch.save'd checkpoint-shaped dict holding a Plant."""
    marker = str(tmp_path / "MARKER")
    def make(path, legacy=False):
        torch.save({"model": Plant(marker), "config": {}, "args": {}, "step": 0}, path,
                   _use_new_zipfile_serialization=not legacy)
        return str(path)
    return make, marker


def refused(capsys, exc, marker, path):
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1, err
    assert "Traceback" not in err and "weights_only" not in err
    assert f"{path!r} is refused: it holds a pickled io.open" in err, err
    assert not os.path.exists(marker), "the crafted file ran"


def test_crafted_inception_weights_never_run(ckpt, plant, tmp_path):
    """The issue's run, as a user types it: sample.py --fid --inception_weights evil.pth."""
    make, marker = plant
    evil = make(tmp_path / "evil.pth")
    r = subprocess.run([sys.executable, "sample.py", "--ckpt", ckpt, "--fid", "--n", "4", "--inception_weights", evil],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"--inception_weights: {evil!r} is refused: it holds a pickled io.open" in r.stderr
    assert not os.path.exists(marker) and not os.path.exists(tmp_path / "samples.png")


@pytest.mark.parametrize("legacy", [False, True])                          # zip and pre-1.6 formats
def test_crafted_file_in_torch_hub_cache_never_runs(ckpt, plant, tmp_path, monkeypatch, capsys, legacy):
    make, marker = plant
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))               # hub's cache: $TORCH_HOME/hub/checkpoints
    os.makedirs(tmp_path / "home" / "hub" / "checkpoints")
    evil = make(tmp_path / "home" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth", legacy)
    monkeypatch.setattr(sample, "generate", None)                           # never reached
    with pytest.raises(SystemExit) as exc:
        sample.main(["--ckpt", ckpt, "--is", "--n", "4", "--out", str(tmp_path / "s.png")])
    refused(capsys, exc, marker, evil)


def test_inception_weights_are_hash_checked_and_loaded_as_data(tmp_path, capsys, monkeypatch):
    """A stand-in with the right tensors loads, with a warning that it is not the official file; a missing cached
    file is downloaded hash-checked (here: offline, one line naming the flag)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    monkeypatch.setattr(fe, "load_state_dict_from_url", lambda *a, **kw: {})   # no download: random weights
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", lambda self, sd, **kw: None)
    sd = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    monkeypatch.undo()
    torch.save(sd, tmp_path / "stand-in.pth")
    assert evaluate.load_inception(str(tmp_path / "stand-in.pth")) == str(tmp_path / "stand-in.pth")
    out = capsys.readouterr().out
    assert "is not the official Inception weights (SHA-256 " in out and "the official file's begins 6726825d" in out
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    calls = []
    def offline(url, dst, hash_prefix=None, progress=True):
        calls.append((url, dst, hash_prefix))
        raise OSError("<urlopen error [Errno -2] Name or service not known>")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(evaluate.DataError, match="FID/IS need the Inception weights .*--inception_weights PATH"):
        evaluate.load_inception(None)
    assert calls[0][2] == "6726825d" and calls[0][1].startswith(str(tmp_path / "empty" / "hub" / "checkpoints"))


@pytest.mark.parametrize("script", ["sample", "viz", "edit"])
def test_crafted_ckpt_never_runs(script, plant, tmp_path, capsys):
    make, marker = plant
    evil = make(tmp_path / "last.pt")
    main, first = {"sample": (sample.main, []), "viz": (viz.main, []), "edit": (edit.main, ["recon"])}[script]
    with pytest.raises(SystemExit) as exc:
        main([*first, "--ckpt", evil])
    refused(capsys, exc, marker, evil)


@pytest.mark.parametrize("resume", [True, False])                          # without --resume: last.pt is read too
def test_crafted_last_pt_never_runs_in_train(resume, plant, tmp_path, capsys):
    make, marker = plant
    evil = make(tmp_path / "last.pt")
    with pytest.raises(SystemExit) as exc:
        train.main(FAST + ["--max_steps", "1", "--out_dir", str(tmp_path), *(["--resume"] if resume else [])])
    refused(capsys, exc, marker, evil)


def test_crafted_init_from_never_runs_in_train(plant, tmp_path, capsys):
    make, marker = plant
    evil = make(tmp_path / "evil.pt")
    with pytest.raises(SystemExit) as exc:
        train.main(FAST + ["--max_steps", "1", "--out_dir", str(tmp_path / "run"), "--init_from", evil])
    refused(capsys, exc, marker, evil)
    assert not os.path.exists(tmp_path / "run" / "last.pt")


def test_crafted_release_file_never_runs_in_convert(plant, tmp_path, capsys):
    make, marker = plant
    evil = make(tmp_path / "sphere_l_imagenet.pth")
    with pytest.raises(SystemExit) as exc:
        convert.main([evil, str(tmp_path / "out.pt")])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"{evil!r} is refused: it holds a pickled io.open" in err
    assert not os.path.exists(marker) and not os.path.exists(tmp_path / "out.pt")


def test_crafted_ref_npz_never_runs(ckpt, plant, tmp_path, capsys, monkeypatch):
    _, marker = plant
    np.savez(tmp_path / "ref.npz", arr_0=np.array([Plant(marker)], dtype=object))   # an object array: a pickle
    monkeypatch.setattr(sample, "generate", None)                           # never reached
    with pytest.raises(SystemExit) as exc:
        sample.main(["--ckpt", ckpt, "--fid", "--ref", str(tmp_path / "ref.npz"), "--out", str(tmp_path / "s.png")])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "Object arrays cannot be loaded" in err, err
    assert not os.path.exists(marker)


def test_crafted_toy_classifier_never_runs(ckpt, plant, tmp_path, capsys):
    """sample.py --toy_metrics reads toy_classifier_seed0.pt from the checkpoint's folder: a file a user copies."""
    make, marker = plant
    shutil.copy(ckpt, tmp_path / "last.pt")
    evil = make(tmp_path / "toy_classifier_seed0.pt")
    with pytest.raises(SystemExit) as exc:
        sample.main(["--ckpt", str(tmp_path / "last.pt"), "--n", "2", "--steps", "1", "--toy_metrics"])
    refused(capsys, exc, marker, evil)


def test_every_loader_in_the_sources_reads_data_only():
    """The next loader cannot forget: every torch.load asks weights_only=True, no np.load allows pickles, no pickle
    or torch.hub loader is called, and torch-fidelity gets only the path load_inception checked."""
    for name in sorted(f for f in os.listdir(ROOT) if f.endswith(".py")):
        text = open(os.path.join(ROOT, name)).read()
        for call in re.findall(r"torch\.load\((?:[^()]|\([^()]*\))*\)", text):
            assert "weights_only=True" in call, (name, call)
        assert "allow_pickle=True" not in text and not re.search(r"\bpickle\.loads?\(|load_state_dict_from_url", text), name
        for m in re.finditer(r"feature_extractor_weights_path=([\w.]+)", text):
            assert name == "evaluate.py" and m[1] in ("path", "args.inception_weights"), (name, m[0])
    src = open(os.path.join(ROOT, "evaluate.py")).read()
    assert "args.inception_weights = load_inception(args.inception_weights)" in src
