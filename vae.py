"""The SDXL VAE (AutoencoderKL) in plain torch.

Module names equal diffusers' `AutoencoderKL` checkpoint keys (the original single-file layout,
`first_stage_model.*`, is renamed in convert.py). Latents are `mean * scaling_factor` (0.13025 for SDXL). The
SDXL VAE overflows in fp16 (diffusers' `force_upcast`): decode in float32 or bfloat16.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VAEConfig:
    in_channels: int = 3                               # image channels
    out_channels: int = 3                              # image channels out
    latent_channels: int = 4                           # latent channels (the UNet's in/out)
    block_out_channels: tuple = (128, 256, 512, 512)   # encoder widths, top to bottom; 3 downsamples = 8x
    layers_per_block: int = 2                          # resnets per encoder level (decoder: one more)
    norm_num_groups: int = 32                          # GroupNorm groups
    scaling_factor: float = 0.13025                    # latents = mean * scaling_factor (SDXL)

    @property
    def downscale(self):
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, cfg: dict, source="config.json"):
        if cfg.get("latent_channels", 4) != 4 or cfg.get("latents_mean") is not None:
            raise ValueError(f"{source}: not an SDXL-architecture VAE "
                             f"(latent_channels={cfg.get('latent_channels')})")
        return cls(in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
                   latent_channels=cfg.get("latent_channels", 4),
                   block_out_channels=tuple(cfg["block_out_channels"]),
                   layers_per_block=cfg.get("layers_per_block", 2),
                   norm_num_groups=cfg.get("norm_num_groups", 32),
                   scaling_factor=cfg.get("scaling_factor", 0.13025))

    def to_diffusers(self) -> dict:
        n = len(self.block_out_channels)
        return {"_class_name": "AutoencoderKL", "in_channels": self.in_channels,
                "out_channels": self.out_channels,
                "latent_channels": self.latent_channels, "block_out_channels": list(self.block_out_channels),
                "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
                "layers_per_block": self.layers_per_block, "norm_num_groups": self.norm_num_groups,
                "act_fn": "silu", "scaling_factor": self.scaling_factor, "force_upcast": True,
                "sample_size": 1024}


# ----------------------------------------------------------------------------------------------------
# Pieces

class ResnetBlock2D(nn.Module):
    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions of the lowest level."""

    def __init__(self, ch, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(ch, ch), nn.Linear(ch, ch), nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).reshape(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        q, k, v = (m(h)[:, None] for m in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)[:, 0]
        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        return x + h


class MidBlock(nn.Module):
    def __init__(self, ch, groups):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, groups), ResnetBlock2D(ch, ch, groups)])
        self.attentions = nn.ModuleList([Attention(ch, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class Downsample2D(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as the original VAE was trained


class Upsample2D(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: resnets, then an optional down- or upsampler."""

    def __init__(self, cin, cout, n, groups, down=False, up=False):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(cin if i == 0 else cout, cout, groups) for i in range(n)])
        if down:
            self.downsamplers = nn.ModuleList([Downsample2D(cout)])
        if up:
            self.upsamplers = nn.ModuleList([Upsample2D(cout)])

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        for s in getattr(self, "downsamplers", []) or getattr(self, "upsamplers", []):
            x = s(x)
        return x


# ----------------------------------------------------------------------------------------------------
# Encoder, decoder, the whole

class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block,
                                                g, down=i < n - 1)
                                          for i in range(n)])
        self.mid_block = MidBlock(ch[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and logvar

    def forward(self, x):
        x = self.conv_in(x)
        for b in self.down_blocks:
            x = b(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g)
        self.up_blocks = nn.ModuleList([Level(ch[max(i - 1, 0)], ch[i],
                                              cfg.layers_per_block + 1, g, up=i < n - 1)
                                        for i in range(n)])
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for b in self.up_blocks:
            x = b(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig = None):
        super().__init__()
        self.config = cfg = cfg or VAEConfig()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode(self, x):
        """x (B, 3, H, W) in [-1, 1] -> mean, logvar (B, 4, H/8, W/8), unscaled (diffusers' latent_dist)."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z):
        """z unscaled latents (B, 4, h, w) -> image (B, 3, 8h, 8w), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    # Latent-space helpers in the UNet's scale; `slice_size` bounds memory for large batches
    # (the paper's "VAE slicing").
    def encode_latents(self, pixels, slice_size=4, sample=False, generator=None):
        out = []
        for x in pixels.split(slice_size):
            mean, logvar = self.encode(x)
            if sample:
                device = generator.device if generator else None
                mean = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator,
                                                                  device=device).to(mean)
            out.append(mean * self.config.scaling_factor)
        return torch.cat(out)

    def decode_latents(self, latents, slice_size=1):
        return torch.cat([self.decode(z / self.config.scaling_factor) for z in latents.split(slice_size)])


# ----------------------------------------------------------------------------------------------------
# The tiny preview autoencoder: TAESDXL (madebyollin/taesdxl), diffusers' `AutoencoderTiny` layout.
# Plain 3x3 convs and ReLUs, no norm, no attention, 64 channels throughout: its decoder costs 0.054x the
# full one's FLOPs at 1024 px (0.57 vs 10.5 TFLOP, tools/bench.py --what vae). It was distilled to map to and
# from the full VAE's *scaled* latents, so its scaling_factor is 1.0 and the UNet never knows which decoder
# follows. Module names are the checkpoint's:
# `encoder.layers.{i}` and `decoder.layers.{i}` index one nn.Sequential each, ReLU/Upsample included
# (they hold no tensors, so the stored indices skip them).

@dataclass
class TinyVAEConfig:
    in_channels: int = 3                                   # image channels
    out_channels: int = 3                                  # image channels out
    latent_channels: int = 4                               # latent channels (the UNet's in/out)
    encoder_block_out_channels: tuple = (64, 64, 64, 64)   # width per encoder stage; each after the first
    #                                                        starts with a stride-2 conv: 3 stages down = 8x
    num_encoder_blocks: tuple = (1, 3, 3, 3)               # residual blocks per encoder stage
    decoder_block_out_channels: tuple = (64, 64, 64, 64)   # width per decoder stage, bottom to top
    num_decoder_blocks: tuple = (3, 3, 3, 1)               # residual blocks per decoder stage
    upsampling_scaling_factor: int = 2                     # nearest upsampling between decoder stages
    latent_magnitude: float = 3.0                          # for 8-bit latent storage only (diffusers'
    latent_shift: float = 0.5                              # forward: u8 = (z / 2 magnitude + shift) 255)
    scaling_factor: float = 1.0                            # latents = encoder output * scaling_factor

    @property
    def downscale(self):
        return 2 ** (len(self.encoder_block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, cfg: dict, source="config.json"):
        """An `AutoencoderTiny` config.json; refuses what this file does not build (other activations,
        upsampling modes, a shift factor)."""
        if cfg.get("_class_name", "AutoencoderTiny") != "AutoencoderTiny":
            raise ValueError(f"{source}: a {cfg['_class_name']} config, not AutoencoderTiny (the tiny VAE)")
        for key, want in (("act_fn", "relu"), ("upsample_fn", "nearest"), ("shift_factor", 0.0)):
            if cfg.get(key, want) not in (want, None):
                raise ValueError(f"{source}: {key}={cfg[key]!r} is not supported (only {want!r})")
        d = cls()
        return cls(in_channels=cfg.get("in_channels", 3), out_channels=cfg.get("out_channels", 3),
                   latent_channels=cfg.get("latent_channels", 4),
                   encoder_block_out_channels=tuple(cfg.get("encoder_block_out_channels",
                                                            d.encoder_block_out_channels)),
                   num_encoder_blocks=tuple(cfg.get("num_encoder_blocks", d.num_encoder_blocks)),
                   decoder_block_out_channels=tuple(cfg.get("decoder_block_out_channels",
                                                            d.decoder_block_out_channels)),
                   num_decoder_blocks=tuple(cfg.get("num_decoder_blocks", d.num_decoder_blocks)),
                   upsampling_scaling_factor=cfg.get("upsampling_scaling_factor", 2),
                   latent_magnitude=cfg.get("latent_magnitude", 3.0),
                   latent_shift=cfg.get("latent_shift", 0.5),
                   scaling_factor=cfg.get("scaling_factor", 1.0))

    def to_diffusers(self) -> dict:
        return {"_class_name": "AutoencoderTiny", "in_channels": self.in_channels,
                "out_channels": self.out_channels, "latent_channels": self.latent_channels,
                "encoder_block_out_channels": list(self.encoder_block_out_channels),
                "num_encoder_blocks": list(self.num_encoder_blocks),
                "decoder_block_out_channels": list(self.decoder_block_out_channels),
                "num_decoder_blocks": list(self.num_decoder_blocks),
                "upsampling_scaling_factor": self.upsampling_scaling_factor, "act_fn": "relu",
                "upsample_fn": "nearest", "latent_magnitude": self.latent_magnitude,
                "latent_shift": self.latent_shift, "scaling_factor": self.scaling_factor,
                "force_upcast": False}


class TinyBlock(nn.Module):
    """conv-ReLU-conv-ReLU-conv plus the input, then ReLU (TAESD's Block)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1, bias=False) if cin != cout else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x):
        return self.fuse(self.conv(x) + self.skip(x))


class TinyEncoder(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> latents (B, 4, H/8, W/8), already in the UNet's scale."""

    def __init__(self, cfg):
        super().__init__()
        ch = cfg.encoder_block_out_channels
        layers = []
        for i, n in enumerate(cfg.num_encoder_blocks):
            # diffusers feeds stage i's stride-2 conv ch[i] channels, right only when all widths are equal
            # (as in every released TAESD); ch[i - 1] in is the same then and right otherwise
            layers.append(nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1) if i == 0 else
                          nn.Conv2d(ch[i - 1], ch[i], 3, padding=1, stride=2, bias=False))
            layers += [TinyBlock(ch[i], ch[i]) for _ in range(n)]
        layers.append(nn.Conv2d(ch[-1], cfg.latent_channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x.add(1).div(2))  # TAESD works on images in [0, 1]


class TinyDecoder(nn.Module):
    """latents (B, 4, h, w) -> image (B, 3, 8h, 8w), roughly in [-1, 1]."""

    def __init__(self, cfg):
        super().__init__()
        ch, n = cfg.decoder_block_out_channels, len(cfg.num_decoder_blocks)
        layers = [nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1), nn.ReLU()]
        for i, blocks in enumerate(cfg.num_decoder_blocks):
            last = i == n - 1
            layers += [TinyBlock(ch[i], ch[i]) for _ in range(blocks)]
            if not last:
                layers.append(nn.Upsample(scale_factor=cfg.upsampling_scaling_factor, mode="nearest"))
            # the stage's closing conv hands on to the next width (diffusers: ch[i], equal widths again)
            layers.append(nn.Conv2d(ch[i], cfg.out_channels if last else ch[i + 1], 3, padding=1,
                                    bias=last))
        self.layers = nn.Sequential(*layers)

    def forward(self, z):
        z = torch.tanh(z / 3) * 3  # a soft clamp to |z| < 3, as TAESD was trained: wild latents stay bounded
        return self.layers(z).mul(2).sub(1)  # [0, 1] -> [-1, 1]


class TinyVAE(nn.Module):
    """TAESDXL with the VAE class's interface, so sample.py swaps one for the other. It is deterministic: no
    posterior, so `encode` returns the latents themselves and img2img draws no posterior noise (as diffusers'
    AutoencoderTiny, whose `latent_dist` does not exist)."""

    def __init__(self, cfg: TinyVAEConfig = None):
        super().__init__()
        self.config = cfg = cfg or TinyVAEConfig()
        self.encoder = TinyEncoder(cfg)
        self.decoder = TinyDecoder(cfg)

    def encode(self, x):
        """x (B, 3, H, W) in [-1, 1] -> latents (B, 4, H/8, W/8), unscaled (diffusers' `.latents`)."""
        return self.encoder(x)

    def decode(self, z):
        """z unscaled latents (B, 4, h, w) -> image (B, 3, 8h, 8w), roughly in [-1, 1]."""
        return self.decoder(z)

    def encode_latents(self, pixels, slice_size=4, sample=False, generator=None):
        """As VAE.encode_latents; `sample` and `generator` are accepted and ignored (nothing to draw)."""
        return torch.cat([self.encode(x) * self.config.scaling_factor for x in pixels.split(slice_size)])

    def decode_latents(self, latents, slice_size=1):
        return torch.cat([self.decode(z / self.config.scaling_factor) for z in latents.split(slice_size)])
