"""bench.py runs on the tiny preset and prints every field (no timed assertions)."""
import subprocess
import sys

from conftest import ROOT


def test_bench_prints_every_field():
    r = subprocess.run([sys.executable, "bench.py", "--iters", "1", "--batch_size", "2", "--perceptual"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for field in ("measured matmul", "train:", "img/s", "peak memory", "FLOPs/img (train step): estimate",
                  "counted", "achieved", "MFU vs measured matmul", "time split:", "encoder (x2)", "decoder (2B)",
                  "perceptual (2B)", "optimizer", "sampling img/s: 1 step(s)", "2 step(s)", "4 step(s)"):
        assert field in r.stdout, field
    ratio = float(r.stdout.split("(ratio ")[1].split(")")[0])
    assert 0.95 < ratio < 1.05                                                   # estimate agrees with the counter


def test_bench_under_torchrun_with_fsdp():
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29641",
                        "bench.py", "--iters", "1", "--batch_size", "2", "--fsdp", "--grad_ckpt", "--device", "cpu"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[eager, grad_ckpt, FSDP x 2] tiny / toy: 1.3M params" in r.stdout
    assert "train:" in r.stdout and "img/s" in r.stdout and r.stdout.count("machine:") == 1
