"""Where weights come from, which layout they are in, and strict loading with errors that say what is wrong.

A source is one of:
- a Hugging Face hub repo id (`stabilityai/stable-diffusion-xl-base-1.0`): files come through
  `huggingface_hub` and its standard cache, only the files needed, so `HF_HUB_OFFLINE=1` works once cached;
- a local diffusers folder (`unet/ vae/ text_encoder/ text_encoder_2/ tokenizer/ tokenizer_2/`);
- a single `.safetensors` file: a UNet alone (diffusers keys, or SGM `model.diffusion_model.*` keys) or a
  whole SGM checkpoint (UNet, `first_stage_model.*` VAE, `conditioner.embedders.*` text encoders).
Only `.safetensors` is read: pickled checkpoints (`.ckpt`, `.bin`, `.pt`) are refused, never unpickled.
The renames between layouts are convert.py's; this file decides which to apply and loads the result strictly.
"""
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import convert
import unet as unet_mod
import vae as vae_mod

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
LIGHTNING_REPO = "ByteDance/SDXL-Lightning"
LIGHTNING_UNETS = {1: "sdxl_lightning_1step_unet_x0.safetensors", 2: "sdxl_lightning_2step_unet.safetensors",
                   4: "sdxl_lightning_4step_unet.safetensors", 8: "sdxl_lightning_8step_unet.safetensors"}
LIGHTNING_LORAS = {2: "sdxl_lightning_2step_lora.safetensors", 4: "sdxl_lightning_4step_lora.safetensors",
                   8: "sdxl_lightning_8step_lora.safetensors"}
TEXT_FILES = ["text_encoder/config.json", "text_encoder/model{v}.safetensors", "text_encoder_2/config.json",
              "text_encoder_2/model{v}.safetensors", "tokenizer/*", "tokenizer_2/*"]
TOKENIZER_FILES = ["tokenizer/*", "tokenizer_2/*"]


class CheckpointError(ValueError):
    """A weights problem the user can fix: the message names the file and what is wrong."""


def lightning_unet_file(steps: int) -> str:
    if steps not in LIGHTNING_UNETS:
        raise CheckpointError(f"no official SDXL-Lightning UNet for {steps} steps; supported: "
                              f"{', '.join(map(str, LIGHTNING_UNETS))} (or pass --unet base / --unet FILE)")
    return LIGHTNING_UNETS[steps]


# ----------------------------------------------------------------------------------------------------
# Finding files

def is_file(source) -> bool:
    """A path naming one checkpoint file (as opposed to a diffusers folder or a hub repo id)."""
    return Path(str(source)).suffix in (".safetensors", ".ckpt", ".bin", ".pt", ".pth")


def is_hub_id(source: str) -> bool:
    return not os.path.exists(source) and re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)) is not None


def fetch(source: str, filename: str) -> Path:
    """`filename` inside `source` (a folder or hub repo id) as a local path."""
    if os.path.isdir(source):
        p = Path(source) / filename
        if not p.exists():
            raise CheckpointError(f"{p}: no such file")
        return p
    if not is_hub_id(source):
        raise CheckpointError(f"{source}: no such file or folder (and not a hub repo id like org/name)")
    from huggingface_hub import hf_hub_download
    try:
        return Path(hf_hub_download(source, filename))
    except Exception as e:  # offline with an empty cache, a missing file, no network: one clear line
        raise CheckpointError(f"{source}/{filename}: could not get it from the Hugging Face hub or its cache "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def fetch_folder(source: str, patterns: list) -> Path:
    """A local diffusers folder holding (at least) the files matching `patterns`."""
    if os.path.isdir(source):
        return Path(source)
    if not is_hub_id(source):
        raise CheckpointError(f"{source}: no such file or folder (and not a hub repo id like org/name)")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(source, allow_patterns=patterns))
    except Exception as e:
        raise CheckpointError(f"{source}: could not get {patterns} from the Hugging Face hub or its cache "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def read_safetensors(path, device="cpu") -> dict:
    path = Path(path)
    if path.suffix in (".ckpt", ".bin", ".pt", ".pth"):
        raise CheckpointError(f"{path}: pickled checkpoints are not loaded (unsafe); convert it to .safetensors")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable .safetensors file ({e})") from None


def read_json(path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read config ({e})") from None


# ----------------------------------------------------------------------------------------------------
# Strict loading

def check_keys(model: torch.nn.Module, sd: dict, source: str):
    """Raise naming the file and the missing, unexpected and mis-shaped keys; do nothing if all match."""
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shapes = [f"{k} (file {tuple(sd[k].shape)}, model {tuple(want[k].shape)})"
              for k in want if k in sd and sd[k].shape != want[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for what, ks in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
            if ks:
                parts.append(f"{len(ks)} {what} keys ({', '.join(ks[:3])}{', ...' if len(ks) > 3 else ''})")
        raise CheckpointError(f"{source}: does not fit {type(model).__name__}: " + "; ".join(parts))


def build_strict(cls, cfg, sd: dict, source: str, device="cpu", dtype=torch.float32):
    """Build the model on the meta device (no wasted init), check every key and shape, then assign."""
    with torch.device("meta"):
        model = cls(cfg)
    check_keys(model, sd, source)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(device=device, dtype=dtype)


def detect_layout(sd: dict, source: str) -> str:
    """'diffusers' (UNet keys as in UNet2DConditionModel), 'sgm' (original single file), or an error."""
    if any(k.startswith("lora_unet_") or ".lora_down." in k or "lora_A" in k for k in sd):
        raise CheckpointError(f"{source}: this is a LoRA file; pass it with --lora")
    if any(k.startswith(("cond_stage_model.", "model.diffusion_model.")) for k in sd) and \
            "model.diffusion_model.label_emb.0.0.weight" not in sd:
        raise CheckpointError(f"{source}: not an SDXL-architecture checkpoint (no label_emb: an SD1.x/2.x model?)")
    if "model.diffusion_model.input_blocks.0.0.weight" in sd:
        return "sgm"
    if "conv_in.weight" in sd and "add_embedding.linear_1.weight" in sd:
        return "diffusers"
    if "conv_in.weight" in sd:
        raise CheckpointError(f"{source}: not an SDXL-architecture UNet (no add_embedding: an SD1.x/2.x UNet?)")
    raise CheckpointError(f"{source}: no UNet found: expected diffusers keys (conv_in.weight, ...) or "
                          f"original-layout keys (model.diffusion_model.*); first keys: {list(sd)[:3]}")


# ----------------------------------------------------------------------------------------------------
# Parts

def checked_single_file(sd: dict, source: str) -> dict:
    """A single file's tensors after checking that every key belongs to a part (convert.check_single_file)."""
    try:
        convert.check_single_file(sd, source)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return sd


def unet_config(base: str, sd=None) -> unet_mod.UNetConfig:
    """The UNet architecture: from `unet/config.json` of a diffusers base, or from a single file's shapes
    (`sd`: its already-read tensors)."""
    if is_file(base):
        try:
            return convert.unet_config_from_sgm(read_safetensors(base) if sd is None else sd, source=str(base))
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    p = fetch(base, "unet/config.json")
    return unet_mod.UNetConfig.from_diffusers(read_json(p), str(p))


def unet_state_dict(sd: dict, source: str, cfg=None) -> tuple:
    """(diffusers-named UNet tensors, config) from a file's tensors in either layout."""
    if detect_layout(sd, source) == "sgm":
        checked_single_file(sd, source)
        try:
            cfg = cfg or convert.unet_config_from_sgm(sd, source=source)
            return convert.unet_from_sgm(sd, cfg, source=source), cfg
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    if cfg is None:
        raise CheckpointError(f"{source}: a diffusers-layout UNet file carries no config; give a base")
    return sd, cfg


def load_unet(source: str, cfg=None, device="cpu", dtype=torch.float32, variant=None, sd=None) -> unet_mod.UNet:
    """A UNet from a file (either layout; `cfg` from the base for diffusers-layout files) or a base."""
    if is_file(source):
        sd, cfg = unet_state_dict(read_safetensors(source) if sd is None else sd, str(source), cfg)
        return build_strict(unet_mod.UNet, cfg, sd, str(source), device, dtype)
    cfg = cfg or unet_config(source)
    path = fetch_variant(source, "unet/diffusion_pytorch_model{v}.safetensors", variant)
    return build_strict(unet_mod.UNet, cfg, read_safetensors(path), str(path), device, dtype)


def load_vae(source: str, device="cpu", dtype=torch.float32, variant=None, sd=None) -> vae_mod.VAE:
    """The VAE of a base; `sd`: the already-read tensors of a single file (read once for all parts)."""
    if is_file(source):
        sd = checked_single_file(read_safetensors(source) if sd is None else sd, str(source))
        try:
            cfg = convert.vae_config_from_sgm(sd, source=str(source))
            vae_sd = convert.vae_from_sgm(sd, cfg, source=str(source))
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        return build_strict(vae_mod.VAE, cfg, vae_sd, str(source), device, dtype)
    cfg_path = fetch(source, "vae/config.json")
    cfg = vae_mod.VAEConfig.from_diffusers(read_json(cfg_path), str(cfg_path))
    path = fetch_variant(source, "vae/diffusion_pytorch_model{v}.safetensors", variant)
    return build_strict(vae_mod.VAE, cfg, read_safetensors(path), str(path), device, dtype)


def load_text(source: str, device="cpu", dtype=torch.float32, variant=None, tokenizers=SDXL_BASE, sd=None):
    """Both CLIP text encoders and tokenizers. A single file brings its encoders; its tokenizers come from
    `tokenizers` (the SDXL base repo), as single files carry none."""
    import text as text_mod
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # one bar per encoder is noise on a command line
    if is_file(source):
        from transformers import CLIPTokenizer
        folder = fetch_folder(tokenizers, TOKENIZER_FILES)
        tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        tok2 = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
        return text_mod.TextEncoders(tok, tok2, *load_text_encoders(source, device, dtype, sd))
    v = "" if variant is None else f".{variant}"
    folder = fetch_folder(source, [p.format(v=v) for p in TEXT_FILES])
    return text_mod.TextEncoders.from_diffusers(folder, dtype=dtype, device=device)


def load_text_encoders(source: str, device="cpu", dtype=torch.float32, sd=None) -> tuple:
    """(CLIP-L, bigG) transformers models of a single file, without tokenizers."""
    import text as text_mod
    sd = checked_single_file(read_safetensors(source) if sd is None else sd, str(source))
    try:
        return text_mod.encoders_from_single_file(sd, dtype=dtype, device=device)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def fetch_variant(source, pattern, variant):
    """`pattern` with the variant (e.g. `.fp16`) if the source has it, else the plain file."""
    if variant:
        try:
            return fetch(source, pattern.format(v=f".{variant}"))
        except CheckpointError:
            pass
    return fetch(source, pattern.format(v=""))
