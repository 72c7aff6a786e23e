"""CUDA only (skipped without a GPU; run by tests/gpu_check.sh): the precision policy under bf16 autocast,
the memory plan against the CUDA allocator, a compiled step against eager."""
import pytest
import torch

from losses import LossWeights, sphere_losses
from model import Block, SphereEncoder, make_config
from parallel import activation_bytes
from spherify import noise_levels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CFG = make_config("S", "imagenet", image_size=128, enc_depth=4, dec_depth=4)   # 16x16 tokens, width 512


def forward(model, cfg, batch, seed=0):
    """A training forward (Eq. 4-10) under bf16 autocast; the losses."""
    g = torch.Generator("cuda").manual_seed(seed)
    x = torch.rand(batch, 3, cfg.image_size, cfg.image_size, device="cuda", generator=g) * 2 - 1
    y = torch.randint(0, cfg.num_classes, (batch,), device="cuda", generator=g)
    torch.manual_seed(seed)
    sigma, sub = noise_levels(batch, 85, 89, device="cuda")
    return sphere_losses(x, *model(x, y, sigma, sub), LossWeights(50, 0, 25, 0, 1))


def test_precision_policy_under_bf16_autocast():
    model, seen = SphereEncoder(CFG).cuda(), {}
    for m in model.modules():
        if isinstance(m, Block):
            m.register_forward_pre_hook(lambda mod, args: seen.setdefault("stream", args[0].dtype) and None)
    model.decoder.register_forward_hook(lambda mod, args, out: seen.setdefault("pixels", out.dtype) and None)
    with torch.autocast("cuda", torch.bfloat16):
        losses = forward(model, CFG, 2)
        seen["qkv"] = model.decoder.vit.blocks[0].attn.qkv(torch.zeros(1, 4, CFG.dec_width, device="cuda")).dtype
    assert seen == {"stream": torch.float32, "pixels": torch.float32, "qkv": torch.bfloat16}
    assert all(v.dtype == torch.float32 and v.isfinite() for v in losses.values())


@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_memory_plan_matches_the_allocator(grad_ckpt):
    """What a forward leaves allocated for backward, per image, against the plan's count (fused CUDA norms)."""
    model = SphereEncoder(CFG).cuda()
    model.set_grad_checkpointing(grad_ckpt)
    held = {}
    for batch in (4, 8):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", torch.bfloat16):
            losses = forward(model, CFG, batch)
            torch.cuda.synchronize()
            held[batch] = torch.cuda.memory_allocated() - before
        del losses
    per_image = (held[8] - held[4]) / 4                                    # weight copies cancel out
    assert activation_bytes(CFG, a=2, fused_norm=True, grad_ckpt=grad_ckpt)[0] == pytest.approx(per_image, rel=0.15)


def test_compiled_step_matches_eager():
    torch.manual_seed(0)
    model = SphereEncoder(CFG).cuda()
    compiled = torch.compile(model)
    with torch.autocast("cuda", torch.bfloat16):
        eager, comp = forward(model, CFG, 4)["total"], forward(compiled, CFG, 4)["total"]
    comp.backward()
    assert comp.item() == pytest.approx(eager.item(), rel=2e-2)
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
