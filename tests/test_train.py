"""train.py and data.py: resume equals uninterrupted, DDP on gloo, atomic checkpoints, bad input,
--init_from, the log."""
import json
import os
import subprocess
import sys
import types

import pytest
import torch
from PIL import Image

import checkpoint
import data
import train
from conftest import ROOT
from cli import DataError
from data import ToyShapes

FAST = ["--batch_size", "8", "--model", "tiny", "--log_every", "2", "--sample_every", "1000", "--num_workers", "0"]


def run(*args, env=None):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_toy_dataset_is_deterministic_and_in_range():
    ds = ToyShapes()
    x0, y0 = ds[7]
    x1, y1 = ToyShapes()[7]                                                      # another process, same image
    assert torch.equal(x0, x1) and y0 == y1 == 7
    assert x0.shape == (3, 32, 32) and x0.min() >= -1 and x0.max() <= 1
    assert not torch.equal(ds[17][0], x0)                                        # same class, other image


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    straight, resumed = str(tmp_path / "a"), str(tmp_path / "b")
    train.main(FAST + ["--max_steps", "6", "--ckpt_every", "3", "--out_dir", straight])

    real_save = checkpoint.save_checkpoint

    def save_then_crash(obj, path):                                            # killed right after step 3's save
        real_save(obj, path)
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train.main(FAST + ["--max_steps", "6", "--ckpt_every", "3", "--out_dir", resumed])
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    assert torch.load(os.path.join(resumed, "last.pt"), weights_only=True)["step"] == 3
    train.main(FAST + ["--max_steps", "6", "--ckpt_every", "3", "--out_dir", resumed, "--resume"])

    a = torch.load(os.path.join(straight, "last.pt"), weights_only=True)       # plain dict, weights_only
    b = torch.load(os.path.join(resumed, "last.pt"), weights_only=True)
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k                    # bit-identical on CPU
    assert set(a) >= {"model", "optimizer", "step", "config", "args", "rng"}
    assert os.path.isfile(os.path.join(straight, "samples_0000006.png"))
    assert os.path.isfile(os.path.join(straight, "recon_0000006.png"))


def test_ranks_see_the_global_batch_of_one_process():
    """The union of the two ranks' micro-batches at each step is the 1-process batch, also
    after a mid-epoch resume (ResumableSampler.start)."""
    ds = ToyShapes(size=100)
    def batches(world, rank, start=0):
        s = data.ResumableSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=3, drop_last=True)
        s.set_epoch(2)
        s.start = start
        idx = list(s)
        per = 16 // world
        return [set(idx[i:i + per]) for i in range(0, len(idx) - per + 1, per)]
    one, r0, r1 = batches(1, 0), batches(2, 0), batches(2, 1)
    assert len(r0) == len(r1) >= 3
    for step in range(len(r0)):
        assert r0[step] | r1[step] == one[step]
    assert batches(2, 1, start=8)[0] == r1[1]                                   # resumed at step 1


def test_torchrun_two_processes_gloo(tmp_path):
    out = str(tmp_path / "ddp")
    r = run("-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533", "train.py", *FAST,
            "--max_steps", "3", "--out_dir", out, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "DDP check: parameters identical on all 2 ranks: True" in r.stdout
    assert "2 process(es) x 1 accum x 4 = batch 8" in r.stdout
    ck = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert ck["step"] == 3 and len(ck["rng"]) == 2


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "last.pt")
    checkpoint.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def crash(src, dst):
        raise OSError("killed between writing the temp file and the rename")
    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with pytest.raises(DataError, match="the previous checkpoint is intact"):
        checkpoint.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    ck = torch.load(path, weights_only=True)
    assert ck["step"] == 1 and torch.equal(ck["w"], torch.ones(3))
    assert not os.path.exists(path + ".tmp")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real = train.sphere_losses

    def nan_at_third_step(*a, **k):
        out = real(*a, **k)
        calls["n"] += 1
        if calls["n"] == 3:
            out["total"] = out["total"] * float("nan")
        return out
    monkeypatch.setattr(train, "sphere_losses", nan_at_third_step)
    out = str(tmp_path / "nan")
    with pytest.raises(SystemExit) as exc:
        train.main(FAST + ["--max_steps", "6", "--ckpt_every", "1", "--out_dir", out])
    assert exc.value.code == 1
    assert "non-finite loss at step 2" in capsys.readouterr().err                # steps count from 0
    ck = torch.load(os.path.join(out, "last.pt"), weights_only=True)
    assert ck["step"] == 2 and all(torch.isfinite(v).all() for v in ck["model"].values())


@pytest.mark.parametrize("args, message", [
    (["--dataset", "folder", "--data_dir", "/nonexistent/images"], "not a folder"),
    (["--batch_size", "0"], "argument --batch_size: must be an integer >= 1, got '0'"),
    (["--model", "Q"], "argument --model: invalid choice: 'Q' (choose from"),
    (["--image_size", "-3"], "argument --image_size: must be an integer >= 1"),
    (["--max_steps", "ten"], "argument --max_steps: must be an integer >= 0, got 'ten'"),
    (["--epochs", "nan"], "argument --epochs: must be a number > 0"),
    (["--batch_size", "6", "--grad_accum", "4"], "multiple of"),
    (["--gpus", "3"], "--gpus is for --dry_run"),
    (["--data_dir", "/tmp"], "--data_dir /tmp needs --dataset (folder, "),      # never the toy set in its place
])
def test_bad_input_exits_2_with_one_line(args, message, tmp_path, capsys):
    assert message in train_error(args + ["--out_dir", str(tmp_path / "out")], capsys)


def train_error(argv, capsys):
    """train.main(argv) must stop with exit 2 and one line on stderr, no traceback: that line."""
    with pytest.raises(SystemExit) as exc:
        train.main(argv)
    err = "\n".join(line for line in capsys.readouterr().err.splitlines() if "it/s]" not in line)
    assert exc.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_corrupt_checkpoint_exits_2(tmp_path, capsys):
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    assert "is not a PyTorch checkpoint (not a zip archive" in train_error(["--resume", "--out_dir", str(tmp_path)],
                                                                            capsys)


def test_empty_image_folder_exits_2(tmp_path, capsys):
    flags = ["--dataset", "folder", "--data_dir", str(tmp_path), "--image_size", "32"]
    assert "not a folder of class subfolders of images, nor of images (no image in it;" in train_error(flags, capsys)
    (tmp_path / "cls_a").mkdir()
    assert "(no image for the classes cls_a;" in train_error(flags, capsys)


def test_lr_schedule_as_released():
    """Warmup (step+1)/(warmup+1), cosine reaching min_lr at total - warmup, then flat; min_lr
    scales with batch/256 like the peak (docs/reference.md Sec. 2 LR)."""
    peak, lo = 1.0, 0.01
    assert train.get_lr(0, peak, 10, 100, lo) == pytest.approx(1 / 11)
    assert train.get_lr(9, peak, 10, 100, lo) == pytest.approx(10 / 11)
    assert train.get_lr(10, peak, 10, 100, lo) == pytest.approx(peak)
    assert train.get_lr(50, peak, 10, 100, lo) == pytest.approx(lo + 0.5 * (peak - lo))   # half-way: t = 40/80
    assert train.get_lr(90, peak, 10, 100, lo) == pytest.approx(lo)
    assert train.get_lr(99, peak, 10, 100, lo) == pytest.approx(lo)
    args, _ = train.get_args(["--dataset", "cifar10", "--batch_size", "512"])
    assert train.lr_range(args) == pytest.approx((2e-4, 2e-6))


def test_folder_takes_the_papers_settings_for_its_image_size(tmp_path, capsys):
    """--dataset folder reads a few images: ~20px -> CIFAR-10's settings at 32px, ~300px -> Flowers' at 256px;
    one line says which; a flag given wins."""
    from PIL import Image
    for side, name in ((20, "small"), (300, "large")):
        for k in range(6):
            os.makedirs(tmp_path / name / "ab"[k % 2], exist_ok=True)
            Image.new("RGB", (side, side + 4), (40 * k, 90, 9)).save(tmp_path / name / "ab"[k % 2] / f"{k}.png")
    flags = lambda name, *more: ["--dataset", "folder", "--data_dir", str(tmp_path / name), "--out_dir",
                                 str(tmp_path / "out"), *more]
    args, _ = train.get_args(flags("small"))
    assert (args.image_size, args.alpha, args.band, args.model) == (32, 80, 85, "L")
    assert "6 images in 2 classes, ~20px -> CIFAR-10's settings at 32px" in capsys.readouterr().out
    args, _ = train.get_args(flags("large", "--alpha", "84"))
    assert (args.image_size, args.alpha, args.band, args.epochs) == (256, 84, 89, 1000)
    assert "Flowers' settings at 256px" in capsys.readouterr().out


def test_grids_come_every_sample_every_steps_between_log_steps(tmp_path):
    out = str(tmp_path / "o")
    train.main(FAST + ["--max_steps", "6", "--log_every", "4", "--sample_every", "3", "--out_dir", out])
    assert sorted(f for f in os.listdir(out) if f.startswith("samples_")) == ["samples_0000003.png", "samples_0000006.png"]
    assert Image.open(os.path.join(out, "recon_0000003.png")).size == (2 + 8 * 34, 2 + 4 * 34)   # x, clean, r 0.5, 1


def test_latent_shape_flags_train_and_sample(tmp_path, capsys):
    """--patch_size 4 --latent_dim 16 on 32px toy images: an 8 x 8 x 16 latent (ratio 3HW/L = 3, Tab. 5), saved in
    the config that sample.py reads; --resume with another shape is refused."""
    import sample
    out = str(tmp_path / "run")
    train.main(FAST + ["--max_steps", "2", "--patch_size", "4", "--latent_dim", "16", "--out_dir", out])
    assert "latent 8x8x16 (ratio 3HW/L 3)" in capsys.readouterr().out
    cfg = checkpoint.load_checkpoint(os.path.join(out, "last.pt"))["config"]
    assert (cfg["image_size"] // cfg["patch_size"], cfg["latent_dim"]) == (8, 16)
    sample.main(["--ckpt", os.path.join(out, "last.pt"), "--n", "2", "--steps", "2", "--out", str(tmp_path / "s.png")])
    assert os.path.isfile(tmp_path / "s.png")
    with pytest.raises(SystemExit):
        train.main(["--resume", "--out_dir", out, "--latent_dim", "32"])
    assert "--latent_dim 32 conflicts with --resume" in capsys.readouterr().err


def test_init_from_starts_a_new_run_from_the_weights(tmp_path, capsys):
    """train.py --init_from: step 0, the given (or EMA) weights, a fresh schedule; another model: one line."""
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    train.main(FAST + ["--max_steps", "2", "--ema", "0.5", "--out_dir", src])
    s = checkpoint.load_checkpoint(os.path.join(src, "last.pt"))
    assert not torch.equal(s["model"]["decoder.out.weight"], s["ema"]["decoder.out.weight"])
    no_model = FAST[:2] + FAST[4:]                                             # the checkpoint's model
    for key, flags in (("model", []), ("ema", ["--init_ema"])):               # lr 1e-12: 5 steps move nothing
        train.main(no_model + ["--init_from", os.path.join(src, "last.pt"), "--out_dir", dst, "--overwrite",
                               "--max_steps", "5", "--lr", "1e-12", "--log_every", "1", *flags])
        d = checkpoint.load_checkpoint(os.path.join(dst, "last.pt"))
        assert d["step"] == 5 and d["config"] == s["config"]
        for k, v in s[key].items():
            torch.testing.assert_close(d["model"][k], v, rtol=0, atol=1e-9)
        assert [json.loads(line)["step"] for line in open(os.path.join(dst, "log.jsonl"))] == [1, 2, 3, 4, 5]
        assert f"started from the {'EMA ' if flags else ''}weights of" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        train.main(no_model + ["--init_from", os.path.join(src, "last.pt"), "--out_dir", str(tmp_path / "big"),
                               "--image_size", "64"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1, err
    assert "encoder.mixer.blocks.0.token_mix.0.weight is (16, 16) there, (64, 64) here" in err
    with pytest.raises(SystemExit):                                        # a latent flag is used, not dropped
        train.main(no_model + ["--init_from", os.path.join(src, "last.pt"), "--out_dir", str(tmp_path / "d"),
                               "--latent_dim", "8"])
    assert "does not fit this run's model" in (err := capsys.readouterr().err) and "(8, 64) here" in err


def test_log_carries_the_loss_parts_psnr_and_latent_norms(tmp_path, monkeypatch, capsys):
    """diagnostics() against hand values; log.jsonl, the progress line and a (stub) wandb run carry them."""
    x = torch.zeros(2, 3, 4, 4)
    z = torch.stack([torch.full((2, 2, 3), 2.0), torch.full((2, 2, 3), 4.0)])            # latent RMS 2 and 4
    out = {"x_noisy": x + 0.2, "x_NOISY": x + 0.4, "z": z}
    d = train.diagnostics(x, out, perceptual=lambda a, b: (a - b).abs().flatten(1).mean(1))
    want = {"recon_dist": 0.5 * 0.1 ** 2, "con_dist": 0.5 * 0.1 ** 2, "recon_perc": 0.2, "con_perc": 0.2,
            "recon_psnr": 20.0, "z_rms": 3.0, "z_rms_std": 1.0}                # [0, 1] scale: error 0.1 -> 20 dB
    assert {k: v.item() for k, v in d.items()} == pytest.approx(want)
    logged = []

    class Run:
        def log(self, rec, step): logged.append((step, rec))
        def finish(self): logged.append("finished")
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: Run()))
    out_dir = str(tmp_path / "o")
    train.main(FAST + ["--max_steps", "2", "--log_every", "1", "--wandb", "--out_dir", out_dir])
    recs = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]
    assert {"recon_dist", "con_dist", "recon_psnr", "z_rms", "z_rms_std"} <= set(recs[0]) and recs[0]["recon_psnr"] > 0
    assert logged == [(r["step"], r) for r in recs] + ["finished"]
    assert "| recon_psnr " in capsys.readouterr().out                         # the progress line
    monkeypatch.setitem(sys.modules, "wandb", None)                            # not installed
    with pytest.raises(SystemExit) as exc:
        train.main(FAST + ["--max_steps", "1", "--wandb", "--out_dir", str(tmp_path / "w")])
    assert exc.value.code == 2 and "--wandb needs the wandb package" in capsys.readouterr().err
