"""The discriminator of Sec. 3.3: the pretrained SDXL UNet's encoder and mid block as backbone, a small head.

backbone d = a copy of the pretrained UNet with its up path removed; `UNet.encode` runs it, so no UNet code
is repeated here. It is trained whole (never LoRA'd) and re-initialized from the pretrained UNet at every
stage (Sec. 3.6). Both forms see the text:
  conditional   D (x_t, x_{t-ns}) = sigma(head(d(x_{t-ns}, t-ns, c) ++ d(x_t, t, c)))      Eq. (22)
  unconditional D'(x_{t-ns})      = sigma(head(d(x_{t-ns}, t-ns, c)))                      Eq. (23)
We return logits; the losses (lightning_min.loss_d / loss_g) apply the sigmoid through softplus.
"""
import copy
import math

import torch
import torch.nn as nn


def head_blocks(latent_size: int, downscale: int) -> int:
    """Number of [4x4 stride-2 conv, GroupNorm(32), SiLU] blocks that bring the mid-block features
    (latent / downscale wide) down to 2x2: 4 at 1024 px (128 -> 32 -> 2)."""
    return max(1, int(math.log2(max(latent_size // downscale, 2))) - 1)


class Discriminator(nn.Module):
    def __init__(self, pretrained_unet, conditional: bool, latent_size: int = 128):
        super().__init__()
        self.conditional = conditional
        self.backbone = copy.deepcopy(pretrained_unet)  # d: a fresh copy of the pretrained weights
        for name in ("up_blocks", "conv_norm_out", "conv_out"):
            delattr(self.backbone, name)  # only conv_in .. mid_block are used (UNet.encode)
        self.backbone.requires_grad_(True)
        cfg = self.backbone.config
        c = cfg.block_out_channels[-1]
        layers, cin = [], c * (2 if conditional else 1)
        for _ in range(head_blocks(latent_size, 2 ** (len(cfg.block_out_channels) - 1))):
            layers += [nn.Conv2d(cin, c, 4, stride=2, padding=1), nn.GroupNorm(32, c), nn.SiLU()]
            cin = c
        layers += [nn.Conv2d(c, 1, 1)]  # project to a single value per position, averaged below
        self.head = nn.Sequential(*layers)

    def features(self, x, t, cond):
        """d(x, t, c) -> (B, C, H/4, W/4). t is the paper's time; the UNet is called with t - 1."""
        context, pooled, ids = cond
        h, _, _ = self.backbone.encode(x, (t - 1).clamp(min=0), context, pooled, ids)
        return h

    def forward(self, x, t, cond, x_t=None, t_x_t=None):
        """Logit that x (at time t) came from the teacher. Conditional form: also x_t at its time (Eq. 22)."""
        h = self.features(x, t, cond)
        if self.conditional:
            if x_t is None:
                raise ValueError("the conditional discriminator (Eq. 22) needs x_t and its time")
            h = torch.cat([h, self.features(x_t, t_x_t, cond)], dim=1)  # (B, 2C, H/4, W/4)
        return self.head(h).float().mean(dim=(1, 2, 3))  # (B,)
