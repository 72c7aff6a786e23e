"""Scaling out (CPU, gloo): FSDP against DDP and one process, a two-node launch on one machine,
checkpoints that move between FSDP and DDP, and bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

FAST = ["--batch_size", "8", "--log_every", "1", "--sample_every", "1000", "--ckpt_every", "1000", "--device", "cpu"]


def run(*args, port=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", *args] if port else [sys.executable, *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def torchrun(n, port, *args):
    return run(f"--nproc_per_node={n}", f"--master_port={port}", "train.py", *FAST, *args, port=port)


def losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def test_fsdp_matches_ddp_and_one_process(tmp_path):
    out = {k: str(tmp_path / k) for k in ("fsdp", "ddp", "one")}
    r = torchrun(2, 29611, "--fsdp", "--max_steps", "3", "--out_dir", out["fsdp"])
    assert r.returncode == 0, r.stderr[-2000:]
    for r in (torchrun(2, 29612, "--max_steps", "3", "--out_dir", out["ddp"]),
              run("train.py", *FAST, "--max_steps", "3", "--out_dir", out["one"])):
        assert r.returncode == 0, r.stderr[-2000:]
    fsdp, ddp, one = losses(out["fsdp"]), losses(out["ddp"]), losses(out["one"])
    # same ranks, seeds and data: FSDP differs from DDP only in the order of float sums
    assert fsdp == pytest.approx(ddp, rel=1e-4)
    # one process draws its noise from one RNG instead of two: equal only statistically (batch 8)
    assert fsdp == pytest.approx(one, rel=0.3)
    a = torch.load(os.path.join(out["fsdp"], "last.pt"), weights_only=True)
    b = torch.load(os.path.join(out["ddp"], "last.pt"), weights_only=True)
    assert a["model"].keys() == b["model"].keys()                                # full, unsharded state dicts
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-4, atol=1e-6)


def test_fsdp_and_ddp_train_the_same_numerics_under_bf16_autocast(tmp_path):
    """CPU bf16 autocast (--precision bf16): FSDP's units keep their inputs' dtype, so the residual streams stay
    fp32 and both wrappers compute the same step, up to bf16 rounding."""
    out = {k: str(tmp_path / k) for k in ("fsdp", "ddp")}
    for port, k in ((29621, "fsdp"), (29622, "ddp")):
        r = torchrun(2, port, "--precision", "bf16", "--max_steps", "3", "--out_dir", out[k], *(["--fsdp"] * (k == "fsdp")))
        assert r.returncode == 0, r.stderr[-2000:]
    assert losses(out["fsdp"]) == pytest.approx(losses(out["ddp"]), rel=2e-2)


def test_checkpoints_move_between_fsdp_and_ddp(tmp_path):
    f, d = str(tmp_path / "f"), str(tmp_path / "d")
    for r in (torchrun(2, 29613, "--fsdp", "--max_steps", "2", "--out_dir", f),
              torchrun(2, 29614, "--max_steps", "2", "--out_dir", d)):
        assert r.returncode == 0, r.stderr[-2000:]
    r = torchrun(2, 29615, "--max_steps", "3", "--out_dir", f, "--resume")          # FSDP -> DDP
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-2000:]
    r = torchrun(2, 29616, "--fsdp", "--max_steps", "3", "--out_dir", d, "--resume")  # DDP -> FSDP
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr[-2000:]
    r = run("sample.py", "--ckpt", os.path.join(f, "last.pt"), "--steps", "2", "--n", "4",
            "--out", str(tmp_path / "s.png"))
    assert r.returncode == 0 and os.path.isfile(tmp_path / "s.png"), r.stderr


def test_two_node_launch_on_one_machine_equals_one_launch(tmp_path):
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    node = lambda i: subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(i), "--nproc_per_node", "1",
         "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:29617", "--rdzv_id", "test", "train.py", *FAST,
         "--max_steps", "2", "--out_dir", two], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    nodes = [node(0), node(1)]
    for p in nodes:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    r = torchrun(2, 29618, "--max_steps", "2", "--out_dir", one)
    assert r.returncode == 0, r.stderr[-2000:]
    a = torch.load(os.path.join(two, "last.pt"), weights_only=True)["model"]
    b = torch.load(os.path.join(one, "last.pt"), weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("args, message", [
    (["--fsdp"], "--fsdp shards over processes"),
    (["--batch_size", "10", "--grad_accum", "4"], "multiple of"),
])
def test_bad_scale_input(args, message):
    r = run("train.py", *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
