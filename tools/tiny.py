"""Tiny configs and random-weight models shared by the tests and bench (no network, seconds on CPU): a 2-level
SDXL-shaped UNet and VAE built by diffusers, tiny SDXL text conditioning (two CLIP tokenizers from a hand-made
vocabulary and two random CLIP text encoders), a whole tiny SDXL base folder, a pre-filled hub cache."""
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import unet as unet_mod
import vae as vae_mod
from tools import toy_world  # its write_tokenizer writes the hub's tokenizer file set

# A 2-level SDXL-shaped UNet: head width 64 (so single files derive the same heads), 6 time ids of 256.
TINY_UNET = unet_mod.UNetConfig(block_out_channels=(64, 128), layers_per_block=1, transformer_depth=(0, 2),
                                num_heads=(1, 2), cross_attention_dim=80, pooled_dim=48)
TINY_VAE = vae_mod.VAEConfig(block_out_channels=(32, 64), layers_per_block=1)
# A 2-stage TAESD: the same 2x factor as TINY_VAE, so either decodes the tiny UNet's latents.
TINY_TAESD = vae_mod.TinyVAEConfig(encoder_block_out_channels=(16, 16), num_encoder_blocks=(1, 2),
                                   decoder_block_out_channels=(16, 16), num_decoder_blocks=(2, 1))


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


def diffusers_tiny_vae(cfg=TINY_TAESD, seed=0):
    from diffusers import AutoencoderTiny
    m = AutoencoderTiny(**{k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")})
    randomize(m, seed)
    return m.eval()


def randomize(module, seed):
    """Random weights everywhere (diffusers zero-inits some outputs, which would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05
                        + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
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


def make_random_base(root, unet_cfg, vae_cfg, text_cfgs, device="cpu", dtype=torch.float16):
    """An SDXL base folder of any size (diffusers layout, written by diffusers) with diffusers' own random
    init and the tiny offline tokenizers: full size for bench.py --report, built on `device` (a GPU builds
    the 2.6B-parameter UNet in seconds) and saved in `dtype`. text_cfgs: (CLIP-L config, bigG config)."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTokenizer
    root = Path(root)
    write_tokenizer(root / "tokenizer", pad_token="<|endoftext|>")
    write_tokenizer(root / "tokenizer_2", pad_token="!")
    torch.manual_seed(0)
    with torch.device(device):
        kwargs = lambda cfg: {k: v for k, v in cfg.to_diffusers().items()  # noqa: E731
                              if not k.startswith("_")}
        unet, vae = UNet2DConditionModel(**kwargs(unet_cfg)), AutoencoderKL(**kwargs(vae_cfg))
        text_encoder, text_encoder_2 = CLIPTextModel(text_cfgs[0]), CLIPTextModelWithProjection(text_cfgs[1])
    pipe = StableDiffusionXLPipeline(
        vae=vae, unet=unet, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(root / "tokenizer_2"),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         num_train_timesteps=1000, steps_offset=1))
    pipe.to(dtype).save_pretrained(root)
    return root


def lightning_scheduler(pipe, prediction="epsilon"):
    """The SDXL-Lightning model card's scheduler override."""
    from diffusers import EulerDiscreteScheduler
    return EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                              prediction_type=prediction)


def fill_hub_cache(cache, repo_id, files):
    """Put `files` {path in repo: local file} into a Hugging Face hub cache laid out as huggingface_hub
    writes it (refs/main -> snapshots/<commit>/...), so HF_HUB_OFFLINE=1 finds them with no network."""
    import shutil
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for rel, src in files.items():
        dst = repo / "snapshots" / commit / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)


def write_noise_images(folder, n, caption, size=(48, 40)):
    """n random RGB images (size: width, height; default 48x40) with captions caption.format(i): sharp,
    usable data for the train tests."""
    import numpy as np
    from PIL import Image
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption.format(i))
    return folder


# ----------------------------------------------------------------------------------------------------
# Tiny SDXL text conditioning, offline


# CLIP-L and bigG stand-ins: different widths, as diffusers' single-file code tells them apart by width.
# One head each: narrower than SDXL's 64-wide heads, which is what text.text_from_single_file assumes then.
WIDTH, WIDTH_2, PROJECTION_DIM = 32, 48, 48
CONTEXT_DIM = WIDTH + WIDTH_2  # 80, the tiny UNet's cross_attention_dim
POOLED_DIM = PROJECTION_DIM  # 48
MAX_LENGTH = 77
# whole-word tokens; the rest spell out
WORDS = ("photo", "of", "cat", "dog", "red", "car", "in", "the", "snow")


def tiny_vocab():
    """A byte-level BPE vocabulary shaped like CLIP's ("!" is id 0, the two specials have the largest ids),
    WORDS whole-word tokens: tools/toy_world.py's, with these words."""
    return toy_world.vocab_and_merges(WORDS)


def write_tokenizer(folder, pad_token):
    """The hub's file set (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json)."""
    toy_world.write_tokenizer(folder, pad_token, tiny_vocab())


def text_configs(**overrides):
    """CLIP-L-like and bigG-like configs, token ids as in the SDXL hub configs (eos_token_id 2: argmax
    pooling)."""
    common = dict(vocab_size=len(tiny_vocab()[0]), num_hidden_layers=3, max_position_embeddings=MAX_LENGTH,
                  bos_token_id=0, eos_token_id=2, pad_token_id=1, layer_norm_eps=1e-5, **overrides)
    config = CLIPTextConfig(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_attention_heads=1,
                            projection_dim=WIDTH, hidden_act="quick_gelu", **common)
    config_2 = CLIPTextConfig(hidden_size=WIDTH_2, intermediate_size=4 * WIDTH_2, num_attention_heads=1,
                              projection_dim=PROJECTION_DIM, hidden_act="gelu", **common)
    return config, config_2


def randomize_text(module, seed):
    """Random weights everywhere: CLIP inits biases to 0 and norms to 1, which would hide swapped tensors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            scale = 0.1 if p.ndim == 1 else 1.0 / p.shape[-1] ** 0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale + base)
    return module


def tiny_text_models(seed=0, **overrides):
    config, config_2 = text_configs(**overrides)
    text_encoder = randomize_text(CLIPTextModel(config), seed).eval()
    text_encoder_2 = randomize_text(CLIPTextModelWithProjection(config_2), seed + 1).eval()
    return text_encoder, text_encoder_2


def make_tiny_text_folder(root: Path) -> None:
    """Write tokenizer/ tokenizer_2/ text_encoder/ text_encoder_2/ of a diffusers SDXL folder under root."""
    root = Path(root)
    write_tokenizer(root / "tokenizer", pad_token="<|endoftext|>")  # CLIP-L pads with EOS
    write_tokenizer(root / "tokenizer_2", pad_token="!")  # bigG pads with "!" (id 0)
    text_encoder, text_encoder_2 = tiny_text_models()
    text_encoder.save_pretrained(root / "text_encoder")
    text_encoder_2.save_pretrained(root / "text_encoder_2")
