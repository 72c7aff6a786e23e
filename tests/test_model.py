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
    """Model card (docs/reference.md Sec. 2): Sphere-L 950M on ImageNet, 948M on Flowers, 642M on
    Animal-Faces (uncond); Sphere-XL about 1.39B on ImageNet."""
    def count(size, ds):
        with torch.device("meta"):
            return SphereEncoder(make_config(size, ds)).num_params() / 1e6
    assert count("L", "imagenet") == pytest.approx(950, rel=0.01)
    assert count("L", "flowers") == pytest.approx(948, rel=0.01)
    assert count("L", "animalfaces") == pytest.approx(642, rel=0.01)
    assert count("XL", "imagenet") == pytest.approx(1390, rel=0.01)


def test_sizes_pair_an_encoder_with_a_decoder():
    """Sphere-L = large encoder + large decoder (Sec. 3.1); tiny's encoder, which runs twice a training step
    (Eq. 4 and Eq. 9), is 64 x 1 x 2 heads against the decoder's 128 x 3 x 4."""
    dims = lambda c: ((c.enc_width, c.enc_depth, c.enc_heads), (c.dec_width, c.dec_depth, c.dec_heads))
    assert dims(make_config("L", "imagenet")) == ((1024, 24, 16), (1024, 24, 16))
    assert dims(make_config("tiny", "toy")) == ((64, 1, 2), (128, 3, 4))
    m = SphereEncoder(make_config("tiny", "toy"))
    assert (len(m.encoder.vit.blocks), len(m.decoder.vit.blocks)) == (1, 3)
    f = m.flops_per_image()
    assert 2 * f["encoder"] < f["decoder"]


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
        assert isinstance(blk, Block) and torch.equal(blk(h, c, vit.rope), h)


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


def test_init_statistics_as_released():
    """docs/reference.md Sec. 2 Init: Xavier on conv weights viewed 2-D (out, in*k*k); the decoder's
    whole input stage (Linear(d, width) and every Linear of its Mixer) N(0, 1); the encoder's
    Mixer Xavier; pixel-head convs Xavier with gain 0.01."""
    torch.manual_seed(0)
    cfg = make_config("tiny", "imagenet", image_size=64, patch_size=8, latent_dim=32, num_classes=10)
    m = SphereEncoder(cfg)
    xavier = lambda w, gain=1.0: gain * (6 / (w.shape[0] + w[0].numel())) ** 0.5   # uniform bound, 2-D fans
    P, w = cfg.patch_size, cfg.enc_width
    patch = m.encoder.patch.weight                                              # (w, 3, P, P)
    assert xavier(patch) == pytest.approx((6 / (w + 3 * P * P)) ** 0.5)        # hand value: fan_out = w, not w P^2
    for weight, gain in ((patch, 1.0), (m.encoder.proj.weight, 1.0), (m.decoder.conv.weight, 0.01)):
        b = xavier(weight, gain)
        assert weight.abs().max().item() <= b and weight.abs().max().item() > 0.9 * b
        assert weight.std().item() == pytest.approx(b / 3 ** 0.5, rel=0.15)    # U(-b, b)
    dec_mix = [l for l in m.decoder.mixer.modules() if isinstance(l, torch.nn.Linear)]
    assert len(dec_mix) == 4 * cfg.mixer_depth
    for lin in [m.decoder.inp, *dec_mix]:
        assert lin.weight.std().item() == pytest.approx(1.0, rel=0.1)
        assert torch.equal(lin.bias, torch.zeros_like(lin.bias))
    for lin in [l for l in m.encoder.mixer.modules() if isinstance(l, torch.nn.Linear)]:
        assert lin.weight.abs().max().item() <= xavier(lin.weight)
    assert all(torch.equal(b.a, torch.zeros(2)) for b in [*m.encoder.mixer.blocks, *m.decoder.mixer.blocks])


def test_norms_have_learned_affine_and_uncond_has_no_final_norm():
    """docs/reference.md Sec. 2 Norms: every RMSNorm has an elementwise affine; an unconditional model
    has no norm before the last Linear (the ViT's output goes straight in)."""
    for classes in (10, 0):
        m = SphereEncoder(make_config("tiny", "toy", num_classes=classes))
        norms = [n for n in m.modules() if isinstance(n, torch.nn.RMSNorm)]
        assert norms and all(n.weight is not None for n in norms)
        per_net = lambda depth: 2 * depth + 2 * 2 + 1 + (1 if classes else 0)    # blocks, Mixer blocks, Mixer, final
        assert len(norms) == per_net(m.cfg.enc_depth) + per_net(m.cfg.dec_depth)
    vit = m.decoder.vit                                                         # the unconditional one
    h = torch.randn(2, 64, 128)
    torch.testing.assert_close(vit.norm(h, None), h)


def test_rope_turns_adjacent_channel_pairs():
    """[released] convention, hand-computed: head_dim 4 on a 2x2 grid; token 1 is row 0, column 1.
    Pair (0, 1) turns with the row (angle 0), pair (2, 3) with the column (angle 1 rad)."""
    cos, sin = rope_2d(2, 4)
    x = torch.tensor([1.0, 0.0, 1.0, 0.0]).view(1, 1, 1, 4).expand(1, 1, 4, 4)
    out = apply_rope(x, cos, sin)[0, 0, 1]
    c1, s1 = torch.cos(torch.tensor(1.0)), torch.sin(torch.tensor(1.0))
    torch.testing.assert_close(out, torch.stack([torch.tensor(1.0), torch.tensor(0.0), c1, s1]))


def test_sincos_table_is_column_first_and_linear_head_is_c_p1_p2():
    from model import sincos_2d
    t = sincos_2d(2, 8)                                                         # omega = [1, 1e-2]
    col, row = 1.0, 0.0                                                         # token 1: row 0, column 1
    om = torch.tensor([1.0, 1e-2])
    expect = torch.cat([torch.sin(col * om), torch.cos(col * om), torch.sin(row * om), torch.cos(row * om)])
    torch.testing.assert_close(t[1], expect)
    cfg = make_config("tiny", "toy", pixel_head="linear", num_classes=0)      # token vector = (c, p1, p2)
    m = SphereEncoder(cfg)
    P = cfg.patch_size
    with torch.no_grad():
        m.decoder.out.weight.zero_()
        m.decoder.out.bias.copy_(torch.arange(3 * P * P) / 100)
        m.decoder.conv.weight.zero_()
        m.decoder.conv.weight[:, :, 1, 1] = torch.eye(3)                       # identity 3x3 conv
    x = m.decode(torch.randn(1, cfg.latent_size))
    c, p1, p2 = 2, 1, 3
    assert x[0, c, P + p1, 2 * P + p2].item() == pytest.approx(torch.tanh(torch.tensor((c * P * P + p1 * P + p2) / 100)).item())
