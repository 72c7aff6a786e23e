"""Convert a checkpoint of the authors' release ({"model", "epoch", "ema_model"?}) into ours. It computes
model.py's function (docs/reference.md Sec. 2), so this renames keys and reads the config off the shapes.
    python convert.py sphere-l-imagenet/ep0800.pth out/sphere-l-imagenet/last.pt --ema
    python sample.py --ckpt out/sphere-l-imagenet/last.pt --steps 1,4 --cfg 1.4   # model card settings
"""
import math
import os
import re
from dataclasses import asdict

import torch

from checkpoint import read_checkpoint, save_checkpoint
from cli import ANGLE, DataError, die, parser, script
from model import SIZES, Config, SphereEncoder

# The heads of each released width: a checkpoint's shapes do not tell them.
HEADS = {w: h for pair in SIZES.values() for w, _, h in pair if w >= 512}
DATASET_BY_CLASSES = {1000: "imagenet", 102: "flowers", 10: "cifar10", 0: "folder"}

# A released key -> ours: regex substitutions, all of them applied to every key, in this order.
RULES = [
    # The encoder's Mixer. This rule must come before ffn.linear -> out below, which makes keys
    # named encoder.out. of its own.
    (r"^encoder\.out\.", "encoder.mixer."),
    (r"^decoder\.x_embedder\.1\.", "decoder.mixer."),                   # the decoder's Mixer
    (r"\.tok_mixer\.mix\.", ".token_mix."), (r"\.chn_mixer\.mix\.", ".channel_mix."),
    # The encoder's convs.
    (r"^encoder\.x_embedder\.0\.", "encoder.patch."),
    (r"^encoder\.x_embedder\.1\.", "encoder.proj."),
    (r"^decoder\.x_embedder\.0\.", "decoder.inp."),                     # the decoder's input Linear
    (r"\.y_embedder\.embedding_table\.", ".vit.y_embed."), (r"\.adaLN_modulation\.1\.", ".ada.1."),
    # The transformer blocks; inside them norm1/2, attn.qkv/proj and mlp.w12/w3 keep their names.
    (r"^(encoder|decoder)\.blocks\.", r"\1.vit.blocks."),
    (r"\.ffn\.norm\.", ".vit.norm.norm."), (r"\.ffn\.ada\.", ".vit.norm.ada."),
    # The last Linear (width -> d, or width -> pixels).
    (r"\.ffn\.linear\.", ".out."),
    # The pixel head's convs.
    (r"^decoder\.out\.2\.", "decoder.conv.0."), (r"^decoder\.out\.4\.", "decoder.conv.2."),
]


def infer_config(sd):
    """A Config from the shapes of a released state dict (keys as released). An odd Mixer depth,
    token count or pixel head surfaces in convert()'s key and shape checks."""
    # The number of blocks under a key prefix.
    count = lambda prefix: len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})
    if any("inctx" in k or "cond_proj" in k for k in sd):
        raise DataError("in-context tokens / text conditioning are not part of this implementation; cannot convert")
    try:
        patch = sd["encoder.x_embedder.0.weight"]                              # (width, 3, P, P)
        enc_w, P = patch.shape[0], patch.shape[-1]
        dec_w = sd["decoder.blocks.0.norm1.weight"].shape[0]
        d = sd["encoder.ffn.linear.weight"].shape[0]
        # The token mixer is N x N, so the grid is sqrt(N).
        grid = math.isqrt(sd["encoder.out.blocks.0.tok_mixer.mix.0.weight"].shape[0])
    except KeyError as err:
        raise DataError(f"not a released Sphere Encoder checkpoint: no key {err}") from None
    for name, w in (("encoder", enc_w), ("decoder", dec_w)):
        if w not in HEADS:
            raise DataError(f"{name} width {w} fits no released size (widths {sorted(HEADS)})")
    pixel_head = "conv" if "decoder.out.4.weight" in sd else "linear"
    table = sd.get("encoder.y_embedder.embedding_table.weight")
    return Config(image_size=grid * P, patch_size=P, latent_dim=d,
                  enc_width=enc_w, enc_depth=count("encoder.blocks."), enc_heads=HEADS[enc_w],
                  dec_width=dec_w, dec_depth=count("decoder.blocks."), dec_heads=HEADS[dec_w],
                  mixer_depth=count("encoder.out.blocks."),
                  num_classes=0 if table is None else table.shape[0] - 1, pixel_head=pixel_head)


def convert(released):
    """Released state dict -> (Config, ours); Mixer gates alpha1, alpha2 become
    a = [alpha1, alpha2]."""
    cfg = infer_config(released)
    out, source = {}, {}
    # The linear pixel head has one conv, decoder.conv, where the conv head has a stack.
    rules = RULES + ([(r"^decoder\.conv\.0\.", "decoder.conv.")] if cfg.pixel_head == "linear" else [])
    for k, v in released.items():
        # Fixed tables (positions, RoPE): the model recomputes them.
        if k.endswith(("pos_embed", "rope")):
            continue
        # A key that no rule knows is left as is, and the check below reports it.
        new = k
        for a, b in rules:
            new = re.sub(a, b, new)
        source[new] = k
        v = torch.as_tensor(v, dtype=torch.float32)
        # A Mixer gate goes into its block's a; a gate missing from the release stays 0.
        if m := re.match(r"(.*mixer\.blocks\.\d+)\.alpha([12])$", new):
            out.setdefault(m[1] + ".a", torch.zeros(2))[int(m[2]) - 1] = v.reshape(())
        else:
            out[new] = v
    ours = SphereEncoder(cfg).state_dict()
    if unknown := sorted(set(out) - set(ours)):
        raise DataError(f"released key maps to nothing here: {source[unknown[0]]} ({len(unknown)} such keys)")
    if missing := sorted(set(ours) - set(out)):
        raise DataError(f"the checkpoint lacks a weight for {missing[0]} ({len(missing)} missing)")
    for k, v in out.items():
        if v.shape != ours[k].shape:
            raise DataError(f"{k}: shape {tuple(v.shape)} does not fit the inferred config's {tuple(ours[k].shape)}")
    return cfg, out


@script
def main(argv=None):
    p = parser(__doc__, device=False)
    p.add_argument("src", help="a released checkpoint (.pth)")
    p.add_argument("dst", help="where to write our checkpoint (e.g. out/sphere-l-imagenet/last.pt)")
    p.add_argument("--ema", action="store_true", help="take the EMA weights (ema_model)")
    p.add_argument("--dataset", default=None, help="its dataset, for FID (default: from the class count)")
    p.add_argument("--data_dir", default=None, help="where that dataset lives (for FID, viz.py, edit.py)")
    p.add_argument("--alpha", type=ANGLE, default=None, help="training noise angle (default: 80 up to 64px, 85 above)")
    args = p.parse_args(argv)
    # read_checkpoint loads weights only: the file comes from the internet.
    try:
        ckpt = read_checkpoint(args.src)
    except DataError as err:
        die(f"cannot read the release: {err}")
    key = "ema_model" if args.ema else "model"
    if not isinstance(ckpt, dict) or key not in ckpt:
        found = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        die(f"{args.src!r} is not a released checkpoint: no {key!r} entry (found {found})")
    cfg, sd = convert(ckpt[key])
    alpha = args.alpha or (80.0 if cfg.image_size <= 64 else 85.0)     # docs/reference.md Sec. 3
    targs = dict(dataset=args.dataset or DATASET_BY_CLASSES.get(cfg.num_classes, "folder"),
                 data_dir=args.data_dir, image_size=cfg.image_size, alpha=alpha,
                 band=min(alpha + 5, 89), converted_from=args.src, epoch=ckpt.get("epoch"),
                 ema=args.ema)
    os.makedirs(os.path.dirname(os.path.abspath(args.dst)), exist_ok=True)
    save_checkpoint({"model": sd, "config": asdict(cfg), "args": targs, "step": 0}, args.dst)
    n = sum(v.numel() for v in sd.values())
    print(f"wrote {args.dst}: {n / 1e6:.1f}M params, {cfg.image_size}px, "
          f"latent {cfg.grid}x{cfg.grid}x{cfg.latent_dim}, enc {cfg.enc_width}x{cfg.enc_depth}, "
          f"dec {cfg.dec_width}x{cfg.dec_depth}, {cfg.pixel_head} head, "
          f"{cfg.num_classes or 'no'} classes{' (EMA)' if args.ema else ''}")


if __name__ == "__main__":
    main()
