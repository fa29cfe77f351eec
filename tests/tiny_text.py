"""Tiny SDXL text conditioning, offline: two CLIP tokenizers from a hand-made vocabulary and two random
CLIP text encoders, written as a diffusers folder. Shared by the text, sampler and pipeline tests."""
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import toy  # its write_tokenizer writes the hub's tokenizer file set

# CLIP-L and bigG stand-ins: different widths, as diffusers' single-file code tells them apart by width.
# One head each: narrower than SDXL's 64-wide heads, which is what text.text_from_single_file assumes then.
WIDTH, WIDTH_2, PROJECTION_DIM = 32, 48, 48
CONTEXT_DIM = WIDTH + WIDTH_2  # 80, the tiny UNet's cross_attention_dim
POOLED_DIM = PROJECTION_DIM  # 48
MAX_LENGTH = 77
WORDS = ("photo", "of", "cat", "dog", "red", "car", "in", "the", "snow")  # whole-word tokens; the rest spell out


def tiny_vocab():
    """A byte-level BPE vocabulary shaped like CLIP's ("!" is id 0, the two specials have the largest ids),
    WORDS whole-word tokens: toy.py's, with these words."""
    return toy.vocab_and_merges(WORDS)


def write_tokenizer(folder, pad_token):
    """The hub's file set (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json)."""
    toy.write_tokenizer(folder, pad_token, tiny_vocab())


def text_configs(**overrides):
    """CLIP-L-like and bigG-like configs, token ids as in the SDXL hub configs (eos_token_id 2: argmax pooling)."""
    common = dict(vocab_size=len(tiny_vocab()[0]), num_hidden_layers=3, max_position_embeddings=MAX_LENGTH,
                  bos_token_id=0, eos_token_id=2, pad_token_id=1, layer_norm_eps=1e-5, **overrides)
    config = CLIPTextConfig(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_attention_heads=1,
                            projection_dim=WIDTH, hidden_act="quick_gelu", **common)
    config_2 = CLIPTextConfig(hidden_size=WIDTH_2, intermediate_size=4 * WIDTH_2, num_attention_heads=1,
                              projection_dim=PROJECTION_DIM, hidden_act="gelu", **common)
    return config, config_2


def randomize(module, seed):
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
    text_encoder = randomize(CLIPTextModel(config), seed).eval()
    text_encoder_2 = randomize(CLIPTextModelWithProjection(config_2), seed + 1).eval()
    return text_encoder, text_encoder_2


def make_tiny_text_folder(root: Path) -> None:
    """Write tokenizer/ tokenizer_2/ text_encoder/ text_encoder_2/ of a diffusers SDXL folder under root."""
    root = Path(root)
    write_tokenizer(root / "tokenizer", pad_token="<|endoftext|>")  # CLIP-L pads with EOS
    write_tokenizer(root / "tokenizer_2", pad_token="!")  # bigG pads with "!" (id 0)
    text_encoder, text_encoder_2 = tiny_text_models()
    text_encoder.save_pretrained(root / "text_encoder")
    text_encoder_2.save_pretrained(root / "text_encoder_2")
