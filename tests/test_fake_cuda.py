"""The CUDA path, checked without a GPU. Under FakeTensorMode a tensor on `cuda` carries its shape, dtype and device but
no data, so nothing is computed; CUDA's bf16 autocast runs on such tensors once its availability checks are told a GPU
is there (fake_cuda). Each preset at its data set's size: the training forward and losses (Eq. 4-10) and Algorithm 1
with CFG in each position, every output on cuda in the dtypes docs/scaling.md promises; what the forward saves for
backward against the memory plan; the pieces of train.py, sample.py, edit.py and viz.py that fake mode can run.
A tensor made on the CPU fails here as on a GPU (FakeTensorDeviceMismatchError). Backward, DDP, FSDP and CUDA streams
need a driver (pytorch/pytorch#92627): tests/test_gpu.py and tests/gpu_check.sh, on a GPU.
"""
from contextlib import contextmanager
from unittest import mock

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.autograd.graph import saved_tensors_hooks

import edit
import train
from losses import LossWeights, sphere_losses
from model import Block, MixerBlock, SphereEncoder, make_config
from parallel import agree, activation_bytes
from spherify import generate, noise_levels, reconstruct, sigma_max

PRESETS = [("S", "cifar10"), ("B", "flowers"), ("L", "imagenet"), ("XL", "imagenet")]     # 32px, 256px, 256px
IDS = [f"{s}-{d}" for s, d in PRESETS]
GIB = 2 ** 30


def flash(q, k, v):
    """What a GPU's SDPA picks for bf16 q, k, v (B, heads, N, hd); fake mode on a CPU would pick the math kernel,
    which saves the N x N weights. Saves q, k, v, the output and the logsumexp."""
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[0]


@contextmanager
def fake_cuda():
    """FakeTensorMode, with torch.autocast("cuda") told that a bf16 GPU is there and SDPA as flash attention; every
    patch is undone on exit, so nothing leaks into the next test of this worker."""
    with (mock.patch("torch.cuda.amp.common.amp_definitely_not_available", return_value=False),
          mock.patch("torch.amp.autocast_mode.is_autocast_available", return_value=True),
          mock.patch("torch.cuda.is_bf16_supported", return_value=True),
          mock.patch.object(F, "scaled_dot_product_attention", flash),
          FakeTensorMode()):
        yield


def cuda_model(size, dataset, grad_ckpt=False):
    """A preset's model on fake cuda (init runs on fake tensors: no FLOPs, no memory)."""
    with torch.device("cuda"):
        model = SphereEncoder(make_config(size, dataset))
    model.set_grad_checkpointing(grad_ckpt)
    return model


def batch(cfg, n):
    """Images (n, 3, H, W) and labels (n,) on cuda, as train.py's loader leaves them."""
    return (torch.rand(n, 3, cfg.image_size, cfg.image_size, device="cuda") * 2 - 1,
            torch.randint(0, cfg.num_classes, (n,), device="cuda"))


def on_cuda(*ts, dtype=torch.float32):
    return all(t.device.type == "cuda" and t.dtype == dtype for t in ts)


def training_forward(model, n):
    """A training forward (Eq. 4-10) of n images under CUDA bf16 autocast, as train.py's loss_fn: (losses, outputs,
    bytes of the distinct storages saved for backward (weights, buffers not counted; under grad_ckpt each block's
    input, which checkpoint keeps instead), {module kind: dtypes seen}). Every saved tensor must be on cuda."""
    cfg, dtypes, saved, hooks = model.cfg, {}, {}, []
    own = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}

    def keep(t):
        assert t.device.type == "cuda", f"a {tuple(t.shape)} tensor saved for backward is on {t.device}"
        if t.untyped_storage()._cdata not in own:
            saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    def seen(kind, t):
        for t in t if isinstance(t, tuple) else [t]:
            assert t.device.type == "cuda", f"{kind} gave a tensor on {t.device}"
            dtypes.setdefault(kind, set()).add(t.dtype)
    def block_input(m, args):                                               # returns None: args unchanged
        seen(type(m).__name__ + " input", args[0])
        if model.encoder.vit.grad_ckpt:
            keep(args[0])
    for m in model.modules():
        hooks.append(m.register_forward_hook(lambda m, args, out: seen(type(m).__name__, out)))
        if isinstance(m, (Block, MixerBlock)):
            hooks.append(m.register_forward_pre_hook(block_input))
    x, y = batch(cfg, n)
    sigma, sigma_sub = noise_levels(n, 85, 89, device="cuda")              # Eq. 5, App. C.2
    with saved_tensors_hooks(keep, lambda t: t), torch.autocast("cuda", torch.bfloat16):
        out = model(x, y, sigma, sigma_sub)                                 # Eq. 4-9
        losses = sphere_losses(x, *out, LossWeights(50, 0, 25, 0, 1))      # Eq. 10
    for h in hooks:
        h.remove()
    return losses, out, sum(saved.values()), dtypes


@pytest.mark.parametrize("grad_ckpt", [False, True], ids=["", "grad_ckpt"])
@pytest.mark.parametrize("size, dataset", PRESETS, ids=IDS)
def test_training_forward_on_cuda_and_the_memory_plan(size, dataset, grad_ckpt):
    with fake_cuda():
        model = cuda_model(size, dataset, grad_ckpt)
        losses, (z, x_NOISY, x_noisy, z_re), held1, dtypes = training_forward(model, 1)
        held2 = training_forward(model, 2)[2]
    assert on_cuda(z, x_NOISY, x_noisy, z_re, *losses.values())             # fp32 latents, pixels and losses
    assert dtypes["Block input"] == dtypes["MixerBlock input"] == dtypes["RMSNorm"] == {torch.float32}  # stream, norm
    matmuls = ("Linear", "Conv2d", "ConvTranspose2d", "Attention", "SwiGLU")     # the last two: their output Linear
    assert all(dtypes[k] == {torch.bfloat16} for k in matmuls if k in dtypes)
    assert ("ConvTranspose2d" in dtypes) == (model.cfg.pixel_head == "conv")
    assert dtypes["Decoder"] == dtypes["Encoder"] == dtypes["Mixer"] == {torch.float32}   # tanh pixels; Mixer norms
    per_image, fixed = held2 - held1, 2 * held1 - held2                     # fixed: the same for any batch
    assert per_image == pytest.approx(activation_bytes(model.cfg, a=2, fused_norm=True, grad_ckpt=grad_ckpt)[0],
                                      rel=0.10)
    # fixed is autocast's bf16 copies of the Linear and conv weights, saved by their matmuls; the recomputed blocks'
    # (grad_ckpt) are not saved, but autocast's cache holds them to the forward's end: the plan counts 2 B a parameter
    weights = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d,
                                                                                        nn.ConvTranspose2d))}
    recomputed = {id(p) for m in model.modules() if grad_ckpt and isinstance(m, (Block, MixerBlock))
                  for p in m.parameters()}
    assert fixed == pytest.approx(2 * sum(n for k, n in weights.items() if k not in recomputed), rel=0.01)
    assert 2 * sum(weights.values()) == pytest.approx(2 * model.num_params(), rel=0.10)     # the plan's term


@pytest.mark.parametrize("size, dataset", PRESETS, ids=IDS)
def test_algorithm_1_with_cfg_on_cuda(size, dataset):
    """generate under inference_mode and bf16 autocast, as sample.py runs it: step 1 and a re-encoding step, CFG in
    each position; at 1024 tokens (L, XL) combo only, which runs both of the others' guided calls (and halves the
    file's time)."""
    with fake_cuda():
        model = cuda_model(size, dataset).eval()
        cfg = model.cfg
        e = torch.randn(2, cfg.grid, cfg.grid, cfg.latent_dim, device="cuda")
        y = torch.tensor([0, cfg.num_classes - 1], device="cuda")
        for position in ("pixel", "latent", "combo") if size in ("S", "B") else ("combo",):
            trace = []
            with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16):
                xs = generate(model, e, y, 2, sigma_max(85), cfg_scale=1.4, cfg_position=position, trace=trace)
                u8 = ((xs[-1] * 0.5 + 0.5) * 255).round().clamp(0, 255).to(torch.uint8)   # sample.py's .npz
            assert len(xs) == len(trace) == 2 and on_cuda(*xs, *trace) and on_cuda(u8, dtype=torch.uint8), position
            assert xs[-1].shape == (2, 3, cfg.image_size, cfg.image_size) and trace[-1].shape == e.shape


def test_train_sample_edit_viz_pieces_on_cuda():
    """train.py's flips, noise levels and the ranks' flags; sample.py's unconditional batch; edit.py's edits and grid;
    viz.py's encoding and trajectory: each on cuda (the S preset at 32px; the code does not depend on the size)."""
    with fake_cuda():
        model = cuda_model("S", "cifar10").eval()
        cfg, n = model.cfg, 2
        x, y = batch(cfg, n)
        flipped = train.hflip(x)                                            # Sec. 3
        sigma, sub = noise_levels(n, 80, 85, device="cuda")                 # Eq. 5, App. C.2
        with pytest.raises(DataDependentOutputException):                   # reading the flags needs data: made
            agree(torch.tensor(-1, device="cuda"), True, False, [], "cuda")   # on cuda up to there
        with torch.autocast("cuda", torch.bfloat16):
            unconditional = generate(model, torch.randn(n, cfg.grid, cfg.grid, cfg.latent_dim, device="cuda"), None, 2)
            recon = reconstruct(model, x)                                   # Eq. 2 (edit.py recon, train.py grids)
            grid = edit.corner_grid(model, 80, n=2, y=3, steps=2, device="cuda")         # Sec. 4, Fig. 6
            cross = edit.crossover(model, x[:1], x[1:], 80, steps=2)       # Sec. 5
            manip = edit.manipulate(model, x, torch.full((n,), 7, device="cuda"), 80, steps=2)
            v = model.encode(x, y)                                          # viz.py: f(E(x, y))
    assert on_cuda(flipped, sigma, sub, *unconditional, recon, grid, *cross, *manip, v)
    assert grid.shape == (4, 3, 32, 32) and len(cross) == 3 and len(manip) == 2
