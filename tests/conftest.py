import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_cfg():
    from model import make_config
    return make_config("tiny", "toy", enc_width=32, dec_width=32, enc_depth=1, dec_depth=1,
                       enc_heads=2, dec_heads=2, patch_size=4, latent_dim=8, mixer_depth=1, pixel_head="conv")


def randomize_zero_inits(model, seed=0):
    """Give the zero-initialised layers (AdaLN, output Linears, Mixer gates) random values, so tests
    can see class conditioning and every path do something; scale up the near-zero pixel head."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for vit in (model.encoder.vit, model.decoder.vit):  # std-0.02 class tables: make classes differ
            if vit.y_embed is not None:
                vit.y_embed.weight.normal_(generator=g)
        for p in model.decoder.conv.parameters():      # gain-0.01 pixel head: make its output visible
            p.mul_(30)
    return model
