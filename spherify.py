"""The sphere and its noise, one pure function per equation
(arXiv 2602.15030, Sec. 2.1-2.2, 2.4, 6, App. C.2):
  Eq. 1      spherify: RMS-normalize a latent over all its L numbers, onto the sphere of radius sqrt(L)
  Eq. 4-6    noisy_latents: v_NOISY = f(v + sigma e), v_noisy = f(v + s sigma e), the same e
  Eq. 5, C.2 noise_levels: sigma = r tan(alpha), with angle mixing into a high band
  Eq. 11-12  sigma_max: the noise angle alpha <-> sigma = tan(alpha); angle_deg measures it
  Eq. 13     sampling_r: the noise strength at each sampling step
  Alg. 1     generate / refine: the walk on the sphere that samples, with CFG (App. C.1)
  Eq. 2      reconstruct: D(f(E(x))), no noise
"""
import math

import torch


def spherify(z, eps=1e-6):
    """Eq. 1: v = f(z) = sqrt(L) z / ||z|| = z / sqrt(mean(z^2) + eps) (docs/reference.md Sec. 1):
    (B, ...) -> (B, ...)."""
    ms = z.pow(2).flatten(1).mean(1)                      # (B,) mean square per sample
    return z * torch.rsqrt(ms + eps).view(-1, *[1] * (z.dim() - 1))


def sigma_max(alpha_deg):
    """Eq. 11-12: the sigma that turns v by alpha degrees, tan(alpha). For large L, e _|_ v and
    ||e|| ~ ||v||, so sigma e turns v by arctan(sigma)."""
    return math.tan(math.radians(alpha_deg))


SIGMA_80 = sigma_max(80)           # tan(80 deg) = 5.67: the paper's alpha at 32px (Sec. 3)


def angle_deg(a, b):
    """The angle in degrees between a and b, per sample, over all non-batch elements: (B,)."""
    cos = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)
    return torch.rad2deg(torch.acos(cos.clamp(-1, 1)))


def stratified_uniform(n, generator=None, device=None):
    """n draws in [0, 1]: n - 2 jittered strata plus one 0 and one 1, shuffled
    (docs/reference.md Sec. 3, Eq. 5)."""
    if n < 3:
        return torch.rand(n, generator=generator, device=device)
    jitter = torch.rand(n - 2, generator=generator, device=device)
    strata = (torch.arange(n - 2, device=device) + jitter) / (n - 2)     # one draw per 1/(n-2) bin
    # The 0 and the 1 are created on the device, which needs no copy from the host.
    u = torch.cat([strata, torch.zeros(1, device=device), torch.ones(1, device=device)])
    return u[torch.randperm(n, generator=generator, device=device)]


def noise_levels(n, alpha_deg, band_deg=None, p_band=0.1, generator=None, device=None):
    """Eq. 5 with the angle mixing of App. C.2: per-sample noise scales for Eq. 4 and 6,
    (sigma, sigma_sub), each (n,):
      sigma     = r tan(alpha), r ~ U[0, 1]                                          (Eq. 5)
                  or, for the samples with u < p_band (u ~ U[0, 1), one draw per sample), the
                  high band: sigma = tan(alpha) (1 + u (tan(band)/tan(alpha) - 1))  (App. C.2)
      sigma_sub = s r tan(alpha), s ~ U[0, 0.5]: always from the base r             (Eq. 6)
    [released]: the same u picks the band and places sigma in it, so band samples only reach
    the bottom p_band of [tan(alpha), tan(band)] (32px, 80-85 deg: sigma in [5.67, 6.25])."""
    r = stratified_uniform(n, generator, device)           # Eq. 5: r ~ U[0, 1]
    s = 0.5 * stratified_uniform(n, generator, device)     # Eq. 6: s ~ U[0, 0.5]
    sigma = r * sigma_max(alpha_deg)                      # Eq. 5
    sigma_sub = s * sigma                                 # Eq. 6
    if band_deg is not None and p_band > 0:               # App. C.2: angle mixing
        u = torch.rand(n, generator=generator, device=device)
        high = sigma_max(alpha_deg) * (1 + u * (sigma_max(band_deg) / sigma_max(alpha_deg) - 1))
        sigma = torch.where(u < p_band, high, sigma)
    return sigma, sigma_sub


def noisy_latents(v, sigma, sigma_sub, e=None):
    """Eq. 4 and Eq. 6: two noisy copies of v (B, ...) from the same noise e;
    sigma, sigma_sub: (B,)."""
    e = torch.randn_like(v) if e is None else e          # e ~ N(0, I_L), shared by both
    bc = lambda t: t.view(-1, *[1] * (v.dim() - 1))       # (B,) -> (B, 1, ..., 1)
    v_NOISY = spherify(v + bc(sigma) * e)                 # Eq. 4
    v_noisy = spherify(v + bc(sigma_sub) * e)             # Eq. 6
    return v_NOISY, v_noisy


def sampling_r(t, steps, gamma=0.0):
    """Eq. 13: r = (1 - (t-1)/(T-1))^gamma at step t = 2..T; gamma 0: r = 1 (best, Tab. 6).
    The release uses 1 - t/T in place of 1 - (t-1)/(T-1); we follow the paper."""
    assert 2 <= t <= steps, f"step {t} out of 2..{steps}"
    return (1.0 - (t - 1) / (steps - 1)) ** gamma


def guidance_scales(cfg_scale, position):
    """(w_pixel, w_latent) for a CFG scale s (App. C.1): pixel (s, 1), latent (1, s), combo sqrt(s)
    at each. combo applies both only from step 2: step 1 decodes noise and runs no encoder, so its
    guidance is sqrt(s) alone."""
    s = cfg_scale
    return {"pixel": (s, 1.0), "latent": (1.0, s), "combo": (s ** 0.5, s ** 0.5)}[position]


def _guided(fn, inp, y, w, null):
    """fn(inp, y) with CFG: uncond + w (cond - uncond), one batched call;
    only for w > 1 [released]."""
    if y is None or w <= 1.0:
        return fn(inp, y)
    cond, uncond = fn(torch.cat([inp, inp]), torch.cat([y, null])).chunk(2)
    return uncond + w * (cond - uncond)


@torch.no_grad()
def refine(model, x, y, rs, sigma, cfg_scale=1.0, cfg_position="combo", noise="shared", generator=None, trace=None):
    """Algorithm 1's loop from x: per r in rs, encode, re-noise with r sigma e' (sigma = tan(alpha),
    Eq. 12), decode; the image of each round. cfg_scale and cfg_position set the CFG weights
    (guidance_scales, App. C.1). noise "shared": one e' (best, Tab. 6), "independent": a new e'
    each round; trace gets each v."""
    w_pix, w_lat = guidance_scales(cfg_scale, cfg_position)
    null = None if y is None else model.null_labels(len(y), y.device)
    xs, e2 = [], None
    for r in rs:
        z = _guided(model.encode, x, y, w_lat, null).float()                 # latent CFG
        if e2 is None or noise == "independent":
            e2 = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        v = spherify(spherify(z) + r * sigma * e2)                          # Eq. 4 at noise r sigma
        if trace is not None:
            trace.append(v)
        # Pixel CFG, then the clamp to [-1, 1] [released].
        x = _guided(model.decode, v, y, w_pix, null).float().clamp(-1, 1)
        xs.append(x)
    return xs


@torch.no_grad()
def generate(model, e, y=None, steps=4, sigma=SIGMA_80, gamma=0.0, cfg_scale=1.0,
             cfg_position="combo", noise="shared", generator=None, trace=None):
    """Algorithm 1. e: (B, h, w, d) noise, y: (B,) or None, sigma = tan(alpha) (Eq. 12). -> the
    images (B, C, H, W) after each step; steps=1 is D(f(e)) (Eq. 3), steps t = 2..T re-encode at
    r = sampling_r(t, T, gamma) (Eq. 13). cfg_scale, cfg_position, noise: as in refine."""
    w_pix, _ = guidance_scales(cfg_scale, cfg_position)
    null = None if y is None else model.null_labels(len(y), y.device)
    v = spherify(e)                                                         # step 1: no added noise
    if trace is not None:
        trace.append(v)
    x = _guided(model.decode, v, y, w_pix, null).float().clamp(-1, 1)
    rs = [sampling_r(t, steps, gamma) for t in range(2, steps + 1)]        # Eq. 13
    return [x] + refine(model, x, y, rs, sigma, cfg_scale, cfg_position, noise, generator, trace)


@torch.no_grad()
def reconstruct(model, x, y=None):
    """Eq. 2: D(f(E(x))), r = 0: (B, C, H, W), fp32. With y None it uses the null class
    (docs/reference.md Sec. 2)."""
    return model.decode(spherify(model.encode(x, y)), y).float()
