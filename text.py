"""SDXL text conditioning on `transformers` CLIP models.

SDXL conditions its UNet on two CLIP text encoders run on the same prompt:
  context (B, 77, 2048) = concat(penultimate hidden states of CLIP-L (768), of OpenCLIP bigG (1280))
  pooled  (B, 1280)     = bigG's projected EOS token
plus six "micro-conditioning" time ids (orig_h, orig_w, crop_top, crop_left, target_h, target_w).
SDXL-Lightning keeps both encoders frozen and distills only the UNet; its unconditional input for
classifier-free guidance is all zeros ("a guidance scale of 6 without any negative prompts", Sec. 3.6).

Weights come either from a diffusers folder (tokenizer/ tokenizer_2/ text_encoder/ text_encoder_2/)
or from an original Stability ("SGM") single file, where CLIP-L is stored in transformers' layout and
bigG in OpenCLIP's layout (fused q/k/v, transposed text projection).
"""
import re
import warnings
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

# -----------------------------------------------------------------------------
# micro-conditioning and the unconditional input


def time_ids(height, width, crop_top=0, crop_left=0, orig_height=None, orig_width=None):
    """SDXL's six size/crop conditions, (6,) float32: (orig_h, orig_w, crop_top, crop_left, target_h, target_w).

    At sampling time the image is neither cropped nor resized, so the original size defaults to the target.
    """
    orig_height = height if orig_height is None else orig_height
    orig_width = width if orig_width is None else orig_width
    values = (orig_height, orig_width, crop_top, crop_left, height, width)
    if min(height, width, orig_height, orig_width) <= 0 or min(crop_top, crop_left) < 0:
        raise ValueError(f"text.py: time_ids needs positive sizes and non-negative crops, got {values}")
    return torch.tensor(values, dtype=torch.float32)


def zeros_like(context, pooled):
    """Sec. 3.6 (CFG without negative prompts): SDXL's force_zeros_for_empty_prompt, all-zero context and pooled."""
    return torch.zeros_like(context), torch.zeros_like(pooled)

# -----------------------------------------------------------------------------
# key layouts
# "Canonical" keys are those of the hub's text_encoder*/model.safetensors and of the SGM file:
# everything but text_projection under "text_model.". transformers >= 5.6 flattened CLIPTextModel (no
# text_model. wrapper) while CLIPTextModelWithProjection keeps it, so we ask each model for its own layout.

SGM_CLIP_L = "conditioner.embedders.0.transformer."  # + canonical CLIPTextModel keys
SGM_BIGG = "conditioner.embedders.1.model."  # + OpenCLIP keys
# Tensors real single files carry that no model uses (a buffer, CLIP's contrastive temperature).
SGM_UNUSED = (SGM_CLIP_L + "text_model.embeddings.position_ids", SGM_BIGG + "logit_scale")

# canonical key -> OpenCLIP key, outside the blocks
_OPENCLIP_GLOBAL = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",  # a bare tensor in OpenCLIP
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
# canonical module -> OpenCLIP module, inside block i (text_model.encoder.layers.i / transformer.resblocks.i)
_OPENCLIP_BLOCK = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_LAYER = "text_model.encoder.layers."
_RESBLOCK = "transformer.resblocks."


def _wrapped(model):
    return any(k.startswith("text_model.") for k in model.state_dict())


def canonical_state_dict(model):
    """The model's state dict with canonical (hub / SGM) key names, whatever the transformers version."""
    sd = model.state_dict()
    return dict(sd) if _wrapped(model) else {"text_model." + k: v for k, v in sd.items()}


def _model_keys(sd, model):
    """Canonical keys -> the installed transformers' key names for this model."""
    return dict(sd) if _wrapped(model) else {k.removeprefix("text_model."): v for k, v in sd.items()}


def openclip_to_transformers(sd, prefix=""):
    """OpenCLIP text tower (prefix removed) -> canonical CLIPTextModelWithProjection keys.

    Unknown keys raise a ValueError naming them, so a different architecture cannot load half-way.
    """
    inv_global = {v: k for k, v in _OPENCLIP_GLOBAL.items()}
    inv_block = {v: k for k, v in _OPENCLIP_BLOCK.items()}
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
        raise ValueError(f"text.py: unknown OpenCLIP text keys {sorted(unknown)}")
    return out


def transformers_to_openclip(sd):
    """Canonical CLIPTextModelWithProjection keys -> OpenCLIP text tower keys (the reverse of the above)."""
    out, qkv = {}, {}
    for key, v in sd.items():
        layer = re.fullmatch(re.escape(_LAYER) + r"(\d+)\.(.+)\.(\w+)", key)
        if key in _OPENCLIP_GLOBAL:
            out[_OPENCLIP_GLOBAL[key]] = v
        elif key == "text_projection.weight":
            out["text_projection"] = v.t().contiguous()  # (proj, width) -> OpenCLIP's (width, proj)
        elif layer and layer[2] in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((layer[1], layer[3]), {})[layer[2][10]] = v  # "self_attn.q_proj"[10] == "q"
        elif layer and layer[2] in _OPENCLIP_BLOCK:
            out[f"{_RESBLOCK}{layer[1]}.{_OPENCLIP_BLOCK[layer[2]]}.{layer[3]}"] = v
        else:
            raise ValueError(f"text.py: no OpenCLIP name for text encoder key {key!r}")
    for (i, kind), parts in qkv.items():
        out[f"{_RESBLOCK}{i}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out

# -----------------------------------------------------------------------------
# the two encoders together


class TextEncoders(torch.nn.Module):
    """SDXL's two tokenizers and two CLIP text encoders; frozen, as in the paper (only the UNet is distilled)."""

    def __init__(self, tokenizer, tokenizer_2, text_encoder, text_encoder_2):
        super().__init__()
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.text_encoder_2 = text_encoder_2.eval().requires_grad_(False)
        n, n_2 = tokenizer.model_max_length, tokenizer_2.model_max_length
        if n != n_2:
            raise ValueError(f"text.py: the two tokenizers pad to different lengths ({n} and {n_2}); SDXL uses 77")
        for tok, enc in ((tokenizer, text_encoder), (tokenizer_2, text_encoder_2)):
            if tok.model_max_length > enc.config.max_position_embeddings:
                raise ValueError(f"text.py: tokenizer model_max_length {tok.model_max_length} exceeds the text "
                                 f"encoder's {enc.config.max_position_embeddings} positions")

    @property
    def device(self):
        return next(self.text_encoder_2.parameters()).device

    @property
    def dtype(self):
        return next(self.text_encoder_2.parameters()).dtype

    @property
    def seq_len(self):
        return self.tokenizer.model_max_length  # 77

    @property
    def context_dim(self):
        return self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size  # 768 + 1280

    @property
    def pooled_dim(self):
        return self.text_encoder_2.config.projection_dim  # 1280

    @staticmethod
    def _tokenize(tokenizer, prompts):
        """Pad with the tokenizer's own pad token (EOS for CLIP-L, "!" for bigG) and truncate to 77."""
        n = tokenizer.model_max_length
        ids = tokenizer(prompts, padding="max_length", max_length=n, truncation=True, return_tensors="pt").input_ids
        full = tokenizer(prompts, truncation=False, verbose=False).input_ids  # counted, warned below
        # BOS + (n - 2) tokens + EOS survive; what fell between them is lost
        return ids, [max(len(f) - n, 0) for f in full]  # (B, n), tokens dropped per prompt

    @torch.no_grad()
    def encode(self, prompts, names=None):
        """prompts (list of B str) -> context (B, 77, 2048), pooled (B, 1280) in the encoders' device and dtype.
        A prompt longer than 77 tokens is cut, with a warning that counts the lost tokens (not their text,
        which floods a log); `names` (B str) says which prompt it is, default "prompt i"."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids, dropped = self._tokenize(self.tokenizer, prompts)
        ids_2, dropped_2 = self._tokenize(self.tokenizer_2, prompts)
        for i, (n, n_2) in enumerate(zip(dropped, dropped_2)):
            if max(n, n_2) > 0:
                name = names[i] if names is not None else f"prompt {i}"
                warnings.warn(f"text.py: {name} is longer than CLIP's {self.seq_len} tokens; "
                              f"{max(n, n_2)} tokens were dropped", stacklevel=3)
        out = self.text_encoder(ids.to(self.text_encoder.device), output_hidden_states=True)
        out_2 = self.text_encoder_2(ids_2.to(self.device), output_hidden_states=True)
        # penultimate layer (before the last block and the final layer norm) of both, as SDXL was trained
        h = out.hidden_states[-2].to(self.device, self.dtype)  # (B, 77, 768)
        context = torch.cat([h, out_2.hidden_states[-2]], dim=-1)  # (B, 77, 768 + 1280)
        return context, out_2.text_embeds  # pooled: final-normed EOS token @ text_projection, (B, 1280)

    def uncond(self, batch):
        """Sec. 3.6: the unconditional input of CFG is all zeros (no negative prompt), not the encoded ""."""
        context = torch.zeros(batch, self.seq_len, self.context_dim, device=self.device, dtype=self.dtype)
        pooled = torch.zeros(batch, self.pooled_dim, device=self.device, dtype=self.dtype)
        return context, pooled

    @classmethod
    def from_diffusers(cls, folder, dtype=torch.float32, device="cpu"):
        """From a local diffusers-layout folder (weights.py resolves hub ids to such folders)."""
        folder = Path(folder)
        for sub in ("text_encoder", "text_encoder_2"):
            if not (folder / sub).is_dir():
                raise ValueError(f"text.py: {folder} has no {sub}/ folder (a diffusers SDXL folder has "
                                 "tokenizer/ tokenizer_2/ text_encoder/ text_encoder_2/)")
        tokenizer, tokenizer_2 = load_tokenizers(folder)
        text_encoder = _from_pretrained(CLIPTextModel, folder / "text_encoder")
        text_encoder_2 = _from_pretrained(CLIPTextModelWithProjection, folder / "text_encoder_2")
        return cls(tokenizer, tokenizer_2, text_encoder, text_encoder_2).to(device=device, dtype=dtype)

# -----------------------------------------------------------------------------
# loading


def load_tokenizers(folder):
    """Both tokenizers of a diffusers SDXL folder; a single file carries none, so it borrows the base repo's."""
    folder = Path(folder)
    for sub in ("tokenizer", "tokenizer_2"):
        if not (folder / sub).is_dir():
            raise ValueError(f"text.py: {folder} has no {sub}/ folder (SDXL's tokenizers are tokenizer/ tokenizer_2/)")
    return tuple(CLIPTokenizer.from_pretrained(folder / sub) for sub in ("tokenizer", "tokenizer_2"))


def _from_pretrained(model_cls, path):
    """transformers' from_pretrained, refusing missing / unexpected / mismatched tensors (it would re-initialize)."""
    model, info = model_cls.from_pretrained(path, output_loading_info=True)
    bad = {}
    for kind, keys in info.items():
        # old hub files still carry the position_ids buffer, which transformers drops silently
        keys = sorted(str(k) for k in keys if not str(k).endswith("position_ids"))
        if keys:
            bad[kind] = keys
    if bad:
        raise ValueError(f"text.py: {path} does not fit {model_cls.__name__}: {bad}")
    return model


def _config_from_shapes(sd, hidden_act, head_dim):
    """CLIPTextConfig from canonical tensors: a single file carries no config, but the shapes say it all."""
    vocab_size, width = sd["text_model.embeddings.token_embedding.weight"].shape
    if width > head_dim and width % head_dim:
        raise ValueError(f"text.py: text encoder width {width} is not a multiple of head_dim {head_dim}")
    layers = {int(m[1]) for k in sd if (m := re.match(re.escape(_LAYER) + r"(\d+)\.", k))}
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=sd[_LAYER + "0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=len(layers),
        num_attention_heads=max(1, width // head_dim),  # encoders narrower than one head get one
        max_position_embeddings=sd["text_model.embeddings.position_embedding.weight"].shape[0],
        projection_dim=sd["text_projection.weight"].shape[0] if "text_projection.weight" in sd else width,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        # as the SDXL hub configs: eos_token_id 2 makes transformers pool at argmax(input_ids), which is
        # OpenCLIP's own rule (EOS has the largest id in CLIP's vocabulary) and also the first EOS when
        # tokenizer 1 pads with EOS
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )


def _build(model_cls, config, sd, name, dtype, device, key_prefix=""):
    """Build on the meta device (no random init of ~800M parameters), then load strictly.

    key_prefix only makes the error name the keys as the file does."""
    with torch.device("meta"):
        model = model_cls(config)
    expected = set(canonical_state_dict(model))
    missing = sorted(key_prefix + k for k in expected - set(sd))
    unexpected = sorted(key_prefix + k for k in set(sd) - expected)
    if missing or unexpected:
        raise ValueError(f"text.py: {name} in the single file does not fit the model its shapes describe: "
                         f"missing {missing}, unexpected {unexpected}")
    model.load_state_dict(_model_keys(sd, model), strict=True, assign=True)
    for buf_name, buf in model.named_buffers():  # non-persistent buffers are not in any file
        if buf.is_meta and buf_name.endswith("position_ids"):
            owner = model.get_submodule(buf_name.rpartition(".")[0])
            owner.position_ids = torch.arange(buf.shape[-1]).expand(buf.shape).clone()  # (1, 77)
        elif buf.is_meta:
            raise ValueError(f"text.py: {model_cls.__name__} has buffer {buf_name!r} that no file provides")
    return model.to(device=device, dtype=dtype)


def text_from_single_file(sd, tokenizer, tokenizer_2, dtype=torch.float32, device="cpu", head_dim=64):
    """Both encoders from an SGM single-file state dict (other keys, e.g. the UNet's, are ignored).

    head_dim cannot be read from the tensors (q/k/v are width x width whatever the heads): SDXL uses 64
    (CLIP-L 12 heads, bigG 20); an encoder narrower than head_dim gets one head (tiny test models).
    """
    clip_l = {k[len(SGM_CLIP_L):]: v for k, v in sd.items() if k.startswith(SGM_CLIP_L) and k not in SGM_UNUSED}
    bigg = {k[len(SGM_BIGG):]: v for k, v in sd.items() if k.startswith(SGM_BIGG) and k not in SGM_UNUSED}
    for name, part, prefix in (("CLIP-L", clip_l, SGM_CLIP_L), ("OpenCLIP bigG", bigg, SGM_BIGG)):
        if not part:
            raise ValueError(f"text.py: the single file has no {name} text encoder keys ({prefix}*)")
    try:
        bigg = openclip_to_transformers(bigg, prefix=SGM_BIGG)
        # CLIP-L uses OpenAI's quick_gelu, bigG (trained by OpenCLIP) the exact gelu
        config = _config_from_shapes(clip_l, "quick_gelu", head_dim)
        config_2 = _config_from_shapes(bigg, "gelu", head_dim)
    except KeyError as e:
        raise ValueError(f"text.py: the single file lacks text encoder tensor {e.args[0]!r}") from None
    text_encoder = _build(CLIPTextModel, config, clip_l, "CLIP-L", dtype, device, key_prefix=SGM_CLIP_L)
    # bigG's keys are already converted: the error names them as transformers does
    text_encoder_2 = _build(CLIPTextModelWithProjection, config_2, bigg, "OpenCLIP bigG (transformers names)",
                            dtype, device)
    return TextEncoders(tokenizer, tokenizer_2, text_encoder, text_encoder_2)


def text_to_single_file(te):
    """TextEncoders -> SGM single-file keys (CLIP-L in transformers' layout, bigG in OpenCLIP's)."""
    out = {SGM_CLIP_L + k: v for k, v in canonical_state_dict(te.text_encoder).items()}
    bigg = transformers_to_openclip(canonical_state_dict(te.text_encoder_2))
    out.update({SGM_BIGG + k: v for k, v in bigg.items()})
    return out
