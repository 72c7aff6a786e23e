"""The Sphere Encoder (arXiv 2602.15030, Sec. 2.4 and 3; docs/reference.md Sec. 2): a ViT +
MLP-Mixer encoder onto the sphere and a Mixer + ViT decoder back. Read bottom-up: positions ->
attention, SwiGLU -> AdaLN-Zero Block -> Mixer -> Encoder, Decoder -> SphereEncoder, whose forward()
is the training pass of Eq. 4-9. encode: (B, 3, H, W) -> (B, h, w, d); decode(spherify(z), y) ->
(B, 3, H, W) in [-1, 1]. Under bf16 autocast (GPU; DDP, FSDP alike) matmuls, convs and attention run
in bf16; residual streams, RMSNorms, RoPE's rotation, pixel output in fp32 (docs/scaling.md).
`python model.py` prints the parameter count and forward FLOPs of every preset.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from spherify import spherify, noisy_latents


@dataclass
class Config:
    """Defaults: the quick start's model (make_config("tiny", "toy")); presets come from
    make_config."""
    image_size: int = 32
    channels: int = 3
    # P: the latent grid is h x w = (H/P) x (W/P).
    patch_size: int = 8
    # d: the channels per latent token, so L = h*w*d.
    latent_dim: int = 128
    enc_width: int = 64
    enc_depth: int = 1
    enc_heads: int = 2
    dec_width: int = 128
    dec_depth: int = 3
    dec_heads: int = 4
    # The SwiGLU hidden width is 2/3 * mlp_ratio * width.
    mlp_ratio: float = 4.0
    # MLP-Mixer layers after the encoder ViT and before the decoder ViT.
    mixer_depth: int = 2
    # 0 means unconditional: no class table, no modulation.
    num_classes: int = 10
    # "conv" (CIFAR-10) or "linear" (256px, toy), docs/reference.md Sec. 2.
    pixel_head: str = "linear"

    @property
    def grid(self): return self.image_size // self.patch_size            # h = w

    @property
    def latent_size(self): return self.grid ** 2 * self.latent_dim      # L = h * w * d


# The transformer sizes: SIZES[size] is (encoder, decoder), each (width, depth, heads) [released].
# The paper's Sphere-L is an L encoder with an L decoder (Sec. 3.1).
PAPER_SIZES = {"S": (512, 8, 8), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
SIZES = {"tiny": ((64, 1, 2), (128, 3, 4)), **{k: (t, t) for k, t in PAPER_SIZES.items()}}
# The latent shape h x w x d of each dataset (docs/reference.md Sec. 2).
LATENTS = {
    "toy": dict(image_size=32, patch_size=8, latent_dim=128, mixer_depth=2,
                pixel_head="linear", num_classes=10),                           # 4x4x128
    "cifar10": dict(image_size=32, patch_size=2, latent_dim=8, mixer_depth=2,
                    pixel_head="conv", num_classes=10),                         # 16x16x8
    "imagenet": dict(image_size=256, patch_size=8, latent_dim=64, mixer_depth=4,
                     pixel_head="linear", num_classes=1000),                    # 32x32x64
    "flowers": dict(image_size=256, patch_size=8, latent_dim=128, mixer_depth=4,
                    pixel_head="linear", num_classes=102),                      # 32x32x128
    "animalfaces": dict(image_size=256, patch_size=8, latent_dim=128, mixer_depth=4,
                        pixel_head="linear", num_classes=0),                    # 32x32x128
}


def latent_for(image_size):
    """A latent for any image size as in the paper: P = 2 up to 64px, else H/32; d = 2 P^2, so that
    3HW/L = 1.5 (App. C.5)."""
    p = 2 if image_size <= 64 else image_size // 32
    return dict(image_size=image_size, patch_size=p, latent_dim=2 * p * p,
                mixer_depth=2 if image_size <= 64 else 4,
                pixel_head="conv" if image_size <= 64 else "linear")


def make_config(size="tiny", dataset="toy", **overrides):
    """Config = transformer size (SIZES) x latent shape of the dataset (LATENTS), then overrides.

    Ours, for the CPU quick start: "tiny" (the encoder runs twice a step, on x and on D(v_NOISY) of
    Eq. 9, and took half the step; a 64 x 1 encoder buys 1.4x the images a minute) and "toy"
    (4x4x128, ratio 1.5, at P = 8: 16 tokens, a third of the step at P = 4; docs/experiments.md)."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; choose from {list(SIZES)}")
    (ew, ed, eh), (dw, dd, dh) = SIZES[size]
    latent = LATENTS.get(dataset) or latent_for(overrides.get("image_size", 32))
    kw = dict(enc_width=ew, enc_depth=ed, enc_heads=eh, dec_width=dw, dec_depth=dd, dec_heads=dh)
    return Config(**{**kw, **latent, **overrides})


def sincos_2d(grid, dim):
    """2D sin-cos positions (Sec. 2.4): [sin, cos] of the column, then of the row [released]:
    (grid*grid, dim)."""
    assert dim % 4 == 0
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    angs = [pos.flatten()[:, None] * omega[None] for pos in (cols, rows)]   # 2 x (N, dim/4)
    return torch.cat([f(a) for a in angs for f in (torch.sin, torch.cos)], dim=1).float()


def rope_2d(grid, head_dim, theta=10000.0):
    """2D RoPE (Sec. 2.4): the first half of a head turns with the row, the second with the column;
    the rotated pairs are (2i, 2i+1) [released]. Returns cos, sin, each (N, hd)."""
    assert head_dim % 4 == 0
    freqs = 1.0 / theta ** (torch.arange(head_dim // 4) / (head_dim // 4))  # (hd/4,)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    # The row angles, then the column angles: (N, hd/2); then each angle twice, once per channel of
    # its pair (2i, 2i+1): (N, hd).
    ang = torch.cat([rows.flatten()[:, None] * freqs, cols.flatten()[:, None] * freqs], 1)
    ang = ang.repeat_interleave(2, dim=1)
    return ang.cos(), ang.sin()


def apply_rope(x, cos, sin):
    """Rotate each channel pair (2i, 2i+1) of x (B, heads, N, hd) by its position's angle:
    fp32 math, x's dtype out."""
    xf = x.float()
    x1, x2 = xf.unflatten(-1, (-1, 2)).unbind(-1)                   # (B, heads, N, hd/2) each
    return (xf * cos + torch.stack([-x2, x1], dim=-1).flatten(-2) * sin).to(x.dtype)


def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]                        # (B, N, D)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)                                  # fused q, k, v
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)                   # (B, heads, N, hd)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D))


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)                               # gate and value at once
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class Block(nn.Module):
    """Pre-norm block with AdaLN-Zero (DiT): zero-init shift, scale, gate from c; c None: plain
    residuals."""
    def __init__(self, dim, heads, mlp_ratio, cond):
        super().__init__()
        self.norm1 = nn.RMSNorm(dim, eps=1e-6)                      # learned affine [released]
        self.attn = Attention(dim, heads)
        self.norm2 = nn.RMSNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim, int(2 / 3 * mlp_ratio * dim))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim)) if cond else None

    def forward(self, x, c, rope):
        if self.ada is None:
            x = x + self.attn(self.norm1(x), rope)
            return x + self.mlp(self.norm2(x))
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c).chunk(6, dim=-1)         # 6 x (B, D)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), sh1, sc1), rope)
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), sh2, sc2))


class FinalNorm(nn.Module):
    """AdaLN-modulated RMSNorm (zero-init); without classes the identity [released]."""
    def __init__(self, dim, cond):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=1e-6) if cond else None
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim)) if cond else None

    def forward(self, x, c):
        return x if self.ada is None else modulate(self.norm(x), *self.ada(c).chunk(2, dim=-1))


class MixerBlock(nn.Module):
    """x += a1 TokenMix(norm(x)); x += a2 ChannelMix(norm(x)); a1 = a2 = 0 at init [released]."""
    def __init__(self, tokens, dim):
        super().__init__()
        self.norm1 = nn.RMSNorm(dim, eps=1e-6)
        self.token_mix = nn.Sequential(nn.Linear(tokens, tokens), nn.SiLU(), nn.Linear(tokens, tokens))
        self.norm2 = nn.RMSNorm(dim, eps=1e-6)
        self.channel_mix = nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))
        self.a = nn.Parameter(torch.zeros(2))

    def forward(self, x):                                                   # (B, N, D), fp32
        x = x + self.a[0] * self.token_mix(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.a[1] * self.channel_mix(self.norm2(x))


class Mixer(nn.Module):
    """MLP-Mixer layers, then an RMSNorm that bounds the latent magnitude for stability
    (Sec. 2.4)."""
    def __init__(self, tokens, dim, depth):
        super().__init__()
        self.blocks = nn.ModuleList([MixerBlock(tokens, dim) for _ in range(depth)])
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        # When set, the backward pass recomputes each block instead of storing its activations.
        self.grad_ckpt = False

    def forward(self, x):
        # The residual stream is kept in fp32.
        x = x.float()
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if self.grad_ckpt else blk(x)
        return self.norm(x)


class ViT(nn.Module):
    """Sin-cos positions, AdaLN-Zero blocks with 2D RoPE, final modulated norm; (B, N, D)."""
    def __init__(self, grid, dim, depth, heads, mlp_ratio, num_classes):
        super().__init__()
        cond = num_classes > 0
        # One row per class, and a last row for the null class.
        self.y_embed = nn.Embedding(num_classes + 1, dim) if cond else None
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio, cond) for _ in range(depth)])
        self.norm = FinalNorm(dim, cond)
        # Fixed tables: the sin-cos positions (1, N, D) and RoPE's cos, sin stacked as (2, N, hd).
        self.register_buffer("pos", sincos_2d(grid, dim)[None], persistent=False)
        self.register_buffer("rope", torch.stack(rope_2d(grid, dim // heads)), persistent=False)
        # When set, the backward pass recomputes each block instead of storing its activations.
        self.grad_ckpt = False

    def forward(self, x, y):
        # c (B, D) is the class embedding. y holds labels (B,), or class weights (B, K+1) that mix
        # the embeddings.
        c = None
        if self.y_embed is not None:
            c = y @ self.y_embed.weight if y.is_floating_point() else self.y_embed(y)
        # The positions are fp32, so adding them makes the residual stream fp32.
        x = x + self.pos
        for blk in self.blocks:
            x = (checkpoint(blk, x, c, self.rope, use_reentrant=False) if self.grad_ckpt else blk(x, c, self.rope))
        return self.norm(x, c)


class Encoder(nn.Module):
    """Patchify -> ViT -> Linear(width, d) -> Mixer -> z (B, N, d)  [released order]."""
    def __init__(self, cfg):
        super().__init__()
        w, N = cfg.enc_width, cfg.grid ** 2
        self.patch = nn.Conv2d(cfg.channels, w, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.proj = nn.Conv2d(w, w, 1)
        self.vit = ViT(cfg.grid, w, cfg.enc_depth, cfg.enc_heads, cfg.mlp_ratio, cfg.num_classes)
        self.out = nn.Linear(w, cfg.latent_dim)
        self.mixer = Mixer(N, cfg.latent_dim, cfg.mixer_depth)

    def forward(self, x, y):                                                # (B, C, H, W)
        x = self.proj(self.patch(x)).flatten(2).transpose(1, 2)             # (B, N, width)
        return self.mixer(self.out(self.vit(x, y)))                         # (B, N, d)


class Decoder(nn.Module):
    """Linear(d, width) -> Mixer -> ViT -> pixel head -> tanh: (B, N, d) -> (B, C, H, W)."""
    def __init__(self, cfg):
        super().__init__()
        w, N, P, C = cfg.dec_width, cfg.grid ** 2, cfg.patch_size, cfg.channels
        self.cfg = cfg
        self.inp = nn.Linear(cfg.latent_dim, w)
        self.mixer = Mixer(N, w, cfg.mixer_depth)
        self.vit = ViT(cfg.grid, w, cfg.dec_depth, cfg.dec_heads, cfg.mlp_ratio, cfg.num_classes)
        if cfg.pixel_head == "linear":
            # P*P*C pixels per token, un-patchified, then a 3x3 conv that smooths the seams.
            self.out = nn.Linear(w, P * P * C)
            self.conv = nn.Conv2d(C, C, 3, padding=1, padding_mode="reflect")
        else:
            # "conv": 32 channels per token, upsampled by a conv stack.
            self.out = nn.Linear(w, 32)
            self.conv = nn.Sequential(
                nn.Conv2d(32, 32, 3, padding=1, padding_mode="reflect"), nn.SiLU(),
                nn.ConvTranspose2d(32, C, P + 2, stride=P, padding=1))

    def forward(self, v, y):                                                # (B, N, d)
        x = self.out(self.vit(self.mixer(self.inp(v)), y))                  # (B, N, out)
        x = x.transpose(1, 2).unflatten(2, (self.cfg.grid, self.cfg.grid))  # (B, out, h, w)
        # The linear head un-patchifies: a token's channels are ordered (c, p1, p2).
        if self.cfg.pixel_head == "linear":
            x = F.pixel_shuffle(x, self.cfg.patch_size)                     # (B, C, H, W)
        return torch.tanh(self.conv(x).float())                 # (B, C, H, W) in [-1, 1], fp32


class SphereEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.initialize()

    def initialize(self):
        """Init per docs/reference.md Sec. 2 [released]; convs get Xavier on their 2-D view
        (out, in*k*k)."""
        xavier_2d = lambda w, gain=1.0: nn.init.xavier_uniform_(w.view(w.shape[0], -1), gain=gain)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                xavier_2d(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # A conditional ViT is AdaLN-Zero: its modulation layers start at zero.
        for vit in (self.encoder.vit, self.decoder.vit):
            if vit.y_embed is not None:
                nn.init.normal_(vit.y_embed.weight, std=0.02)
                for m in [b.ada for b in vit.blocks] + [vit.norm.ada]:
                    nn.init.zeros_(m[1].weight), nn.init.zeros_(m[1].bias)
        # The decoder's input stage (its input Linear and Mixer) gets N(0, 1) weights.
        for m in [self.decoder.inp, *self.decoder.mixer.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=1.0)
        # As in DiT, the last Linear of each network starts at zero.
        for last in (self.encoder.out, self.decoder.out):
            nn.init.zeros_(last.weight), nn.init.zeros_(last.bias)
        for m in self.decoder.conv.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                xavier_2d(m.weight, gain=0.01)

    def null_labels(self, batch, device=None):
        """(batch,) labels of the null class, the class table's row num_classes."""
        return torch.full((batch,), self.cfg.num_classes, dtype=torch.long, device=device)

    def labels(self, y, batch, device):
        """y, or the null class where y is None; None for an unconditional model."""
        return (None if self.cfg.num_classes == 0 else self.null_labels(batch, device) if y is None else y)

    def drop_labels(self, y, p):
        """Replace each label by the null class with probability p (Sec. 2.4: p = 0.1 for CFG)."""
        if y is None or p <= 0:
            return y
        return torch.where(torch.rand(y.shape, device=y.device) < p, self.cfg.num_classes, y)

    def encode(self, x, y=None):
        """E: images (B, C, H, W) in [-1, 1] -> latent z (B, h, w, d), before spherify."""
        z = self.encoder(x, self.labels(y, len(x), x.device))              # (B, N, d)
        return z.unflatten(1, (self.cfg.grid, self.cfg.grid))               # (B, h, w, d)

    def decode(self, v, y=None):
        """D: a point on the sphere, (B, h, w, d) or (B, L) -> images (B, C, H, W) in [-1, 1]."""
        v = v.reshape(len(v), self.cfg.grid ** 2, self.cfg.latent_dim)      # (B, N, d)
        return self.decoder(v, self.labels(y, len(v), v.device))

    def forward(self, x, y, sigma, sigma_sub, p_drop=0.1, pix_con=True, lat_con=True):
        """The training pass, Eq. 4-9, one call (p_drop per network call, Sec. 2.4). Returns z
        (target of Eq. 9), x_NOISY = D(v_NOISY), x_noisy = D(v_noisy), z_re = E(D(v_NOISY)).
        The loss ablation (Tab. 4) as released: without pixel consistency only v_NOISY is decoded
        (x_noisy None), without latent consistency nothing is re-encoded (z_re None)."""
        y = self.labels(y, x.shape[0], x.device)
        z = self.encode(x, self.drop_labels(y, p_drop))                    # (B, h, w, d)
        v_NOISY, v_noisy = noisy_latents(spherify(z), sigma, sigma_sub)   # Eq. 1, 4, 6
        # With pixel consistency both noisy latents are decoded in one call: (2B, h, w, d).
        v = torch.cat([v_NOISY, v_noisy]) if pix_con else v_NOISY
        # Each network call draws its own label dropout.
        y2 = None if y is None else self.drop_labels(y.repeat(len(v) // len(x)), p_drop)
        x_NOISY, x_noisy = (self.decode(v, y2).chunk(2) if pix_con
                            else (self.decode(v, y2), None))               # (B, C, H, W)
        z_re = self.encode(x_NOISY, self.drop_labels(y, p_drop)) if lat_con else None   # Eq. 9
        return z, x_NOISY, x_noisy, z_re

    def set_grad_checkpointing(self, on=True):
        for m in (self.encoder.vit, self.decoder.vit, self.encoder.mixer, self.decoder.mixer):
            m.grad_ckpt = on

    def num_params(self): return sum(p.numel() for p in self.parameters())

    def flops_per_image(self):
        """Forward matmul FLOPs per image {"encoder", "decoder"}: Linear 2 rows in out, attention
        4 N^2 width, AdaLN once per image, pixel-head convs."""
        cfg, N, P, C = self.cfg, self.cfg.grid ** 2, self.cfg.patch_size, self.cfg.channels

        def vit(w, depth):
            hidden = int(2 / 3 * cfg.mlp_ratio * w)
            # AdaLN: shift, scale and gate from c, once per image.
            ada = (depth * 12 * w * w + 4 * w * w) if cfg.num_classes else 0
            return depth * (2 * N * (4 * w * w + 3 * w * hidden) + 4 * N * N * w) + ada
        # Token mixing, then channel mixing.
        mixer = lambda D: cfg.mixer_depth * (2 * D * 2 * N * N + 2 * N * 4 * D * D)
        ew, dw, d = cfg.enc_width, cfg.dec_width, cfg.latent_dim
        enc = 2 * N * (C * P * P * ew + ew * ew + ew * d) + vit(ew, cfg.enc_depth) + mixer(d)
        # The pixel head: "linear" is a Linear and a 3x3 conv; "conv" is a Linear, a 3x3 conv and
        # a ConvTranspose.
        head = (2 * N * dw * P * P * C + 2 * 9 * C * C * N * P * P if cfg.pixel_head == "linear"
                else 2 * N * (dw * 32 + 9 * 32 * 32 + 32 * C * (P + 2) ** 2))
        dec = 2 * N * d * dw + mixer(dw) + vit(dw, cfg.dec_depth) + head
        return {"encoder": enc, "decoder": dec}


if __name__ == "__main__":
    for ds in LATENTS:
        for size in SIZES:
            with torch.device("meta"):
                m = SphereEncoder(make_config(size, ds))
            f = m.flops_per_image()
            print(f"{size:>4} {ds:<11} params {m.num_params() / 1e6:8.1f}M  "
                  f"latent {m.cfg.grid}x{m.cfg.grid}x{m.cfg.latent_dim}  "
                  f"fwd GFLOPs/img enc {f['encoder'] / 1e9:7.2f} dec {f['decoder'] / 1e9:7.2f}")
