"""The discriminator of Sec. 3.3: the pretrained SDXL UNet's encoder and mid block as backbone, a small head.

backbone d = a copy of the pretrained UNet with its up path removed; `UNet.encode` runs it, so no UNet code
is repeated here, and `lightning_min.unet_model` calls it at paper time t (the UNet gets t - 1). It is trained
whole (never LoRA'd) and re-initialized from the pretrained UNet at every stage (Sec. 3.6), not every phase:
train.py carries it from cond to uncond (`unconditional_from`) and from uncond to full. Both forms see the
text:
  conditional   D (x_t, x_{t-ns}) = sigma(head(d(x_{t-ns}, t-ns, c) ++ d(x_t, t, c)))      Eq. (22)
  unconditional D'(x_{t-ns})      = sigma(head(d(x_{t-ns}, t-ns, c)))                      Eq. (23)
We return logits; the losses (lightning_min.loss_d / loss_g) apply the sigmoid through softplus.
"""
import copy
import math

import torch
import torch.nn as nn

import lightning_min as lm


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
        """d(x, t, c) -> (B, C, H/4, W/4) at paper time t."""
        return lm.unet_model(Encoder(self.backbone), cond)(x, t)

    def forward(self, x, t, cond, x_t=None, t_x_t=None):
        """Logit that x (at time t) came from the teacher. Conditional form: also x_t at its time (Eq. 22)."""
        h = self.features(x, t, cond)
        if self.conditional:
            if x_t is None:
                raise ValueError("the conditional discriminator (Eq. 22) needs x_t and its time")
            h = torch.cat([h, self.features(x_t, t_x_t, cond)], dim=1)  # (B, 2C, H/4, W/4)
        return self.head(h).float().mean(dim=(1, 2, 3))  # (B,)


class Encoder:
    """The backbone with the UNet's call signature, returning the mid-block features (for unet_model)."""

    def __init__(self, unet):
        self.unet = unet

    def __call__(self, x, t, context, pooled, time_ids):
        return self.unet.encode(x, t, context, pooled, time_ids)[0]

    def parameters(self):
        return self.unet.parameters()


def unconditional_from(state: dict) -> dict:
    """The conditional discriminator's state for the unconditional form (cond -> uncond, Sec. 3.6).

    The backbone carries over as it is. The head's first conv reads 2C channels, d(x_{t-ns}) ++ d(x_t), in
    the conditional form and C, d(x_{t-ns}), in the unconditional one: we keep the weights that read
    d(x_{t-ns}) and drop those that read x_t, so the new head is the old one with the x_t evidence taken
    away. GroupNorm right after re-normalizes the changed sum; every later layer carries over unchanged."""
    state = dict(state)
    w = state["head.0.weight"]  # (C, 2C, 4, 4)
    state["head.0.weight"] = w[:, : w.shape[1] // 2].clone()  # (C, C, 4, 4)
    return state
