"""The three training losses of the Sphere Encoder (arXiv 2602.15030, Sec. 2.3, Eq. 7-10).

  Eq. 7   pixel reconstruction  L(D(v_noisy), x)                smooth L1 + perceptual
  Eq. 8   pixel consistency     L(D(v_NOISY), sg(D(v_noisy)))   the same, target under stop-grad
  Eq. 9   latent consistency    1 - cos(v, E(D(v_NOISY)))       target v detached
  Eq. 10  total = weighted sum of the three (weights per dataset, docs/reference.md Sec. 4)
Images in [-1, 1]. Optional, as released (`--convnext 0.1`):
perceptual = (LPIPS + 0.1 ConvNeXt-Small logit MSE) / 1.1.
"""
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossWeights:
    """Eq. 10's weights; defaults are CIFAR-10's (docs/reference.md Sec. 4 [released])."""
    recon_dist: float = 1.0
    recon_perc: float = 1.0
    con_dist: float = 0.5
    con_perc: float = 0.5
    lat_con: float = 0.1


def distance(pred, target):
    """Smooth L1 (beta 1) on images mapped to [0, 1], mean per sample: (B,). In fp32, under
    autocast too."""
    return F.smooth_l1_loss((pred.float() + 1) / 2, (target.float() + 1) / 2, reduction="none").flatten(1).mean(1)


def pixel_loss(pred, target, w_dist, w_perc, perceptual=None):
    """L_{smoothL1 + perceptual}(pred, target) of Eq. 7-8, averaged over the batch."""
    loss = w_dist * distance(pred, target).mean()
    if perceptual is not None and w_perc > 0:
        loss = loss + w_perc * perceptual(pred, target).mean()    # Perceptual takes [-1, 1] inputs
    return loss


def cosine_loss(target, pred):
    """1 - cos(target, pred) per sample over all L elements, batch mean (Eq. 9)."""
    cos = F.cosine_similarity(target.flatten(1).float(), pred.flatten(1).float(), dim=1)
    return (1 - cos).mean()


def sphere_losses(x, z, x_NOISY, x_noisy, z_re, w: LossWeights, perceptual=None):
    """Eq. 7-10 from SphereEncoder.forward's outputs: scalars recon, pix_con, lat_con and their sum
    total. Tab. 4's ablation as released: x_noisy None (no pixel consistency) -> Eq. 7 on
    D(v_NOISY); z_re None -> no Eq. 9."""
    zero = x.new_zeros((), dtype=torch.float32)
    recon = pixel_loss(x_NOISY if x_noisy is None else x_noisy, x, w.recon_dist, w.recon_perc,
                       perceptual)                                                   # Eq. 7
    # Eq. 8: the target D(v_noisy) is under stop-grad.
    pix_con = zero if x_noisy is None else pixel_loss(x_NOISY, x_noisy.detach(), w.con_dist, w.con_perc, perceptual)
    # Eq. 9: the cosine is scale-free, so z stands in for v = f(z).
    lat_con = zero if z_re is None else w.lat_con * cosine_loss(z.detach(), z_re)
    total = recon + pix_con + lat_con                                                # Eq. 10
    return {"total": total, "recon": recon, "pix_con": pix_con, "lat_con": lat_con}


class Perceptual(torch.nn.Module):
    """Perceptual distance (B,): LPIPS-VGG, or (LPIPS + w MSE of ConvNeXt logits) / (1 + w)
    (docs/reference.md Sec. 4)."""
    def __init__(self, lpips, convnext=None, w_convnext=0.0):
        super().__init__()
        self.lpips, self.convnext, self.w = lpips, convnext, w_convnext
        # ImageNet's normalization, for the ConvNeXt.
        mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, 3, 1, 1), persistent=False)

    def logits(self, x):                                                   # [-1, 1] -> (B, 1000)
        x = F.interpolate((x + 1) / 2, size=224, mode="bilinear", antialias=True)
        return self.convnext((x - self.mean) / self.std)

    def forward(self, pred, target):
        # LPIPS takes images in [-1, 1]: (B,).
        loss = self.lpips(pred, target).float().flatten(1).mean(1)
        if self.convnext is None:
            return loss
        cnx = F.mse_loss(self.logits(pred), self.logits(target), reduction="none").mean(1)
        return (loss + self.w * cnx) / (1 + self.w)


def load_perceptual(w_convnext=0.0, pretrained=True):
    """The frozen perceptual loss; pretrained=False gives random backbones, for tests and
    benchmarks only."""
    import lpips
    import torchvision
    # What is loaded, its file and the flag that trains without it: for the error message.
    what, file, flag = ("torchvision's VGG-16 weights (LPIPS)", "vgg16-397923af.pth", "--perceptual_weight 0")
    try:
        # lpips uses torchvision's old API, which warns.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            net = lpips.LPIPS(net="vgg", pnet_rand=not pretrained, verbose=False)
        convnext = None
        if w_convnext > 0:
            what, file, flag = ("torchvision's ConvNeXt-Small weights", "convnext_small-0c510722.pth", "--convnext 0")
            weights = (torchvision.models.ConvNeXt_Small_Weights.IMAGENET1K_V1 if pretrained else None)
            convnext = torchvision.models.convnext_small(weights=weights)
    except Exception as err:
        # A failed download (urllib's URLError), a bad file (RuntimeError), ...: all the same to a
        # user, who gets one message.
        raise RuntimeError(f"the perceptual loss needs {what} and could not load them "
                           f"({str(err).splitlines()[0]}). "
                           f"Put https://download.pytorch.org/models/{file} at "
                           f"{torch.hub.get_dir()}/checkpoints/"
                           f"{file}, or train without it: {flag}") from None
    return Perceptual(net, convnext, w_convnext).eval().requires_grad_(False)
