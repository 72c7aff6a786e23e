"""model.py: shapes, init, conditioning, positions, FLOPs, and that training moves the loss."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from conftest import randomize_zero_inits
from losses import LossWeights, sphere_losses
from model import LATENTS, SIZES, Block, SphereEncoder, apply_rope, make_config, rope_2d
from spherify import noise_levels, spherify


@pytest.mark.parametrize("dataset", list(LATENTS))
@pytest.mark.parametrize("size", list(SIZES))
def test_shapes_every_preset_on_meta(size, dataset):
    with torch.device("meta"):
        m = SphereEncoder(make_config(size, dataset))
        cfg = m.cfg
        x = torch.randn(2, 3, cfg.image_size, cfg.image_size)
        y = torch.tensor([0, 1]) if cfg.num_classes else None
        z = m.encode(x, y)
        assert z.shape == (2, cfg.grid, cfg.grid, cfg.latent_dim)
        assert m.decode(spherify(z), y).shape == x.shape
        assert m.decode(spherify(z).flatten(1), y).shape == x.shape        # (B, L) works too


def test_paper_parameter_counts():
    """Model card (REFERENCE.md Sec. 2): Sphere-L 950M on ImageNet, 948M on Flowers, 642M on
    Animal-Faces (uncond); Sphere-XL about 1.39B on ImageNet."""
    def count(size, ds):
        with torch.device("meta"):
            return SphereEncoder(make_config(size, ds)).num_params() / 1e6
    assert count("L", "imagenet") == pytest.approx(950, rel=0.01)
    assert count("L", "flowers") == pytest.approx(948, rel=0.01)
    assert count("L", "animalfaces") == pytest.approx(642, rel=0.01)
    assert count("XL", "imagenet") == pytest.approx(1390, rel=0.01)


def test_latent_shapes_match_the_paper():
    assert make_config("L", "cifar10").latent_size == 16 * 16 * 8
    assert make_config("L", "imagenet").latent_size == 32 * 32 * 64
    c = make_config("L", "flowers")
    assert 3 * c.image_size ** 2 / c.latent_size == 1.5                        # pixel/latent ratio


def test_blocks_are_identity_and_encoder_outputs_zero_at_init(tiny_cfg):
    torch.manual_seed(0)
    m = SphereEncoder(tiny_cfg)
    x = torch.randn(3, 3, 32, 32)
    y = torch.tensor([1, 2, 10])
    assert torch.equal(m.encode(x, y), torch.zeros(3, 8, 8, 8))                  # zero-init output Linear
    vit = m.decoder.vit
    h = torch.randn(3, 64, 32)
    c = vit.y_embed(y)
    for blk in vit.blocks:
        assert isinstance(blk, Block) and torch.equal(blk(h, c, (vit.rope_cos, vit.rope_sin)), h)


def test_null_class_differs_from_real_class(tiny_cfg):
    torch.manual_seed(0)
    m = randomize_zero_inits(SphereEncoder(tiny_cfg))
    v = spherify(torch.randn(2, 8, 8, 8))
    assert torch.equal(m.null_labels(2), torch.tensor([10, 10]))
    x_null = m.decode(v)                                                         # None -> null class
    torch.testing.assert_close(x_null, m.decode(v, m.null_labels(2)))
    assert (x_null - m.decode(v, torch.tensor([3, 3]))).abs().max() > 1e-3
    assert (m.decode(v, torch.tensor([3, 3])) - m.decode(v, torch.tensor([4, 4]))).abs().max() > 1e-3


def test_label_dropout_rate(tiny_cfg):
    m = SphereEncoder(tiny_cfg)
    torch.manual_seed(0)
    y = m.drop_labels(torch.zeros(20_000, dtype=torch.long), 0.1)
    assert abs((y == 10).float().mean().item() - 0.1) < 0.01
    assert set(y.unique().tolist()) == {0, 10}


def test_rope_depends_only_on_relative_position():
    cos, sin = rope_2d(4, 8)                                                     # 4x4 grid, head dim 8
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, generator=g), torch.randn(8, generator=g)
    rot = lambda t, i: apply_rope(t.view(1, 1, 1, 8), cos[i], sin[i]).flatten()
    pos = lambda r, c: r * 4 + c
    a = rot(q, pos(0, 1)) @ rot(k, pos(2, 3))                                    # offset (2, 2)
    b = rot(q, pos(1, 0)) @ rot(k, pos(3, 2))                                    # same offset elsewhere
    c = rot(q, pos(0, 1)) @ rot(k, pos(3, 2))                                    # another offset
    assert a.item() == pytest.approx(b.item(), abs=1e-5) and abs(a.item() - c.item()) > 1e-3
    assert rot(q, pos(2, 1)).norm().item() == pytest.approx(q.norm().item(), rel=1e-5)  # a rotation


def test_unconditional_model_has_no_class_table():
    m = SphereEncoder(make_config("tiny", "toy", num_classes=0))
    assert m.encoder.vit.y_embed is None and m.decoder.vit.blocks[0].ada is None
    x = torch.randn(2, 3, 32, 32)
    assert m.decode(spherify(m.encode(x, torch.tensor([1, 2])))).shape == x.shape   # labels ignored


@pytest.mark.parametrize("dataset", ["toy", "cifar10"])
def test_flops_estimate_matches_flop_counter(dataset):
    m = randomize_zero_inits(SphereEncoder(make_config("tiny", dataset)))
    est = m.flops_per_image()
    x, y = torch.randn(1, 3, 32, 32), torch.tensor([1])
    for name, fn, inp in (("encoder", m.encode, x), ("decoder", m.decode, m.encode(x, y))):
        with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):  # CPU flash SDPA is not counted
            fn(inp, y)
        assert fc.get_total_flops() == pytest.approx(est[name], rel=0.03), name


def _loss(m, x, y, seed):
    torch.manual_seed(seed)                          # same noise and label dropout each call
    sigma, sub = noise_levels(len(x), 80, 85)
    return sphere_losses(x, *m(x, y, sigma, sub), LossWeights(1, 0, 0.5, 0, 0.1))


def test_gradients_flow_and_steps_lower_the_recon_loss(tiny_cfg):
    torch.manual_seed(0)
    m = SphereEncoder(tiny_cfg)
    x, y = torch.rand(8, 3, 32, 32) * 2 - 1, torch.arange(8)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    for _ in range(3):                               # at init the encoder's last Linear is 0: a few steps
        loss = _loss(m, x, y, seed=1)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    before = _loss(m, x, y, seed=1)
    opt.zero_grad()
    before["total"].backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == [], f"no gradient reaches {no_grad}"
    opt.step()
    for _ in range(4):                               # Eq. 9's target is detached, so the total is no plain
        loss = _loss(m, x, y, seed=1)["total"]       # objective: check that the reconstruction term learns
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert _loss(m, x, y, seed=1)["recon"].item() < before["recon"].item()


def test_grad_checkpointing_gives_the_same_gradients(tiny_cfg):
    torch.manual_seed(0)
    m = randomize_zero_inits(SphereEncoder(tiny_cfg))
    x, y = torch.rand(4, 3, 32, 32) * 2 - 1, torch.arange(4)
    grads = []
    for on in (False, True):
        m.zero_grad()
        m.set_grad_checkpointing(on)
        _loss(m, x, y, seed=2)["total"].backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
