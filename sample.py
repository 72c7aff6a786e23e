"""Generate images with a trained Sphere Encoder: Algorithm 1 with classifier-free guidance.

Sphere Encoder (arXiv 2602.15030): Alg. 1 / Sec. 2.4 (sampling), Eq. 13 (noise schedule),
App. C.1 (CFG positions). Step 1 decodes a random point on the sphere, D(f(e)); every further
step re-encodes the image, puts it back on the sphere with noise r sigma_max e', and decodes.

    python sample.py --ckpt out/toy/last.pt --steps 4
"""
import torch

from spherify import spherify, sampling_r


def guidance_scales(cfg, position):
    """(w_pixel, w_latent) for a total CFG strength cfg. Combo splits it as sqrt(cfg) at each
    position so the total is cfg (App. C.1)."""
    return {"pixel": (cfg, 1.0), "latent": (1.0, cfg), "combo": (cfg ** 0.5, cfg ** 0.5)}[position]


def _guided(fn, inp, y, w, null):
    """fn(inp, y) with CFG: uncond + w (cond - uncond), one batched call. w == 1: plain fn."""
    if y is None or w == 1.0:
        return fn(inp, y)
    cond, uncond = fn(torch.cat([inp, inp]), torch.cat([y, null])).chunk(2)
    return uncond + w * (cond - uncond)


@torch.no_grad()
def generate(model, e, y=None, steps=4, sigma_max=5.67, gamma=0.0, cfg=1.0, cfg_position="combo",
             noise="shared", generator=None):
    """Algorithm 1. e: (B, h, w, d) Gaussian noise; y: (B,) labels or None (null class /
    unconditional). Returns a list of the images after each step, each (B, C, H, W) in [-1, 1]:
    a step is one decoder pass, so steps=1 is exactly D(f(e)) (Eq. 3).

    noise: "shared" draws e' once at the first re-encode and reuses it (the paper's best, Tab. 6),
    "independent" draws a fresh e' every step. gamma: Eq. 13 (0 = fixed r = 1, the best)."""
    w_pix, w_lat = guidance_scales(cfg, cfg_position)
    null = None if y is None else model.null_labels(len(y), y.device)
    decode = lambda v: _guided(model.decode, v, y, w_pix, null).float().clamp(-1, 1)  # pixel CFG, clamp [released]
    v = spherify(e)                                                         # step 1: no added noise
    xs = [decode(v)]
    e2 = None
    for t in range(2, steps + 1):
        z = _guided(model.encode, xs[-1], y, w_lat, null).float()           # latent CFG
        if e2 is None or noise == "independent":
            e2 = torch.randn(e.shape, generator=generator, device=e.device, dtype=e.dtype)
        r = sampling_r(t, steps, gamma)                                     # Eq. 13
        v = spherify(spherify(z) + r * sigma_max * e2)                      # Eq. 4 at r sigma_max
        xs.append(decode(v))
    return xs
