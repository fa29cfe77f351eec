"""Speed and memory: ours against diffusers, same config, weights, dtype and device, in the same run.

    python -m tools.bench --config tiny                             # smoke run, seconds
    python -m tools.bench --config mid --what unet --runs 5         # CPU: one UNet forward, 64x64 latents
    python -m tools.bench --config mid --what sample --runs 3       # CPU: text + 4 steps + VAE decode, 512 px
    python -m tools.bench --config sdxl --what all --json out.json  # GPU: full SDXL, 1024 px, bf16, 4 steps
    python -m tools.bench --what memory        # per-GPU memory per phase, DDP+ZeRO vs FSDP2 (computed)
    python -m tools.bench --config mid --what vae --runs 1  # the tiny preview VAE's decoder vs the full one

What is timed (median of --runs after --warmup, both under torch.no_grad):
- `unet`: one forward of our `unet.UNet` against diffusers' `UNet2DConditionModel`, the same weights
  (diffusers' state dict loaded into ours strictly).
- `sample`: the whole text-to-image call, `sample.generate` (text encoders, the Lightning sampler of
  `lightning_min.sample`, VAE decode) against `StableDiffusionXLPipeline` with the model card's
  `EulerDiscreteScheduler(timestep_spacing="trailing")`, guidance off, same prompt, seed, steps, size.
  The two share the same tokenizers and the same `transformers` CLIP text encoders (both call them).
- `vae`: the tiny preview decoder (`vae.TinyVAE`, TAESDXL) against diffusers' `AutoencoderTiny` (same
  weights) and against our full VAE decoder, plus each decoder's FLOPs at 1024 px (FlopCounterMode).
- `memory` (computed, not timed): per-GPU memory of every training phase at SDXL size on 1, 2 and 8 GPUs,
  DDP + ZeRO against FSDP2 (train.py --shard), from parameter counts of the real shapes on the meta device.

How to read the table: times are medians; `ratio` = ours ms / diffusers ms, so < 1 means we are
faster; `(min)` is the same ratio of the fastest runs, the steadier one on a machine shared with other
work. Our calls and diffusers' are interleaved (AB, BA, AB, ...) so that load hits both alike.
`peak MB` is the memory the call needs on top of what was allocated before it (activations and
workspace; the weights are the same bytes for both and are not counted): on CUDA from
torch.cuda.max_memory_allocated, on CPU the process RSS sampled every millisecond (psutil) after
returning freed heap to the OS (malloc_trim), or, without psutil, the rise of ru_maxrss (a lower bound:
only what goes above the process's earlier peak). Peak memory is read on the last warmup call (at
least the second call: the first pays one-off allocations), so the sampling thread never runs during
a timed call. `max|diff|` is the largest difference between the two outputs: it shows that the same
computation was timed (0 when both ran the very same kernels in the same order).

Attention: both sides use F.scaled_dot_product_attention. Our UNet and VAE call it directly; diffusers'
UNet and VAE are set to `AttnProcessor2_0` (its default in torch 2, which calls the same function);
this is checked before timing. Threads are the same for both (torch's default unless --threads) and
printed in the header with the load average: on a shared CPU another busy process slows torch's thread
pool by large factors, so compare ratios within one run, not times across runs.

Random weights: speed does not depend on the values. Text encoders are full-size CLIP-L and OpenCLIP
bigG configs (random weights, a tiny offline vocabulary) for `mid` and `sdxl`, tiny ones for `tiny`.
On float16, diffusers' pipeline upcasts its VAE to float32 for every decode (its `force_upcast`
recipe) while ours keeps a float32 VAE, as sample.py does; bfloat16 runs the VAE in bfloat16 on both.
"""
import argparse
import ctypes
import fnmatch
import gc
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from dataclasses import dataclass

import torch

import lightning_min as lm
import sample as sample_mod
import text as text_mod
import unet as unet_mod
import vae as vae_mod
import weights


@dataclass
class BenchConfig:
    unet: unet_mod.UNetConfig                          # UNet architecture (both sides)
    vae: vae_mod.VAEConfig                             # VAE architecture for the sample bench
    # "full": CLIP-L + bigG sizes; "tiny": tests/tiny_text.py
    text: str
    latent: int                                        # latent height = width (pixels: latent * VAE factor)


CONFIGS = {
    "tiny": BenchConfig(unet_mod.UNetConfig(block_out_channels=(64, 128), layers_per_block=1,
                                            transformer_depth=(0, 2),
                                            num_heads=(1, 2), cross_attention_dim=80, pooled_dim=48),
                        vae_mod.VAEConfig(block_out_channels=(32, 64), layers_per_block=1), "tiny", 32),
    "mid": BenchConfig(unet_mod.UNetConfig(transformer_depth=(0, 2, 2)), vae_mod.VAEConfig(), "full", 64),
    "sdxl": BenchConfig(unet_mod.UNetConfig(), vae_mod.VAEConfig(), "full", 128),
}
PROMPT = "photo of a red car in the snow"

# ----------------------------------------------------------------------------------------------------
# Clocks and memory


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """Wall time of one call in ms; CUDA work is waited for before each clock read."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3, out


try:
    import psutil
except ImportError:
    psutil = None


def _trim_heap():
    """Give freed heap pages back to the OS, so the RSS before a call is not inflated by earlier calls."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: RSS deltas may then read low


def memory_method(device):
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated minus allocated before the call"
    if psutil is not None:
        return "peak process RSS (psutil, sampled every 1 ms) minus RSS before the call, after malloc_trim"
    return "rise of ru_maxrss during the call (lower bound: only what exceeds the process's earlier peak)"


class PeakMemory:
    """`with PeakMemory(device) as m: fn()`, then m.mb: the peak above the level at entry, in MB."""

    def __init__(self, device):
        self.device, self.mb = device, float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        _trim_heap()
        if psutil is None:
            import resource
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
            return self
        proc, self.stop = psutil.Process(), threading.Event()
        self.base = self.peak = proc.memory_info().rss

        def watch():  # torch releases the GIL in its kernels, so this thread keeps sampling
            while not self.stop.wait(0.001):
                self.peak = max(self.peak, proc.memory_info().rss)
        self.thread = threading.Thread(target=watch, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.mb = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        elif psutil is None:
            import resource
            self.mb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base, 0) / 2**20
        else:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.peak, psutil.Process().memory_info().rss)
            self.mb = (self.peak - self.base) / 2**20


def compare(what, ours, theirs, device, runs, warmup):
    """Interleaved timing of two zero-argument callables. Returns a result row (dict)."""
    peak, out, times = {}, {}, {"ours": [], "diffusers": []}
    fns = {"ours": ours, "diffusers": theirs}
    # untimed calls: at least 2, the last one measures memory (the first pays one-off allocations)
    for i in range(max(warmup, 2)):
        for name, fn in fns.items():
            if i < max(warmup, 2) - 1:
                fn()
                continue
            with PeakMemory(device) as m:
                out[name] = fn()
            peak[name] = m.mb
    for i in range(runs):
        for name in (("ours", "diffusers") if i % 2 == 0 else ("diffusers", "ours")):
            ms, _ = timed(fns[name], device)
            times[name].append(ms)
            print(f"  {what} run {i + 1}/{runs} {name}: {ms:.1f} ms", file=sys.stderr)
    a, b = out["ours"].float(), out["diffusers"].float()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"what": what, "ours_ms": med["ours"], "diffusers_ms": med["diffusers"],
            "ratio": med["ours"] / med["diffusers"],
            "ratio_min": min(times["ours"]) / min(times["diffusers"]),
            "ours_peak_mb": peak["ours"], "diffusers_peak_mb": peak["diffusers"],
            "max_abs_diff": (a - b).abs().max().item(), "ours_runs_ms": times["ours"],
            "diffusers_runs_ms": times["diffusers"]}


# ----------------------------------------------------------------------------------------------------
# Models: diffusers builds them, ours gets the same tensors


def sdpa_everywhere(model):
    """diffusers' UNet and VAE on AttnProcessor2_0, i.e. F.scaled_dot_product_attention, like ours."""
    from diffusers.models.attention_processor import AttnProcessor2_0
    model.set_attn_processor(AttnProcessor2_0())
    kinds = {type(p).__name__ for p in model.attn_processors.values()}
    if kinds != {"AttnProcessor2_0"}:
        raise RuntimeError(f"bench.py: diffusers {type(model).__name__} uses {kinds}, not AttnProcessor2_0")
    return model


def build_pair(diffusers_cls, our_cls, cfg, device, dtype):
    """(ours, diffusers'): diffusers' randomly initialized model, its state dict loaded strictly into ours."""
    kwargs = {k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}
    torch.manual_seed(0)
    with torch.device(device):  # built in place: a full SDXL UNet in float32 would not fit a small host
        theirs = sdpa_everywhere(diffusers_cls(**kwargs)).to(dtype).eval()
    sd = {k: v.clone() for k, v in theirs.state_dict().items()}  # own copies: no shared storage
    ours = weights.build_strict(our_cls, cfg, sd, f"diffusers {diffusers_cls.__name__}", device, dtype).eval()
    return ours, theirs


def unet_inputs(cfg: BenchConfig, batch, device, dtype):
    """Random UNet inputs at the config's size; t = 999, the first Lightning step."""
    g = torch.Generator().manual_seed(0)
    u, n = cfg.unet, cfg.latent
    x = torch.randn(batch, u.in_channels, n, n, generator=g)
    context = torch.randn(batch, 77, u.cross_attention_dim, generator=g)
    pooled = torch.randn(batch, u.pooled_dim, generator=g)
    px = n * cfg.vae.downscale
    ids = torch.tensor([px, px, 0, 0, px, px], dtype=torch.float32).expand(batch, 6)
    t = torch.full((batch,), 999, dtype=torch.long)
    return [v.to(device, dtype) if v.is_floating_point() else v.to(device)
            for v in (x, t, context, pooled, ids)]


def clip_configs(kind, vocab_size):
    """CLIP-L (hidden 768, 12 layers, quick_gelu) and OpenCLIP bigG (1280, 32 layers, gelu, projection
    1280)."""
    from transformers import CLIPTextConfig
    from tools.tiny import text_configs
    if kind == "tiny":
        return text_configs()
    common = dict(vocab_size=vocab_size, max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
                  pad_token_id=1, layer_norm_eps=1e-5)
    return (CLIPTextConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072, hidden_act="quick_gelu", projection_dim=768, **common),
            CLIPTextConfig(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20,
                           intermediate_size=5120, hidden_act="gelu", projection_dim=1280, **common))


def build_text(cfg: BenchConfig, device, dtype):
    """Two CLIP tokenizers (an offline vocabulary from tests/tiny_text.py) and two random text encoders."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    from tools.tiny import write_tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(f"{tmp}/tokenizer", pad_token="<|endoftext|>")  # CLIP-L pads with EOS
        write_tokenizer(f"{tmp}/tokenizer_2", pad_token="!")  # bigG pads with "!"
        tok, tok_2 = (CLIPTokenizer.from_pretrained(f"{tmp}/{sub}") for sub in ("tokenizer", "tokenizer_2"))
    config, config_2 = clip_configs(cfg.text, 49408)
    torch.manual_seed(0)
    with torch.device(device):
        enc, enc_2 = CLIPTextModel(config), CLIPTextModelWithProjection(config_2)
    if config.hidden_size + config_2.hidden_size != cfg.unet.cross_attention_dim or \
            config_2.projection_dim != cfg.unet.pooled_dim:
        raise ValueError("bench.py: text widths "
                         f"{config.hidden_size}+{config_2.hidden_size}/{config_2.projection_dim} do not fit "
                         f"the UNet ({cfg.unet.cross_attention_dim}/{cfg.unet.pooled_dim})")
    return tok, tok_2, enc.to(dtype).eval(), enc_2.to(dtype).eval()


# ----------------------------------------------------------------------------------------------------
# The benches: each returns a list of result rows. A `train` bench slots into BENCHES the same way.

_cache = {}


def unets(cfg, device, dtype):
    if "unet" not in _cache:  # `--what all` builds the UNets once
        from diffusers import UNet2DConditionModel
        _cache["unet"] = build_pair(UNet2DConditionModel, unet_mod.UNet, cfg.unet, device, dtype)
    return _cache["unet"]


# The fast path, like against like: each option on both sides (ours: sample.make_fast; diffusers: its
# own channels_last, fuse_qkv_projections, torch.compile). CUDA graphs (ours) are paired with diffusers'
# torch.compile mode "reduce-overhead", the way diffusers captures CUDA graphs.
OPTIONS = ["plain", "channels_last", "fuse_qkv", "compile", "fast"]


def option_kwargs(name, device, mode="default"):
    """A bench option -> sample.make_fast's keywords; "fast" is sample.py --fast on this device."""
    opts = {"channels_last": False, "fuse_qkv": False, "compile": None, "cuda_graphs": False}
    if name == "fast":
        flags = sample_mod.parse_args(["-", "--fast"])
        return sample_mod.speed_options(flags, device)
    if name == "compile":
        return {**opts, "compile": mode}
    return {**opts, name: True} if name != "plain" else opts


def make_fast_diffusers(unet, vae, opts):
    """diffusers' own speed-ups for make_fast's keywords, in place; either model may be None."""
    if unet is not None:
        if opts["channels_last"]:
            unet.to(memory_format=torch.channels_last)
        if opts["fuse_qkv"]:
            unet.fuse_qkv_projections()  # the UNet only, as ours (the VAE's one attention stays unfused)
        mode = "reduce-overhead" if opts["cuda_graphs"] else opts["compile"]
        if mode:
            unet.compile(mode=mode)
    if vae is not None:
        if opts["channels_last"]:
            vae.to(memory_format=torch.channels_last)
        if opts["compile"]:
            vae.decoder.compile(mode=opts["compile"])
    return unet, vae


def unet_pair(cfg, device, dtype, option, mode="default"):
    """The UNet pair with `option` on both sides, cached: the unet and sample benches share it. An option's
    pair is built fresh after the cached ones are dropped (at SDXL size in fp32 two pairs may not fit)."""
    if option == "plain":
        return unets(cfg, device, dtype)
    if ("unet", option) not in _cache:
        from diffusers import UNet2DConditionModel
        _cache.clear()
        gc.collect()
        ours, theirs = build_pair(UNet2DConditionModel, unet_mod.UNet, cfg.unet, device, dtype)
        opts = option_kwargs(option, device, mode)
        _cache[("unet", option)] = (sample_mod.make_fast(ours, None, device, **opts)[0],
                                    make_fast_diffusers(theirs, None, opts)[0])
    return _cache[("unet", option)]


def bench_options(args, device):
    return args.options or [o for o in OPTIONS if o != "compile" or device.type == "cuda"]


def label(what, option, device):
    if option == "plain":
        return what
    if option == "fast":
        on = [k for k, v in option_kwargs("fast", device).items() if v]
        return f"{what}, fast ({'+'.join(on)})"
    return f"{what}, {option}"


@torch.no_grad()
def bench_unet(cfg, args, device, dtype):
    rows = []
    for option in bench_options(args, device):
        ours, theirs = unet_pair(cfg, device, dtype, option, args.compile_mode)
        x, t, context, pooled, ids = unet_inputs(cfg, args.batch, device, dtype)
        added = {"text_embeds": pooled, "time_ids": ids}
        rows.append(compare(label("unet forward", option, device), lambda: ours(x, t, context, pooled, ids),
                            lambda: theirs(x, t, encoder_hidden_states=context, added_cond_kwargs=added,
                                           return_dict=False)[0],
                            device, args.runs, args.warmup))
        rows[-1]["option"] = option
        del ours, theirs
    return rows


@torch.no_grad()
def bench_sample(cfg, args, device, dtype):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    tok, tok_2, enc, enc_2 = build_text(cfg, device, dtype)
    text = text_mod.TextEncoders(tok, tok_2, enc, enc_2)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="trailing")
    px, prompts = cfg.latent * cfg.vae.downscale, [PROMPT] * args.batch
    rows = []
    for option in bench_options(args, device):
        opts = option_kwargs(option, device, args.compile_mode)
        unet, unet_ref = unet_pair(cfg, device, dtype, option, args.compile_mode)
        # float16: our VAE stays float32 (sample.py); diffusers' pipeline upcasts its own per decode
        # (force_upcast)
        vae, vae_ref = build_pair(AutoencoderKL, vae_mod.VAE, cfg.vae, device, dtype)
        if dtype == torch.float16:
            vae = vae.float()
        if option != "plain":  # the UNets have it already (unet_pair)
            vae = sample_mod.make_fast(None, vae, device, **opts)[1]
            make_fast_diffusers(None, vae_ref, opts)
        pipe = StableDiffusionXLPipeline(vae=vae_ref, unet=unet_ref, text_encoder=enc, text_encoder_2=enc_2,
                                         tokenizer=tok, tokenizer_2=tok_2, scheduler=scheduler,
                                         add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        for steps in getattr(args, "sample_steps", None) or [args.steps]:
            def ours():
                images = sample_mod.generate(text, unet, vae, prompts, steps, 0, px, px, "epsilon", 0.0,
                                             dtype)
                return (images / 2 + 0.5).clamp(0, 1)  # diffusers' "pt" output range

            def theirs():
                return pipe(prompts, num_inference_steps=steps, guidance_scale=0.0, width=px, height=px,
                            generator=torch.Generator("cpu").manual_seed(0), output_type="pt").images

            rows.append(compare(label(f"sample {steps} steps {px}px", option, device), ours, theirs, device,
                                args.runs, args.warmup))
            rows[-1]["option"] = option
        del unet, unet_ref, vae, vae_ref, pipe
    return rows


# ----------------------------------------------------------------------------------------------------
# The tiny preview VAE (sample.py --vae tiny): TAESDXL's decoder against diffusers' AutoencoderTiny (same
# weights) and against our full VAE decoder (its work saved), in time and in FLOPs at 1024 px


def decoder_flops(decode, latent=128):
    """FLOPs of one decode of a (1, 4, latent, latent) latent, counted by FlopCounterMode on the meta device
    (shapes only: no memory, no time, so 1024 px is counted on any machine)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"), FlopCounterMode(display=False) as fc, torch.no_grad():
        decode()(torch.zeros(1, 4, latent, latent))
    return fc.get_total_flops()


@torch.no_grad()
def bench_vae(cfg, args, device, dtype):
    from diffusers import AutoencoderKL, AutoencoderTiny
    from tools.tiny import TINY_TAESD
    tcfg = vae_mod.TinyVAEConfig() if cfg.vae.downscale == 8 else TINY_TAESD  # the same factor as cfg.vae
    torch.manual_seed(0)
    with torch.device(device):  # build_pair without its attention check: AutoencoderTiny has no attention
        tiny_ref = AutoencoderTiny(**{k: v for k, v in tcfg.to_diffusers().items()
                                      if not k.startswith("_")}).to(dtype).eval()
    sd = {k: v.clone() for k, v in tiny_ref.state_dict().items()}
    tiny = weights.build_strict(vae_mod.TinyVAE, tcfg, sd, "diffusers AutoencoderTiny", device, dtype).eval()
    full, _ = build_pair(AutoencoderKL, vae_mod.VAE, cfg.vae, device, dtype)
    if dtype == torch.float16:
        full = full.float()  # as sample.py: the SDXL VAE overflows in fp16; TAESD runs in fp16
    z = torch.randn(args.batch, 4, cfg.latent, cfg.latent, generator=torch.Generator().manual_seed(0))
    z = z.to(device, dtype)
    px = cfg.latent * cfg.vae.downscale
    rows = [compare(f"tiny vae decode {px}px", lambda: tiny.decode_latents(z, args.batch),
                    lambda: tiny_ref.decode(z).sample, device, args.runs, args.warmup),
            compare(f"tiny / our full dec {px}px", lambda: tiny.decode_latents(z, args.batch),
                    lambda: full.decode_latents(z.to(next(full.parameters()).dtype), args.batch),
                    device, args.runs, args.warmup)]
    rows[1]["max_abs_diff"] = float("nan")  # two decoders: different images by design
    n = 1024 // cfg.vae.downscale  # FLOPs at 1024 px, whatever size was timed
    with torch.device("meta"):
        meta = {"tiny": vae_mod.TinyVAE(tcfg), "full": vae_mod.VAE(cfg.vae),
                "diffusers": AutoencoderTiny(**{k: v for k, v in tcfg.to_diffusers().items()
                                                if not k.startswith("_")})}
    flops = {"tiny": decoder_flops(lambda: meta["tiny"].decode_latents, n),
             "full": decoder_flops(lambda: meta["full"].decode_latents, n),
             "diffusers": decoder_flops(lambda: lambda x: meta["diffusers"].decode(x).sample, n)}
    rows[0].update(ours_gflop_1024px=flops["tiny"] / 1e9, diffusers_gflop_1024px=flops["diffusers"] / 1e9)
    rows[1].update(ours_gflop_1024px=flops["tiny"] / 1e9, full_gflop_1024px=flops["full"] / 1e9,
                   flop_ratio=flops["tiny"] / flops["full"])
    print(f"VAE decoder FLOPs at 1024 px (FlopCounterMode): tiny {flops['tiny'] / 1e12:.3f} TFLOP, "
          f"diffusers' AutoencoderTiny {flops['diffusers'] / 1e12:.3f}, our full VAE "
          f"{flops['full'] / 1e12:.2f} "
          f"(tiny / full {flops['tiny'] / flops['full']:.3f})")
    return rows


# ----------------------------------------------------------------------------------------------------
# Training: time per step, images/s, peak memory and FLOPs of every phase (ours alone: diffusers has no
# distillation loop to compare with)

TRAIN_PHASES = [(s, p) for s, st in lm.STAGES.items() for p in st.phases]


def tiny_training_setup(root):
    """A tiny base, random teachers for every step count, and captioned random images (no network)."""
    from safetensors.torch import save_file
    from tools.tiny import diffusers_unet, make_tiny_base, write_noise_images
    make_tiny_base(root / "base")
    teachers = {}
    for seed, steps in [(5, 32), (6, 8), (7, 4), (8, 2)]:
        teachers[steps] = str(root / f"teacher_{steps}.safetensors")
        save_file({k: v.half().contiguous()
                   for k, v in diffusers_unet(seed=seed).state_dict().items()}, teachers[steps])
    write_noise_images(root / "data", 16, "a picture number {}")
    return str(root / "base"), str(root / "data"), teachers, 32


def bench_train(cfg, args, device, dtype):
    from torch.utils.flop_counter import FlopCounterMode
    import train
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    if args.train_base:  # real weights: --train-base (hub id / folder / file) and --train-data
        base, data, teachers, res = args.train_base, args.train_data, {}, args.resolution
    else:
        base, data, teachers, res = tiny_training_setup(tmp)
    sources = [("", data)]
    if args.cache:  # the same data encoded once by prepare.py: no VAE or text encoders in the step
        from tools import prepare
        prepare.main(["--data", data, "--base", base, "--out", str(tmp / "cache"), "--resolution", str(res),
                      "--min-size", str(res)])
        sources.append((" (cache)", str(tmp / "cache")))
    rows = []
    for (stage, phase), (label, src) in [(sp, s) for sp in TRAIN_PHASES for s in sources]:
        if args.phases and f"{stage}/{phase}" not in args.phases:
            continue
        t = teachers
        extra = {"128to32": [], "32to8": ["--teacher", t.get(32)], "8to4": ["--teacher", t.get(8)],
                 "4to2": ["--teacher", t.get(4), "--skip-level-teacher", t.get(8)],
                 "2to1": ["--teacher", t.get(2), "--skip-level-teacher", t.get(4)]}[stage] if teachers else []

        def run(out, steps):
            train.main(["--stage", stage, "--phase", phase, "--data", src, "--base", base, "--out", str(out),
                        "--resolution", str(res), "--min-size", str(res), "--batch-size", str(args.batch),
                        "--micro-batch-size", str(args.batch), "--max-steps", str(steps),
                        "--save-every", "1000000", "--device", str(device),
                        *(["--grad-checkpointing"] if args.grad_checkpointing else []), *extra])
        with FlopCounterMode(display=False) as fc:  # one step, counted op by op (forward and backward)
            run(tmp / f"flops_{stage}_{phase}{bool(label)}", 1)
        flops = fc.get_total_flops()
        timed_out = tmp / f"time_{stage}_{phase}{bool(label)}"
        with PeakMemory(device) as m:
            run(timed_out, args.runs + 1)
        log = [json.loads(line) for line in (timed_out / stage / phase / "log.jsonl").open()]
        ms = statistics.median(r["step_time"] for r in log[1:]) * 1000  # the first step is warmup
        tflops = flops / (ms / 1000) / 1e12
        evals = [r["teacher_evals"] for r in log[1:] if "teacher_evals" in r]  # teacher UNet calls x samples
        rows.append({"what": f"train {stage}/{phase}{label}", "step_ms": ms,
                     "images_per_s": args.batch / (ms / 1000),
                     "teacher_evals": statistics.median(evals) if evals else None,
                     "peak_mb": m.mb, "gflop_per_step": flops / 1e9, "tflops": tflops,
                     "mfu": tflops / args.peak_tflops if args.peak_tflops else None})
    return rows


def print_train_table(rows):
    head = f"{'what':<32} {'step ms':>10} {'images/s':>9} {'peak MB':>9} {'GFLOP/step':>11} {'TFLOP/s':>8} " \
           f"{'MFU':>6} {'teacher evals':>13}"
    print(head)
    print("-" * len(head))
    for r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        evals = f"{r['teacher_evals']:g}" if r.get("teacher_evals") is not None else "-"
        print(f"{r['what']:<32} {r['step_ms']:>10.1f} {r['images_per_s']:>9.2f} {r['peak_mb']:>9.1f} "
              f"{r['gflop_per_step']:>11.2f} {r['tflops']:>8.3f} {mfu:>6} {evals:>13}")


# ----------------------------------------------------------------------------------------------------
# Memory per GPU at SDXL size, computed from parameter counts (no GPU, no weights: the real shapes on the
# meta device): what each rank holds in every phase with DDP + ZeroRedundancyOptimizer (--shard zero) and
# with FSDP2 (--shard fsdp), before activations. Bytes per parameter:
#   trained whole model, 1 GPU:   4 fp32 weight + 4 fp32 grad + 8 Adam (exp_avg, exp_avg_sq)  = 16
#   ... DDP + ZeRO, N GPUs:       4 + 4 + 8 / N (ZeRO shards Adam only; train.py's gradients are views into
#                                 DDP's all-reduce buckets, gradient_as_bucket_view, so no second copy)
#   ... FSDP2, N GPUs:            16 / N, plus what is gathered while it runs: the root unit (conv_in,
#                                 embeddings, samplers, attention projections) for the whole step and two
#                                 units (the running one and the prefetched one) at a time, each as a bf16
#                                 weight + fp32 grad (6 B)
#   frozen teacher (bf16): 2; FSDP2: 2 / N + the same gathered parts at 2 B
#   LoRA phase student: the base stays an fp32 replica (4, frozen) and the LoRA is trained (16; its Adam is
#   not ZeRO'd): --shard fsdp keeps it under DDP (parallel.py)
#   text encoders + VAE (bf16, 2): loaded when --data is images, not with a prepare.py cache

GB = 1e9


def sdxl_parameter_counts():
    """Parameter counts of the full SDXL UNet, both discriminators, the LoRA, text encoders and VAE, and the
    sizes FSDP2 gathers (root unit, largest unit), built on the meta device in a second."""
    import copy
    import lora
    import parallel
    from discriminator import Discriminator
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731

    def gathered(model):
        head = parallel.head_convs(model)
        units = [n(m) for m in model.modules() if isinstance(m, parallel.UNITS) or any(m is h for h in head)]
        return {"root": n(model) - sum(units), "unit": max(units)}
    with torch.device("meta"):
        unet = unet_mod.UNet(unet_mod.UNetConfig())
        d_cond, d_uncond = Discriminator(unet, True, 128), Discriminator(unet, False, 128)
        with_lora = copy.deepcopy(unet)
        lora.add_lora(with_lora, 64, 8.0)
        vae = vae_mod.VAE(vae_mod.VAEConfig())
        try:
            from transformers import CLIPTextModel, CLIPTextModelWithProjection
            c1, c2 = clip_configs("full", 49408)
            text = n(CLIPTextModel(c1)) + n(CLIPTextModelWithProjection(c2))
        except Exception:  # noqa: BLE001 -- transformers not importable: the count measured once (README)
            text = 817_720_320
    return {"unet": n(unet), "disc_cond": n(d_cond), "disc_uncond": n(d_uncond), "lora": n(with_lora.lora),
            "frozen_extra": text + n(vae), "text": text, "vae": n(vae), "unet_gathered": gathered(unet),
            "disc_gathered": gathered(d_cond)}


def per_gpu_bytes(c, phase, world, mode):
    """Bytes one GPU holds in `phase` ("mse", "convert", "cond", "uncond", "uncond_skip", "full") on `world`
    GPUs with mode "zero" (DDP + ZeRO) or "fsdp" (FSDP2). See the table above for the rules."""
    fsdp = mode == "fsdp" and world > 1

    def trained(params, g):
        if world == 1:
            return 16 * params
        if fsdp:
            return 16 * params / world + 6 * (g["root"] + 2 * g["unit"])
        return 8 * params + 8 * params / world

    def frozen(params, g):
        return 2 * params / world + 2 * (g["root"] + 2 * g["unit"]) if fsdp else 2 * params

    u, ug, dg = c["unet"], c["unet_gathered"], c["disc_gathered"]
    total = 2 * c["frozen_extra"]
    if phase in ("cond", "uncond", "uncond_skip"):  # LoRA student (DDP either way) + discriminator
        total += 4 * u + 16 * c["lora"]
        total += trained(c["disc_cond" if phase == "cond" else "disc_uncond"], dg)
        if phase == "uncond_skip":
            total += frozen(u, ug)
    else:  # whole-UNet student + frozen teacher (+ discriminator in the adversarial ones)
        total += trained(u, ug) + frozen(u, ug)
        if phase == "full":
            total += trained(c["disc_cond"], dg)
    return total


MEMORY_ROWS = [("mse", "128to32 mse: whole UNet + bf16 teacher"),
               ("convert", "2to1 convert: whole UNet + bf16 eps teacher"),
               ("cond", "cond (LoRA; teacher = student, LoRA off) + cond. D"),
               ("uncond", "uncond (LoRA) + uncond. D"),
               ("uncond_skip", "4to2 uncond (LoRA) + uncond. D + bf16 skip-level teacher"),
               ("full", "full, 2to1 cond/uncond: whole UNet + D + bf16 teacher")]


def memory_table(worlds=(1, 2, 8)):
    """The rows of the memory table, GB per GPU (1e9 bytes)."""
    c = sdxl_parameter_counts()
    rows = []
    for phase, what in MEMORY_ROWS:
        row = {"phase": phase, "what": what}
        for w in worlds:
            for mode in (("zero",) if w == 1 else ("zero", "fsdp")):
                row[f"{w}_{mode}"] = per_gpu_bytes(c, phase, w, mode) / GB
        rows.append(row)
    return c, rows


def print_memory_table(worlds=(1, 2, 8)):
    c, rows = memory_table(worlds)
    cols = [f"{w}_{m}" for w in worlds for m in (("zero",) if w == 1 else ("zero", "fsdp"))]
    names = {k: ("1 GPU" if k == "1_zero"
                 else f"{k.split('_')[0]} GPUs {'ZeRO' if k.endswith('zero') else 'FSDP2'}")
             for k in cols}
    print(f"SDXL parameters: UNet {c['unet']:,}; discriminator {c['disc_cond']:,} conditional / "
          f"{c['disc_uncond']:,} unconditional; LoRA {c['lora']:,}; text encoders {c['text']:,}; VAE "
          f"{c['vae']:,}")
    print(f"FSDP2 gathers: UNet root unit {c['unet_gathered']['root']:,}, largest unit "
          f"{c['unet_gathered']['unit']:,}; discriminator root {c['disc_gathered']['root']:,}, largest "
          f"{c['disc_gathered']['unit']:,} parameters")
    print(f"| phase | {' | '.join(names[k] for k in cols)} |")
    print("|---|" + "---|" * len(cols))
    for r in rows:
        print(f"| {r['what']} | " + " | ".join(f"{r[k]:.1f}" for k in cols) + " |")
    print(f"GB per GPU (1e9 bytes), weights + gradients + Adam + frozen models, before activations; with a "
          f"prepare.py cache subtract {2 * c['frozen_extra'] / GB:.1f} GB (no text encoders, no VAE)")
    return rows


BENCHES = {"unet": bench_unet, "sample": bench_sample, "train": bench_train, "vae": bench_vae}


# ----------------------------------------------------------------------------------------------------
# The GPU report (--report OUT): the benches above at SDXL size on one GPU in one command. Each item runs in
# a worker process with its own time limit (a timed-out or crashed worker is killed and a fresh one takes
# the next item), so one failure is one line of the report; results go to OUT/report.json and
# OUT/report.md as they come.

# Dense bf16 peak TFLOP/s by device name: the denominator of MFU (--peak-tflops overrides). Longest match.
PEAK_TFLOPS = {"H200": 989, "H100": 989, "H800": 989, "H20": 148, "B200": 2250, "A100": 312, "A800": 312,
               "L40S": 362, "L40": 181, "L4": 121, "A10": 125, "RTX 4090": 165, "RTX 6000 Ada": 364}
# Every phase runs once plainly (--shard zero, no compile); these run again under --shard fsdp and
# --compile: a LoRA phase, a whole-UNet adversarial phase, the teacher-only x0 switch.
REPORT_VARIANT_PHASES = [("8to4", "cond"), ("8to4", "full"), ("2to1", "convert")]
REPORT_STEPS = [1, 2, 4, 8]
# The report's tiny config: bench's tiny models at 8x8 latents (16 px), so the CPU test takes seconds
REPORT_TINY = BenchConfig(CONFIGS["tiny"].unet, CONFIGS["tiny"].vae, "tiny", 8)
ROOT = Path(__file__).resolve().parents[1]


def device_peak_tflops(name, override=None):
    """The bf16 dense peak of a device named `name` (torch.cuda.get_device_name), or None if unknown."""
    if override:
        return override
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if name and key in name:
            return PEAK_TFLOPS[key]
    return None


def report_items(tiny):
    """The report's items in priority order (what runs first when the time budget runs out)."""
    items = [{"name": "setup", "kind": "setup", "limit": 240}]
    items += [{"name": f"sample/{o}", "kind": "sample", "option": o, "limit": 180 if o == "plain" else 360}
              for o in ("plain", "fast")]
    items += [{"name": f"train/{s}/{p}/zero", "kind": "train", "stage": s, "phase": p, "shard": "zero",
               "compile": False, "limit": 90} for s, p in TRAIN_PHASES]
    items.append({"name": "torchrun/2to1/resume", "kind": "torchrun", "limit": 120})
    variants = REPORT_VARIANT_PHASES[-1:] if tiny else REPORT_VARIANT_PHASES
    for shard, comp in (("fsdp", False), ("zero", True), ("fsdp", True)):
        items += [{"name": f"train/{s}/{p}/{shard}{'+compile' if comp else ''}", "kind": "train", "stage": s,
                   "phase": p, "shard": shard, "compile": comp, "limit": 200 if comp else 90}
                  for s, p in variants]
    return items


def _report_device(spec):
    device = torch.device(spec["device"])
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


def _count_flops(fn):
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def _peak_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GB
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # the worker's own peak RSS


def report_setup(spec):
    """The random base (full-size SDXL on a GPU, or the tiny one) and a few random images at the training
    resolution: what the train items read (train.py takes its models from files)."""
    import shutil
    from tools import tiny
    work = Path(spec["work"])
    shutil.rmtree(work, ignore_errors=True)
    device, _ = _report_device(spec)
    t0 = time.perf_counter()
    if spec["tiny"]:
        tiny.make_tiny_base(work / "base")
    else:
        tiny.make_random_base(work / "base", unet_mod.UNetConfig(), vae_mod.VAEConfig(),
                              clip_configs("full", 49408), device, torch.float16)
    size = spec["resolution"]
    tiny.write_noise_images(work / "data", 4, "a picture number {}", size=(size, size))
    if not spec["tiny"]:  # the torchrun item runs the tiny model whatever the device (see report_torchrun)
        tiny.make_tiny_base(work / "tiny_base")
    tiny.write_noise_images(work / "tiny_data", 4, "a picture number {}")
    gb = sum(f.stat().st_size for f in (work / "base").rglob("*") if f.is_file()) / GB
    return {"rows": [{"what": "random base written", "seconds": time.perf_counter() - t0, "base_gb": gb}]}


def report_sample(spec):
    """The UNet forward and the 1/2/4/8-step sample, ours against diffusers, with spec["option"] on both
    sides; the FLOPs of a UNet forward and of a VAE decode (FlopCounterMode), for MFU."""
    device, dtype = _report_device(spec)
    cfg = REPORT_TINY if spec["tiny"] else CONFIGS["sdxl"]
    ns = argparse.Namespace(options=[spec["option"]], compile_mode="default", runs=spec["runs"],
                            warmup=spec["warmup"], batch=1, steps=4, sample_steps=REPORT_STEPS)
    rows = bench_unet(cfg, ns, device, dtype) + bench_sample(cfg, ns, device, dtype)
    if spec["option"] == "plain":  # counted on the eager UNet; the fast rows take these (write_report)
        with torch.no_grad():
            plain_unet = unets(cfg, device, dtype)[0]
            x, t, context, pooled, ids = unet_inputs(cfg, 1, device, dtype)
            unet_flops = _count_flops(lambda: plain_unet(x, t, context, pooled, ids))
            vae = vae_mod.VAE(cfg.vae).to(device, dtype)
            vae_flops = _count_flops(lambda: vae.decode(torch.randn_like(x[:, :cfg.vae.latent_channels])))
        for r in rows:  # a sample: its UNet forwards and the decode (the text encoders: < 0.5%, not counted)
            steps = next((n for n in REPORT_STEPS if r["what"].startswith(f"sample {n} steps")), None)
            r["tflop"] = (unet_flops * (steps or 1) + (vae_flops if steps else 0)) / 1e12
    _cache.clear()
    return {"rows": rows}


def report_train(spec):
    """One training phase at the report's resolution, micro-batch 1, gradient checkpointing: train.main in
    this process for 1 + N steps with its saves turned off (a whole-UNet checkpoint is ~47 GB at SDXL
    size); the first step is warmup and, without --compile, is counted by FlopCounterMode."""
    import shutil
    import train
    from torch.utils.flop_counter import FlopCounterMode
    device, _ = _report_device(spec)
    work, stage, phase = Path(spec["work"]), spec["stage"], spec["phase"]
    out = work / "train" / spec["name"].replace("/", "_").replace("+", "_")
    shutil.rmtree(out, ignore_errors=True)
    teachers = {"128to32": [], "32to8": ["--teacher", "base"], "8to4": ["--teacher", "base"],
                "4to2": ["--teacher", "base", "--skip-level-teacher", "base"],
                "2to1": ["--teacher", "base", "--skip-level-teacher", "base"]}[stage]  # random: any UNet
    flops, step, save = [], train.train_step, train.save

    def counted_step(run, ph, m):
        if ph.step == 0 and not spec["compile"]:
            with FlopCounterMode(display=False) as fc:
                logs = step(run, ph, m)
            flops.append(fc.get_total_flops())
            return logs
        return step(run, ph, m)
    res = str(spec["resolution"])
    train.train_step, train.save = counted_step, lambda *a, **k: None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        train.main(["--stage", stage, "--phase", phase, "--data", str(work / "data"), "--base",
                    str(work / "base"), "--out", str(out), "--resolution", res, "--min-size", res,
                    "--batch-size", "1", "--micro-batch-size", "1", "--max-steps", str(1 + spec["train_steps"]),
                    "--save-every", "1000000", "--device", device.type, "--grad-checkpointing", "--shard",
                    spec["shard"], *(["--compile"] if spec["compile"] else []), *teachers])
    finally:
        train.train_step, train.save = step, save
    log = [json.loads(line) for line in (out / stage / phase / "log.jsonl").open()]
    ms = [r["step_time"] * 1e3 for r in log[1:]]  # the first step: warmup (and counted)
    shutil.rmtree(out, ignore_errors=True)
    return {"rows": [{"what": f"train {stage}/{phase}", "shard": spec["shard"], "compile": spec["compile"],
                      "step_ms": statistics.median(ms), "steps_timed": len(ms), "peak_gb": _peak_gb(device),
                      "tflop_per_step": flops[0] / 1e12 if flops else None,
                      "loss": log[-1].get("loss")}]}


def report_torchrun(spec):
    """`torchrun --nproc_per_node 1 train.py --stage 2to1`, 2 steps a phase, on NCCL (gloo on the CPU),
    stopped by a simulated crash at convert's step 2 (after step 1's checkpoint) and re-run: the re-run
    resumes convert and finishes cond and uncond. The tiny model on every device: at SDXL size each phase's
    checkpoint.pt is 30-47 GB, more than a GPU machine's disk and minutes to write."""
    import subprocess
    import files
    device, _ = _report_device(spec)
    work = Path(spec["work"])
    base = work / ("base" if spec["tiny"] else "tiny_base")
    out = work / "torchrun"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
           str(29400 + os.getpid() % 500), str(ROOT / "train.py"), "--stage", "2to1", "--data",
           str(work / "tiny_data"), "--base", str(base), "--teacher", "base", "--skip-level-teacher", "base",
           "--resolution", "32", "--min-size", "32", "--batch-size", "1", "--micro-batch-size", "1",
           "--max-steps", "2", "--save-every", "1", "--out", str(out), "--device", device.type]
    t0 = time.perf_counter()
    first = subprocess.run(cmd, capture_output=True, text=True,
                           env={**os.environ, "LIGHTNING_CRASH_AT": "step2"})
    t1 = time.perf_counter()
    second = subprocess.run(cmd, capture_output=True, text=True)
    t2 = time.perf_counter()
    if second.returncode != 0:
        raise RuntimeError(f"the resumed run failed (exit {second.returncode}): "
                           f"{(second.stderr.strip().splitlines() or [''])[-1]}")
    progress = {p: files.progress_step(files.phase_dir(out, "2to1", p))
                for p in ("convert", "cond", "uncond")}
    convert_steps = [json.loads(line)["step"] for line in (out / "2to1/convert/log.jsonl").open()]
    ok = first.returncode != 0 and all(v == 2 for v in progress.values()) and convert_steps[-1] == 2
    if not ok:
        raise RuntimeError(f"no clean resume: first run exit {first.returncode}, progress {progress}, "
                           f"convert log steps {convert_steps}")
    return {"rows": [{"what": "torchrun 2to1, crash at convert step 2, resume",
                      "backend": "nccl" if device.type == "cuda" else "gloo", "first_run_s": t1 - t0,
                      "resumed_run_s": t2 - t1, "first_exit": first.returncode, "progress": progress,
                      "convert_log_steps": convert_steps}]}


REPORT_KINDS = {"setup": report_setup, "sample": report_sample, "train": report_train,
                "torchrun": report_torchrun}


def report_worker(folder):
    """--report-worker FOLDER: run the items the parent writes on stdin (one JSON line each), each result to
    FOLDER/results/<index>.json (written whole, then renamed)."""
    import traceback
    import files
    results = Path(folder) / "results"
    import diffusers
    diffusers.utils.logging.set_verbosity_error()
    for line in sys.stdin:
        spec = json.loads(line)
        print(f"=== {spec['name']}", flush=True)
        t0 = time.perf_counter()
        try:
            files.crash_point(f"report:{spec['name']}")  # the test's failing item (LIGHTNING_CRASH_AT)
            result = {"ok": True, **REPORT_KINDS[spec["kind"]](spec)}
        except (Exception, SystemExit) as e:  # noqa: BLE001 -- train.main exits with "error: ..."
            traceback.print_exc()
            msg = str(e).strip().splitlines()
            result = {"ok": False, "error": f"{type(e).__name__}: {msg[-1] if msg else ''}"[:300]}
        result["seconds"] = time.perf_counter() - t0
        tmp = results / f"{spec['index']}.json.tmp"
        tmp.write_text(json.dumps(result, default=str))
        os.replace(tmp, results / f"{spec['index']}.json")
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        torch._dynamo.reset()
        sys.stdout.flush()


class Worker:
    """A `python -m tools.bench --report-worker` process; its output goes to OUT/log.txt."""

    def __init__(self, out, log, inductor_cache):
        import subprocess
        self.out = out
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(inductor_cache)}
        self.proc = subprocess.Popen([sys.executable, "-m", "tools.bench", "--report-worker", str(out)],
                                     stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, text=True,
                                     cwd=ROOT, env=env, start_new_session=True)  # its own group: killed whole

    def run(self, spec, limit):
        """-> the item's result, or an error on timeout or a dead worker (then the worker is gone)."""
        path = self.out / "results" / f"{spec['index']}.json"
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        t0 = time.perf_counter()
        while not path.exists():
            if self.proc.poll() is not None:
                return {"ok": False, "error": f"the worker process died (exit {self.proc.returncode}); see "
                                              "log.txt", "seconds": time.perf_counter() - t0}
            if time.perf_counter() - t0 > limit:
                self.kill()
                return {"ok": False, "error": f"timed out after {limit:.0f} s (its time limit)",
                        "seconds": time.perf_counter() - t0}
            time.sleep(0.05)
        return json.loads(path.read_text())

    def kill(self):
        import signal
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the worker and what it started (torchrun's ranks)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def alive(self):
        return self.proc.poll() is None


def report(args):
    """--report OUT: every item of report_items, in order, within --report-budget seconds."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.tiny:
        raise SystemExit("error: --report at SDXL size needs a CUDA GPU (--tiny runs it at the tiny config)")
    out = Path(args.report)
    (out / "results").mkdir(parents=True, exist_ok=True)
    for f in (out / "results").glob("*.json"):
        f.unlink()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    import diffusers
    info = {"device": str(device), "gpu": gpu, "config": "tiny" if args.tiny else "sdxl",
            "dtype": "bfloat16" if device.type == "cuda" else "float32",
            "peak_tflops": device_peak_tflops(gpu, args.peak_tflops), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "budget_s": args.report_budget,
            "resolution": 32 if args.tiny else 1024}
    common = {"device": str(device), "tiny": args.tiny, "work": str(out / "work"), "runs": args.runs,
              "warmup": args.warmup, "train_steps": args.report_train_steps, "resolution": info["resolution"]}
    items, done, worker, workers = report_items(args.tiny), [], None, 0
    print(f"report: {len(items)} items on {gpu or device}, {info['config']} config, budget "
          f"{args.report_budget:.0f} s; results in {out}/report.json and report.md, worker output in "
          f"{out}/log.txt", flush=True)
    t_start = time.perf_counter()
    with open(out / "log.txt", "w") as log:
        for i, item in enumerate(items):
            left = args.report_budget - (time.perf_counter() - t_start)
            limit = min(item["limit"] * args.limit_scale, left)
            if args.report_items and item["name"] != "setup" and \
                    not any(fnmatch.fnmatch(item["name"], g) for g in args.report_items):
                result = {"ok": False, "error": "skipped: not selected (--report-items)", "seconds": 0.0}
            elif item["kind"] in ("train", "torchrun") and not done[0]["ok"]:
                result = {"ok": False, "error": "skipped: setup failed", "seconds": 0.0}
            elif left < 5:
                result = {"ok": False, "seconds": 0.0, "error": "skipped: the report's time budget "
                                                                f"({args.report_budget:.0f} s) is spent"}
            else:
                if worker is None or not worker.alive():
                    workers += 1  # each its own inductor cache: a killed compile can leave a torn file
                    worker = Worker(out, log, out / "work" / f"inductor_{workers}")
                result = worker.run({**common, **item, "index": i}, limit)
                if not result["ok"] and worker.alive():
                    worker.kill()  # a fresh process after any error (a CUDA error poisons the context)
            done.append({"name": item["name"], "kind": item["kind"], **result})
            status = "ok" if result["ok"] else result["error"]
            print(f"[{i + 1}/{len(items)}] {item['name']}: {status} ({result['seconds']:.1f} s)", flush=True)
            write_report(out, info, done, time.perf_counter() - t_start)
    if worker is not None and worker.alive():
        worker.proc.stdin.close()
        worker.proc.wait(timeout=30)
    print(f"report: {sum(d['ok'] for d in done)} of {len(done)} items ok in "
          f"{time.perf_counter() - t_start:.0f} s: {out / 'report.md'}")
    return done


def write_report(out, info, done, elapsed):
    """report.json (everything) and report.md (the tables), atomically, after every item."""
    peak = info["peak_tflops"]
    flops = {(r["what"]): r["tflop_per_step"] for d in done if d["kind"] == "train" and d["ok"]
             for r in d["rows"] if r.get("tflop_per_step")}
    sample_flops = {r["what"]: r["tflop"] for d in done if d["kind"] == "sample" and d["ok"]
                    for r in d["rows"] if r.get("tflop")}  # the plain rows' counts, by what they time
    for d in done:
        for r in d.get("rows", []) if d["ok"] else []:
            if d["kind"] == "train":
                tflop = flops.get(r["what"])  # the plain run's count: the same math with or without compile
                r["tflops"] = tflop / (r["step_ms"] / 1e3) if tflop else None
                r["mfu"] = r["tflops"] / peak if r["tflops"] and peak else None
            elif d["kind"] == "sample":
                r["tflop"] = r.get("tflop") or sample_flops.get(r["what"].split(", ")[0])
                for side in ("ours", "diffusers"):
                    r[f"{side}_mfu"] = r["tflop"] / (r[f"{side}_ms"] / 1e3) / peak if peak and r["tflop"] \
                        else None
    report_json = {**info, "elapsed_s": elapsed, "items": done}
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    md = [f"# bench.py --report: {info['gpu'] or info['device']}, {info['config']} config",
          "", f"torch {info['torch']}, diffusers {info['diffusers']}, {info['dtype']}, "
          f"{info['resolution']} px, peak {fmt(peak, 'g')} TFLOP/s for MFU; {elapsed:.0f} s of "
          f"{info['budget_s']:.0f} s.", "",
          "## Sampling, ours against diffusers (ratio = ours / diffusers time)", "",
          "| what | ours ms | diffusers ms | ratio | ours / diffusers peak MB | TFLOP | MFU ours / diffusers "
          "| max abs diff |", "|---|---|---|---|---|---|---|---|"]

    def rows(*kinds):  # (item, row) for every row of the items of these kinds that ran
        return [(d, r) for d in done if d["ok"] and d["kind"] in kinds for r in d.get("rows", [])]

    for _, r in rows("sample"):
        md.append(f"| {r['what']} | {r['ours_ms']:.1f} | {r['diffusers_ms']:.1f} | {r['ratio']:.3f} | "
                  f"{r['ours_peak_mb']:.0f} / {r['diffusers_peak_mb']:.0f} | {fmt(r['tflop'], '.3g')} | "
                  f"{fmt(r['ours_mfu'], '.1%')} / {fmt(r['diffusers_mfu'], '.1%')} | "
                  f"{r['max_abs_diff']:.2e} |")
    md += ["", "## Training, one rank, micro-batch 1, gradient checkpointing", "",
           "| phase | shard | compile | step ms | peak GB | TFLOP/step | TFLOP/s | MFU |",
           "|---|---|---|---|---|---|---|---|"]
    for _, r in rows("train"):
        md.append(f"| {r['what'].removeprefix('train ')} | {r['shard']} | {'yes' if r['compile'] else 'no'} | "
                  f"{r['step_ms']:.1f} | {r['peak_gb']:.2f} | {fmt(flops.get(r['what']), '.3g')} | "
                  f"{fmt(r['tflops'], '.3g')} | {fmt(r['mfu'], '.1%')} |")
    md += ["", "## torchrun and setup", ""]
    for d, r in rows("torchrun", "setup"):
        md.append(f"- {d['name']}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in r.items() if k != "what"))
    failed = [d for d in done if not d["ok"]]
    md += ["", "## Items that failed or were skipped", ""] + \
        ([f"- {d['name']}: {d['error']}" for d in failed] or ["none"])
    text_json, text_md = json.dumps(report_json, indent=2, default=str), "\n".join(md) + "\n"
    import files
    files.atomic_write(out / "report.json", lambda tmp: tmp.write_text(text_json))
    files.atomic_write(out / "report.md", lambda tmp: tmp.write_text(text_md))


# ----------------------------------------------------------------------------------------------------
# The command line


def print_table(rows):
    """`vs plain`: ours with the row's option against diffusers' plain call of the same bench (the fast
    path's goal), when the run has that plain row."""
    plain = {r["what"]: r["diffusers_ms"] for r in rows if r.get("option", "plain") == "plain"}
    for r in rows:
        base = plain.get(r["what"].split(", ")[0])
        r["ratio_vs_diffusers_plain"] = r["ours_ms"] / base if base else None
    head = f"{'what':<52} {'ours ms':>10} {'diffusers ms':>13} {'ratio':>7} {'(min)':>7} {'vs plain':>8} " \
           f"{'ours peak MB':>13} {'diffusers peak MB':>18} {'max|diff|':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        vs = f"{r['ratio_vs_diffusers_plain']:.3f}" if r["ratio_vs_diffusers_plain"] else "-"
        print(f"{r['what']:<52} {r['ours_ms']:>10.1f} {r['diffusers_ms']:>13.1f} {r['ratio']:>7.3f} "
              f"{r['ratio_min']:>7.3f} {vs:>8} {r['ours_peak_mb']:>13.1f} {r['diffusers_peak_mb']:>18.1f} "
              f"{r['max_abs_diff']:>10.2e}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", choices=[*BENCHES, "memory", "all"], default="all",
                   help="which bench to run (default all: unet, sample and vae); vae: the tiny preview "
                        "VAE's decoder vs diffusers' AutoencoderTiny and vs our full decoder, with FLOPs at "
                        "1024 px; memory: the per-GPU memory table of every training phase at SDXL size, "
                        "DDP+ZeRO vs FSDP2, computed from parameter counts")
    p.add_argument("--config", choices=list(CONFIGS), default=None,
                   help="model sizes: tiny (smoke run), mid (CPU-sized SDXL, 64x64 latents), sdxl (full "
                        "SDXL, 1024 px); default sdxl on CUDA, mid on CPU")
    p.add_argument("--device", default=None, help="torch device; default cuda if available, else cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="dtype of both sides; default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--runs", type=int, default=5,
                   help="timed calls per side; the median is reported (default 5)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed calls per side before timing (at least 2 are made; the last one measures "
                        "memory) (default 2)")
    p.add_argument("--steps", type=int, default=4, help="sampling steps of the sample bench (default 4)")
    p.add_argument("--options", nargs="+", choices=OPTIONS, default=None,
                   help="unet/sample benches: the speed options to time, each on both sides (default all; "
                        "compile only on CUDA: on the CPU its compile time dwarfs a few calls)")
    p.add_argument("--compile-mode", choices=sample_mod.COMPILE_MODES, default="default",
                   help="torch.compile mode of the compile option (default: default)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for both sides; default torch's own (the core count)")
    p.add_argument("--json", metavar="OUT", default=None, help="also write the results as JSON to OUT")
    p.add_argument("--phases", nargs="*", default=None,
                   help="train bench: only these STAGE/PHASE (e.g. 8to4/cond)")
    p.add_argument("--train-base", default=None, help="train bench: a real SDXL base (hub id, folder, file); "
                   "default a generated tiny one (with --config tiny)")
    p.add_argument("--train-data", default=None, help="train bench: image-caption data for --train-base")
    p.add_argument("--resolution", type=int, default=1024, help="train bench with --train-base: pixels")
    p.add_argument("--grad-checkpointing", action="store_true", help="train bench: activation checkpointing")
    p.add_argument("--cache", action="store_true",
                   help="train bench: also run every phase from a prepare.py cache "
                   "of the same data (no VAE or text encoders in the step) and report both")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="train bench and --report: the device's peak TFLOP/s for MFU (H100 SXM bf16 dense: "
                        "989); --report's default comes from the GPU's name (PEAK_TFLOPS)")
    g = p.add_argument_group("the GPU report (docs/speed.md#the-gpu-report)")
    g.add_argument("--report", metavar="OUT", default=None,
                   help="measure everything on one GPU with random full-size SDXL weights (no network): "
                        "UNet and 1/2/4/8-step samples vs diffusers plain and fast, every training phase, a "
                        "torchrun resume; writes OUT/report.json and OUT/report.md")
    g.add_argument("--tiny", action="store_true", help="--report at the tiny config (CPU: the test)")
    g.add_argument("--report-budget", type=float, default=480,
                   help="--report: total seconds; items past it are listed as skipped (default 480)")
    g.add_argument("--report-train-steps", type=int, default=2,
                   help="--report: timed steps per training phase, after one warmup step (default 2)")
    g.add_argument("--limit-scale", type=float, default=1.0,
                   help="--report: multiply every item's own time limit (90-240 s) by this")
    g.add_argument("--report-items", nargs="+", metavar="GLOB", default=None,
                   help="--report: only the items matching one of these names (e.g. 'sample/*' "
                        "'train/8to4/*'); setup always runs, the rest are listed as not selected")
    g.add_argument("--report-worker", metavar="OUT", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.report_worker:  # one of --report's worker processes (internal)
        return report_worker(args.report_worker)
    if args.report:
        import diffusers
        diffusers.utils.logging.set_verbosity_error()
        return report(args)
    if args.what == "memory":  # computed, not measured: no device, no diffusers
        rows = print_memory_table()
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)
        return
    if args.runs < 1 or args.warmup < 0 or args.batch < 1:
        raise SystemExit(f"error: --runs and --batch must be >= 1 and --warmup >= 0, got runs={args.runs}, "
                         f"warmup={args.warmup}, batch={args.batch}")
    try:
        lm.trailing_timesteps(args.steps)
    except ValueError as e:
        raise SystemExit(f"error: --steps: {e}")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise SystemExit(f"error: --device {args.device!r} is not a torch device (e.g. cpu, cuda, "
                         "cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {args.device}: CUDA is not available in this torch build")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"error: --threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    config = args.config or ("sdxl" if device.type == "cuda" else "mid")
    # bfloat16 on GPU (the SDXL VAE overflows in float16); float32 on CPU, where half matmuls are slow
    cfg = CONFIGS[config]
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    import diffusers
    diffusers.utils.logging.set_verbosity_error()  # not its dtype-cast notices on randomly built models
    info = {"config": config, "device": str(device),
            "dtype": str(dtype).removeprefix("torch."), "batch": args.batch, "runs": args.runs,
            "warmup": args.warmup, "steps": args.steps, "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "threads": torch.get_num_threads(), "attention": "F.scaled_dot_product_attention (both)",
            "peak_memory": memory_method(device), "load_average_1min": os.getloadavg()[0],
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    print(", ".join(f"{k} {v}" for k, v in info.items() if v is not None))
    rows = []
    for name in (["unet", "sample", "vae"] if args.what == "all" else [args.what]):
        rows += BENCHES[name](cfg, args, device, dtype)
    info["load_average_1min_end"] = os.getloadavg()[0]  # other processes on the machine skew CPU timings
    if args.what == "train":
        print_train_table(rows)
    else:
        print_table(rows)
    print(("train: step time is the median after a warmup step; GFLOP counted by FlopCounterMode; peak MB = "
           if args.what == "train" else "ratio = ours / diffusers time (< 1: ours is faster), both with the "
           "row's option; vs plain = ours with it / diffusers plain; peak MB = ")
          + info["peak_memory"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**info, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
