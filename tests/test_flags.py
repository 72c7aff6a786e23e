"""Every numeric flag is checked against its domain: a bad value is one line naming the flag, exit 2, no
traceback, nothing written. Plus the helpers of data.py: progress() to a log file, folder_settings, default_workers."""
import argparse
import importlib
import io
import os
import subprocess
import sys

import pytest
from PIL import Image

import train
from conftest import ROOT
from cli import DataError, progress
from data import Guarded, build_dataset, default_workers, folder_settings

INT, NUM, CK = "must be an integer", "must be a number", ["--ckpt", "{out}/none.pt"]  # CK: never read
ROWS = [  # script, arguments ({out}: where it would write), the error's words, as a subprocess (else main(argv))
    ("data.py", ["--check", "--image_size", "0"], "argument --image_size: must be an integer >= 1, got '0'", True),
    ("data.py", ["--check", "--image_size", "1.5"], "argument --image_size: must be an integer >= 1, got '1.5'", True),
    ("convert.py", ["r.pth", "{out}/last.pt", "--alpha", "95"], "argument --alpha: must be a number in (0, 90), got '95'", True),
    ("convert.py", ["r.pth", "{out}/last.pt", "--alpha", "0"], "argument --alpha: must be a number in (0, 90), got '0'", False),
    ("convert.py", ["r.pth", "{out}/last.pt", "--alpha", "nan"], "argument --alpha: must be a number in (0, 90)", False),
    ("convert.py", ["r.pth", "{out}/last.pt", "--alpha", "inf"], "argument --alpha: must be a number in (0, 90)", False),
    ("convert.py", ["r.pth", "{out}/last.pt", "--alpha", "x"], "argument --alpha: must be a number in (0, 90), got 'x'", False),
    ("sample.py", [*CK, "--alpha", "90"], "argument --alpha: must be a number in (0, 90), got '90'", True),
    ("sample.py", [*CK, "--steps", "1,0"], "argument --steps: must be integers >= 1 like 1,2,4, got 1,0", False),
    ("sample.py", [*CK, "--steps", "all"], "argument --steps: must be integers >= 1 like 1,2,4, got all", False),
    ("sample.py", [*CK, "--steps", "2.5"], "argument --steps: must be integers >= 1 like 1,2,4, got 2.5", False),
    ("sample.py", [*CK, "--n", "0"], f"argument --num_samples/--n: {INT} >= 1, got '0'", False),
    ("sample.py", [*CK, "--classes", "a"], "argument --classes: must be integers like 1,2,4 (or 'all'), got 'a'", False),
    ("sample.py", [*CK, "--cfg", "0.5"], f"argument --cfg: {NUM} >= 1.0, got '0.5'", False),
    ("sample.py", [*CK, "--gamma", "-1"], f"argument --gamma: {NUM} >= 0, got '-1'", False),
    ("sample.py", [*CK, "--seed", "-1"], f"argument --seed: {INT} in [0, 4294967295], got '-1'", False),
    ("sample.py", [*CK, "--batch_size", "0"], f"argument --batch_size: {INT} >= 1, got '0'", False),
    ("sample.py", [*CK, "--dist_timeout", "0"], f"argument --dist_timeout: {INT} >= 1, got '0'", False),
    ("sample.py", [*CK, "--out", "{out}/grid"], "argument --out: must be an image file name like grid.png", False),
    ("sample.py", [*CK, "--inception_weights", "{out}/w.pth"], "argument --inception_weights: no file", False),
    ("viz.py", ["--n", "1"], f"argument --n: {INT} in [2, 10000], got '1'", False),
    ("viz.py", ["--n", "20000"], f"argument --n: {INT} in [2, 10000], got '20000'", False),
    ("viz.py", ["--steps", "0"], f"argument --steps: {INT} >= 1, got '0'", False),
    ("edit.py", ["grid", "--target", "-1"], f"argument --target: {INT} >= 0, got '-1'", False),
    ("edit.py", ["grid", "--images", "0,x"], "argument --images: must be integers like 1,2,4", False),
    ("edit.py", ["crossover", "--steps", "0"], f"argument --steps: {INT} >= 1, got '0'", False),
    ("edit.py", ["crossover", "--r", "1.5"], f"argument --r: {NUM} in [0, 1], got '1.5'", False),
    ("edit.py", ["crossover", "--gamma", "-0.5"], f"argument --gamma: {NUM} >= 0, got '-0.5'", False),
    ("edit.py", ["grid", "--seed", "4294967296"], f"argument --seed: {INT} in [0, 4294967295], got '4294967296'", False),
    ("edit.py", ["recon", "--out", "{out}/r.txt"], "argument --out: must be an image file name like edit.png", False),
    ("train.py", ["--out_dir", "{out}", "--alpha", "95"], "argument --alpha: must be a number in (0, 90), got '95'", True),
    ("train.py", ["--out_dir", "{out}", "--band", "90"], "argument --band: must be a number in (0, 90), got '90'", False),
    ("train.py", ["--out_dir", "{out}", "--band", "70"], "--band 70.0 is below --alpha 80", False),
    ("train.py", ["--out_dir", "{out}", "--p_band", "1.5"], f"argument --p_band: {NUM} in [0, 1], got '1.5'", False),
    ("train.py", ["--out_dir", "{out}", "--p_drop", "-0.1"], f"argument --p_drop: {NUM} in [0, 1], got '-0.1'", False),
    ("train.py", ["--out_dir", "{out}", "--max_bad_frac", "2"], f"argument --max_bad_frac: {NUM} in [0, 1]", False),
    ("train.py", ["--out_dir", "{out}", "--epochs", "0"], f"argument --epochs: {NUM} > 0, got '0'", False),
    ("train.py", ["--out_dir", "{out}", "--warmup_epochs", "16"], "--warmup_epochs 16.0 must be below --epochs 16", False),
    ("train.py", ["--out_dir", "{out}", "--warmup_epochs", "-1"], f"argument --warmup_epochs: {NUM} >= 0", False),
    ("train.py", ["--out_dir", "{out}", "--max_steps", "-1"], f"argument --max_steps: {INT} >= 0, got '-1'", False),
    ("train.py", ["--out_dir", "{out}", "--batch_size", "0"], f"argument --batch_size: {INT} >= 1, got '0'", False),
    ("train.py", ["--out_dir", "{out}", "--grad_accum", "0"], f"argument --grad_accum: {INT} >= 1, got '0'", False),
    ("train.py", ["--out_dir", "{out}", "--image_size", "0"], f"argument --image_size: {INT} >= 1, got '0'", False),
    ("train.py", ["--out_dir", "{out}", "--lr", "0"], f"argument --lr: {NUM} > 0, got '0'", False),
    ("train.py", ["--out_dir", "{out}", "--min_lr=-1e-6"], f"argument --min_lr: {NUM} >= 0", False),
    ("train.py", ["--out_dir", "{out}", "--enc_lr_mult", "-0.1"], f"argument --enc_lr_mult: {NUM} >= 0", False),
    ("train.py", ["--out_dir", "{out}", "--weight_decay", "-1"], f"argument --weight_decay: {NUM} >= 0", False),
    ("train.py", ["--out_dir", "{out}", "--clip", "0"], f"argument --clip: {NUM} > 0, got '0'", False),
    ("train.py", ["--out_dir", "{out}", "--weights", "1", "1", "-1", "1", "1"], f"argument --weights: {NUM} >= 0", False),
    ("train.py", ["--out_dir", "{out}", "--weights", "0", "0", "0", "0", "0"], "--weights are all 0", False),
    ("train.py", ["--out_dir", "{out}", "--perceptual_weight", "-1"], f"argument --perceptual_weight: {NUM} >= 0", False),
    ("train.py", ["--out_dir", "{out}", "--convnext", "-0.1"], f"argument --convnext: {NUM} >= 0", False),
    ("train.py", ["--out_dir", "{out}", "--ema", "1"], f"argument --ema: {NUM} in [0, 1), got '1'", False),
    ("train.py", ["--out_dir", "{out}", "--seed", "-1"], f"argument --seed: {INT} >= 0, got '-1'", False),
    ("train.py", ["--out_dir", "{out}", "--num_workers", "-1"], f"argument --num_workers: {INT} >= 0, got '-1'", False),
    ("train.py", ["--out_dir", "{out}", "--log_every", "0"], f"argument --log_every: {INT} >= 1, got '0'", False),
    ("train.py", ["--out_dir", "{out}", "--ckpt_every", "0"], f"argument --ckpt_every: {INT} >= 1, got '0'", False),
    ("train.py", ["--out_dir", "{out}", "--keep_every", "-2"], f"argument --keep_every: {INT} >= 0, got '-2'", False),
    ("train.py", ["--out_dir", "{out}", "--sample_every", "0"], f"argument --sample_every: {INT} >= 1, got '0'", False),
    ("train.py", ["--out_dir", "{out}", "--sample_steps", "0"], f"argument --sample_steps: {INT} >= 1, got '0'", False),
    ("train.py", ["--out_dir", "{out}", "--gpus", "0"], f"argument --gpus: {INT} >= 1, got '0'", False),
    ("train.py", ["--out_dir", "{out}", "--gpu_mem", "-80"], f"argument --gpu_mem: {NUM} > 0, got '-80'", False),
    ("train.py", ["--out_dir", "{out}", "--dist_timeout", "0"], f"argument --dist_timeout: {INT} >= 1, got '0'", False),
    ("bench.py", ["--batch_size", "0"], f"argument --batch_size: {INT} >= 1, got '0'", False),
    ("bench.py", ["--iters", "-1"], f"argument --iters: {INT} >= 1, got '-1'", False),
    ("bench.py", ["--dist_timeout", "0"], f"argument --dist_timeout: {INT} >= 1, got '0'", False),
    ("bench.py", ["--dist_timeout", "-5"], f"argument --dist_timeout: {INT} >= 1, got '-5'", False),
    ("bench.py", ["--dist_timeout", "1e3"], f"argument --dist_timeout: {INT} >= 1, got '1e3'", False),
]


@pytest.mark.parametrize("script, args, words, sub", ROWS, ids=[f"{r[0]} {' '.join(r[1][-2:])}" for r in ROWS])
def test_bad_flag_value_is_one_line_exit_2_nothing_written(script, args, words, sub, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [a.replace("{out}", str(out)) for a in args]
    if sub:
        r = subprocess.run([sys.executable, script, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
        code, err = r.returncode, r.stderr
    else:
        with pytest.raises(SystemExit) as exc:
            importlib.import_module(script[:-3]).main(argv)
        code, err = exc.value.code, capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and words in err and "Traceback" not in err, err
    assert not out.exists() or not os.listdir(out)


def test_progress_to_a_file_writes_a_few_plain_lines(monkeypatch):
    f = io.StringIO()                                                       # a fast run: the first and last line
    bar = progress(total=1300, initial=100, dynamic_ncols=True, file=f)
    for step in range(100, 1300):
        bar.update(1)
        if step % 100 == 0:
            bar.write(f"step {step}", file=f)                              # messages add no bar lines
    bar.close()
    lines = f.getvalue().splitlines()
    assert "\r" not in f.getvalue() and len(lines) == 14 and "100/1300 [" in lines[0] and "1300/1300 [" in lines[-1]
    monkeypatch.setattr("tqdm.std.time", iter(range(10**6)).__next__)       # a slow run: 1 s per look at the clock
    f = io.StringIO()
    for _ in progress(range(300), desc="reading", file=f):
        pass
    lines = f.getvalue().splitlines()                                       # every 30 s: 0, 30, ... and the end
    assert "\r" not in f.getvalue() and 4 <= len(lines) <= 11 and lines[-1].startswith("reading: 100%|"), lines


def test_folder_settings_reads_size_and_counts(tmp_path):
    for k, side in enumerate([64, 64, 80, 64, 50, 64, 96, 64, 64]):       # 3 classes x 3 images
        os.makedirs(tmp_path / "abc"[k // 3], exist_ok=True)
        Image.new("RGB", (side + 10, side)).save(tmp_path / "abc"[k // 3] / f"{k}.png")
    assert folder_settings(tmp_path) == dict(image_size=64, num_classes=3, num_images=9)
    for k in range(9):
        (tmp_path / "abc"[k // 3] / f"{k}.png").write_text("<html>404</html>")
    with pytest.raises(DataError, match="none of the 8 images sampled in .* can be read"):
        folder_settings(tmp_path)
    with pytest.raises(DataError, match="not a folder of class subfolders of images, nor of images"):
        folder_settings(tmp_path / "missing")


def test_a_flat_folder_is_an_unconditional_set_and_the_folder_line_says_the_size_used(tmp_path, capsys):
    """Images straight in --data_dir (like Animal-Faces): no classes, label 0; the line names --image_size's size."""
    for k, side in enumerate([300, 260, 280]):
        Image.new("RGB", (side, side + 5)).save(tmp_path / f"{k}.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    assert folder_settings(tmp_path) == dict(image_size=280, num_classes=0, num_images=3)
    ds, num_classes = build_dataset("folder", str(tmp_path), 16)
    assert num_classes == 0 and len(ds) == 3 and ds[2][0].shape == (3, 16, 16) and ds[2][1] == 0
    assert Guarded(ds).path(1) == str(tmp_path / "1.jpg")
    for size, line in ((None, "~280px -> Flowers' settings at 256px"), (16, "~280px -> CIFAR-10's settings at 16px")):
        args = argparse.Namespace(data_dir=str(tmp_path), image_size=size, model=None, alpha=None, band=None,
                                  epochs=None, batch_size=None)
        assert train.folder_defaults(args)["image_size"] == (size or 256)
        out = capsys.readouterr().out
        assert out.startswith("folder: 3 images and no class subfolder (unconditional), " + line), out


def test_default_workers_fit_the_cpus(monkeypatch):
    for cpus, cap, want in ((2, 8, 1), (1, 8, 0), (64, 8, 8), (16, 4, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
        assert default_workers(cap) == want
