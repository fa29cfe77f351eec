"""The SDXL UNet in plain torch.

Module and attribute names equal the keys of diffusers' `UNet2DConditionModel` checkpoints, so the
official `sdxl_lightning_*_unet.safetensors` load with `load_state_dict(strict=True)` and no renaming
(the original single-file layout is renamed in convert.py). `UNet.encode` is the encoder path
(conv_in .. mid_block) the discriminator reuses.

Top to bottom: the config, the pieces (time embedding, resnet, attention, transformer, samplers), the
blocks of one resolution level, then the UNet, whose forward pushes a skip connection at every step
of the down path and pops one at every step of the up path. Last, the ControlNet (Sec. 5.3): the encoder
again, with a control image and zero convolutions whose residuals UNet.forward adds.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class UNetConfig:
    in_channels: int = 4                              # latent channels in
    out_channels: int = 4                             # latent channels out (eps or x0)
    block_out_channels: tuple = (320, 640, 1280)      # width of each resolution level
    layers_per_block: int = 2                         # resnets per down block (up blocks have one more)
    transformer_depth: tuple = (0, 2, 10)             # transformer blocks per attention; 0 = no attention
    num_heads: tuple = (5, 10, 20)                    # attention heads per level (SDXL: head width 64)
    cross_attention_dim: int = 2048                   # text context width (CLIP-L 768 + bigG 1280)
    addition_time_embed_dim: int = 256               # sinusoidal width of each of the 6 time ids
    pooled_dim: int = 1280                            # pooled text embedding width (bigG projection)
    num_time_ids: int = 6                             # (orig_h, orig_w, crop_top, crop_left, h, w)
    norm_num_groups: int = 32                         # GroupNorm groups everywhere
    norm_eps: float = 1e-5                            # GroupNorm eps of resnets and conv_norm_out

    @property
    def time_embed_dim(self):
        return 4 * self.block_out_channels[0]

    @classmethod
    def from_diffusers(cls, cfg: dict, source="config.json"):
        """Read a diffusers `unet/config.json`; refuse what is not an SDXL-architecture UNet."""
        if cfg.get("addition_embed_type") != "text_time":
            raise ValueError(f"{source}: not an SDXL-architecture UNet (addition_embed_type="
                             f"{cfg.get('addition_embed_type')!r}, SDXL has 'text_time'; SD1.x/2.x is "
                             "unsupported)")
        if not cfg.get("use_linear_projection", False):
            raise ValueError(f"{source}: use_linear_projection=False is not SDXL's architecture")
        n = len(cfg["block_out_channels"])
        per = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v,) * n
        depth = per(cfg.get("transformer_layers_per_block", 1))
        heads = per(cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8))
        types = cfg["down_block_types"]
        depth = tuple(d if "CrossAttn" in bt else 0 for d, bt in zip(depth, types))
        time_in = cfg["projection_class_embeddings_input_dim"]
        add_dim = cfg.get("addition_time_embed_dim", 256)
        return cls(in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4),
                   block_out_channels=tuple(cfg["block_out_channels"]),
                   layers_per_block=cfg.get("layers_per_block", 2), transformer_depth=depth,
                   num_heads=heads, cross_attention_dim=cfg["cross_attention_dim"],
                   addition_time_embed_dim=add_dim, pooled_dim=time_in - 6 * add_dim,
                   norm_num_groups=cfg.get("norm_num_groups", 32), norm_eps=cfg.get("norm_eps", 1e-5))

    def to_diffusers(self) -> dict:
        """The equivalent diffusers config.json (written next to exports so diffusers loads them)."""
        down = ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in self.transformer_depth]
        up = ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(self.transformer_depth)]
        return {"_class_name": "UNet2DConditionModel", "sample_size": 128,
                "in_channels": self.in_channels, "out_channels": self.out_channels,
                "down_block_types": down, "up_block_types": up, "mid_block_type": "UNetMidBlock2DCrossAttn",
                "block_out_channels": list(self.block_out_channels),
                "layers_per_block": self.layers_per_block,
                "transformer_layers_per_block": [max(d, 1) for d in self.transformer_depth],
                "attention_head_dim": list(self.num_heads), "cross_attention_dim": self.cross_attention_dim,
                "use_linear_projection": True, "addition_embed_type": "text_time",
                "addition_time_embed_dim": self.addition_time_embed_dim,
                "projection_class_embeddings_input_dim": self.add_embed_in_dim,
                "norm_num_groups": self.norm_num_groups, "norm_eps": self.norm_eps,
                "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu", "center_input_sample": False}

    @property
    def add_embed_in_dim(self):
        return self.pooled_dim + self.num_time_ids * self.addition_time_embed_dim


# ----------------------------------------------------------------------------------------------------
# Pieces

def timestep_embedding(t, dim):
    """Sinusoidal embedding, cos first (diffusers flip_sin_to_cos=True, freq_shift=0). t: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.linear_1 = nn.Linear(cin, cout)
        self.linear_2 = nn.Linear(cout, cout)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    def __init__(self, cin, cout, temb_dim, groups=32, eps=1e-5):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, C, 1, 1) broadcast over H, W
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Multi-head attention; self-attention when `context` is None, else cross-attention to the text."""

    def __init__(self, dim, heads, context_dim=None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # diffusers' to_out.0 (to_out.1 was dropout)
        self.cross = context_dim is not None
        self.fused = 0  # fuse_qkv(): how many projections one matmul makes: 3 (q, k, v) or 2 (k, v; cross)

    def fuse_qkv(self):
        """Inference speed (diffusers' fuse_qkv_projections): one (3C, C) matmul instead of three (self-
        attention; cross-attention fuses k, v). The fused matrix is not a new parameter: to_q/to_k/to_v's
        weights become views into it, so state_dict, load_state_dict(strict=True) and LoRA merges keep
        working on the checkpoint keys and write through to it. Not for training: no gradient reaches the
        views through the fused matmul. A later .to()/.half() re-fuses (_apply)."""
        names = ("to_k", "to_v") if self.cross else ("to_q", "to_k", "to_v")
        w = torch.cat([getattr(self, n).weight.detach() for n in names])  # (3C or 2C, C_in)
        rows = 0
        for n in names:
            lin = getattr(self, n)
            lin.weight = nn.Parameter(w[rows:rows + lin.out_features], requires_grad=False)  # a view of w
            rows += lin.out_features
        self._fused_weight, self.fused = w, len(names)
        return self

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)  # moves each weight on its own: the views lose their shared matrix
        if self.fused:
            self.fuse_qkv()
        return out

    def forward(self, x, context=None):
        B, N, C = x.shape
        d = C // self.heads
        split = lambda y: y.view(B, -1, self.heads, d).transpose(1, 2)  # (B, heads, N, C/heads)
        if self.fused == 3:  # self-attention: (B, N, 3, heads, d) -> 3 x (B, heads, N, d)
            q, k, v = F.linear(x, self._fused_weight).view(B, N, 3, self.heads, d).permute(2, 0, 3, 1, 4)
        elif self.fused == 2:  # cross-attention: k, v from the text
            kv = F.linear(context, self._fused_weight).view(B, -1, 2, self.heads, d).permute(2, 0, 3, 1, 4)
            q, (k, v) = split(self.to_q(x)), kv
        else:
            context = x if context is None else context
            q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).reshape(B, N, C))  # (B, N, C)


class GEGLU(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4):
        super().__init__()
        # net.1: dropout
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x):
        for m in self.net:
            x = m(x)
        return x


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, heads, context_dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """GroupNorm, linear projection in, `depth` transformer blocks over the H*W tokens, projection out."""

    def __init__(self, dim, heads, depth, context_dim, groups=32):
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(dim, heads, context_dim)
                                                 for _ in range(depth)])
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, HW, C)
        h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = self.proj_out(h).reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
        return x + h


class Downsample2D(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample2D(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size=None):
        # `size` = the next skip's size, so latents not divisible by 4 (e.g. 1000 px images) still line up
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


# ----------------------------------------------------------------------------------------------------
# Blocks: one resolution level each. A down block returns every output it produced, for the skips.

class DownBlock(nn.Module):
    def __init__(self, cin, cout, cfg, level, add_downsample):
        super().__init__()
        depth, heads = cfg.transformer_depth[level], cfg.num_heads[level]
        g, eps, temb = cfg.norm_num_groups, cfg.norm_eps, cfg.time_embed_dim
        self.resnets = nn.ModuleList([ResnetBlock2D(cin if i == 0 else cout, cout, temb, g, eps)
                                      for i in range(cfg.layers_per_block)])
        if depth:
            self.attentions = nn.ModuleList([Transformer2DModel(cout, heads, depth,
                                                                cfg.cross_attention_dim, g)
                                             for _ in range(cfg.layers_per_block)])
        if add_downsample:
            self.downsamplers = nn.ModuleList([Downsample2D(cout)])


class UpBlock(nn.Module):
    def __init__(self, cin, cout, cprev, cfg, level, add_upsample):
        super().__init__()
        # level indexes the config in down order; this block mirrors it on the way up
        depth, heads = cfg.transformer_depth[level], cfg.num_heads[level]
        g, eps, temb, n = cfg.norm_num_groups, cfg.norm_eps, cfg.time_embed_dim, cfg.layers_per_block + 1
        # resnet i sees the previous output concatenated with a popped skip (the last skip is narrower)
        self.resnets = nn.ModuleList([ResnetBlock2D((cprev if i == 0 else cout)
                                                    + (cin if i == n - 1 else cout),
                                                    cout, temb, g, eps) for i in range(n)])
        if depth:
            self.attentions = nn.ModuleList([Transformer2DModel(cout, heads, depth,
                                                                cfg.cross_attention_dim, g)
                                             for _ in range(n)])
        if add_upsample:
            self.upsamplers = nn.ModuleList([Upsample2D(cout)])


class MidBlock(nn.Module):
    def __init__(self, ch, cfg):
        super().__init__()
        g, eps, temb = cfg.norm_num_groups, cfg.norm_eps, cfg.time_embed_dim
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, temb, g, eps) for _ in range(2)])
        self.attentions = nn.ModuleList([Transformer2DModel(ch, cfg.num_heads[-1], cfg.transformer_depth[-1],
                                                            cfg.cross_attention_dim, g)])


# ----------------------------------------------------------------------------------------------------
# The UNet

class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig = None):
        super().__init__()
        cfg = cfg or UNetConfig()
        self._build_entry(cfg)
        self._build_encoder(cfg)
        ch, L = cfg.block_out_channels, len(cfg.block_out_channels)
        self.up_blocks = nn.ModuleList([UpBlock(ch[max(L - 2 - i, 0)], ch[L - 1 - i], ch[min(L - i, L - 1)],
                                                cfg, L - 1 - i, i < L - 1) for i in range(L)])
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)
        self.gradient_checkpointing = False  # recompute block activations in backward (training memory)

    def _build_entry(self, cfg):
        """conv_in and the two embeddings (the ControlNet builds the same)."""
        assert len(cfg.block_out_channels) == len(cfg.transformer_depth) == len(cfg.num_heads)
        if cfg.transformer_depth[-1] == 0:
            raise ValueError("the last level needs attention: SDXL's mid block is a cross-attention block")
        self.config = cfg
        ch = cfg.block_out_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], cfg.time_embed_dim)
        self.add_embedding = TimestepEmbedding(cfg.add_embed_in_dim, cfg.time_embed_dim)

    def _build_encoder(self, cfg):
        """The down blocks and the mid block (the ControlNet builds the same)."""
        ch, L = cfg.block_out_channels, len(cfg.block_out_channels)
        self.down_blocks = nn.ModuleList([DownBlock(ch[max(i - 1, 0)], ch[i], cfg, i, i < L - 1)
                                          for i in range(L)])
        self.mid_block = MidBlock(ch[-1], cfg)

    def _run(self, module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def fuse_qkv(self):
        """Every attention's q/k/v projections as one matmul (Attention.fuse_qkv): inference only, the
        checkpoint keys unchanged. Returns self."""
        for m in self.modules():
            if isinstance(m, Attention):
                m.fuse_qkv()
        return self

    def embed(self, t, pooled, time_ids, dtype):
        """Time embedding plus SDXL's micro-conditioning: pooled text and the 6 time ids. -> (B, 4*C0)."""
        t = t.reshape(-1) if torch.is_tensor(t) else torch.tensor([t])
        t = t.to(pooled.device).expand(pooled.shape[0])
        emb = self.time_embedding(timestep_embedding(t, self.config.block_out_channels[0]).to(dtype))
        ids = timestep_embedding(time_ids.reshape(-1), self.config.addition_time_embed_dim)  # (B*6, 256)
        ids = ids.reshape(pooled.shape[0], -1)  # (B, 6*256)
        return emb + self.add_embedding(torch.cat([pooled, ids.to(pooled.dtype)], dim=-1).to(dtype))

    def encode(self, x, t, context, pooled, time_ids, hint=None):
        """conv_in .. mid_block. Returns (h, emb, skips); the discriminator backbone uses h (B, C, H/4,
        W/4). hint: a ControlNet's embedded control image, added to conv_in's output."""
        emb = self.embed(t, pooled, time_ids, x.dtype)
        h = self.conv_in(x) if hint is None else self.conv_in(x) + hint
        skips = [h]                                            # push: conv_in output
        for block in self.down_blocks:
            for i, resnet in enumerate(block.resnets):
                h = self._run(resnet, h, emb)
                if hasattr(block, "attentions"):
                    h = self._run(block.attentions[i], h, context)
                skips.append(h)                                # push: every resnet(+attention) output
            if hasattr(block, "downsamplers"):
                h = block.downsamplers[0](h)
                skips.append(h)                                # push: every downsampler output
        h = self._run(self.mid_block.resnets[0], h, emb)
        h = self._run(self.mid_block.attentions[0], h, context)
        h = self._run(self.mid_block.resnets[1], h, emb)
        return h, emb, skips

    def forward(self, x, t, context, pooled, time_ids, down_block_additional_residuals=None,
                mid_block_additional_residual=None):
        """x (B, 4, H, W); t UNet timestep (0..999) scalar or (B,); context (B, 77, 2048);
        pooled (B, 1280); time_ids (B, 6). Returns eps (or x0 for an x0 model), (B, 4, H, W).
        The residuals (a ControlNet's, Sec. 5.3; diffusers' names) are added to the skips and mid block."""
        h, emb, skips = self.encode(x, t, context, pooled, time_ids)
        if down_block_additional_residuals is not None:
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals, strict=True)]
            h = h + mid_block_additional_residual
        for block in self.up_blocks:
            for i, resnet in enumerate(block.resnets):
                h = torch.cat([h, skips.pop()], dim=1)         # pop: the matching down-path output
                h = self._run(resnet, h, emb)
                if hasattr(block, "attentions"):
                    h = self._run(block.attentions[i], h, context)
            if hasattr(block, "upsamplers"):
                h = block.upsamplers[0](h, skips[-1].shape[-2:])
        assert not skips
        return self.conv_out(F.silu(self.conv_norm_out(h)))


# ----------------------------------------------------------------------------------------------------
# ControlNet (Sec. 5.3: the Lightning models keep working with the SDXL ControlNets)
#
# A copy of the UNet's encoder (conv_in, embeddings, down blocks, mid block) that also sees a control image
# (canny edges, depth, ...) through a small conditioning embedding added after conv_in; a zero-initialised
# 1x1 convolution per skip and one for the mid block turn its activations into residuals the UNet adds to
# its own (UNet.forward). Names equal diffusers' `ControlNetModel` keys, so the official files
# (diffusers/controlnet-canny-sdxl-1.0, ...-depth-sdxl-1.0) load strictly.

@dataclass
class ControlNetConfig(UNetConfig):
    """The UNetConfig fields describe the copied encoder (SDXL's, as the official SDXL ControlNets);
    out_channels is unused (there is no decoder)."""
    conditioning_channels: int = 3                                    # control image channels (RGB)
    conditioning_embedding_out_channels: tuple = (16, 32, 96, 256)    # hint encoder widths; 2x down per step

    # diffusers ControlNetModel options we do not implement, with the only value we accept
    UNSUPPORTED = {"global_pool_conditions": False, "controlnet_conditioning_channel_order": "rgb",
                   "class_embed_type": None, "num_class_embeds": None, "encoder_hid_dim": None,
                   "mid_block_type": "UNetMidBlock2DCrossAttn", "resnet_time_scale_shift": "default",
                   "only_cross_attention": False, "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0,
                   "mid_block_scale_factor": 1, "downsample_padding": 1}

    @classmethod
    def from_diffusers(cls, cfg: dict, source="config.json"):
        """Read a diffusers ControlNet config.json; refuse another architecture or an SD1.x/2.x ControlNet."""
        name = cfg.get("_class_name", "ControlNetModel")
        if name != "ControlNetModel":
            raise ValueError(f"{source}: a {name}, not a ControlNetModel (only the SDXL ControlNet "
                             "architecture is supported)")
        if cfg.get("addition_embed_type") != "text_time":
            raise ValueError(f"{source}: not an SDXL ControlNet (addition_embed_type="
                             f"{cfg.get('addition_embed_type')!r}, SDXL has 'text_time'; cross_attention_dim "
                             f"{cfg.get('cross_attention_dim')}: an SD1.x/2.x ControlNet?)")
        for key, ok in cls.UNSUPPORTED.items():
            v = cfg.get(key, ok)
            if not (all(e == ok for e in v) if isinstance(v, list) else v == ok):  # lists: one per level
                raise ValueError(f"{source}: {key}={v!r} is not supported (only {ok!r})")
        base = UNetConfig.from_diffusers(cfg, source)
        return cls(**{**base.__dict__, "conditioning_channels": cfg.get("conditioning_channels", 3),
                      "conditioning_embedding_out_channels":
                          tuple(cfg.get("conditioning_embedding_out_channels") or (16, 32, 96, 256))})

    def to_diffusers(self) -> dict:
        cfg = super().to_diffusers()
        for key in ("sample_size", "out_channels", "up_block_types", "center_input_sample"):
            del cfg[key]
        return {**cfg, "_class_name": "ControlNetModel", "conditioning_channels": self.conditioning_channels,
                "conditioning_embedding_out_channels": list(self.conditioning_embedding_out_channels)}


class ControlNetConditioningEmbedding(nn.Module):
    """The control image (B, 3, H, W) in [0, 1] -> (B, C0, H/8, W/8): conv, then (conv, strided conv) per
    width step, SiLU after each, and a zero-initialised conv_out."""

    def __init__(self, cin, cout, widths):
        super().__init__()
        self.conv_in = nn.Conv2d(cin, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in zip(widths[:-1], widths[1:]):
            self.blocks.extend([nn.Conv2d(a, a, 3, padding=1), nn.Conv2d(a, b, 3, padding=1, stride=2)])
        self.conv_out = nn.Conv2d(widths[-1], cout, 3, padding=1)

    def forward(self, x):
        h = F.silu(self.conv_in(x))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)


class ControlNet(nn.Module):
    """Sec. 5.3: the UNet's encoder path on the same inputs plus a control image; returns the residuals the
    UNet adds to its skips and mid block output, times `scale` (diffusers' conditioning_scale)."""
    embed, encode, _run = UNet.embed, UNet.encode, UNet._run  # the UNet's encoder path, on these weights
    _build_entry, _build_encoder = UNet._build_entry, UNet._build_encoder  # and its modules, same names

    def __init__(self, cfg: ControlNetConfig = None):
        super().__init__()
        cfg = cfg or ControlNetConfig()
        self._build_entry(cfg)
        ch, L = cfg.block_out_channels, len(cfg.block_out_channels)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            cfg.conditioning_channels, ch[0], cfg.conditioning_embedding_out_channels)
        self._build_encoder(cfg)
        # one zero conv per skip the UNet pushes: conv_in's, every resnet's, every downsampler's
        widths = [ch[0]] + [c for i, c in enumerate(ch) for _ in range(cfg.layers_per_block + (i < L - 1))]
        self.controlnet_down_blocks = nn.ModuleList([nn.Conv2d(c, c, 1) for c in widths])
        self.controlnet_mid_block = nn.Conv2d(ch[-1], ch[-1], 1)
        for conv in [*self.controlnet_down_blocks, self.controlnet_mid_block,
                     self.controlnet_cond_embedding.conv_out]:
            nn.init.zeros_(conv.weight)  # zero convolutions: a new ControlNet starts as "no change"
            nn.init.zeros_(conv.bias)
        self.gradient_checkpointing = False

    def forward(self, x, t, context, pooled, time_ids, cond, scale=1.0):
        """x, t, context, pooled, time_ids as UNet.forward; cond the control image (B, 3, 8h, 8w) in [0, 1].
        -> ([one residual per UNet skip, each its shape], the mid block's residual)."""
        hint = self.controlnet_cond_embedding(cond.to(x.dtype))  # (B, C0, h, w)
        h, _, skips = self.encode(x, t, context, pooled, time_ids, hint)
        down = [zero(s) * scale for zero, s in zip(self.controlnet_down_blocks, skips, strict=True)]
        return down, self.controlnet_mid_block(h) * scale


class ControlledUNet(nn.Module):
    """Sec. 5.3: the UNet steered by ControlNets, with the UNet's call signature (what lightning_min's
    unet_model calls). controls: [(ControlNet, control image (1 or B, 3, H, W) in [0, 1], scale)]; every
    ControlNet sees the UNet's inputs, their residuals are summed (diffusers' MultiControlNetModel)."""

    def __init__(self, unet, controls):
        super().__init__()
        self.unet = unet  # first, so .parameters() starts with the UNet's (its dtype is the run's)
        self.controlnets = nn.ModuleList([c for c, _, _ in controls])
        self.images = [image for _, image, _ in controls]
        self.scales = [scale for _, _, scale in controls]

    def forward(self, x, t, context, pooled, time_ids):
        down = mid = None
        for net, image, scale in zip(self.controlnets, self.images, self.scales):
            # the image repeated to the batch, twice under CFG (x is [uncond; cond] then), as diffusers
            image = image.to(x.device).repeat(x.shape[0] // image.shape[0], 1, 1, 1)  # (B, 3, H, W)
            d, m = net(x, t, context, pooled, time_ids, image, scale)
            down, mid = (d, m) if down is None else ([a + b for a, b in zip(down, d)], mid + m)
        return self.unet(x, t, context, pooled, time_ids, down, mid)
