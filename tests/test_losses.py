"""losses.py against hand computations: Eq. 7-10."""
import urllib.error

import pytest
import torch

from losses import LossWeights, cosine_loss, distance, load_perceptual, pixel_loss, sphere_losses


def test_distance_is_smooth_l1_on_0_1_images():
    t = torch.ones(2, 3, 4, 4)                          # 1.0 in [-1, 1] -> 1.0 in [0, 1]
    assert distance(torch.zeros_like(t), t).tolist() == pytest.approx([0.125, 0.125])   # |0.5| < 1: 0.5 * 0.5^2
    assert distance(-t, t).tolist() == pytest.approx([0.5, 0.5])                        # |1| >= 1: 1 - 0.5
    half = torch.cat([torch.zeros(1, 3, 2, 4), torch.ones(1, 3, 2, 4)], 2)                # half the pixels off
    assert distance(half, torch.ones(1, 3, 4, 4)).item() == pytest.approx(0.0625)


def test_cosine_loss_hand_values():
    a = torch.tensor([[1.0, 0.0, 0.0], [1.0, 2.0, 3.0], [1.0, 1.0, 0.0]])
    b = torch.tensor([[0.0, 5.0, 0.0], [2.0, 4.0, 6.0], [-1.0, -1.0, 0.0]])
    assert cosine_loss(a, b).item() == pytest.approx((1 + 0 + 2) / 3)           # 1 - cos: 1, 0, 2


def _outputs(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, n, n, generator=g) * 2 - 1
    z = torch.randn(2, 4, 4, 2, generator=g)
    x_NOISY = (torch.rand(2, 3, n, n, generator=g) * 2 - 1).requires_grad_()
    x_noisy = (torch.rand(2, 3, n, n, generator=g) * 2 - 1).requires_grad_()
    z_re = torch.randn(2, 4, 4, 2, generator=g).requires_grad_()
    return x, z.requires_grad_(), x_NOISY, x_noisy, z_re


def test_sphere_losses_weighted_sum_matches_hand_computation():
    x, z, x_NOISY, x_noisy, z_re = _outputs()
    w = LossWeights(recon_dist=50.0, recon_perc=0.0, con_dist=25.0, con_perc=0.0, lat_con=0.1)
    out = sphere_losses(x, z, x_NOISY, x_noisy, z_re, w)
    sl1 = lambda p, t: torch.nn.functional.smooth_l1_loss((p + 1) / 2, (t + 1) / 2)   # equal-size samples: mean of means
    cos = torch.nn.functional.cosine_similarity(z.flatten(1), z_re.flatten(1)).mean()
    assert out["recon"].item() == pytest.approx(50 * sl1(x_noisy, x).item(), rel=1e-5)          # Eq. 7
    assert out["pix_con"].item() == pytest.approx(25 * sl1(x_NOISY, x_noisy).item(), rel=1e-5)  # Eq. 8
    assert out["lat_con"].item() == pytest.approx(0.1 * (1 - cos.item()), rel=1e-5)           # Eq. 9
    assert out["total"].item() == pytest.approx(sum(out[k].item() for k in ("recon", "pix_con", "lat_con")))  # Eq. 10


def test_stop_gradient_on_consistency_targets():
    x, z, x_NOISY, x_noisy, z_re = _outputs()
    out = sphere_losses(x, z, x_NOISY, x_noisy, z_re, LossWeights(1.0, 0.0, 1.0, 0.0, 1.0))
    out["pix_con"].backward(retain_graph=True)
    assert x_noisy.grad is None or x_noisy.grad.abs().sum() == 0                 # Eq. 8: sg(D(v_noisy))
    assert x_NOISY.grad.abs().sum() > 0
    out["lat_con"].backward()
    assert z.grad is None or z.grad.abs().sum() == 0                             # Eq. 9: target detached
    assert z_re.grad.abs().sum() > 0


def test_lpips_path_with_random_backbone():
    lp = load_perceptual(pretrained=False)                # random VGG: exercises the code path offline
    assert not any(p.requires_grad for p in lp.parameters())
    x, _, x_NOISY, _, _ = _outputs(n=32)                 # VGG pools 4 times: 32px is the least
    assert lp(x, x).abs().max().item() < 1e-6                                    # identical images: 0
    with_perc = pixel_loss(x_NOISY, x, 1.0, 1.0, lp)
    without = pixel_loss(x_NOISY, x, 1.0, 0.0, lp)
    assert with_perc.item() > without.item()


def test_lpips_offline_error_names_the_file(monkeypatch):
    import lpips.pretrained_networks as pn

    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(pn.tv, "vgg16", offline)
    with pytest.raises(RuntimeError, match=r"vgg16-397923af\.pth.*checkpoints.*--perceptual_weight 0"):
        load_perceptual(pretrained=True)


def test_convnext_mix_is_the_released_average():
    """(LPIPS + w ConvNeXt-logit MSE) / (1 + w), ConvNeXt on 224px ImageNet-normalised inputs."""
    torch.manual_seed(0)
    p = load_perceptual(w_convnext=0.1, pretrained=False)
    assert not any(q.requires_grad for q in p.parameters())
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    lp = p.lpips(a, b).flatten()                                                   # (2,)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    up = lambda x: torch.nn.functional.interpolate((x + 1) / 2, size=224, mode="bilinear", antialias=True)
    cnx = ((p.convnext((up(a) - mean) / std) - p.convnext((up(b) - mean) / std)) ** 2).mean(1)
    torch.testing.assert_close(p(a, b), (lp + 0.1 * cnx) / 1.1)
    assert p(a, a).abs().max().item() < 1e-5


def test_convnext_offline_error_names_the_file(monkeypatch):
    import torchvision

    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torchvision.models, "convnext_small", offline)
    with pytest.raises(RuntimeError, match=r"convnext_small-0c510722\.pth.*checkpoints.*--convnext 0"):
        load_perceptual(w_convnext=0.1, pretrained=False)


def test_loss_ablation_as_released_drops_the_passes_it_does_not_need(tiny_cfg):
    """Tab. 4's rows as the release trains them: without pixel consistency Eq. 7 takes D(v_NOISY) and only B images
    are decoded; without latent consistency nothing is re-encoded (the encoder runs once)."""
    from conftest import randomize_zero_inits
    from model import SphereEncoder
    model = randomize_zero_inits(SphereEncoder(tiny_cfg))
    calls = {"encoder": [], "decoder": []}
    for name in calls:
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: calls[name].append(len(i[0])))
    x, y, sigma = torch.rand(3, 3, 32, 32) * 2 - 1, torch.tensor([0, 1, 2]), torch.tensor([1.0, 2.0, 3.0])
    w = LossWeights(recon_dist=1.0, recon_perc=0.0, con_dist=0.0, con_perc=0.0, lat_con=0.0)
    torch.manual_seed(0)
    z, x_NOISY, x_noisy, z_re = model(x, y, sigma, 0.5 * sigma, p_drop=0.0, pix_con=False, lat_con=False)
    assert x_noisy is None and z_re is None and calls == {"encoder": [3], "decoder": [3]}
    out = sphere_losses(x, z, x_NOISY, x_noisy, z_re, w)
    assert out["recon"].item() == pytest.approx(distance(x_NOISY, x).mean().item())      # Eq. 7 on D(v_NOISY)
    assert out["pix_con"].item() == out["lat_con"].item() == 0 and out["total"].item() == out["recon"].item()
    out["total"].backward()                                                              # the encoder still learns
    assert model.encoder.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    calls["encoder"].clear(), calls["decoder"].clear()
    torch.manual_seed(0)
    z2, x_NOISY2, x_noisy2, z_re2 = model(x, y, sigma, 0.5 * sigma, p_drop=0.0)           # the full pass
    assert calls == {"encoder": [3, 3], "decoder": [6]} and x_noisy2 is not None and z_re2 is not None
    assert torch.allclose(x_NOISY2, x_NOISY, atol=1e-6)                                  # same e: same D(v_NOISY)
