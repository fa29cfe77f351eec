"""LoRA for our SDXL UNet in plain torch: the kohya file format, merging, training layers.

Sec. 3.6: at each adversarial stage the paper first trains a LoRA, then merges it and trains the whole
UNet further; its LoRA settings are LCM-LoRA's, rank 64 on every conv and linear weight except the input
and output convs and the shared time-embedding linears (`TARGET_EXCLUDE`), released with alpha 8 as
`sdxl_lightning_{2,4,8}step_lora.safetensors` (Sec. 2.6: plug-and-play on other base models). A LoRA
adds a low-rank update to a frozen weight, W' = W + (alpha / rank) * up @ down, with `down` (rank, in)
and `up` (out, rank). For a conv, `down` is a conv with the base kernel (3x3 or 1x1) to `rank` channels
and `up` a 1x1 conv, so the composition is again one conv of the base kernel and merges exactly.

The kohya format stores, per wrapped module, `lora_unet_<path with '.' -> '_'>.lora_down.weight`,
`.lora_up.weight` and a scalar `.alpha` (absent means alpha = rank). The path is spelled either as
the diffusers module path (`down_blocks_1_attentions_0_...`) or as the original Stability (SGM) one
(`input_blocks_4_1_...`); '_' makes names ambiguous, so names are looked up in a table built from the
UNet's real module names instead of being parsed. This file speaks the diffusers spelling; weights.py reads
files in either spelling (weights.read_lora) and converts between them.

Read top to bottom: targets and names, the lookup table, checking and merging LoRAs, extracting one from
two UNets (truncated SVD), then the training side (hooks on the targets, enable/disable, state dict, the
kohya file, merge-and-remove).
"""
import math

import torch
import torch.nn as nn


TARGET_EXCLUDE = ("conv_in", "conv_out", "time_embedding.", "add_embedding.")
SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")


# ----------------------------------------------------------------------------------------------------
# Targets and names

def _unwrap(model):
    """DDP keeps the UNet in `.module`; everything here works on the UNet itself."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _base_modules(unet):
    """Every Linear/Conv2d of the UNet proper, skipping the LoRA layers themselves (`unet.lora.*`)."""
    return [(n, m) for n, m in unet.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and not n.startswith("lora.")]


def lora_targets(unet) -> list:
    """Module names of every Linear/Conv2d the released LoRAs wrap (788 on SDXL)."""
    return [n for n, _ in _base_modules(_unwrap(unet)) if not n.startswith(TARGET_EXCLUDE)]


def kohya_name(module_name: str) -> str:
    """The kohya name of a module in the diffusers spelling: lora_unet_<path with '.' -> '_'>."""
    return "lora_unet_" + module_name.replace(".", "_")


def lookup_table(unet) -> dict:
    """{kohya name: diffusers module name} for every Linear/Conv2d of the UNet. Merging accepts any of them
    (a superset of `lora_targets`); add_lora wraps only the targets. Files in the SGM spelling are respelled
    by weights.read_lora before they get here."""
    return {kohya_name(n): n for n, _ in _base_modules(_unwrap(unet))}


# ----------------------------------------------------------------------------------------------------
# Checking and merging kohya LoRAs

def _few(keys, n=5):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n
                                  else f" ({len(keys)} in all)")


def _expected_shapes(module, rank):
    """(down shape, up shape) a LoRA of this rank must have on this module."""
    if isinstance(module, nn.Linear):
        return (rank, module.in_features), (module.out_features, rank)
    return (rank, module.in_channels, *module.kernel_size), (module.out_channels, rank, 1, 1)


def _group(lora_sd, table, modules, source):
    """Validate every key and shape of a kohya state dict. -> {module name: (down, up, alpha or None)}."""
    layers, unknown, text = {}, [], []
    for k in lora_sd:
        name, _, suffix = k.partition(".")
        if name.startswith(("lora_te_", "lora_te1_", "lora_te2_")):
            text.append(k)
        elif suffix not in SUFFIXES or name not in table:
            unknown.append(k)
        else:
            layers.setdefault(name, {})[suffix] = lora_sd[k]
    if text:
        raise ValueError(f"{source}: text-encoder LoRA keys are not supported (UNet LoRAs only): "
                         f"{_few(text)}")
    if unknown:
        raise ValueError(f"{source}: unknown LoRA keys, not 'lora_unet_<module>.{{lora_down.weight,"
                         f"lora_up.weight,alpha}}' of a Linear/Conv2d of this UNet: {_few(unknown)}")
    incomplete = [n for n, p in layers.items() if "lora_down.weight" not in p or "lora_up.weight" not in p]
    if incomplete:
        raise ValueError(f"{source}: layers without both lora_down and lora_up weights: {_few(incomplete)}")
    # int8 / bool tensors would fuse as garbage (Inf, then NaN images): weights and alphas are floats
    not_float = [f"{k} ({str(lora_sd[k].dtype).removeprefix('torch.')})" for k in lora_sd
                 if k.partition(".")[0] in layers and not lora_sd[k].is_floating_point()]
    if not_float:
        raise ValueError(f"{source}: LoRA tensors that are not floating point: {_few(not_float)}")
    empty = [n for n, p in layers.items() if p["lora_down.weight"].shape[0] == 0]
    if empty:  # alpha / rank would divide by zero
        raise ValueError(f"{source}: LoRA layers of rank 0 (empty lora_down/lora_up): {_few(empty)}")
    nonfinite = [k for k in lora_sd if k.partition(".")[0] in layers and not torch.isfinite(lora_sd[k]).all()]
    if nonfinite:
        raise ValueError(f"{source}: NaN or Inf values in {_few(nonfinite)}")
    out, bad = {}, []
    for name, p in layers.items():
        module_name = table[name]
        down, up = p["lora_down.weight"], p["lora_up.weight"]
        want = _expected_shapes(modules[module_name], down.shape[0])
        if (tuple(down.shape), tuple(up.shape)) != want:
            bad.append(f"{name} down {tuple(down.shape)} up {tuple(up.shape)}, expected {want[0]} {want[1]}")
            continue
        alpha = p.get("alpha")
        if alpha is not None and alpha.numel() != 1:
            bad.append(f"{name}.alpha has shape {tuple(alpha.shape)}, expected a scalar")
            continue
        if module_name in out:
            bad.append(f"{name}: {module_name} appears twice (both the diffusers and the SGM spelling)")
            continue
        out[module_name] = (down, up, None if alpha is None else float(alpha))
    if bad:
        raise ValueError(f"{source}: {len(bad)} LoRA layers do not fit this UNet: " + "; ".join(bad[:3]))
    if not out:
        raise ValueError(f"{source}: holds no LoRA layers")
    return out


@torch.no_grad()
def _fuse(weight, down, up, factor):
    """W += factor * up @ down, computed in float32, stored in the weight's dtype."""
    d = down.to(weight.device, torch.float32).flatten(1)  # (rank, in * kh * kw)
    u = up.to(weight.device, torch.float32).flatten(1)    # (out, rank): the up conv is 1x1
    delta = (u @ d).reshape(weight.shape)                 # (out, in[, kh, kw])
    weight.copy_((weight.float() + factor * delta).to(weight.dtype))


def merge_lora(unet, lora_sd, scale=1.0, source="lora") -> int:
    """Fuse a kohya LoRA into the UNet weights in place: W += scale * alpha / rank * up @ down.
    Every key and shape is checked first, so a bad file changes nothing. Returns the layers merged."""
    unet = _unwrap(unet)
    modules = dict(_base_modules(unet))
    layers = _group(lora_sd, lookup_table(unet), modules, source)
    for module_name, (down, up, alpha) in layers.items():
        rank = down.shape[0]
        _fuse(modules[module_name].weight, down, up, scale * (rank if alpha is None else alpha) / rank)
    return len(layers)


# ----------------------------------------------------------------------------------------------------
# Extracting a LoRA from two UNets (kohya's extract_lora_from_models): the difference, truncated by SVD

def kohya_metadata(rank, alpha) -> dict:
    """The safetensors metadata kohya writes for a LoRA of one rank and alpha."""
    return {"format": "pt", "ss_network_module": "networks.lora", "ss_network_dim": str(rank),
            "ss_network_alpha": f"{float(alpha):g}"}


@torch.no_grad()
def extract_lora(base_sd, tuned_sd, module_names, rank, alpha, device=None) -> tuple:
    """Sec. 2.6 / 3.6 (the LoRA plugs into other bases): the LoRA that turns `base_sd` into `tuned_sd` on
    the modules `module_names` (diffusers names, e.g. lora_targets(unet)), every layer at `rank` and `alpha`.
    Per layer D = W_tuned - W_base, flattened to (out, in * kh * kw) for a conv; its best rank-r
    approximation (Eckart-Young) is the projection onto its top r singular vectors, D_r = U_r U_r^T D,
    U_r from the eigenvectors of the small Gram matrix D D^T (or D^T D), in float64: on SDXL's widest
    layers about ten times cheaper than a full SVD, exactly the same D_r up to float64 rounding. Split
    evenly, up = U_r sqrt(S_r) and down = sqrt(S_r) V_r^T (S_r V_r^T = U_r^T D), both times
    sqrt(rank / alpha) so that merge_lora's alpha / rank gives D_r back. A layer narrower than `rank` is
    exact and padded with zero rows (every layer keeps one rank, as the release files and kohya's metadata
    have it). -> (kohya tensors float32 on the CPU, {module name: relative error ||D - D_r||_F / ||D||_F},
    0 where D = 0), the error being sqrt of the sum of the squared discarded singular values over ||D||_F."""
    if rank < 1 or not alpha > 0:
        raise ValueError(f"extract_lora: rank must be >= 1 and alpha > 0, got rank {rank}, alpha {alpha}")
    out, errors = {}, {}
    f = math.sqrt(rank / alpha)
    for name in module_names:
        key = name + ".weight"
        w_base, w_tuned = base_sd[key], tuned_sd[key]
        if w_base.shape != w_tuned.shape:
            raise ValueError(f"extract_lora: {key} has shape {tuple(w_base.shape)} in one UNet and "
                             f"{tuple(w_tuned.shape)} in the other")
        dev = device or w_tuned.device
        d = (w_tuned.to(dev, torch.float64) - w_base.to(dev, torch.float64)).flatten(1)  # (out, in*kh*kw)
        wide = d.shape[0] <= d.shape[1]
        a = d if wide else d.T  # (m, n), m <= n
        k = min(rank, a.shape[0])
        u = torch.linalg.eigh(a @ a.T)[1][:, -k:].flip(1)  # (m, k): the top k left singular vectors
        sv = u.T @ a  # (k, n) = S_k V_k^T
        total = a.square().sum()
        errors[name] = float(((a - u @ sv).square().sum() / total).sqrt()) if total > 0 else 0.0
        root = sv.norm(dim=1).sqrt()  # sqrt(S_k)
        u, sv = u * root * f, sv / root.clamp_min(1e-300)[:, None] * f  # (m, k) and (k, n), balanced
        up = torch.zeros(d.shape[0], rank, device=dev, dtype=torch.float64)
        down = torch.zeros(rank, d.shape[1], device=dev, dtype=torch.float64)
        if wide:  # d = u sv
            up[:, :k], down[:k] = u, sv
        else:  # d = (u sv)^T = sv^T u^T
            up[:, :k], down[:k] = sv.T, u.T
        if w_base.dim() == 4:  # a conv: down keeps the base kernel, up is 1x1 (as LoRALayer)
            down, up = down.reshape(rank, *w_base.shape[1:]), up.reshape(*up.shape, 1, 1)
        kn = kohya_name(name)
        out[f"{kn}.lora_down.weight"], out[f"{kn}.lora_up.weight"] = down.float().cpu(), up.float().cpu()
        out[f"{kn}.alpha"] = torch.tensor(float(alpha))
    return out, errors


# ----------------------------------------------------------------------------------------------------
# Training: LoRA layers called by forward hooks on the targets

class LoRALayer(nn.Module):
    """down then up, scaled by alpha / rank; `alpha` is a buffer so the state dict is kohya's."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        kw = dict(device=base.weight.device, dtype=torch.float32)  # trainable params stay float32
        if isinstance(base, nn.Linear):
            self.lora_down = nn.Linear(base.in_features, rank, bias=False, **kw)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False, **kw)
        else:
            if base.groups != 1 or base.dilation != (1, 1):
                raise ValueError(f"lora.py: conv with groups={base.groups}, dilation={base.dilation} is "
                                 "unsupported")
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding,
                                       bias=False, **kw)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False, **kw)
        self.rank = rank
        self.enabled = True  # off: the base model (the teacher in LoRA phases)
        self.register_buffer("alpha", torch.tensor(float(alpha), device=kw["device"]))
        # kohya and peft: down like nn.Linear's default init, up zero so training starts at the base model
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def forward(self, x):
        # the base may be bf16/fp16 while these are fp32; under autocast the matmuls run in bf16 anyway
        return self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype))) * (self.alpha / self.rank)


def _lora_hook(module, args, out):
    # The layer hangs off the base module unregistered (not a submodule, so no duplicate state-dict
    # keys); a deepcopy of the UNet copies it along with `unet.lora`, so copies never share LoRA layers.
    layer = module.__dict__["_lora_layer"]
    return out + layer(args[0]).to(out.dtype) if layer.enabled else out


def add_lora(unet, rank=64, alpha=8.0) -> nn.ModuleDict:
    """Register trainable LoRA layers as `unet.lora` (keyed by kohya names) and forward hooks on every
    target, so out = base(x) + (alpha / rank) * up(down(x)). The layers are submodules of the UNet,
    so optimizers, DDP, checkpointing and .to() see them; the hooks rerun under activation recompute."""
    unet = _unwrap(unet)
    if hasattr(unet, "lora"):
        raise ValueError("add_lora: this UNet already has LoRA layers (unet.lora); merge_and_remove_lora "
                         "first")
    if rank < 1:
        raise ValueError(f"add_lora: rank must be >= 1, got {rank}")
    lora_dict = nn.ModuleDict()
    for name, module in _base_modules(unet):
        if name.startswith(TARGET_EXCLUDE):
            continue
        layer = LoRALayer(module, rank, alpha)
        lora_dict[kohya_name(name)] = layer
        module.__dict__["_lora_layer"] = layer
        layer.__dict__["_hook_handle"] = module.register_forward_hook(_lora_hook)
    unet.lora = lora_dict
    return lora_dict


def _lora_dict(unet):
    unet = _unwrap(unet)
    if not isinstance(getattr(unet, "lora", None), nn.ModuleDict):
        raise ValueError("this UNet has no LoRA layers (call lora.add_lora(unet) first)")
    return unet.lora


def set_lora_enabled(unet, enabled: bool):
    """LoRA off gives the base model back: the teacher is the student with LoRA off, no second copy."""
    for layer in _lora_dict(unet).values():
        layer.enabled = bool(enabled)


def lora_state_dict(unet) -> dict:
    """Kohya format: `<kohya name>.lora_down.weight`, `.lora_up.weight`, `.alpha` (detached)."""
    return {k: v.detach() for k, v in _lora_dict(unet).state_dict().items()}


def kohya_file(unet, dtype=torch.float16) -> tuple:
    """The LoRA as a kohya `.safetensors` holds it: (tensors on the CPU in `dtype`, contiguous; metadata),
    which diffusers' load_lora_weights and ComfyUI read. Written by the caller
    (files.save_safetensors(tensors, path, metadata)): a model file does no I/O."""
    lora_dict = _lora_dict(unet)
    sd = {k: v.to("cpu", dtype).contiguous() for k, v in lora_state_dict(unet).items()}
    first = next(iter(lora_dict.values()))  # add_lora gives every layer the same rank and alpha
    return sd, kohya_metadata(first.rank, float(first.alpha))


def merge_and_remove_lora(unet) -> None:
    """Fuse the trained LoRA into the weights (whether enabled or not), remove the hooks and
    `unet.lora`: a plain UNet whose state dict has exactly the diffusers keys again."""
    unet = _unwrap(unet)
    sd = lora_state_dict(unet)  # raises if there is no LoRA
    for name, module in _base_modules(unet):
        if "_lora_layer" in module.__dict__:
            module.__dict__.pop("_lora_layer").__dict__.pop("_hook_handle").remove()
    del unet.lora
    merge_lora(unet, sd, source="unet.lora")


def base_state_dict(unet) -> dict:
    """The UNet's state dict without the LoRA entries (what a full-UNet checkpoint holds)."""
    return {k: v for k, v in _unwrap(unet).state_dict().items() if not k.startswith("lora.")}
