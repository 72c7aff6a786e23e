"""spherify.py against the paper: Eq. 1, 4-6, 11-13 and App. C.2."""
import math

import pytest
import torch

from spherify import (angle_deg, noise_levels, noisy_latents, sampling_r, sigma_max, spherify,
                      stratified_uniform)


@pytest.mark.parametrize("shape", [(3, 4, 4, 8), (2, 100), (5, 2, 2, 1)])
@pytest.mark.parametrize("scale", [0.5, 1e3])  # RMS >> sqrt(eps) = 1e-3
def test_spherify_norm_is_sqrt_L_and_idempotent(shape, scale):
    z = scale * torch.randn(shape, dtype=torch.float64)
    v = spherify(z)
    L = z[0].numel()
    assert v.shape == z.shape
    torch.testing.assert_close(v.flatten(1).norm(dim=1), torch.full((shape[0],), math.sqrt(L), dtype=torch.float64),
                               rtol=1e-4, atol=0)
    torch.testing.assert_close(spherify(v), v, rtol=1e-4, atol=1e-5)            # f(f(z)) = f(z) up to eps


def test_spherify_hand_value_and_zero():
    v = spherify(torch.tensor([[3.0, 4.0]]))            # rms = sqrt(12.5); Eq. 1: sqrt(2) * z / 5
    torch.testing.assert_close(v, torch.tensor([[3.0, 4.0]]) * math.sqrt(2) / 5, rtol=1e-5, atol=0)
    assert torch.equal(spherify(torch.zeros(2, 8)), torch.zeros(2, 8))           # finite at z = 0


def test_sigma_max_is_tan_alpha():
    assert sigma_max(45) == pytest.approx(1.0)
    assert sigma_max(88) == pytest.approx(28.636, abs=1e-3)                     # docs/reference.md Sec. 3
    assert sigma_max(80) == pytest.approx(5.671, abs=1e-3)


@pytest.mark.parametrize("alpha", [20.0, 45.0, 80.0, 85.0])
def test_noise_angle_matches_arctan_sigma_for_large_L(alpha):
    """Eq. 11-12: in high dimension e is orthogonal to v with ||e|| ~ sqrt(L), so the angle
    between v and v_NOISY is arctan(sigma)."""
    torch.manual_seed(0)
    v = spherify(torch.randn(4, 2 ** 20))                          # error ~ sigma / sqrt(L) radians
    sig = torch.full((4,), sigma_max(alpha))
    v_NOISY, v_noisy = noisy_latents(v, sig, 0.5 * sig)
    assert angle_deg(v, v_NOISY) == pytest.approx(torch.full((4,), alpha), abs=0.3)
    expected_sub = math.degrees(math.atan(0.5 * sigma_max(alpha)))
    assert angle_deg(v, v_noisy) == pytest.approx(torch.full((4,), expected_sub), abs=0.3)


def test_noisy_latents_share_e_and_hand_value():
    v = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    e = torch.tensor([[1.0, -1.0, 0.0, 0.0]])
    v_NOISY, v_noisy = noisy_latents(v, torch.tensor([1.0]), torch.tensor([0.0]), e)
    torch.testing.assert_close(v_noisy, v)                                      # s = 0: no noise
    u = torch.tensor([[2.0, 0.0, 1.0, 1.0]])                                     # v + 1 * e
    torch.testing.assert_close(v_NOISY, u * 2 / u.norm())                       # onto radius sqrt(4) = 2
    torch.manual_seed(1)                                                         # same e for both (Eq. 6)
    v = spherify(torch.randn(3, 50))
    a, b = noisy_latents(v, torch.full((3,), 2.0), torch.full((3,), 2.0))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("alpha, band, top", [(80.0, 85.0, 6.2472), (85.0, 89.0, 16.016)])
def test_noise_levels_ranges_and_band_rate(alpha, band, top):
    """App. C.2 as released (docs/reference.md Sec. 3): 10% of samples from the band, and the one u
    that picks the band also places sigma in it, so band sigmas fill only the bottom tenth of
    [tan alpha, tan band]: [5.67, 6.25] at 32px (80-80.9 deg), [11.43, 16.02] at 256px."""
    g = torch.Generator().manual_seed(0)
    n = 40_000
    sigma, sub = noise_levels(n, alpha, band, p_band=0.1, generator=g)
    lo = sigma_max(alpha)
    assert top == pytest.approx(lo * (1 + 0.1 * (sigma_max(band) / lo - 1)), rel=1e-4)   # hand-computed
    high = sigma > lo + 1e-6
    assert abs(high.float().mean().item() - 0.1) < 0.01                          # App. C.2: 10% from the band
    assert sigma[high].min().item() >= lo and sigma[high].max().item() <= top + 1e-4
    assert sigma[high].max().item() > top - 0.02 * (top - lo)                    # and it fills that range
    assert sigma[high].mean().item() == pytest.approx((lo + top) / 2, rel=0.01)  # uniformly
    assert ((sigma[~high] >= 0) & (sigma[~high] <= lo + 1e-6)).all()
    assert (sub >= 0).all() and (sub <= 0.5 * lo + 1e-6).all()                   # Eq. 6: s <= 0.5, base r
    assert (sub[~high] <= 0.5 * sigma[~high] + 1e-6).all()
    sigma, _ = noise_levels(n, alpha, None, generator=g)                          # no band: all base
    assert sigma.max().item() <= lo + 1e-6


def test_stratified_uniform_covers_0_to_1():
    u = stratified_uniform(66, torch.Generator().manual_seed(0))
    s = u.sort().values
    assert s[0] == 0 and s[-1] == 1
    inner = s[1:-1]                                                              # one draw per 1/64 bin
    assert torch.equal((inner * 64).floor().clamp(max=63), torch.arange(64, dtype=torch.float))


def test_sampling_r_eq13():
    assert [sampling_r(t, 5, 0.0) for t in range(2, 6)] == [1.0, 1.0, 1.0, 1.0]    # gamma 0: fixed
    assert [sampling_r(t, 5, 1.0) for t in range(2, 6)] == [0.75, 0.5, 0.25, 0.0]  # linear decay
    assert sampling_r(3, 5, 2.0) == pytest.approx(0.25)
