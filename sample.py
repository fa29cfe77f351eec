"""Generate images with SDXL-Lightning, seed for seed the same as the official diffusers recipe.

    python sample.py "a cat in a spacesuit" --steps 4                      # official 4-step UNet
    python sample.py "a cat in a spacesuit" --steps 1                      # 1-step UNet, x0 prediction
    python sample.py "a cat" --steps 4 --unet base --lora sdxl_lightning_4step_lora.safetensors
    python sample.py "a cat" --steps 4 --base sdxl_lightning_4step.safetensors --unet base   # all-in-one file
    python sample.py "a cat" --steps 32 --unet base --guidance 6          # the SDXL base itself (a teacher)

The base (`--base`) gives the text encoders, tokenizers, VAE and UNet architecture; `--unet` the UNet
weights; `--lora` is fused into that UNet. Weights come from the Hugging Face hub cache, a diffusers
folder or a single .safetensors file (see weights.py).
"""
import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import lightning_min as lm
import text as text_mod
import weights

# ----------------------------------------------------------------------------------------------------
# The pipeline: text -> noise -> sampler -> VAE -> PNG


def pick_device_dtype(device=None, dtype=None):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # the model card runs in float16 on GPU; CPU stays float32 (half matmuls there are slow and inexact)
    dtype = getattr(torch, dtype) if dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    return device, dtype


def unet_model(unet, context, pooled, ids, guidance, dtype):
    """The sampler's model(x, t) -> u: our UNet at paper time t (it is called with t - 1), with CFG
    against SDXL's all-zero unconditional input in one batched call when guidance > 1 (as diffusers)."""
    if guidance > 1:
        context = torch.cat([torch.zeros_like(context), context])
        pooled, ids = torch.cat([torch.zeros_like(pooled), pooled]), torch.cat([ids, ids])

    def model(x, t):
        if guidance > 1:
            u_uncond, u_cond = unet(torch.cat([x, x]).to(dtype), torch.cat([t, t]) - 1, context, pooled, ids).float().chunk(2)
            return u_uncond + guidance * (u_cond - u_uncond)
        return unet(x.to(dtype), t - 1, context, pooled, ids).float()
    return model


def to_pil(images):
    """(B, 3, H, W) in [-1, 1] -> PIL images, rounding as diffusers' image processor does."""
    arr = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]


@torch.no_grad()
def generate(text, unet, vae, prompts, steps, seed=0, width=1024, height=1024, prediction="epsilon",
             guidance=0.0, dtype=torch.float32, progress=False, decode=True):
    """prompts (list of B str) -> images (B, 3, H, W) in [-1, 1], float32 (or the latents if not decode)."""
    f = vae.config.downscale
    if width % f or height % f:
        raise ValueError(f"--width/--height must be multiples of {f} (the VAE's factor), got {width}x{height}")
    device = next(unet.parameters()).device
    context, pooled = text.encode(prompts)
    context, pooled = context.to(device, dtype), pooled.to(device, dtype)
    ids = text_mod.time_ids(height, width).to(device, dtype).expand(len(prompts), 6)
    # drawn on the CPU in the run's dtype, exactly as diffusers' randn_tensor with a CPU generator
    g = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn((len(prompts), unet.config.in_channels, height // f, width // f), generator=g, dtype=dtype)
    latents = lm.sample(unet_model(unet, context, pooled, ids, guidance, dtype), noise.to(device), steps,
                        prediction, progress=progress)
    if not decode:
        return latents
    return vae.decode_latents(latents.to(next(vae.parameters()).dtype)).float()


def load(base, unet_source, lora, steps, device, dtype):
    """(text encoders, UNet, VAE, prediction type of the default UNet) from the sources on the command line."""
    single = weights.is_file(base)
    sd = weights.read_safetensors(base) if single else None  # a single file is read once for all parts
    variant = "fp16" if dtype == torch.float16 else None
    text = weights.load_text(base, device, dtype, variant, sd=sd)
    vae_dtype = torch.float32 if dtype == torch.float16 else dtype  # the SDXL VAE overflows in fp16
    vae = weights.load_vae(base, device, vae_dtype, variant, sd=sd).eval()
    cfg = weights.unet_config(base) if not single else None
    if unet_source == "base":
        unet = weights.load_unet(base, cfg, device, dtype, variant, sd=sd)
    else:
        if unet_source is None:  # the official Lightning UNet for this step count
            unet_source = str(weights.fetch(weights.LIGHTNING_REPO, weights.lightning_unet_file(steps)))
        if single:
            cfg = weights.unet_config(base, sd)
        unet = weights.load_unet(unet_source, cfg, device, dtype)
    del sd
    if lora:
        import lora as lora_mod
        lora_mod.merge_lora(unet, lora_mod.read_lora(resolve_lora(lora)), source=lora)
    return text, unet.eval(), vae


def resolve_lora(lora):
    """A local LoRA file, or an official file name fetched from the Lightning repo."""
    if Path(lora).exists() or "/" in lora:
        return lora
    return str(weights.fetch(weights.LIGHTNING_REPO, lora))


# ----------------------------------------------------------------------------------------------------
# The command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", help="the text prompt")
    p.add_argument("--steps", type=int, default=4, help="sampling steps (official Lightning UNets: 1, 2, 4, 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (CPU generator, as diffusers)")
    p.add_argument("--num", type=int, default=1, help="number of images, generated as one batch")
    p.add_argument("--width", type=int, default=1024, help="image width in pixels, a multiple of 8")
    p.add_argument("--height", type=int, default=1024, help="image height in pixels, a multiple of 8")
    p.add_argument("--out", default="out.png", help="output PNG; with --num > 1, OUT_0.png, OUT_1.png, ...")
    p.add_argument("--base", default=weights.SDXL_BASE,
                   help="SDXL base for text encoders, tokenizers, VAE and UNet config: a hub id, a diffusers "
                        "folder, or a single-file .safetensors checkpoint")
    p.add_argument("--unet", default=None,
                   help="UNet weights: default the official ByteDance/SDXL-Lightning UNet for --steps; a UNet "
                        ".safetensors file (diffusers or original layout); or 'base' for the base's own UNet")
    p.add_argument("--lora", default=None, help="a kohya-format LoRA .safetensors fused into the UNet "
                                                "(e.g. sdxl_lightning_4step_lora.safetensors, fetched from the hub)")
    p.add_argument("--prediction", choices=["epsilon", "sample"], default=None,
                   help="what the UNet predicts; default: 'sample' (x0) for the official 1-step UNet, else 'epsilon'")
    p.add_argument("--guidance", type=float, default=0.0,
                   help="classifier-free guidance scale against an all-zero uncond; <= 1 is off (Lightning: off)")
    p.add_argument("--device", default=None, help="torch device; default cuda if available, else cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="UNet and text dtype; default float16 on GPU (the model card), float32 on CPU")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    f = 8
    if args.width % f or args.height % f or args.width <= 0 or args.height <= 0:
        raise SystemExit(f"error: --width/--height must be positive multiples of {f}, got {args.width}x{args.height}")
    if args.num < 1:
        raise SystemExit("error: --num must be at least 1")
    try:
        if args.unet is None:
            weights.lightning_unet_file(args.steps)  # refuse an unsupported step count before loading anything
        else:
            lm.trailing_timesteps(args.steps)
        prediction = args.prediction or ("sample" if args.unet is None and args.steps == 1 else "epsilon")
        device, dtype = pick_device_dtype(args.device, args.dtype)
        t0 = time.time()
        text, unet, vae = load(args.base, args.unet, args.lora, args.steps, device, dtype)
        t1 = time.time()
        images = to_pil(generate(text, unet, vae, [args.prompt] * args.num, args.steps, args.seed, args.width,
                                 args.height, prediction, args.guidance, dtype, progress=True))
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.time()
    except (weights.CheckpointError, ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(len(images))]
    for img, path in zip(images, paths):
        img.save(path)
    print(f"saved {', '.join(map(str, paths))} ({args.steps} steps, {prediction}, {args.width}x{args.height}, "
          f"{device} {str(dtype).removeprefix('torch.')}): load {t1 - t0:.1f}s, generate {t2 - t1:.2f}s")


if __name__ == "__main__":
    main()
