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


def make_tiny_base(root, seed=0):
    """A tiny SDXL base in the diffusers layout (model_index.json, unet/ vae/ text_encoder*/ tokenizer*/
    scheduler/), written by diffusers itself. Returns the diffusers pipeline."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from tests.tiny_text import make_tiny_text_folder
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    make_tiny_text_folder(root)
    pipe = StableDiffusionXLPipeline(
        vae=diffusers_vae(seed=seed), unet=diffusers_unet(seed=seed),
        text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2"),
        tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(root / "tokenizer_2"),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         num_train_timesteps=1000, steps_offset=1))
    pipe.save_pretrained(root)
    return pipe


def lightning_scheduler(pipe, prediction="epsilon"):
    """The SDXL-Lightning model card's scheduler override."""
    from diffusers import EulerDiscreteScheduler
    return EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                              prediction_type=prediction)


def fill_hub_cache(cache, repo_id, files):
    """Put `files` {path in repo: local file} into a Hugging Face hub cache laid out as huggingface_hub
    writes it (refs/main -> snapshots/<commit>/...), so HF_HUB_OFFLINE=1 finds them with no network."""
    import shutil
    from pathlib import Path
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for rel, src in files.items():
        dst = repo / "snapshots" / commit / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)


def write_noise_images(folder, n, caption):
    """n random 48x40 RGB images with captions caption.format(i): sharp, usable data for the train tests."""
    import numpy as np
    from PIL import Image
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption.format(i))
    return folder
