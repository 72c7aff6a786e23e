"""The memory plan (parallel.py): its activation count against the tensors torch itself saves for backward,
and the plans of the headline GPU commands."""
from contextlib import nullcontext

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

import train
from losses import LossWeights, sphere_losses
from model import Block, MixerBlock, SphereEncoder, make_config
from parallel import activation_bytes
from spherify import noise_levels


def saved_bytes(cfg, batch, bf16, grad_ckpt):
    """Bytes of the distinct storages a training forward (Eq. 4-10) keeps for backward, weights and buffers not
    counted; under grad_ckpt what checkpoint keeps instead: each block's input."""
    torch.manual_seed(0)
    model = SphereEncoder(cfg)
    model.set_grad_checkpointing(grad_ckpt)
    own = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    seen = {}

    def keep(t):
        if t.untyped_storage()._cdata not in own:
            seen[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t
    def held_input(module, args):                                           # returns None: args unchanged
        keep(args[0])
    for m in model.modules():
        if grad_ckpt and isinstance(m, (Block, MixerBlock)):
            m.register_forward_pre_hook(held_input)
    x = torch.rand(batch, 3, cfg.image_size, cfg.image_size) * 2 - 1
    y = torch.randint(0, cfg.num_classes, (batch,))
    with saved_tensors_hooks(keep, lambda t: t), (torch.autocast("cpu", torch.bfloat16) if bf16 else nullcontext()):
        sphere_losses(x, *model(x, y, *noise_levels(batch, 80, 85)), LossWeights(50, 0, 25, 0, 1))
    return sum(seen.values())


SMALL = make_config("tiny", "toy", enc_width=128, enc_depth=2, enc_heads=4, dec_width=128)
LARGER = make_config("S", "imagenet", image_size=64, enc_depth=2, dec_depth=2)     # 8x8 tokens, width 512


@pytest.mark.parametrize("cfg", [SMALL, LARGER], ids=["tiny-128", "S-64px"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("grad_ckpt", [False, True], ids=["", "grad_ckpt"])
def test_activation_estimate_matches_the_saved_tensors(cfg, bf16, grad_ckpt):
    per_image = (saved_bytes(cfg, 4, bf16, grad_ckpt) - saved_bytes(cfg, 2, bf16, grad_ckpt)) / 2  # no weight copies
    est = activation_bytes(cfg, a=2 if bf16 else 4, fused_norm=False, grad_ckpt=grad_ckpt)[0]       # CPU: unfused
    assert est == pytest.approx(per_image, rel=0.15)


def dry_run(flags, capsys):
    """train.py --dry_run in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        train.main(["--dataset", "imagenet", "--dry_run", "--gpus", "8", "--gpu_mem", "80", *flags])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


@pytest.mark.parametrize("flags", [["--model", "L"], ["--model", "XL", "--fsdp"]])
def test_headline_plans_fit_8_gpus_of_80_gb(flags, capsys):
    code, out, err = dry_run(flags, capsys)
    assert code == 0, err
    plan = dict(kv.split("=") for kv in out.strip().splitlines()[-1].split()[1:])
    assert int(plan["micro_batch"]) * int(plan["grad_accum"]) == 32 and float(plan["est_gb"]) <= 0.85 * 80


def test_a_plan_that_cannot_fit_stops_with_what_would(capsys):
    code, out, err = dry_run(["--model", "L", "--grad_accum", "1", "--no-grad_ckpt"], capsys)
    assert code == 2 and "try --grad_accum 4 --no-grad_ckpt" in err and "Traceback" not in err
