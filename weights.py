"""Where weights come from, every layout they come in, and strict loading with errors that say what is wrong.

A source is one of:
- a Hugging Face hub repo id (`stabilityai/stable-diffusion-xl-base-1.0`): files come through
  `huggingface_hub` and its standard cache, only the files needed, so `HF_HUB_OFFLINE=1` works once cached;
- a local diffusers folder (`unet/ vae/ text_encoder/ text_encoder_2/ tokenizer/ tokenizer_2/`);
- a single `.safetensors` file: a UNet alone (diffusers keys, or SGM `model.diffusion_model.*` keys) or a
  whole SGM checkpoint (UNet, `first_stage_model.*` VAE, `conditioner.embedders.*` text encoders).
Only `.safetensors` is read: pickled checkpoints (`.ckpt`, `.bin`, `.pt`) are refused, never unpickled.

Three layouts meet here, converted both ways:
- diffusers: our module names (unet.py, vae.py) and the official `sdxl_lightning_*_unet.safetensors`;
  text encoders in transformers' CLIP layout, every key under `text_model.` but `text_projection`.
- SGM, the original Stability single file that ComfyUI, A1111 and kohya open:
    model.diffusion_model.*              UNet, modules numbered by position (input_blocks.4.1 ...)
    first_stage_model.*                  VAE, attention as 1x1 convs, decoder levels numbered bottom-up
    conditioner.embedders.0.transformer.* CLIP-L in transformers' layout
    conditioner.embedders.1.model.*      OpenCLIP bigG: fused in_proj, transposed text_projection
  It carries no config: the architecture is derived from tensor names and shapes (head width 64).
- kohya LoRA names: `lora_unet_<module path, '.' -> '_'>`, spelled with the diffusers path
  (`lora_unet_down_blocks_1_...`) or the SGM one (`lora_unet_input_blocks_4_...`).

Read top to bottom: finding files, the layouts (UNet, VAE, text encoders, LoRA names, the whole single
file), strict loading, then each part: UNet, VAE, text encoders, LoRA files. tools/convert.py is the command.
"""
import json
import math
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import lora as lora_mod
import text as text_mod
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


PICKLED = (".ckpt", ".bin", ".pt", ".pth")


def _check_path(path: Path):
    """A pickled checkpoint, a folder or a missing path, refused in one line naming it."""
    if path.suffix in PICKLED:
        raise CheckpointError(f"{path}: pickled checkpoints are not loaded (unsafe); convert it to "
                              ".safetensors")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a .safetensors file")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")


def read_safetensors(path, device="cpu") -> dict:
    path = Path(path)
    _check_path(path)
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable .safetensors file ({e})") from None


def read_header(path) -> dict:
    """{key: safetensors dtype name ("F16", "I8", "BOOL", ...)} from the file's header alone, no tensor read:
    the cheap check of an input before anything is loaded."""
    path = Path(path)
    _check_path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_slice(k).get_dtype() for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable .safetensors file ({e})") from None


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")  # safetensors' names of float dtypes
INT_DTYPES = {"BOOL": "bool", "I8": "int8", "U8": "uint8", "I16": "int16", "U16": "uint16", "I32": "int32",
              "U32": "uint32", "I64": "int64", "U64": "uint64"}  # the others, as torch names them


def check_unet_file(path) -> None:
    """A UNet file (either layout, or a whole single file) checked by its header: readable, a UNet, every
    UNet tensor floating point. Cheap, so commands run it before loading anything else."""
    header = read_header(path)
    layout = detect_layout(header, str(path))
    for k, dtype in header.items():
        if (layout == "diffusers" or k.startswith(SGM_UNET)) and dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{path}: {k} is {INT_DTYPES.get(dtype, dtype)}, not a floating-point "
                                  "tensor (model weights are floats)")


def read_json(path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read config ({e})") from None


# ----------------------------------------------------------------------------------------------------
# Layouts: every rename between the original single file (SGM), diffusers and kohya, both directions

SGM_UNET = "model.diffusion_model."
SGM_VAE = "first_stage_model."
SGM_CLIP_L = "conditioner.embedders.0.transformer."  # + canonical CLIPTextModel keys
SGM_BIGG = "conditioner.embedders.1.model."           # + OpenCLIP keys
# Tensors real single files carry that no model uses (a buffer, CLIP's contrastive temperature).
SGM_UNUSED = (SGM_CLIP_L + "text_model.embeddings.position_ids", SGM_BIGG + "logit_scale")


# ----------------------------------------------------------------------------------------------------
# UNet. SGM numbers modules by position: input_blocks.k.{0: resnet or downsampler op, 1: attention},
# middle_block.{0,1,2}, output_blocks.k.{0: resnet, 1: attention, last: upsampler}. One table of
# module prefixes, built from the config, renames both ways.

SGM_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
              "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
SGM_FIXED = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
             "middle_block.1": "mid_block.attentions.0"}


def unet_prefix_map(cfg: unet_mod.UNetConfig) -> dict:
    """{SGM module prefix: (diffusers module prefix, is_resnet)} for every module of the UNet."""
    m = {k: (v, False) for k, v in SGM_FIXED.items()}
    m["middle_block.0"], m["middle_block.2"] = ("mid_block.resnets.0", True), ("mid_block.resnets.1", True)
    L, n, k = len(cfg.block_out_channels), cfg.layers_per_block, 1
    for b in range(L):
        for i in range(n):
            m[f"input_blocks.{k}.0"] = (f"down_blocks.{b}.resnets.{i}", True)
            if cfg.transformer_depth[b]:
                m[f"input_blocks.{k}.1"] = (f"down_blocks.{b}.attentions.{i}", False)
            k += 1
        if b < L - 1:
            m[f"input_blocks.{k}.0.op"] = (f"down_blocks.{b}.downsamplers.0.conv", False)
            k += 1
    k = 0
    for b in range(L):
        has_attn = cfg.transformer_depth[L - 1 - b] > 0
        for i in range(n + 1):
            m[f"output_blocks.{k}.0"] = (f"up_blocks.{b}.resnets.{i}", True)
            if has_attn:
                m[f"output_blocks.{k}.1"] = (f"up_blocks.{b}.attentions.{i}", False)
            if i == n and b < L - 1:
                m[f"output_blocks.{k}.{2 if has_attn else 1}.conv"] = (f"up_blocks.{b}.upsamplers.0.conv",
                                                                       False)
            k += 1
    return m


def _rename(name: str, prefix_map: dict, inner: dict) -> str:
    """Rename a parameter or module name by its longest module prefix in `prefix_map`
    ({old prefix: (new prefix, is_resnet)}); inside resnets also by `inner` (SGM_RESNET or its inverse)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):  # longest matching module prefix wins
        head = ".".join(parts[:cut])
        if head in prefix_map:
            new, is_resnet = prefix_map[head]
            rest = ".".join(parts[cut:])
            if is_resnet:
                for old, repl in inner.items():
                    if rest == old or rest.startswith(old + "."):
                        rest = repl + rest[len(old):]
                        break
            return new + ("." + rest if rest else "")
    raise KeyError(name)


def _to_sgm(cfg: unet_mod.UNetConfig):
    """diffusers name -> SGM name, for one config (the reverse table is built once per call of this)."""
    inverse = {new: (old, is_resnet) for old, (new, is_resnet) in unet_prefix_map(cfg).items()}
    resnet_inverse = {new: old for old, new in SGM_RESNET.items()}
    return lambda name: _rename(name, inverse, resnet_inverse)


def unet_name_to_sgm(name: str, cfg: unet_mod.UNetConfig) -> str:
    """One diffusers name -> its SGM spelling (`down_blocks.1.resnets.0.conv1` ->
    `input_blocks.4.0.in_layers.2`)."""
    return _to_sgm(cfg)(name)


def unet_config_from_sgm(sd: dict, source="checkpoint", prefix=SGM_UNET) -> unet_mod.UNetConfig:
    """Derive the UNet architecture from SGM tensor names and shapes (no config in a single file).
    Head width is taken as 64, as in SDXL; the 6 time ids have 256 sinusoidal channels each."""
    keys = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if "label_emb.0.0.weight" not in keys:
        raise ValueError(f"{source}: not an SDXL-architecture UNet (no {prefix}label_emb: an SD1.x/2.x "
                         "checkpoint?)")
    blocks, k = [], 1  # per level: [width, resnets, depth]
    while f"input_blocks.{k}.0.op.weight" in keys or f"input_blocks.{k}.0.in_layers.0.weight" in keys:
        if f"input_blocks.{k}.0.op.weight" in keys:
            blocks.append(None)  # level boundary
        else:
            if not blocks or blocks[-1] is None:
                blocks.append([0, 0, 0])
            depth = len({kk.split(".")[4] for kk in keys
                         if kk.startswith(f"input_blocks.{k}.1.transformer_blocks.")})
            blocks[-1] = [keys[f"input_blocks.{k}.0.out_layers.3.weight"].shape[0], blocks[-1][1] + 1, depth]
        k += 1
    levels = [b for b in blocks if b is not None]
    if not levels or len({b[1] for b in levels}) != 1:
        raise ValueError(f"{source}: cannot derive the UNet's levels from its input_blocks")
    to_k = [v for kk, v in keys.items() if kk.endswith("attn2.to_k.weight")]
    add_in = keys["label_emb.0.0.weight"].shape[1]
    try:
        return unet_mod.UNetConfig(in_channels=keys["input_blocks.0.0.weight"].shape[1],
                          out_channels=keys["out.2.weight"].shape[0],
                          block_out_channels=tuple(b[0] for b in levels), layers_per_block=levels[0][1],
                          transformer_depth=tuple(b[2] for b in levels),
                          num_heads=tuple(max(b[0] // 64, 1) for b in levels),
                          cross_attention_dim=to_k[0].shape[1] if to_k else 2048, pooled_dim=add_in - 6 * 256)
    except KeyError as e:
        raise ValueError(f"{source}: the UNet lacks {prefix}{e.args[0]}") from None


def unet_from_sgm(sd: dict, cfg: unet_mod.UNetConfig, source="checkpoint", prefix=SGM_UNET) -> dict:
    """SGM UNet tensors (other keys ignored) -> diffusers names; the caller loads them strictly."""
    pm, out, unknown = unet_prefix_map(cfg), {}, []
    for k, v in sd.items():
        if k.startswith(prefix):
            try:
                out[_rename(k[len(prefix):], pm, SGM_RESNET)] = v
            except KeyError:
                unknown.append(k)
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} unexpected UNet keys ({', '.join(sorted(unknown)[:3])}"
                         f"{', ...' if len(unknown) > 3 else ''})")
    return out


def unet_to_sgm(sd: dict, cfg: unet_mod.UNetConfig, prefix=SGM_UNET) -> dict:
    """Diffusers-named UNet tensors -> SGM names."""
    to_sgm = _to_sgm(cfg)
    return {prefix + to_sgm(k): v for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------------
# VAE. SGM spells resnets `block.j`, samplers `downsample`/`upsample`, the mid block `block_1, attn_1,
# block_2`, its attention as 1x1 convs named q, k, v, proj_out; the decoder counts levels bottom-up.

SGM_VAE_RESNET = {"nin_shortcut": "conv_shortcut"}
SGM_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def vae_name_from_sgm(name: str, n_levels: int) -> str:
    """One SGM VAE name (without 'first_stage_model.') -> the diffusers name."""
    p = name.split(".")
    if p[0] in ("encoder", "decoder"):
        if p[1] in ("down", "up"):  # encoder.down.i.block.j / downsample; decoder.up.i counts bottom-up
            i = int(p[2]) if p[1] == "down" else n_levels - 1 - int(p[2])
            blocks = "down_blocks" if p[1] == "down" else "up_blocks"
            if p[3] == "block":
                rest = SGM_VAE_RESNET.get(p[5], p[5])
                return ".".join([p[0], blocks, str(i), "resnets", p[4], rest] + p[6:])
            sampler = {"downsample": "downsamplers.0", "upsample": "upsamplers.0"}[p[3]]
            return ".".join([p[0], blocks, str(i), sampler] + p[4:])
        if p[1] == "mid":
            if p[2].startswith("block_"):
                rest = SGM_VAE_RESNET.get(p[3], p[3])
                return ".".join([p[0], "mid_block.resnets", str(int(p[2][-1]) - 1), rest] + p[4:])
            return ".".join([p[0], "mid_block.attentions.0", SGM_VAE_ATTN[p[3]]] + p[4:])
        if p[1] == "norm_out":
            return ".".join([p[0], "conv_norm_out"] + p[2:])
    return name  # conv_in, conv_out, quant_conv, post_quant_conv keep their names


def vae_config_from_sgm(sd: dict, source="checkpoint", prefix=SGM_VAE) -> vae_mod.VAEConfig:
    keys = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if "encoder.conv_in.weight" not in keys:
        raise ValueError(f"{source}: no VAE ({prefix}encoder.*) in this file")
    n = len({k.split(".")[2] for k in keys if k.startswith("encoder.down.")})
    try:
        widths = tuple(keys[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(n))
        layers = len({k.split(".")[4] for k in keys if k.startswith("encoder.down.0.block.")})
        return vae_mod.VAEConfig(in_channels=keys["encoder.conv_in.weight"].shape[1],
                         out_channels=keys["decoder.conv_out.weight"].shape[0],
                         latent_channels=keys["post_quant_conv.weight"].shape[0], block_out_channels=widths,
                         layers_per_block=layers)
    except KeyError as e:
        raise ValueError(f"{source}: the VAE lacks {prefix}{e.args[0]}") from None


def vae_from_sgm(sd: dict, cfg: vae_mod.VAEConfig, source="checkpoint", prefix=SGM_VAE) -> dict:
    """SGM VAE tensors (other keys ignored) -> diffusers names; attention 1x1 convs become Linear weights."""
    out, unknown = {}, []
    for k, v in sd.items():
        if not k.startswith(prefix):
            continue
        try:
            name = vae_name_from_sgm(k[len(prefix):], len(cfg.block_out_channels))
        except (KeyError, IndexError, ValueError):
            unknown.append(k)
            continue
        if ".attentions." in name and name.endswith("weight") and v.ndim == 4:
            v = v[:, :, 0, 0]  # (C, C, 1, 1) -> (C, C)
        out[name] = v
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} unexpected VAE keys ({', '.join(sorted(unknown)[:3])})")
    return out


def _sgm_vae_names(cfg: vae_mod.VAEConfig) -> list:
    """Every SGM VAE tensor name of this architecture (the reverse map is built from these)."""
    n, L = len(cfg.block_out_channels), cfg.layers_per_block
    res = ["norm1", "conv1", "norm2", "conv2", "nin_shortcut"]
    names = ["quant_conv", "post_quant_conv"]
    for part, lvl, m in (("encoder", "down", L), ("decoder", "up", L + 1)):
        names += [f"{part}.conv_in", f"{part}.conv_out", f"{part}.norm_out"]
        names += [f"{part}.mid.block_{i}.{r}" for i in (1, 2) for r in res]
        names += [f"{part}.mid.attn_1.{a}" for a in SGM_VAE_ATTN]
        for i in range(n):
            names += [f"{part}.{lvl}.{i}.block.{j}.{r}" for j in range(m) for r in res]
            names += [f"{part}.{lvl}.{i}.{lvl}sample.conv"]
    return [f"{n_}.{w}" for n_ in names for w in ("weight", "bias")]


def vae_to_sgm(sd: dict, cfg: vae_mod.VAEConfig, prefix=SGM_VAE) -> dict:
    """Diffusers-named VAE tensors -> SGM names, attention Linear weights as 1x1 convs."""
    inverse = {vae_name_from_sgm(name, len(cfg.block_out_channels)): name for name in _sgm_vae_names(cfg)}
    missing = [k for k in sd if k not in inverse]
    if missing:
        raise ValueError(f"no SGM name for VAE keys {missing[:5]}")
    out = {}
    for k, v in sd.items():
        if ".attentions." in k and k.endswith("weight") and v.ndim == 2:
            v = v[:, :, None, None]  # Linear (C, C) -> 1x1 conv (C, C, 1, 1)
        out[prefix + inverse[k]] = v
    return out


# ----------------------------------------------------------------------------------------------------
# Text encoders. "Canonical" keys are those of the hub's text_encoder*/model.safetensors and of the SGM
# CLIP-L: everything but text_projection under "text_model.". transformers >= 5.6 flattened
# CLIPTextModel (no text_model. wrapper) while CLIPTextModelWithProjection keeps it, so each model is
# asked for its own layout. bigG is stored in OpenCLIP's layout.

# canonical key -> OpenCLIP key, outside the blocks
OPENCLIP_GLOBAL = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",  # a bare tensor in OpenCLIP
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
# canonical module -> OpenCLIP module, inside block i (text_model.encoder.layers.i / transformer.resblocks.i)
OPENCLIP_BLOCK = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                  "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_LAYER = "text_model.encoder.layers."
_RESBLOCK = "transformer.resblocks."


def _wrapped(model):
    return any(k.startswith("text_model.") for k in model.state_dict())


def canonical_state_dict(model) -> dict:
    """A transformers CLIP model's state dict with canonical (hub / SGM) key names, whatever the version."""
    sd = model.state_dict()
    return dict(sd) if _wrapped(model) else {"text_model." + k: v for k, v in sd.items()}


def model_keys(sd: dict, model) -> dict:
    """Canonical keys -> the installed transformers' key names for this model."""
    return dict(sd) if _wrapped(model) else {k.removeprefix("text_model."): v for k, v in sd.items()}


def openclip_to_transformers(sd: dict, prefix="") -> dict:
    """OpenCLIP text tower (prefix removed) -> canonical CLIPTextModelWithProjection keys.
    Unknown keys raise a ValueError naming them (with `prefix`), so nothing loads half-way."""
    inv_global = {v: k for k, v in OPENCLIP_GLOBAL.items()}
    inv_block = {v: k for k, v in OPENCLIP_BLOCK.items()}
    out, unknown = {}, []
    for key, v in sd.items():
        block = re.fullmatch(re.escape(_RESBLOCK) + r"(\d+)\.(.+)\.(\w+)", key)
        if key in inv_global:
            out[inv_global[key]] = v
        elif key == "text_projection":
            out["text_projection.weight"] = v.t().contiguous()  # (width, proj) -> nn.Linear's (proj, width)
        elif block and block[2] == "attn" and block[3] in ("in_proj_weight", "in_proj_bias"):
            # nn.MultiheadAttention stacks q, k, v along dim 0: (3 * width, width) or (3 * width,)
            kind = block[3].removeprefix("in_proj_")
            for name, part in zip("qkv", v.chunk(3, dim=0)):
                out[f"{_LAYER}{block[1]}.self_attn.{name}_proj.{kind}"] = part.clone()  # no shared storage
        elif block and block[2] in inv_block:
            out[f"{_LAYER}{block[1]}.{inv_block[block[2]]}.{block[3]}"] = v
        else:
            unknown.append(prefix + key)
    if unknown:
        raise ValueError(f"unknown OpenCLIP text keys {sorted(unknown)}")
    return out


def transformers_to_openclip(sd: dict) -> dict:
    """Canonical CLIPTextModelWithProjection keys -> OpenCLIP text tower keys (q, k, v fused again)."""
    out, qkv = {}, {}
    for key, v in sd.items():
        layer = re.fullmatch(re.escape(_LAYER) + r"(\d+)\.(.+)\.(\w+)", key)
        if key in OPENCLIP_GLOBAL:
            out[OPENCLIP_GLOBAL[key]] = v
        elif key == "text_projection.weight":
            out["text_projection"] = v.t().contiguous()  # (proj, width) -> OpenCLIP's (width, proj)
        elif layer and layer[2] in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((layer[1], layer[3]), {})[layer[2][10]] = v  # "self_attn.q_proj"[10] == "q"
        elif layer and layer[2] in OPENCLIP_BLOCK:
            out[f"{_RESBLOCK}{layer[1]}.{OPENCLIP_BLOCK[layer[2]]}.{layer[3]}"] = v
        else:
            raise ValueError(f"no OpenCLIP name for text encoder key {key!r}")
    for (i, kind), parts in qkv.items():
        out[f"{_RESBLOCK}{i}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def clip_config_from_shapes(sd: dict, hidden_act: str, head_dim=64):
    """CLIPTextConfig from canonical tensors: a single file carries no config, but the shapes say it all.
    head_dim cannot be read from the tensors (q/k/v are width x width whatever the heads): SDXL uses 64
    (CLIP-L 12 heads, bigG 20); an encoder narrower than head_dim gets one head (tiny test models)."""
    from transformers import CLIPTextConfig
    vocab_size, width = sd["text_model.embeddings.token_embedding.weight"].shape
    if width > head_dim and width % head_dim:
        raise ValueError(f"text encoder width {width} is not a multiple of head_dim {head_dim}")
    layers = {int(m[1]) for k in sd if (m := re.match(re.escape(_LAYER) + r"(\d+)\.", k))}
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=sd[_LAYER + "0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=len(layers), num_attention_heads=max(1, width // head_dim),
        max_position_embeddings=sd["text_model.embeddings.position_embedding.weight"].shape[0],
        projection_dim=sd["text_projection.weight"].shape[0] if "text_projection.weight" in sd else width,
        hidden_act=hidden_act, layer_norm_eps=1e-5,
        # as the SDXL hub configs: eos_token_id 2 makes transformers pool at argmax(input_ids), which is
        # OpenCLIP's own rule (EOS has the largest id in CLIP's vocabulary) and also the first EOS when
        # tokenizer 1 pads with EOS
        bos_token_id=0, eos_token_id=2, pad_token_id=1)


def text_from_sgm(sd: dict, head_dim=64) -> tuple:
    """Both encoders of an SGM file (other parts' keys ignored) -> ((CLIP-L canonical tensors, config),
    (bigG canonical tensors, config)). CLIP-L uses OpenAI's quick_gelu, bigG (OpenCLIP) the exact gelu."""
    clip_l = {k[len(SGM_CLIP_L):]: v for k, v in sd.items() if k.startswith(SGM_CLIP_L)
              and k not in SGM_UNUSED}
    bigg = {k[len(SGM_BIGG):]: v for k, v in sd.items() if k.startswith(SGM_BIGG) and k not in SGM_UNUSED}
    for name, part, prefix in (("CLIP-L", clip_l, SGM_CLIP_L), ("OpenCLIP bigG", bigg, SGM_BIGG)):
        if not part:
            raise ValueError(f"the single file has no {name} text encoder keys ({prefix}*)")
    try:
        bigg = openclip_to_transformers(bigg, prefix=SGM_BIGG)
        return ((clip_l, clip_config_from_shapes(clip_l, "quick_gelu", head_dim)),
                (bigg, clip_config_from_shapes(bigg, "gelu", head_dim)))
    except KeyError as e:
        raise ValueError(f"the single file lacks text encoder tensor {e.args[0]!r}") from None


def text_to_sgm(clip_l: dict, bigg: dict) -> dict:
    """Canonical CLIP-L and bigG tensors -> SGM keys (CLIP-L stays in transformers' layout)."""
    out = {SGM_CLIP_L + k: v for k, v in clip_l.items()}
    out.update({SGM_BIGG + k: v for k, v in transformers_to_openclip(bigg).items()})
    return out


# ----------------------------------------------------------------------------------------------------
# LoRA names (kohya). '_' makes the names ambiguous to parse, so both spellings are looked up in a
# table built from the UNet's real module names.

def kohya_table(module_names, cfg: unet_mod.UNetConfig = None) -> dict:
    """{kohya name in either spelling: diffusers module name}; the SGM spelling needs the UNet config."""
    table = {lora_mod.kohya_name(n): n for n in module_names}
    if cfg is not None:
        to_sgm = _to_sgm(cfg)
        for n in module_names:
            try:
                k = lora_mod.kohya_name(to_sgm(n))
            except KeyError:
                continue
            if table.get(k, n) != n:  # would silently merge into the wrong layer
                raise ValueError(f"SGM LoRA name {k} is ambiguous ({table[k]} and {n})")
            table[k] = n
    return table


def kohya_respell(lora_sd: dict, cfg: unet_mod.UNetConfig, to="sgm", source="lora") -> dict:
    """A kohya LoRA state dict in the other spelling, same tensors: to='sgm' (lora_unet_input_blocks_...)
    or to='diffusers' (lora_unet_down_blocks_...). Keys of no Linear/Conv2d of this UNet are refused."""
    with torch.device("meta"):
        names = [n for n, m in unet_mod.UNet(cfg).named_modules()
                 if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    table, to_sgm = kohya_table(names, cfg), _to_sgm(cfg)
    out, unknown = {}, []
    for k, v in lora_sd.items():
        name, _, suffix = k.partition(".")
        if name not in table:
            unknown.append(k)
            continue
        module = table[name]
        out[f"{lora_mod.kohya_name(to_sgm(module) if to == 'sgm' else module)}.{suffix}"] = v
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} LoRA keys name no Linear/Conv2d of this UNet: "
                         f"{sorted(unknown)[:3]}")
    return out


# ----------------------------------------------------------------------------------------------------
# The whole single file

SGM_PARTS = {"unet": SGM_UNET, "vae": SGM_VAE, "clip_l": SGM_CLIP_L, "bigg": SGM_BIGG}


def check_single_file(sd: dict, source="checkpoint"):
    """Refuse keys outside the four parts (the unused tensors real files carry are tolerated by name)."""
    unknown = sorted(k for k in sd if not k.startswith(tuple(SGM_PARTS.values())) and k not in SGM_UNUSED)
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} keys belong to no SDXL part (UNet {SGM_UNET}*, VAE "
                         f"{SGM_VAE}*, text {SGM_CLIP_L}*, {SGM_BIGG}*): {', '.join(unknown[:3])}"
                         f"{', ...' if len(unknown) > 3 else ''}")


def to_single_file(unet_sd, unet_cfg, vae_sd, vae_cfg, clip_l_sd, bigg_sd) -> dict:
    """Diffusers-named UNet and VAE tensors and canonical text encoder tensors -> one SGM state dict."""
    out = unet_to_sgm(unet_sd, unet_cfg)
    out.update(vae_to_sgm(vae_sd, vae_cfg))
    out.update(text_to_sgm(clip_l_sd, bigg_sd))
    return out


# ----------------------------------------------------------------------------------------------------
# Strict loading

def check_keys(model: torch.nn.Module, sd: dict, source: str):
    """Raise naming the file and the missing, unexpected and mis-shaped keys; do nothing if all match."""
    want = model.state_dict()
    check_float(want, sd, source)
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


def check_float(want: dict, sd: dict, source: str, key_prefix=""):
    """Refuse, naming the first, a tensor that is not floating point (int8, bool, ...) where the model's is:
    torch's load_state_dict would say so in hundreds of lines."""
    for k, v in sd.items():
        if k in want and want[k].is_floating_point() and not v.is_floating_point():
            dtype = str(v.dtype).removeprefix("torch.")
            raise CheckpointError(f"{source}: {key_prefix}{k} is {dtype}, not a floating-point tensor (model "
                                  "weights are floats)")


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
        raise CheckpointError(f"{source}: not an SDXL-architecture checkpoint (no label_emb: an SD1.x/2.x "
                              "model?)")
    if "model.diffusion_model.input_blocks.0.0.weight" in sd:
        return "sgm"
    if "conv_in.weight" in sd and "add_embedding.linear_1.weight" in sd:
        return "diffusers"
    if "conv_in.weight" in sd:
        raise CheckpointError(f"{source}: not an SDXL-architecture UNet (no add_embedding: an SD1.x/2.x "
                              "UNet?)")
    raise CheckpointError(f"{source}: no UNet found: expected diffusers keys (conv_in.weight, ...) or "
                          f"original-layout keys (model.diffusion_model.*); first keys: {list(sd)[:3]}")


# ----------------------------------------------------------------------------------------------------
# Parts

def checked_single_file(sd: dict, source: str) -> dict:
    """A single file's tensors after checking that every key belongs to a part (check_single_file)."""
    try:
        check_single_file(sd, source)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return sd


def unet_config(base: str, sd=None) -> unet_mod.UNetConfig:
    """The UNet architecture: from `unet/config.json` of a diffusers base, or from a single file's shapes
    (`sd`: its already-read tensors)."""
    if is_file(base):
        try:
            return unet_config_from_sgm(read_safetensors(base) if sd is None else sd, source=str(base))
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    p = fetch(base, "unet/config.json")
    return unet_mod.UNetConfig.from_diffusers(read_json(p), str(p))


def unet_state_dict(sd: dict, source: str, cfg=None) -> tuple:
    """(diffusers-named UNet tensors, config) from a file's tensors in either layout."""
    if detect_layout(sd, source) == "sgm":
        checked_single_file(sd, source)
        try:
            cfg = cfg or unet_config_from_sgm(sd, source=source)
            return unet_from_sgm(sd, cfg, source=source), cfg
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    if cfg is None:
        raise CheckpointError(f"{source}: a diffusers-layout UNet file carries no config; give a base")
    return sd, cfg


def load_unet(source: str, cfg=None, device="cpu", dtype=torch.float32,
              variant=None, sd=None) -> unet_mod.UNet:
    """A UNet from a file (either layout; `cfg` from the base for diffusers-layout files) or a base."""
    if is_file(source):
        sd, cfg = unet_state_dict(read_safetensors(source) if sd is None else sd, str(source), cfg)
        return build_strict(unet_mod.UNet, cfg, sd, str(source), device, dtype)
    cfg = cfg or unet_config(source)
    path = fetch_variant(source, "unet/diffusion_pytorch_model{v}.safetensors", variant)
    return build_strict(unet_mod.UNet, cfg, read_safetensors(path), str(path), device, dtype)


def load_any_unet(source, base=None, device="cpu", dtype=torch.float32) -> unet_mod.UNet:
    """A UNet from wherever a user keeps one, strictly: a single file (SGM layout, the whole model or the
    UNet alone); a diffusers-layout UNet file, its architecture from the config.json next to it (as
    train.py exports it) or else from `base`; a diffusers UNet folder (config.json and
    diffusion_pytorch_model.safetensors); a diffusers SDXL folder or hub id (its unet/)."""
    p = Path(source)
    if p.is_dir() and (p / "config.json").is_file() and not (p / "unet").is_dir():
        cfg = unet_mod.UNetConfig.from_diffusers(read_json(p / "config.json"), str(p / "config.json"))
        return load_unet(str(p / "diffusion_pytorch_model.safetensors"), cfg, device, dtype)
    if not is_file(source):
        return load_unet(str(source), None, device, dtype)
    sd = read_safetensors(source)
    cfg = None
    if detect_layout(sd, str(source)) == "diffusers":
        cfg_json = p.with_name("config.json")
        if cfg_json.is_file():
            cfg = unet_mod.UNetConfig.from_diffusers(read_json(cfg_json), str(cfg_json))
        elif base is not None:
            cfg = unet_config(base)
        else:
            raise CheckpointError(f"{source}: a diffusers-layout UNet file with no config.json next to it; "
                                  "give --base (the architecture's source)")
    return load_unet(str(source), cfg, device, dtype, sd=sd)


def load_vae(source: str, device="cpu", dtype=torch.float32, variant=None, sd=None) -> vae_mod.VAE:
    """The VAE of a base; `sd`: the already-read tensors of a single file (read once for all parts)."""
    if is_file(source):
        sd = checked_single_file(read_safetensors(source) if sd is None else sd, str(source))
        try:
            cfg = vae_config_from_sgm(sd, source=str(source))
            vae_sd = vae_from_sgm(sd, cfg, source=str(source))
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        return build_strict(vae_mod.VAE, cfg, vae_sd, str(source), device, dtype)
    cfg_path = fetch(source, "vae/config.json")
    cfg = vae_mod.VAEConfig.from_diffusers(read_json(cfg_path), str(cfg_path))
    path = fetch_variant(source, "vae/diffusion_pytorch_model{v}.safetensors", variant)
    return build_strict(vae_mod.VAE, cfg, read_safetensors(path), str(path), device, dtype)


# ----------------------------------------------------------------------------------------------------
# The VAE sample.py decodes with (`--vae`): the base's, the tiny preview one (TAESDXL), or a file or folder of
# either kind, told apart by its config's class or its keys

TINY_VAE_REPO = "madebyollin/taesdxl"  # AutoencoderTiny for SDXL latents: config.json + weights at the root
TINY_VAE_FILES = ["config.json", "diffusion_pytorch_model.safetensors"]


def vae_kind(keys, source: str) -> str:
    """A VAE file's layout from its key names: 'tiny' (AutoencoderTiny), 'diffusers' (AutoencoderKL),
    'sgm' (a VAE alone in the original layout, e.g. sdxl_vae.safetensors) or 'single' (a whole SGM
    checkpoint, its first_stage_model.*); anything else is refused naming the file."""
    keys = list(keys)
    if any(k.startswith(("encoder.layers.", "decoder.layers.")) for k in keys):
        return "tiny"
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in keys:
        return "diffusers"
    if "encoder.down.0.block.0.conv1.weight" in keys:
        return "sgm"
    if SGM_VAE + "encoder.conv_in.weight" in keys:
        return "single"
    what = "a UNet or a checkpoint without a VAE" if any(k.startswith(SGM_UNET) or k == "conv_in.weight"
                                                         for k in keys) else "no VAE"
    raise CheckpointError(f"{source}: {what}: expected AutoencoderTiny keys (encoder.layers.*), "
                          "AutoencoderKL keys (encoder.down_blocks.*) or original ones (encoder.down.*, "
                          f"first_stage_model.*); first keys: {keys[:3]}")


def _refuse_kind(kind: str, want: str, source: str):
    """One line when a tiny VAE is given where a full one is wanted, or the other way round."""
    if (kind == "tiny") != (want == "tiny"):
        have = "the tiny VAE (AutoencoderTiny)" if kind == "tiny" else "a full-size VAE (AutoencoderKL)"
        wanted = "the tiny VAE (AutoencoderTiny)" if want == "tiny" else "a full-size VAE (AutoencoderKL)"
        raise CheckpointError(f"{source}: holds {have}, not {wanted}")


def tiny_vae_config_from_keys(sd: dict, source: str) -> vae_mod.TinyVAEConfig:
    """A TinyVAEConfig from the shapes of a lone AutoencoderTiny file (it carries no config.json): each plain
    conv of `encoder.layers` opens a stage, each of `decoder.layers` after the first closes one, and the
    residual blocks between them are counted (layers without tensors, ReLU and Upsample, have no keys)."""
    def layers(part):  # [(index, 'conv' | 'block', the first conv's weight)] in order
        out = {}
        for k, v in sd.items():
            p = k.split(".")
            if p[0] == part and p[1] == "layers":
                if p[3] == "weight":
                    out[int(p[2])] = ("conv", v)
                elif p[3:5] == ["conv", "0"] and p[5] == "weight":
                    out[int(p[2])] = ("block", v)
        return [out[i] for i in sorted(out)]
    try:
        enc, dec = layers("encoder"), layers("decoder")
        ein, eout = [i for i, (t, _) in enumerate(enc) if t == "conv"][:-1], enc[-1][1]
        e_counts = [b - a - 1 for a, b in zip(ein, ein[1:] + [len(enc) - 1])]
        douts = [i for i, (t, _) in enumerate(dec) if t == "conv"][1:]
        d_counts = [b - a - 1 for a, b in zip([0] + douts[:-1], douts)]
        return vae_mod.TinyVAEConfig(
            in_channels=enc[0][1].shape[1], out_channels=dec[-1][1].shape[0], latent_channels=eout.shape[0],
            encoder_block_out_channels=tuple(enc[i][1].shape[0] for i in ein),
            num_encoder_blocks=tuple(e_counts),
            decoder_block_out_channels=tuple(dec[i][1].shape[1] for i in douts),  # closing conv's input
            num_decoder_blocks=tuple(d_counts))
    except (IndexError, ValueError) as e:
        raise CheckpointError(f"{source}: not a readable AutoencoderTiny layout ({e})") from None


def full_vae_config_from_keys(sd: dict, source: str) -> vae_mod.VAEConfig:
    """A VAEConfig from the shapes of a lone AutoencoderKL file in diffusers keys. GroupNorm's group count
    is not in any shape: SDXL's 32 is assumed."""
    try:
        n = len({k.split(".")[2] for k in sd if k.startswith("encoder.down_blocks.")})
        return vae_mod.VAEConfig(
            in_channels=sd["encoder.conv_in.weight"].shape[1],
            out_channels=sd["decoder.conv_out.weight"].shape[0],
            latent_channels=sd["post_quant_conv.weight"].shape[0],
            block_out_channels=tuple(sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]
                                     for i in range(n)),
            layers_per_block=len({k.split(".")[4] for k in sd
                                  if k.startswith("encoder.down_blocks.0.resnets.")}))
    except KeyError as e:
        raise CheckpointError(f"{source}: the VAE lacks {e.args[0]}") from None


def load_vae_file(path, device="cpu", dtype=torch.float32, want=None):
    """A VAE from one .safetensors file of any kind vae_kind knows; `want` ('tiny' or 'full') refuses the
    other kind in one line."""
    sd = read_safetensors(path)
    kind = vae_kind(sd, str(path))
    if want:
        _refuse_kind(kind, want, str(path))
    if kind == "tiny":
        return build_strict(vae_mod.TinyVAE, tiny_vae_config_from_keys(sd, str(path)), sd, str(path), device,
                            dtype)
    if kind == "single":
        return load_vae(str(path), device, dtype, sd=sd)
    if kind == "sgm":
        try:
            cfg = vae_config_from_sgm(sd, str(path), prefix="")
            sd = vae_from_sgm(sd, cfg, str(path), prefix="")
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    else:
        cfg = full_vae_config_from_keys(sd, str(path))
    return build_strict(vae_mod.VAE, cfg, sd, str(path), device, dtype)


def load_vae_folder(folder, device="cpu", dtype=torch.float32, want=None):
    """A VAE from a diffusers folder: `config.json` + `diffusion_pytorch_model.safetensors` (a VAE's own
    folder, as madebyollin/taesdxl) or the same under `vae/` (a whole base). Its class comes from the config;
    weights of the other kind are refused in one line."""
    folder = Path(folder)
    if not (folder / "config.json").exists() and (folder / "vae" / "config.json").exists():
        folder = folder / "vae"
    cfg_path, path = folder / "config.json", folder / "diffusion_pytorch_model.safetensors"
    if not cfg_path.exists():
        raise CheckpointError(f"{folder}: no config.json (nor vae/config.json): not a diffusers VAE folder")
    cfg = read_json(cfg_path)
    cls_name = cfg.get("_class_name")
    if cls_name not in ("AutoencoderTiny", "AutoencoderKL"):
        raise CheckpointError(f"{cfg_path}: _class_name {cls_name!r}, not AutoencoderTiny or AutoencoderKL")
    kind = "tiny" if cls_name == "AutoencoderTiny" else "full"
    if want:
        _refuse_kind(kind, want, str(folder))
    sd = read_safetensors(path)
    _refuse_kind(vae_kind(sd, str(path)), kind, f"{path} (its config.json says {cls_name})")
    try:
        model_cfg = (vae_mod.TinyVAEConfig if kind == "tiny" else vae_mod.VAEConfig).from_diffusers(
            cfg, str(cfg_path))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return build_strict(vae_mod.TinyVAE if kind == "tiny" else vae_mod.VAE, model_cfg, sd, str(path), device,
                        dtype)


def check_vae_source(source: str) -> None:
    """sample.py's cheap check of a --vae PATH before anything is loaded: an existing folder, a hub id, or a
    .safetensors file whose header names VAE keys."""
    if os.path.isdir(source) or is_hub_id(source):
        return
    if not (is_file(source) or os.path.exists(source)):
        raise CheckpointError(f"--vae {source}: no such file or folder (expected full, tiny, a folder, a "
                              ".safetensors file or a hub repo id)")
    vae_kind(read_header(source), str(source))


def load_tiny_vae(source=TINY_VAE_REPO, device="cpu", dtype=torch.float32):
    """The tiny preview VAE from a hub id (default madebyollin/taesdxl, through the hub cache as every other
    weight), a folder or a .safetensors file; a full-size VAE is refused in one line."""
    if is_file(source):
        return load_vae_file(source, device, dtype, want="tiny")
    return load_vae_folder(fetch_folder(source, TINY_VAE_FILES), device, dtype, want="tiny")


def load_vae_choice(choice: str, base: str, device="cpu", dtype=torch.float32, variant=None, sd=None):
    """sample.py's --vae: 'full' (the base's own VAE; `sd` a single-file base's tensors), 'tiny' (TAESDXL
    from the hub) or a PATH, a folder or .safetensors file of either kind, told apart by config or keys."""
    if choice == "full":
        return load_vae(base, device, dtype, variant, sd=sd)
    if choice == "tiny":
        return load_tiny_vae(TINY_VAE_REPO, device, dtype)
    if os.path.isdir(choice):
        return load_vae_folder(choice, device, dtype)
    if is_hub_id(choice):  # a VAE repo on the hub laid out as madebyollin/taesdxl (config.json at the root)
        return load_vae_folder(fetch_folder(choice, TINY_VAE_FILES), device, dtype)
    check_vae_source(choice)
    return load_vae_file(choice, device, dtype)


def load_text(source: str, device="cpu", dtype=torch.float32, variant=None, tokenizers=SDXL_BASE, sd=None):
    """Both CLIP text encoders and tokenizers. A single file brings its encoders; its tokenizers come from
    `tokenizers` (the SDXL base repo), as single files carry none."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # one bar per encoder is noise on a command line
    if is_file(source):
        folder = fetch_folder(tokenizers, TOKENIZER_FILES)
        tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        tok2 = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
        return text_mod.TextEncoders(tok, tok2, *load_text_encoders(source, device, dtype, sd))
    v = "" if variant is None else f".{variant}"
    folder = fetch_folder(source, [p.format(v=v) for p in TEXT_FILES])
    return text_from_folder(folder, dtype=dtype, device=device, variant=variant)


def load_text_encoders(source: str, device="cpu", dtype=torch.float32, sd=None) -> tuple:
    """(CLIP-L, bigG) transformers models of a single file, without tokenizers."""
    sd = checked_single_file(read_safetensors(source) if sd is None else sd, str(source))
    try:
        return encoders_from_single_file(sd, dtype=dtype, device=device)
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


# ----------------------------------------------------------------------------------------------------
# Text encoders: a diffusers folder or a single file, loaded strictly

def load_tokenizers(folder):
    """Both tokenizers of a diffusers SDXL folder; a single file carries none, so it borrows the base
    repo's."""
    folder = Path(folder)
    for sub in ("tokenizer", "tokenizer_2"):
        if not (folder / sub).is_dir():
            raise ValueError(f"{folder} has no {sub}/ folder (SDXL's tokenizers are tokenizer/ tokenizer_2/)")
    return tuple(CLIPTokenizer.from_pretrained(folder / sub) for sub in ("tokenizer", "tokenizer_2"))


def _build(model_cls, config, sd, name, dtype, device, key_prefix=""):
    """Build on the meta device (no random init of ~800M parameters), then load strictly.

    key_prefix only makes the error name the keys as the file does."""
    with torch.device("meta"):
        model = model_cls(config)
    want = canonical_state_dict(model)
    missing = sorted(key_prefix + k for k in set(want) - set(sd))
    unexpected = sorted(key_prefix + k for k in set(sd) - set(want))
    if missing or unexpected:
        raise ValueError(f"{name} does not fit the model its config describes: "
                         f"missing {missing}, unexpected {unexpected}")
    check_float(want, sd, name, key_prefix)
    model.load_state_dict(model_keys(sd, model), strict=True, assign=True)
    for buf_name, buf in model.named_buffers():  # non-persistent buffers are not in any file
        if buf.is_meta and buf_name.endswith("position_ids"):
            owner = model.get_submodule(buf_name.rpartition(".")[0])
            owner.position_ids = torch.arange(buf.shape[-1]).expand(buf.shape).clone()  # (1, 77)
        elif buf.is_meta:
            raise ValueError(f"{model_cls.__name__} has buffer {buf_name!r} that no file provides")
    return model.to(device=device, dtype=dtype)


def encoders_from_single_file(sd, dtype=torch.float32, device="cpu", head_dim=64):
    """(CLIP-L, bigG) from an SGM single-file state dict (other keys, e.g. the UNet's, are ignored);
    the configs come from the shapes (text_from_sgm; head_dim cannot be read from them)."""
    (clip_l, config), (bigg, config_2) = text_from_sgm(sd, head_dim)
    text_encoder = _build(CLIPTextModel, config, clip_l, "CLIP-L in the single file", dtype, device,
                          key_prefix=SGM_CLIP_L)
    # bigG's keys are already converted: the error names them as transformers does
    text_encoder_2 = _build(CLIPTextModelWithProjection, config_2, bigg,
                            "OpenCLIP bigG in the single file (transformers names)", dtype, device)
    return text_encoder, text_encoder_2


def text_from_single_file(sd, tokenizer, tokenizer_2, dtype=torch.float32, device="cpu", head_dim=64):
    """TextEncoders from an SGM single file; its tokenizers come from elsewhere (the SDXL base repo)."""
    return text_mod.TextEncoders(tokenizer, tokenizer_2,
                                 *encoders_from_single_file(sd, dtype, device, head_dim))


def encoder_from_folder(model_cls, folder, dtype=torch.float32, device="cpu", variant=None):
    """One CLIP text encoder of a diffusers folder (text_encoder/ or text_encoder_2/) from its config.json and
    model[.variant].safetensors only: built on the meta device and loaded strictly, as a single file's are.
    Never through torch.load: a folder with only pytorch_model.bin is refused by name."""
    folder = Path(folder)
    names = ([f"model.{variant}.safetensors"] if variant else []) + ["model.safetensors"]
    path = next((folder / n for n in names if (folder / n).is_file()), None)
    if path is None:
        pickled = sorted(folder.glob("*.bin"))
        if pickled:
            raise CheckpointError(f"{pickled[0]}: pickled weights are not loaded (unsafe); {folder} needs a "
                                  "model.safetensors (convert it once where you trust the file)")
        raise CheckpointError(f"{folder / names[-1]}: no such file")
    try:
        config = CLIPTextConfig.from_json_file(str(folder / "config.json"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: cannot read config ({e})") from None
    # hub files spell every key but text_projection under text_model.; old ones carry position_ids (a buffer)
    sd = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
          for k, v in read_safetensors(path).items() if not k.endswith("position_ids")}
    try:
        return _build(model_cls, config, sd, str(path), dtype, device)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def text_from_folder(folder, dtype=torch.float32, device="cpu", variant=None):
    """From a local diffusers-layout folder (fetch_folder resolves hub ids to such folders); safetensors
    only (encoder_from_folder)."""
    folder = Path(folder)
    for sub in ("text_encoder", "text_encoder_2"):
        if not (folder / sub).is_dir():
            raise ValueError(f"text.py: {folder} has no {sub}/ folder (a diffusers SDXL folder has "
                             "tokenizer/ tokenizer_2/ text_encoder/ text_encoder_2/)")
    tokenizer, tokenizer_2 = load_tokenizers(folder)
    text_encoder = encoder_from_folder(CLIPTextModel, folder / "text_encoder", dtype, device, variant)
    text_encoder_2 = encoder_from_folder(CLIPTextModelWithProjection, folder / "text_encoder_2", dtype,
                                         device, variant)
    return text_mod.TextEncoders(tokenizer, tokenizer_2, text_encoder, text_encoder_2)


# ----------------------------------------------------------------------------------------------------
# LoRA files

def parse_lora_spec(spec: str) -> tuple:
    """--lora FILE[:SCALE] -> (FILE, SCALE), SCALE 1.0 when absent. Only a number after the last colon is a
    scale: a Windows drive letter (C:\\loras\\a.safetensors) or any other non-number belongs to the path. A
    scale that is not finite (inf, nan) is refused: it would fill the UNet with Inf/NaN."""
    path, _, scale = spec.rpartition(":")
    try:
        value = float(scale) if path else None
    except ValueError:
        value = None
    if value is None:
        return spec, 1.0
    if not math.isfinite(value):
        raise ValueError(f"--lora {spec}: the scale must be a finite number")
    return path, value


def read_lora(path, cfg=None) -> dict:
    """A kohya-format LoRA `.safetensors` -> its state dict (tensors on the CPU), in the diffusers spelling
    that lora.merge_lora reads: with the UNet's config, names in the SGM spelling are respelled."""
    path = os.fspath(path)
    check_lora_file(path)
    sd = read_safetensors(path)
    return sd if cfg is None else lora_diffusers_spelling(sd, cfg, path)


def check_lora_file(path) -> None:
    """A LoRA file checked by its header (no tensor read): a readable .safetensors holding kohya LoRA tensors.
    Commands run it before loading anything; lora.merge_lora checks every key, shape and dtype."""
    header = read_header(path)
    if not any(k.endswith(".lora_down.weight") for k in header):
        raise CheckpointError(f"{path}: not a kohya LoRA (no '*.lora_down.weight' tensors; {len(header)} "
                              f"tensors, first {sorted(header)[:3]})")


def lora_diffusers_spelling(lora_sd: dict, cfg, source) -> dict:
    """SGM-spelled kohya names -> diffusers-spelled; names this UNet does not have pass unchanged (merge_lora
    names them). One layer in both spellings is refused: it would be fused twice."""
    with torch.device("meta"):
        names = [n for n, m in unet_mod.UNet(cfg).named_modules()
                 if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    table, out = kohya_table(names, cfg), {}
    for k, v in lora_sd.items():
        name, dot, suffix = k.partition(".")
        new = lora_mod.kohya_name(table[name]) + dot + suffix if name in table else k
        if new in out:
            raise CheckpointError(f"{source}: {table[name]} appears twice (both the diffusers and the SGM "
                                  "spelling)")
        out[new] = v
    return out


# ----------------------------------------------------------------------------------------------------
# ControlNets (Sec. 5.3): a diffusers folder or hub id, or one .safetensors file, loaded strictly

CONTROLNET_FILE = "diffusion_pytorch_model{v}.safetensors"  # beside config.json, as the official repos


def check_controlnet_keys(sd: dict, source: str) -> None:
    """Refuse, in one line, what is not a diffusers-layout SDXL ControlNet: a LoRA, a UNet, an original-layout
    (ldm) ControlNet, an SD1.x/2.x ControlNet (no add_embedding), anything else. `sd`: tensors or a header."""
    if any(k.startswith("lora_unet_") or ".lora_down." in k or "lora_A" in k for k in sd):
        raise CheckpointError(f"{source}: a LoRA file, not a ControlNet (pass it with --lora)")
    if any(k.startswith(("control_model.", "input_hint_block.")) or ".input_hint_block." in k for k in sd):
        raise CheckpointError(f"{source}: a ControlNet in the original (ldm) layout; only diffusers-layout "
                              "ControlNets are read (diffusers' ControlNetModel.from_single_file + "
                              "save_pretrained converts it)")
    if "controlnet_cond_embedding.conv_in.weight" not in sd:
        unet = "conv_in.weight" in sd or any(k.startswith(SGM_UNET) for k in sd)
        what = "a UNet" if unet else "no ControlNet"
        raise CheckpointError(f"{source}: {what}, not a ControlNet (no controlnet_cond_embedding.*; "
                              f"{len(sd)} tensors, first {sorted(sd)[:3]})")
    if "add_embedding.linear_1.weight" not in sd:
        raise CheckpointError(f"{source}: not an SDXL ControlNet (no add_embedding.*: an SD1.x/2.x "
                              "ControlNet?)")


def controlnet_config_from_shapes(sd: dict, source="controlnet") -> unet_mod.ControlNetConfig:
    """Derive the architecture of a ControlNet file that came without config.json from its tensor shapes
    (head width 64 and 6 time ids of 256 channels, as SDXL; unet_config_from_sgm's rule)."""
    def n(prefix):  # how many numbered children `prefix.N.` the file has
        return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})
    try:
        widths = [sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(n("down_blocks."))]
        depth = tuple(n(f"down_blocks.{i}.attentions.0.transformer_blocks.") for i in range(len(widths)))
        to_k = [v for k, v in sd.items() if k.endswith("attn2.to_k.weight")]
        emb = "controlnet_cond_embedding."
        hint = [sd[emb + "conv_in.weight"].shape[0]] + [sd[f"{emb}blocks.{2 * i + 1}.weight"].shape[0]
                                                        for i in range(n(emb + "blocks.") // 2)]
        return unet_mod.ControlNetConfig(
            in_channels=sd["conv_in.weight"].shape[1], block_out_channels=tuple(widths),
            layers_per_block=n("down_blocks.0.resnets."), transformer_depth=depth,
            num_heads=tuple(max(w // 64, 1) for w in widths),
            cross_attention_dim=to_k[0].shape[1] if to_k else 2048,
            pooled_dim=sd["add_embedding.linear_1.weight"].shape[1] - 6 * 256,
            conditioning_channels=sd[emb + "conv_in.weight"].shape[1],
            conditioning_embedding_out_channels=tuple(hint))
    except KeyError as e:
        raise CheckpointError(f"{source}: cannot derive the ControlNet's architecture: no "
                              f"{e.args[0]}") from None


def controlnet_config(path) -> unet_mod.ControlNetConfig:
    try:
        return unet_mod.ControlNetConfig.from_diffusers(read_json(path), str(path))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(str(e) if isinstance(e, ValueError) else f"{path}: not a ControlNet config "
                              f"({type(e).__name__}: {e})") from None


def load_controlnet(source: str, device="cpu", dtype=torch.float32, variant=None) -> unet_mod.ControlNet:
    """A ControlNet from a hub id or diffusers folder (config.json + diffusion_pytorch_model[.fp16]
    .safetensors; hub files through `fetch`, like every other weight) or one .safetensors file: its
    architecture from a ControlNet config.json beside it, else from its shapes."""
    if is_file(source):
        path = Path(source)
        sd = read_safetensors(path)
        check_controlnet_keys(sd, str(path))
        beside = path.with_name("config.json")
        if beside.is_file() and read_json(beside).get("_class_name") == "ControlNetModel":
            cfg = controlnet_config(beside)
        else:
            cfg = controlnet_config_from_shapes(sd, str(path))
    else:
        cfg = controlnet_config(fetch(source, "config.json"))
        path = fetch_variant(source, CONTROLNET_FILE, variant)
        sd = read_safetensors(path)
        check_controlnet_keys(sd, str(path))
    return build_strict(unet_mod.ControlNet, cfg, sd, str(path), device, dtype)


def check_controlnet_fits(net: unet_mod.ControlNet, unet_cfg: unet_mod.UNetConfig, source: str) -> None:
    """Its residuals must have the UNet's skip shapes and it must read the same text and latents: refuse a
    ControlNet made for another base in one line naming the first difference."""
    c = net.config
    for field in ("in_channels", "block_out_channels", "layers_per_block", "cross_attention_dim",
                  "pooled_dim", "addition_time_embed_dim"):
        if getattr(c, field) != getattr(unet_cfg, field):
            raise CheckpointError(f"{source}: a ControlNet for another base: its {field} is "
                                  f"{getattr(c, field)}, the UNet's {getattr(unet_cfg, field)}")


def check_controlnet_source(source: str) -> None:
    """The cheap checks commands run before loading anything: a file by its header, a folder by its
    config.json; a hub id is only checked when fetched."""
    if is_file(source) or Path(source).is_file():
        header = read_header(source)
        check_controlnet_keys(header, str(source))
        for k, dtype in header.items():
            if dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{source}: {k} is {INT_DTYPES.get(dtype, dtype)}, not a "
                                      "floating-point tensor (model weights are floats)")
    elif Path(source).is_dir():
        controlnet_config(fetch(source, "config.json"))
    elif not is_hub_id(source):
        raise CheckpointError(f"{source}: no such file or folder (and not a hub repo id like org/name)")
