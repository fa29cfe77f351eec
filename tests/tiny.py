"""Tiny configs and random-weight reference models shared by the tests (no network, seconds on CPU)."""
import torch

import unet as unet_mod
import vae as vae_mod

# A 2-level SDXL-shaped UNet: head width 64 (so single files derive the same heads), 6 time ids of 256.
TINY_UNET = unet_mod.UNetConfig(block_out_channels=(64, 128), layers_per_block=1, transformer_depth=(0, 2),
                                num_heads=(1, 2), cross_attention_dim=80, pooled_dim=48)
TINY_VAE = vae_mod.VAEConfig(block_out_channels=(32, 64), layers_per_block=1)


def diffusers_unet(cfg=TINY_UNET, seed=0):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    m = UNet2DConditionModel(**{k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")})
    randomize(m, seed)
    return m.eval()


def diffusers_vae(cfg=TINY_VAE, seed=0):
    from diffusers import AutoencoderKL
    m = AutoencoderKL(**{k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")})
    randomize(m, seed)
    return m.eval()


def randomize(module, seed):
    """Random weights everywhere (diffusers zero-inits some outputs, which would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    return module


def report(name, a, b):
    d = (a.double() - b.double()).abs()
    print(f"{name}: max abs err {d.max().item():.3e}, mean {d.mean().item():.3e}")
