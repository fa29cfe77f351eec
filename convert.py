"""Every checkpoint layout conversion, both directions, and the command that writes a single file.

Three layouts meet here:
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

Read top to bottom: UNet, VAE, text encoders, LoRA names, the whole single file, then the command:

    python convert.py my_sdxl_finetune/ my_finetune.safetensors --to single-file         # diffusers folder
    python convert.py runs/8to4/full/sdxl_lightning_4step_unet.safetensors my4step.safetensors \\
        --to single-file --base my_finetune.safetensors --fp16                           # a training export
    python convert.py my_finetune.safetensors my_finetune_4step.safetensors --to single-file \\
        --lora sdxl_lightning_4step_lora.safetensors:1.0                                 # LoRA fused in
    python convert.py sdxl_lightning_4step.safetensors sdxl_lightning_4step/ --to diffusers
"""
import argparse
import json
import os
import re
import shutil
from pathlib import Path

import torch

from unet import UNetConfig
from vae import VAEConfig

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


def unet_prefix_map(cfg: UNetConfig) -> dict:
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
                m[f"output_blocks.{k}.{2 if has_attn else 1}.conv"] = (f"up_blocks.{b}.upsamplers.0.conv", False)
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


def _to_sgm(cfg: UNetConfig):
    """diffusers name -> SGM name, for one config (the reverse table is built once per call of this)."""
    inverse = {new: (old, is_resnet) for old, (new, is_resnet) in unet_prefix_map(cfg).items()}
    resnet_inverse = {new: old for old, new in SGM_RESNET.items()}
    return lambda name: _rename(name, inverse, resnet_inverse)


def unet_name_to_sgm(name: str, cfg: UNetConfig) -> str:
    """One diffusers name -> its SGM spelling (`down_blocks.1.resnets.0.conv1` -> `input_blocks.4.0.in_layers.2`)."""
    return _to_sgm(cfg)(name)


def unet_config_from_sgm(sd: dict, source="checkpoint", prefix=SGM_UNET) -> UNetConfig:
    """Derive the UNet architecture from SGM tensor names and shapes (no config in a single file).
    Head width is taken as 64, as in SDXL; the 6 time ids have 256 sinusoidal channels each."""
    keys = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if "label_emb.0.0.weight" not in keys:
        raise ValueError(f"{source}: not an SDXL-architecture UNet (no {prefix}label_emb: an SD1.x/2.x checkpoint?)")
    blocks, k = [], 1  # per level: [width, resnets, depth]
    while f"input_blocks.{k}.0.op.weight" in keys or f"input_blocks.{k}.0.in_layers.0.weight" in keys:
        if f"input_blocks.{k}.0.op.weight" in keys:
            blocks.append(None)  # level boundary
        else:
            if not blocks or blocks[-1] is None:
                blocks.append([0, 0, 0])
            depth = len({kk.split(".")[4] for kk in keys if kk.startswith(f"input_blocks.{k}.1.transformer_blocks.")})
            blocks[-1] = [keys[f"input_blocks.{k}.0.out_layers.3.weight"].shape[0], blocks[-1][1] + 1, depth]
        k += 1
    levels = [b for b in blocks if b is not None]
    if not levels or len({b[1] for b in levels}) != 1:
        raise ValueError(f"{source}: cannot derive the UNet's levels from its input_blocks")
    to_k = [v for kk, v in keys.items() if kk.endswith("attn2.to_k.weight")]
    add_in = keys["label_emb.0.0.weight"].shape[1]
    try:
        return UNetConfig(in_channels=keys["input_blocks.0.0.weight"].shape[1],
                          out_channels=keys["out.2.weight"].shape[0],
                          block_out_channels=tuple(b[0] for b in levels), layers_per_block=levels[0][1],
                          transformer_depth=tuple(b[2] for b in levels),
                          num_heads=tuple(max(b[0] // 64, 1) for b in levels),
                          cross_attention_dim=to_k[0].shape[1] if to_k else 2048, pooled_dim=add_in - 6 * 256)
    except KeyError as e:
        raise ValueError(f"{source}: the UNet lacks {prefix}{e.args[0]}") from None


def unet_from_sgm(sd: dict, cfg: UNetConfig, source="checkpoint", prefix=SGM_UNET) -> dict:
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


def unet_to_sgm(sd: dict, cfg: UNetConfig, prefix=SGM_UNET) -> dict:
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


def vae_config_from_sgm(sd: dict, source="checkpoint", prefix=SGM_VAE) -> VAEConfig:
    keys = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if "encoder.conv_in.weight" not in keys:
        raise ValueError(f"{source}: no VAE ({prefix}encoder.*) in this file")
    n = len({k.split(".")[2] for k in keys if k.startswith("encoder.down.")})
    try:
        widths = tuple(keys[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(n))
        layers = len({k.split(".")[4] for k in keys if k.startswith("encoder.down.0.block.")})
        return VAEConfig(in_channels=keys["encoder.conv_in.weight"].shape[1],
                         out_channels=keys["decoder.conv_out.weight"].shape[0],
                         latent_channels=keys["post_quant_conv.weight"].shape[0], block_out_channels=widths,
                         layers_per_block=layers)
    except KeyError as e:
        raise ValueError(f"{source}: the VAE lacks {prefix}{e.args[0]}") from None


def vae_from_sgm(sd: dict, cfg: VAEConfig, source="checkpoint", prefix=SGM_VAE) -> dict:
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


def _sgm_vae_names(cfg: VAEConfig) -> list:
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


def vae_to_sgm(sd: dict, cfg: VAEConfig, prefix=SGM_VAE) -> dict:
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
    clip_l = {k[len(SGM_CLIP_L):]: v for k, v in sd.items() if k.startswith(SGM_CLIP_L) and k not in SGM_UNUSED}
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

def kohya_name(module_name: str) -> str:
    return "lora_unet_" + module_name.replace(".", "_")


def kohya_table(module_names, cfg: UNetConfig = None) -> dict:
    """{kohya name in either spelling: diffusers module name}; the SGM spelling needs the UNet config."""
    table = {kohya_name(n): n for n in module_names}
    if cfg is not None:
        to_sgm = _to_sgm(cfg)
        for n in module_names:
            try:
                k = kohya_name(to_sgm(n))
            except KeyError:
                continue
            if table.get(k, n) != n:  # would silently merge into the wrong layer
                raise ValueError(f"SGM LoRA name {k} is ambiguous ({table[k]} and {n})")
            table[k] = n
    return table


def kohya_respell(lora_sd: dict, cfg: UNetConfig, to="sgm", source="lora") -> dict:
    """A kohya LoRA state dict in the other spelling, same tensors: to='sgm' (lora_unet_input_blocks_...)
    or to='diffusers' (lora_unet_down_blocks_...). Keys of no Linear/Conv2d of this UNet are refused."""
    from unet import UNet
    with torch.device("meta"):
        names = [n for n, m in UNet(cfg).named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    table, to_sgm = kohya_table(names, cfg), _to_sgm(cfg)
    out, unknown = {}, []
    for k, v in lora_sd.items():
        name, _, suffix = k.partition(".")
        if name not in table:
            unknown.append(k)
            continue
        module = table[name]
        out[f"{kohya_name(to_sgm(module) if to == 'sgm' else module)}.{suffix}"] = v
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
        raise ValueError(f"{source}: {len(unknown)} keys belong to no SDXL part (UNet {SGM_UNET}*, VAE {SGM_VAE}*, "
                         f"text {SGM_CLIP_L}*, {SGM_BIGG}*): {', '.join(unknown[:3])}"
                         f"{', ...' if len(unknown) > 3 else ''}")


def to_single_file(unet_sd, unet_cfg, vae_sd, vae_cfg, clip_l_sd, bigg_sd) -> dict:
    """Diffusers-named UNet and VAE tensors and canonical text encoder tensors -> one SGM state dict."""
    out = unet_to_sgm(unet_sd, unet_cfg)
    out.update(vae_to_sgm(vae_sd, vae_cfg))
    out.update(text_to_sgm(clip_l_sd, bigg_sd))
    return out


# ----------------------------------------------------------------------------------------------------
# The command: gather the parts with weights.py (strict loads, clear errors), fuse LoRAs, write.
# weights.py imports this file, so the command imports weights.py (and lora.py, text.py) when it runs.

_BASE = "stabilityai/stable-diffusion-xl-base-1.0"  # = weights.SDXL_BASE

SDXL_SCHEDULER = {  # stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}
PIPELINE_INDEX = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
                  "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                  "text_encoder": ["transformers", "CLIPTextModel"],
                  "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                  "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
                  "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}


def parse_lora(spec: str) -> tuple:
    """'FILE' or 'FILE:SCALE' -> (file, scale); a Windows drive letter is not a scale."""
    path, sep, scale = spec.rpartition(":")
    if not sep or not re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", scale):
        return spec, 1.0
    return path, float(scale)


def load_parts(args):
    """(UNet, VAE, (CLIP-L, bigG), TextEncoders or None) from IN and --base, every part loaded strictly,
    in the source's dtypes; the LoRAs fused into the UNet. Tokenizers are loaded only where they are at hand
    or needed (--to diffusers)."""
    import lora as lora_mod
    import weights
    src, base = args.input, args.base
    single = weights.is_file(src)
    sd = weights.read_safetensors(src) if single else None
    whole = single and any(k.startswith(SGM_VAE) for k in sd)  # a UNet-only file needs a base for the rest
    if base is not None and (whole or not single):
        raise weights.CheckpointError(f"{src} holds its own VAE and text encoders; --base is for UNet-only inputs")
    base = src if (whole or not single) else (base or weights.SDXL_BASE)
    base_single = weights.is_file(base)
    base_sd = sd if base == src else (weights.read_safetensors(base) if base_single else None)
    if single and weights.detect_layout(sd, src) == "diffusers":
        cfg_json = Path(src).with_name("config.json")  # train.py exports a UNet file and its config.json
        cfg = UNetConfig.from_diffusers(weights.read_json(cfg_json), str(cfg_json)) if cfg_json.is_file() else \
            weights.unet_config(base, base_sd)
        unet = weights.load_unet(src, cfg, sd=sd, dtype=None)
    else:
        unet = weights.load_unet(src, sd=sd, dtype=None)
    for spec in args.lora:
        path, scale = parse_lora(spec)
        try:
            lora_mod.merge_lora(unet, lora_mod.read_lora(path), scale=scale, source=path)
        except (FileNotFoundError, ValueError) as e:
            raise weights.CheckpointError(str(e)) from None
    vae = weights.load_vae(base, dtype=None, sd=base_sd)
    if base_single and args.to == "single-file":  # no tokenizers needed
        encoders = weights.load_text_encoders(base, dtype=None, sd=base_sd)
        return unet, vae, encoders, None
    text = weights.load_text(base, dtype=None, tokenizers=args.tokenizers, sd=base_sd)
    return unet, vae, (text.text_encoder, text.text_encoder_2), text


def _cast(sd, fp16):
    return {k: (v.half() if fp16 and v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def write_single_file(path, unet, vae, encoders, fp16=False):
    from safetensors.torch import save_file
    sd = to_single_file(unet.state_dict(), unet.config, vae.state_dict(), vae.config,
                        canonical_state_dict(encoders[0]), canonical_state_dict(encoders[1]))
    save_file(_cast(sd, fp16), str(path), metadata={"format": "pt"})


def write_diffusers(folder, unet, vae, encoders, text, fp16=False):
    """A diffusers SDXL folder (model_index.json, scheduler/, unet/, vae/, text_encoder*/, tokenizer*/)."""
    from safetensors.torch import save_file
    folder = Path(folder)
    for sub, model, cfg in (("unet", unet, unet.config.to_diffusers()), ("vae", vae, vae.config.to_diffusers())):
        (folder / sub).mkdir(parents=True)
        (folder / sub / "config.json").write_text(json.dumps(cfg, indent=1))
        save_file(_cast(model.state_dict(), fp16), str(folder / sub / "diffusion_pytorch_model.safetensors"),
                  metadata={"format": "pt"})
    for sub, model in (("text_encoder", encoders[0]), ("text_encoder_2", encoders[1])):
        (folder / sub).mkdir()
        config = model.config.to_dict()
        config["architectures"] = [type(model).__name__]
        config.pop("dtype", None), config.pop("torch_dtype", None)
        (folder / sub / "config.json").write_text(json.dumps(config, indent=1))
        # canonical (hub) key names, which every transformers version reads
        save_file(_cast(canonical_state_dict(model), fp16), str(folder / sub / "model.safetensors"),
                  metadata={"format": "pt"})
    text.tokenizer.save_pretrained(folder / "tokenizer")
    text.tokenizer_2.save_pretrained(folder / "tokenizer_2")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SDXL_SCHEDULER, indent=1))
    (folder / "model_index.json").write_text(json.dumps(PIPELINE_INDEX, indent=1))


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", metavar="IN",
                   help="what to convert: a diffusers SDXL folder or hub id; a single-file .safetensors (original "
                        "layout, all parts); or a UNet-only .safetensors (either layout; our training export, "
                        "whose config.json next to it gives the architecture), completed from --base")
    p.add_argument("output", metavar="OUT", help="the .safetensors file (--to single-file) or folder (--to diffusers)")
    p.add_argument("--to", required=True, choices=["single-file", "diffusers"],
                   help="single-file: the original Stability layout in one .safetensors (ComfyUI, A1111, kohya); "
                        "diffusers: a folder StableDiffusionXLPipeline.from_pretrained loads")
    p.add_argument("--base", default=None,
                   help="for a UNet-only IN: where the VAE, text encoders (and the UNet config, if no config.json "
                        f"lies next to IN) come from: hub id, diffusers folder or single file; default {_BASE}")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="kohya-format LoRA fused into the UNet at SCALE (default 1.0); repeatable, fused in order")
    p.add_argument("--tokenizers", default=_BASE,
                   help="with --to diffusers from a single file: the SDXL repo or folder whose tokenizer/ and "
                        "tokenizer_2/ are copied (single files carry none)")
    p.add_argument("--fp16", action="store_true",
                   help="store floating tensors in float16 (half the size); default: keep the source's dtypes")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (default: refuse)")
    return p


def check_args(args):
    """Everything that can be checked before reading gigabytes."""
    out = Path(args.output)
    if args.to == "single-file" and out.suffix != ".safetensors":
        raise ValueError(f"OUT {out} must end in .safetensors for --to single-file")
    if args.to == "diffusers" and out.suffix:
        raise ValueError(f"OUT {out} names a file; --to diffusers writes a folder")
    if out.exists() and not args.overwrite:
        raise ValueError(f"OUT {out} exists (pass --overwrite to replace it)")
    if out.resolve() == Path(args.input).resolve():
        raise ValueError(f"OUT {out} is IN")
    if not out.parent.resolve().is_dir():
        raise ValueError(f"OUT's folder {out.parent} does not exist")
    if not os.access(out.parent.resolve(), os.W_OK):
        raise ValueError(f"OUT's folder {out.parent} is not writable")
    for spec in args.lora:
        path, _ = parse_lora(spec)
        if not Path(path).is_file():
            raise ValueError(f"--lora {spec}: no such file {path}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    out = Path(args.output)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        check_args(args)
        unet, vae, encoders, text = load_parts(args)
        if args.to == "single-file":
            write_single_file(tmp, unet, vae, encoders, args.fp16)
        else:
            write_diffusers(tmp, unet, vae, encoders, text, args.fp16)
        if out.is_dir():  # --overwrite of a folder: os.replace cannot replace a non-empty one
            shutil.rmtree(out)
        os.replace(tmp, out)
    except ValueError as e:  # weights.CheckpointError is a ValueError
        raise SystemExit(f"error: {e}")
    except OSError as e:  # a missing file names itself; a failed write (disk full) is named here
        raise SystemExit(f"error: {e}" if getattr(e, "filename", None) else f"error: writing {out}: {e}")
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        elif tmp.exists():
            tmp.unlink()
    n = sum(p.numel() for m in (unet, vae, *encoders) for p in m.parameters())
    print(f"wrote {out} ({args.to}, {n / 1e6:,.1f}M parameters{', float16' if args.fp16 else ''})")


if __name__ == "__main__":
    main()
