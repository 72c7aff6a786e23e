"""A multi-day run survives bad files, kills and full disks, and says what is wrong in one line:
each failure mode is produced for real (a truncated PNG, SIGKILL, a read-only mount, /dev/full)."""
import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import bench
import edit
import checkpoint
import sample
import train
import viz
from conftest import ROOT
from cli import DataError

FAST = ["--batch_size", "8", "--model", "tiny", "--log_every", "2", "--sample_every", "1000", "--num_workers", "0"]
FOLDER = ["--dataset", "folder", "--image_size", "16", "--perceptual_weight", "0"]


def one_line_error(capsys, exc, code=2):
    """The one line of stderr that is not the progress bar."""
    err = "\n".join(line for line in capsys.readouterr().err.splitlines() if not re.search(r"\d+/\d+ \[", line))
    assert exc.value.code == code and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and "weights_only" not in err
    return err


@pytest.fixture
def folder(tmp_path):
    """An ImageFolder tree of 16 PNGs in 2 classes; b/03.png is truncated, b/07.png is not an image."""
    root = tmp_path / "data"
    for k in range(16):
        os.makedirs(root / "ab"[k // 8], exist_ok=True)
        Image.new("RGB", (20, 20), (16 * k, 80, 200 - 8 * k)).save(root / "ab"[k // 8] / f"{k % 8:02d}.png")
    png = (root / "b" / "03.png").read_bytes()
    (root / "b" / "03.png").write_bytes(png[: len(png) // 2])              # a download cut short
    (root / "b" / "07.png").write_text("<html>404 not found</html>")       # a saved error page
    return root


@pytest.mark.parametrize("workers", ["0", "2"])
def test_bad_images_are_replaced_named_once_and_counted(folder, tmp_path, workers, capsys):
    out = str(tmp_path / "out")
    train.main(FAST + FOLDER + ["--data_dir", str(folder), "--max_steps", "4", "--ckpt_every", "2",
                                "--max_bad_frac", "0.2", "--num_workers", workers, "--out_dir", out])
    text = capsys.readouterr().out
    for name in ("03.png", "07.png"):                                      # 2 epochs, each file named once
        assert text.count(f"unreadable image skipped (the next one used instead): {folder / 'b' / name}") == 1
    logs = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert logs[-1]["step"] == 4 and logs[-1]["bad_images"] == 2
    assert len(torch.load(os.path.join(out, "last.pt"), weights_only=True)["bad_images"]) == 2


def test_too_many_bad_images_stop_with_one_line_naming_them(folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:                                  # default: 0.1% of 16 images
        train.main(FAST + FOLDER + ["--data_dir", str(folder), "--max_steps", "4", "--out_dir", str(tmp_path / "o")])
    err = one_line_error(capsys, exc)
    assert "2 unreadable images, more than --max_bad_frac 0.001 of 16 (first: " in err
    assert str(folder / "b" / "03.png") in err and "python data.py --check" in err


def test_data_check_lists_every_unreadable_file(folder):
    r = subprocess.run([sys.executable, "data.py", "--check", "--dataset", "folder", "--data_dir", str(folder)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert f"unreadable: {folder / 'b' / '03.png'} (OSError: image file is truncated" in r.stdout
    assert f"unreadable: {folder / 'b' / '07.png'} (UnidentifiedImageError" in r.stdout
    assert "2 of 16 images unreadable" in r.stdout and "reading" in r.stderr   # the progress bar


def test_killed_at_random_moments_resumes_bit_identical(tmp_path):
    """Stop a real training process 4 times and resume each time: SIGKILL in the middle of writing a checkpoint,
    SIGKILL twice at random moments after a checkpoint, and once a cluster's SIGTERM (preemption, time limit),
    which finishes the step, writes last.pt and exits 3. The weights equal an unstopped run's, bit for bit."""
    args = ["train.py", *FAST, "--max_steps", "40", "--ckpt_every", "2"]    # room for 4 kills at ~0.1 s a step
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    last, rng = os.path.join(out, "last.pt"), random.Random(14)
    mtime = lambda: os.stat(last).st_mtime_ns if os.path.exists(last) else None
    steps = []
    for kill in range(5):
        before, resume = mtime(), ["--resume"] if os.path.exists(last) else []
        p = subprocess.Popen([sys.executable, *args, "--out_dir", out, *resume], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env={**env, "SPHERE_SAVE_DELAY": "0.3" if kill == 0 else "0"})
        if kill == 4:                                                       # the last run goes to the end
            assert p.wait(timeout=120) == 0
            break
        if kill == 0:   # during the 2nd checkpoint's write: last.pt.tmp half on disk, last.pt from step 2
            ready = lambda: os.path.exists(last) and os.path.exists(last + ".tmp")
        else:           # some time after the next checkpoint
            ready = lambda: mtime() != before
        t = time.time()
        while not ready() and p.poll() is None and time.time() - t < 120:
            time.sleep(0.005)
        time.sleep(0 if kill == 0 else rng.uniform(0, 0.8))
        assert p.poll() is None, "finished before it was killed"
        p.send_signal(signal.SIGTERM if kill == 2 else signal.SIGKILL)
        assert p.wait() == (train.PREEMPTED if kill == 2 else -signal.SIGKILL)
        steps.append(checkpoint.load_checkpoint(last)["step"])               # last.pt always loads
        if kill == 2:                                                       # saved at the step it stopped at
            assert f"stopped by SIGTERM at step {steps[-1]}; " in p.stderr.read()
    assert steps[0] == 2 and steps == sorted(steps) and steps[-1] < 40, steps
    r = subprocess.run([sys.executable, *args, "--out_dir", ref], cwd=ROOT, capture_output=True, env=env, timeout=120)
    assert r.returncode == 0
    a, b = (torch.load(os.path.join(d, "last.pt"), weights_only=True) for d in (ref, out))
    assert a["step"] == b["step"] == 40
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k                # bit-identical
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_second_run_never_replaces_the_first(tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main(FAST + ["--max_steps", "1", "--sample_every", "5", "--out_dir", out])
    before = os.stat(os.path.join(out, "last.pt")).st_mtime_ns
    with pytest.raises(SystemExit) as exc:
        train.main(FAST + ["--max_steps", "2", "--out_dir", out])
    err = one_line_error(capsys, exc)
    assert "already holds a run (last.pt at step 1)" in err and "--resume" in err and "--out_dir" in err
    assert os.stat(os.path.join(out, "last.pt")).st_mtime_ns == before
    train.main(FAST + ["--max_steps", "2", "--sample_every", "5", "--out_dir", out, "--overwrite"])
    assert checkpoint.load_checkpoint(os.path.join(out, "last.pt"))["step"] == 2


def test_unwritable_out_dir_stops_before_the_first_step(tmp_path):
    """A read-only folder (chmod 555). Root ignores chmod, so as root the run drops to user nobody."""
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "keep.txt").write_text("already here")
    locked.chmod(0o555)
    tmp_path.chmod(0o755)
    as_nobody = (lambda: (os.setgid(65534), os.setuid(65534))) if os.geteuid() == 0 else None
    try:
        r = subprocess.run([sys.executable, "train.py", *FAST, "--max_steps", "1", "--out_dir", str(locked)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120, preexec_fn=as_nobody)
    except (subprocess.SubprocessError, OSError) as err:
        pytest.skip(f"root ignores chmod, and user nobody cannot run this Python ({err.__class__.__name__})")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"cannot write to --out_dir {str(locked)!r}: Permission denied" in r.stderr
    assert os.listdir(locked) == ["keep.txt"] and (locked / "keep.txt").read_text() == "already here"


def test_out_dir_that_is_a_file_stops_before_the_first_step(tmp_path, capsys):
    (tmp_path / "out").write_text("a file, not a folder")                   # fails for root too
    with pytest.raises(SystemExit) as exc:
        train.main(FAST + ["--max_steps", "1", "--out_dir", str(tmp_path / "out")])
    assert f"cannot write to --out_dir {str(tmp_path / 'out')!r}: File exists" in one_line_error(capsys, exc)
    assert (tmp_path / "out").read_text() == "a file, not a folder"


@pytest.mark.parametrize("free_mb, stops", [(1, True), (40, False)])
def test_disk_space_is_checked_before_the_first_step(tmp_path, monkeypatch, capsys, free_mb, stops):
    real = checkpoint.shutil.disk_usage
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: real(p)._replace(free=free_mb * 2 ** 20))
    argv = FAST + ["--max_steps", "1", "--out_dir", str(tmp_path)]         # tiny: ~15 MB a checkpoint
    if stops:
        with pytest.raises(SystemExit) as exc:
            train.main(argv)
        err = one_line_error(capsys, exc)
        assert re.search(rf"only 1 MB free in {re.escape(repr(str(tmp_path)))}, a checkpoint needs about 1\d MB", err)
        assert not os.path.exists(tmp_path / "last.pt")
    else:
        train.main(argv)
        assert "warning: only 40 MB free in" in capsys.readouterr().out
        assert os.path.exists(tmp_path / "last.pt")


@pytest.mark.parametrize("how", ["/dev/full", "monkeypatch"])
def test_full_disk_during_save_exits_with_one_line_and_keeps_last_pt(tmp_path, monkeypatch, capsys, how):
    out = str(tmp_path)
    train.main(FAST + ["--max_steps", "2", "--ckpt_every", "2", "--out_dir", out])
    good = open(os.path.join(out, "last.pt"), "rb").read()
    if how == "/dev/full":                                                  # the OS's own ENOSPC
        if not os.path.exists("/dev/full"):
            pytest.skip("no /dev/full on this OS")
        os.symlink("/dev/full", os.path.join(out, "last.pt.tmp"))
    else:
        def half_then_full(obj, f):
            f.write(b"PK\x03\x04" + b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(checkpoint.torch, "save", half_then_full)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        train.main(FAST + ["--max_steps", "4", "--ckpt_every", "2", "--out_dir", out, "--resume"])
    err = one_line_error(capsys, exc)
    assert f"cannot write checkpoint {os.path.join(out, 'last.pt')!r}: No space left on device; " \
           "the previous checkpoint is intact" in err
    assert open(os.path.join(out, "last.pt"), "rb").read() == good        # byte for byte
    assert checkpoint.load_checkpoint(os.path.join(out, "last.pt"))["step"] == 2
    assert not os.path.lexists(os.path.join(out, "last.pt.tmp"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ck"))
    train.main(FAST + ["--max_steps", "1", "--out_dir", out])
    return out


@pytest.mark.parametrize("flags, message", [
    (["--model", "S"], "--model S conflicts with --resume: {} was trained with --model tiny"),
    (["--image_size", "64"], "--image_size 64 conflicts with --resume: {} was trained with --image_size 32"),
    (["--dataset", "cifar10"], "--dataset cifar10 conflicts with --resume: {} was trained with --dataset toy"),
])
def test_resume_conflicts_name_the_flag(ckpt, capsys, flags, message):
    with pytest.raises(SystemExit) as exc:
        train.main(["--resume", "--out_dir", ckpt, *flags])
    assert message.format(os.path.join(ckpt, "last.pt")) in one_line_error(capsys, exc)


def test_resume_without_a_checkpoint_says_so(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(["--resume", "--out_dir", str(tmp_path)])
    assert f"--resume, but there is no {tmp_path / 'last.pt'} to resume from" in one_line_error(capsys, exc)


def test_checkpoint_messages_name_the_cause(ckpt, tmp_path):
    good = os.path.join(ckpt, "last.pt")
    Image.new("RGB", (4, 4)).save(tmp_path / "image.png")
    (tmp_path / "notes.txt").write_text("step 100: loss 0.1")
    (tmp_path / "cut.pt").write_bytes(open(good, "rb").read()[:100_000])
    torch.save(torch.load(good, weights_only=True)["model"], tmp_path / "state_dict.pt")
    torch.save({"model": {}, "epoch": 3, "optimizer": {}}, tmp_path / "release.pt")
    torch.save({"model": {}, "args": __import__("argparse").Namespace(lr=1)}, tmp_path / "dit.pt")
    cases = {str(tmp_path / "missing.pt"): "no checkpoint at",
             str(tmp_path): "(that is a folder)",
             str(tmp_path / "image.png"): "is not a PyTorch checkpoint (not a zip archive; it starts with b'\\x89PNG",
             str(tmp_path / "notes.txt"): "is not a PyTorch checkpoint (not a zip archive; it starts with b'step 100'",
             str(tmp_path / "cut.pt"): "is truncated (a zip archive without its end",
             str(tmp_path / "state_dict.pt"): "not a train.py checkpoint: a bare state_dict of",
             str(tmp_path / "release.pt"): "checkpoint of the authors' release: convert it with python convert.py IN OUT",
             str(tmp_path / "dit.pt"): "is refused: it holds a pickled argparse.Namespace"}
    for path, message in cases.items():
        with pytest.raises(DataError) as err:
            checkpoint.load_checkpoint(path)
        assert message in str(err.value) and "\n" not in str(err.value), (path, str(err.value))
        assert "weights_only" not in str(err.value)


@pytest.mark.parametrize("main, argv, message", [
    (sample.main, ["--ckpt", "x.pt", "--batch_size", "0"], "argument --batch_size: must be an integer >= 1"),
    (viz.main, ["--n", "1"], "argument --n: must be an integer in [2, 10000], got '1'"),
    (edit.main, ["recon", "--steps", "0"], "argument --steps: must be an integer >= 1"),
    (edit.main, ["recon", "--target", "-1"], "argument --target: must be an integer >= 0"),
    (bench.main, ["--model", "Q"], "argument --model: invalid choice: 'Q'"),
    (bench.main, ["--batch_size", "-2"], "argument --batch_size: must be an integer >= 1"),
    (bench.main, ["--dataset", "mnist"], "argument --dataset: invalid choice: 'mnist'"),
])
def test_every_script_rejects_bad_flags_in_one_line(capsys, main, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert message in one_line_error(capsys, exc)
