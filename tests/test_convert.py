"""convert.py: released-format checkpoints (synthetic: released key names and shapes, random
values, some Mixer gates as Python floats) become our checkpoints that sample.py reads.

The released layout, written out independently of convert.py's rules (docs/reference.md Sec. 2 and
issue 12): encoder.x_embedder.{0: patch conv, 1: 1x1 conv}, {net}.blocks.i.*, {net}.ffn.{norm,
adaLN_modulation.1, linear}, encoder.out = Mixer, decoder.x_embedder.{0: Linear, 1: Mixer}
(tok_mixer.mix / chn_mixer.mix, alpha1 / alpha2), decoder.out.{2, 4} = pixel-head convs,
{net}.pos_embed and, in EMA copies, {net}.rope."""
import re
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

import convert
from conftest import ROOT, randomize_zero_inits
from cli import DataError
from model import SphereEncoder, make_config

OURS_TO_RELEASED = [                                 # applied in order to "net.rest"
    (r"^encoder\.patch\.", "encoder.x_embedder.0."), (r"^encoder\.proj\.", "encoder.x_embedder.1."),
    (r"^decoder\.inp\.", "decoder.x_embedder.0."),
    (r"^encoder\.mixer\.", "encoder.out."), (r"^decoder\.mixer\.", "decoder.x_embedder.1."),
    (r"\.token_mix\.", ".tok_mixer.mix."), (r"\.channel_mix\.", ".chn_mixer.mix."),
    (r"\.vit\.y_embed\.", ".y_embedder.embedding_table."),
    (r"\.vit\.blocks\.(\d+)\.ada\.", r".blocks.\1.adaLN_modulation."), (r"\.vit\.blocks\.", ".blocks."),
    (r"\.vit\.norm\.norm\.", ".ffn.norm."), (r"\.vit\.norm\.ada\.", ".ffn.adaLN_modulation."),
    (r"^(encoder|decoder)\.out\.(weight|bias)$", r"\1.ffn.linear.\2"),
    (r"^decoder\.conv\.0\.", "decoder.out.2."), (r"^decoder\.conv\.2\.", "decoder.out.4."),
    (r"^decoder\.conv\.(weight|bias)$", r"decoder.out.2.\1"),
]


def released(model, gates_as_floats=True):
    """Our weights under the release's key names (the format convert.py reads)."""
    out = {}
    for k, v in model.state_dict().items():
        for a, b in OURS_TO_RELEASED:
            k = re.sub(a, b, k)
        if k.endswith(".a"):                                                     # Mixer gates: two scalars
            a1, a2 = v.tolist()
            out[k[:-2] + ".alpha1"] = a1 if gates_as_floats else torch.tensor([a1])
            out[k[:-2] + ".alpha2"] = torch.tensor([a2])
        else:
            out[k] = v.clone()
    for net in ("encoder", "decoder"):                                           # fixed tables, saved as released
        vit = getattr(model, net).vit
        out[f"{net}.pos_embed"] = vit.pos.clone()
    return out


CONFIGS = {
    "cond-conv": dict(size="S", dataset="toy", image_size=16, patch_size=2, latent_dim=8, mixer_depth=1,
                      enc_depth=1, dec_depth=2, num_classes=10, pixel_head="conv"),
    "uncond-linear": dict(size="B", dataset="toy", image_size=64, patch_size=8, latent_dim=16, mixer_depth=2,
                          enc_depth=2, dec_depth=1, num_classes=0, pixel_head="linear"),
}


def make(name, seed=0):
    kw = dict(CONFIGS[name])
    cfg = make_config(kw.pop("size"), kw.pop("dataset"), **kw)
    torch.manual_seed(seed)
    return randomize_zero_inits(SphereEncoder(cfg), seed).eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_convert_recovers_config_and_weights(name):
    m = make(name)
    cfg, sd = convert.convert(released(m))
    assert cfg == m.cfg                                                          # widths, depths, heads, latent, head
    ref = m.state_dict()
    assert set(sd) == set(ref)
    for k in ref:
        torch.testing.assert_close(sd[k], ref[k], rtol=0, atol=0, msg=k)
    m2 = SphereEncoder(cfg).eval()
    m2.load_state_dict(sd)
    x = torch.rand(2, 3, cfg.image_size, cfg.image_size) * 2 - 1
    torch.testing.assert_close(m2.encode(x), m.encode(x))                       # the same function


def _cli(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cli_converts_ema_and_the_result_samples(tmp_path):
    m, ema = make("cond-conv", 0), make("cond-conv", 1)
    src, dst = tmp_path / "ep0007.pth", tmp_path / "conv" / "last.pt"
    torch.save({"model": released(m), "epoch": 7,
                "ema_model": {**released(ema, gates_as_floats=False), "encoder.rope": torch.zeros(1)}}, src)
    r = _cli("convert.py", str(src), str(dst), "--ema")
    assert r.returncode == 0, r.stderr
    assert "10 classes (EMA)" in r.stdout
    ck = torch.load(dst, weights_only=True)
    assert ck["config"] == asdict(ema.cfg) and ck["args"]["alpha"] == 80.0 and ck["args"]["dataset"] == "cifar10"
    torch.testing.assert_close(ck["model"]["decoder.vit.blocks.1.attn.qkv.weight"],
                               ema.state_dict()["decoder.vit.blocks.1.attn.qkv.weight"])
    r = _cli("sample.py", "--ckpt", str(dst), "--steps", "1,2", "--num_samples", "4", "--classes", "2,3",
             "--cfg", "1.4", "--npz", str(tmp_path / "s.npz"))
    assert r.returncode == 0, r.stderr
    import numpy as np
    arr = np.load(tmp_path / "s_2step.npz")["arr_0"]
    assert arr.shape == (4, 16, 16, 3) and arr.dtype == np.uint8 and arr.std() > 0


def test_bad_files_give_one_line(tmp_path, capsys):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    plain = tmp_path / "plain.pth"
    torch.save({"state_dict": {}}, plain)
    m = make("cond-conv")
    sd = released(m)
    sd["decoder.blocks.0.attn.qkv.weight"] = torch.zeros(7, 512)
    bad_shape = tmp_path / "shape.pth"
    torch.save({"model": sd}, bad_shape)
    odd = released(m)
    odd["encoder.blocks.0.extra.weight"] = torch.zeros(1)
    extra = tmp_path / "extra.pth"
    torch.save({"model": odd}, extra)
    cases = [(text, "cannot read"), (plain, "no 'model' entry (found ['state_dict'])"),
             (bad_shape, "decoder.vit.blocks.0.attn.qkv.weight: shape (7, 512)"),
             (extra, "maps to nothing here: encoder.blocks.0.extra.weight"),
             (tmp_path / "missing.pth", "no checkpoint at")]
    for path, message in cases:
        with pytest.raises(SystemExit) as exit_:
            convert.main([str(path), str(tmp_path / "out.pt")])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, (path, err)
    assert not (tmp_path / "out.pt").exists()
    bad_width = released(m)
    bad_width["encoder.x_embedder.0.weight"] = torch.zeros(640, 3, 2, 2)
    with pytest.raises(DataError, match="encoder width 640 fits no released size"):
        convert.convert(bad_width)
