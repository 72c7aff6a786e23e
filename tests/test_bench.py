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


def test_bench_compile_compiles_the_whole_model_as_train_py(monkeypatch, capsys):
    import torch

    import bench
    from model import SphereEncoder
    seen = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: seen.append(m) or m)    # records, runs eagerly
    bench.main(["--compile", "--iters", "1", "--batch_size", "2", "--device", "cpu"])
    out = capsys.readouterr().out
    assert len(seen) == 1 and type(seen[0]) is SphereEncoder                        # its forward: the train step
    assert "[compile] tiny / toy" in out and out.count("train:") == 2 and out.count("time split:") == 1


def test_bf16_peaks_match_the_longest_name_first():
    import bench
    peak = lambda name: next((v for k, v in bench.PEAK_BF16.items() if k in name), None)   # as bench.main
    for name, tflops in (("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H100 80GB HBM3", 989),
                         ("NVIDIA H200", 989), ("NVIDIA H200 NVL", 835), ("NVIDIA A100-SXM4-80GB", 312),
                         ("NVIDIA B200", 2250), ("NVIDIA GB200", 2500)):
        assert peak(name) == tflops * 1e12, name
