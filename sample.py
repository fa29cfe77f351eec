"""Generate images with SDXL-Lightning, seed for seed the same as the official diffusers recipe.

    python sample.py "a cat in a spacesuit" --steps 4                      # official 4-step UNet
    python sample.py "a cat in a spacesuit" --steps 1                      # 1-step UNet, x0 prediction
    python sample.py "a cat" --steps 4 --unet base --lora sdxl_lightning_4step_lora.safetensors
    python sample.py "a cat" --steps 4 --unet base --lora lightning.safetensors:0.8 \\
        --lora style.safetensors:0.5
    python sample.py "a cat" --steps 4 --base sdxl_lightning_4step.safetensors --unet base   # all-in-one file
    python sample.py "a cat" --steps 32 --unet base --guidance 6 --negative "blurry"  # SDXL base (a teacher)
    python sample.py "a cat, oil painting" --steps 4 --image photo.png --strength 0.5  # img2img (SDEdit)
    python sample.py --prompts prompts.txt --steps 4 --batch-size 4 --out out/img.png  # out/img_00000.png ...
    python sample.py "a cat" --steps 1 --unet runs/2to1/uncond/sdxl_lightning_1step_unet_x0.safetensors
    python sample.py "a cat" --steps 4 --vae tiny          # preview decoder madebyollin/taesdxl (TAESDXL)

The base (`--base`) gives the text encoders, tokenizers, VAE and UNet architecture; `--unet` the UNet
weights; each `--lora` is fused into that UNet in order. Weights come from the Hugging Face hub cache, a
diffusers folder or a single .safetensors file (see weights.py).

Image i of a run (over --num copies of each prompt of --prompts) uses seed --seed + i, so any image comes
back alone with `sample.py PROMPT --seed S` (prompts.jsonl lists prompt, seed and file of each). A re-run of
an interrupted --prompts job keeps the images on disk that prompts.jsonl lists with the same prompt, seed and
settings, and makes the rest.
img2img noises the encoded image to the time the strength selects (Eq. 1) and runs the rest of the
model's steps; the 1- and 2-step models were trained at t = 250, 500, 750, 1000 (Sec. 3.7.1), an N-step
model on its N trailing timesteps, so those strengths are the valid ones (--force for others).
"""
import argparse
import hashlib
import json
import math
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

import files
import lightning_min as lm
import text as text_mod
import unet as unet_mod
import vae as vae_mod
import weights

# ----------------------------------------------------------------------------------------------------
# The pipeline: text -> noise (or a noised image) -> sampler -> VAE -> PNG


class NonFiniteError(ValueError):
    """A model produced NaN or Inf: the image would be black or garbage, so nothing is written."""


def pick_device_dtype(device=None, dtype=None):
    """The device (refused if it is not there) and the run's dtype."""
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise ValueError(f"--device {device}: not a torch device ({str(e).splitlines()[0]})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is available here (use --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: MPS is not available here")
    # the model card runs in float16 on GPU; CPU stays float32 (half matmuls there are slow and inexact)
    dtype = getattr(torch, dtype) if dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    return device, dtype


def check_strength(steps, strength, force=False):
    """Refuse an img2img strength off the model's training times, listing the valid ones."""
    valid = lm.trained_strengths(steps)
    if round(strength * lm.T) not in [round(s * lm.T) for s in valid] and not force:
        raise ValueError(f"--strength {strength:g} is not a time the {steps}-step model was trained at; "
                         f"valid: {', '.join(f'{s:.3g}' for s in valid)} (--force to use it anyway)")
    try:
        lm.timesteps(steps, strength)  # the range check, lightning_min's rule
    except ValueError as e:
        raise ValueError(f"--strength: {e}") from None


def load_image(path, width=None, height=None, resize="stretch", flag="--image", normalize=True):
    """An image file -> ((1, 3, H, W) in [-1, 1], float32; W, H) as diffusers' load_image + VaeImageProcessor:
    EXIF rotation, RGB, Lanczos resize to width x height (default: its own size, rounded down to a multiple
    of 8); "stretch" ignores the aspect ratio (diffusers' default), "crop" keeps it and cuts the centre.
    normalize=False: in [0, 1], as diffusers' control image processor (do_normalize=False); flag names the
    option in errors."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
    except Image.DecompressionBombError as e:  # a few KB of PNG can claim gigapixels
        raise ValueError(f"{flag} {path}: too many pixels, refused as a possible decompression bomb "
                         f"({e})") from None
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"{flag} {path}: not a readable image ({e})") from None
    width = width or im.width - im.width % 8
    height = height or im.height - im.height % 8
    if width < 8 or height < 8:
        raise ValueError(f"{flag} {path}: {im.width}x{im.height} is too small")
    if resize == "crop":  # diffusers' resize_mode="crop": scale to cover, paste centred
        w = width if width / height > im.width / im.height else im.width * height // im.height
        h = height if width / height <= im.width / im.height else im.height * width // im.width
        canvas = Image.new("RGB", (width, height))
        canvas.paste(im.resize((w, h), resample=Image.LANCZOS),
                     box=(width // 2 - w // 2, height // 2 - h // 2))
        im = canvas
    else:
        im = im.resize((width, height), resample=Image.LANCZOS)
    x = torch.from_numpy(np.asarray(im).astype(np.float32) / 255.0).permute(2, 0, 1)[None]  # (1, 3, H, W)
    return (2 * x - 1 if normalize else x), (width, height)


def _randn(shape, gens, dtype):
    """diffusers' randn_tensor on the CPU: one generator draws the batch, a list draws one row each."""
    if isinstance(gens, list):
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=dtype) for g in gens])
    return torch.randn(shape, generator=gens, dtype=dtype)


def _check_finite(x, what):
    if not torch.isfinite(x).all():
        raise NonFiniteError(f"{what} produced NaN or Inf")


def encode_image(vae, image, gens, batch, dtype):
    """The image's latent as diffusers' img2img: one draw of the VAE posterior per generator (its first
    draw), times the scaling factor, repeated to the batch. (1, 3, H, W) -> (B, 4, H/f, W/f)"""
    vae_dtype = next(vae.parameters()).dtype
    # diffusers casts the image to the run's dtype first, then upcasts for the VAE
    x = image.to(dtype).to(next(vae.parameters()).device, vae_dtype)
    if isinstance(vae, vae_mod.TinyVAE):  # no posterior, nothing drawn (diffusers' AutoencoderTiny .latents)
        z = vae.encode(x).to(dtype) * vae.config.scaling_factor
        _check_finite(z, "the tiny VAE encoder")
        return z.expand(batch, *z.shape[1:])
    mean, logvar = vae.encode(x)  # (1, 4, h, w)
    # (B or 1, ...)
    draw = _randn((len(gens) if isinstance(gens, list) else 1, *mean.shape[1:]), gens, vae_dtype)
    z = (mean + (0.5 * logvar).exp() * draw.to(mean.device)).to(dtype) * vae.config.scaling_factor
    _check_finite(z, "the VAE encoder")
    return z.expand(batch, *z.shape[1:])


def _check_step(step):
    """lm.sample's callback: a UNet output with NaN or Inf stops sampling, naming the step, instead of giving
    a black image."""
    _check_finite(step["u"], f"the UNet at t={step['t']} (step {step['i'] + 1} of {step['n']})")


def _diagnose(unet, guidance, error):
    """Say what made the NaN: broken weights (named), the guidance scale, or arithmetic (fp16 overflow)."""
    bad = [n for n, p in unet.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        return NonFiniteError(f"{error}: the UNet weights hold NaN/Inf in {len(bad)} tensors "
                              f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): the --unet file or "
                              "a --lora is broken")
    if guidance > 1:
        return NonFiniteError(f"{error} with --guidance {guidance:g}: lower the guidance scale")
    return NonFiniteError(f"{error} from finite weights: try --dtype float32 or bfloat16 (float16 overflow?)")


@torch.no_grad()
def generate(text, unet, vae, prompts, steps, seed=0, width=1024, height=1024, prediction="epsilon",
             guidance=0.0, dtype=torch.float32, progress=False, decode=True, *, negative=None, image=None,
             strength=1.0, names=None, controls=None):
    """prompts (list of B str) -> images (B, 3, H, W) in [-1, 1], float32 (or the latents if not decode).

    seed: an int (one CPU generator draws the batch, as diffusers' `generator=`) or B ints (one generator per
    image, as diffusers' list of generators: image i is the same whatever the batch around it).
    negative: a negative prompt encoded as CFG's unconditional input (diffusers' negative_prompt); needs
    guidance > 1. image: (1, 3, H, W) in [-1, 1] for img2img (SDEdit): its latent, noised to
    round(strength * T) by Eq. (1), is denoised by the rest of the model's steps (lm.timesteps).
    names: what warnings call each prompt (e.g. the file it will be written to).
    controls: ControlNets (Sec. 5.3), [(unet.ControlNet, control image (1, 3, H, W) in [0, 1], scale)], their
    residuals summed into the UNet at every step, under CFG for both halves (diffusers' pipeline)."""
    f = vae.config.downscale
    if width % f or height % f:
        raise ValueError(f"--width/--height must be multiples of {f} (the VAE's factor), got "
                         f"{width}x{height}")
    if negative is not None and not guidance > 1:
        raise ValueError("a negative prompt needs guidance > 1 (without CFG it does nothing)")
    device = next(unet.parameters()).device
    ids = text_mod.time_ids(height, width).to(device).expand(len(prompts), 6)  # (B, 6), float32

    def encode(texts, names):
        context, pooled = text.encode(texts, names=names)  # (B or 1, 77, C), (B or 1, P)
        return context.to(device, dtype), pooled.to(device, dtype), ids
    cond = encode(prompts, names)
    uncond = encode([negative], ["the negative prompt"]) if negative is not None else None  # encoded once
    # drawn on the CPU in the run's dtype, exactly as diffusers' randn_tensor with CPU generators
    seeds = [seed] if isinstance(seed, int) else list(seed)
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    gens = gens[0] if isinstance(seed, int) else gens
    shape = (len(prompts), unet.config.in_channels, height // f, width // f)
    z0 = None
    if image is not None:
        if tuple(image.shape[-2:]) != (height, width):
            raise ValueError(f"the image is {image.shape[-1]}x{image.shape[-2]}, not {width}x{height}")
        z0 = encode_image(vae, image, gens, len(prompts), dtype).to(device)  # first draw of each generator
    noise = _randn(shape, gens, dtype).to(device)  # img2img: the second draw
    steered = unet
    if controls:
        for _, control, _ in controls:
            if tuple(control.shape[-2:]) != (height, width):
                raise ValueError(f"a control image is {control.shape[-1]}x{control.shape[-2]}, not "
                                 f"{width}x{height}")
        steered = unet_mod.ControlledUNet(unet, [(net, c.to(device), s) for net, c, s in controls])
    try:
        latents = lm.sample(lm.unet_model(steered, cond, guidance, uncond), noise, steps, prediction,
                            progress, x0=z0, strength=strength if image is not None else 1.0,
                            callback=_check_step)
    except NonFiniteError as e:
        raise _diagnose(unet, guidance, e) from None
    if not decode:
        return latents
    images = vae.decode_latents(latents.to(next(vae.parameters()).dtype)).float()
    _check_finite(images, "the VAE decoder")
    return images


def resolve_lora(lora):
    """A local LoRA file, or an official file name fetched from the Lightning repo."""
    if Path(lora).exists() or lora not in weights.LIGHTNING_LORAS.values():
        return lora
    return str(weights.fetch(weights.LIGHTNING_REPO, lora))


def load(base, unet_source, loras, steps, device, dtype, vae="full"):
    """(text encoders, UNet, VAE) from the sources on the command line. loras: None, one file, or a list of
    (file, scale) fused in order, W += scale * alpha / rank * up @ down each (lora.merge_lora). vae: --vae,
    'full' (the base's), 'tiny' (TAESDXL) or a folder or file of either kind (weights.load_vae_choice)."""
    single = weights.is_file(base)
    sd = weights.read_safetensors(base) if single else None  # a single file is read once for all parts
    variant = "fp16" if dtype == torch.float16 else None
    text = weights.load_text(base, device, dtype, variant, sd=sd)
    vae_dtype = torch.float32 if dtype == torch.float16 else dtype  # the SDXL VAE overflows in fp16
    vae = weights.load_vae_choice(vae, base, device, vae_dtype, variant, sd=sd).eval()
    if isinstance(vae, vae_mod.TinyVAE):  # TAESD does not overflow in fp16: it runs in the run's dtype
        vae = vae.to(dtype)
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
    if loras:
        import lora as lora_mod
        for path, scale in [(loras, 1.0)] if isinstance(loras, (str, Path)) else loras:
            lora_mod.merge_lora(unet, weights.read_lora(resolve_lora(str(path)), unet.config), scale,
                                source=str(path))
    return text, unet.eval(), vae


def default_prediction(unet_source, base, steps):
    """What the UNet predicts when --prediction is not given: x0 ("sample") for the official 1-step UNet and
    for our own 1-step exports, known by a config.json next to the file with "prediction_type", or by "x0"
    in the file name (train.py writes sdxl_lightning_1step_unet_x0.safetensors); else epsilon."""
    if unet_source is None:
        return "sample" if steps == 1 else "epsilon"
    source = base if unet_source == "base" else unet_source  # an all-in-one file names its UNet too
    if not weights.is_file(source):
        return "epsilon"
    config = Path(source).with_name("config.json")
    if config.is_file():
        kind = weights.read_json(config).get("prediction_type")
        if kind is not None and kind not in lm.PREDICTIONS:
            raise ValueError(f"{config}: prediction_type {kind!r} is not one of {', '.join(lm.PREDICTIONS)}")
        if kind is not None:
            return kind
    return "sample" if re.search(r"(^|[_.-])x0($|[_.-])", Path(source).stem) else "epsilon"


# ----------------------------------------------------------------------------------------------------
# The fast path (docs/speed.md#the-fast-path): each option keeps the image to float tolerance

COMPILE_MODES = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


def speed_options(args, device):
    """The speed flags as make_fast's keywords. --fast turns on what pays on the device: on CUDA channels-
    last, fused q/k/v, torch.compile (mode default, unless --compile names one) and CUDA graphs; on the CPU
    channels-last and fused q/k/v only (compiling costs more than a few images save there; CUDA graphs need
    CUDA). An explicit --cuda-graphs off CUDA, or with a compile mode that captures graphs itself, is
    refused."""
    cuda = device.type == "cuda"
    opts = {"channels_last": args.channels_last or args.fast, "fuse_qkv": args.fuse_qkv or args.fast,
            "compile": args.compile or ("default" if args.fast and cuda else None),
            "cuda_graphs": args.cuda_graphs or (args.fast and cuda)}
    if args.cuda_graphs and not cuda:
        raise ValueError(f"--cuda-graphs needs a CUDA device (this run is on {device}); --fast skips it "
                         "there")
    if opts["cuda_graphs"] and opts["compile"] in ("reduce-overhead", "max-autotune"):
        if args.cuda_graphs:
            raise ValueError(f"--cuda-graphs with --compile {opts['compile']}: that mode captures CUDA "
                             "graphs itself; use one of them")
        opts["cuda_graphs"] = False  # --fast: the compile mode's own graphs
    if opts["cuda_graphs"] and getattr(args, "controlnet", None):  # the residuals are lists: not graphed
        if args.cuda_graphs:
            raise ValueError("--cuda-graphs does not take --controlnet (use --compile for a speed-up)")
        opts["cuda_graphs"] = False
    return opts


class GraphedUNet(torch.nn.Module):
    """The UNet replayed from a CUDA graph: one capture per input shape (the 1- to 8-step loop has one), then
    each step copies its inputs into the captured buffers and replays the kernels with no Python or launch
    overhead. Same kernels as the eager call, so the same output. CUDA only; inference only."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.config, self.graphs = unet, unet.config, {}

    @torch.no_grad()
    def forward(self, *inputs):  # x, t, context, pooled, time_ids: every one a tensor on the GPU
        key = tuple((a.shape, a.dtype) for a in inputs)
        if key not in self.graphs:
            static = [a.clone() for a in inputs]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up off the capture: cuDNN/cuBLAS choices, compiled kernels
                for _ in range(2):
                    self.unet(*static)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.unet(*static)
            self.graphs[key] = graph, static, out
        graph, static, out = self.graphs[key]
        for buffer, a in zip(static, inputs):
            buffer.copy_(a)
        graph.replay()
        return out.clone()  # the next replay overwrites `out`


def make_fast(unet, vae, device, channels_last=False, fuse_qkv=False, compile=None, cuda_graphs=False):
    """The UNet and VAE with the speed options on (speed_options), after loading and LoRA fusing.
    compile: a torch.compile mode for the UNet and the VAE decoder (Module.compile: the checkpoint names
    stay). Either model may be None (the other alone). -> (unet, vae); with cuda_graphs the UNet is a
    GraphedUNet."""
    if cuda_graphs and device.type != "cuda":
        raise ValueError(f"--cuda-graphs needs a CUDA device, not {device}")
    if unet is not None:
        if channels_last:  # NHWC convolutions: what cuDNN's and oneDNN's fastest kernels take
            unet = unet.to(memory_format=torch.channels_last)
        if fuse_qkv:
            unet.fuse_qkv()
        if compile:
            unet.compile(mode=compile)
        if cuda_graphs:
            unet = GraphedUNet(unet)
    if vae is not None:
        if channels_last:
            vae = vae.to(memory_format=torch.channels_last)
        if compile:
            vae.decoder.compile(mode=compile)
    return unet, vae


# ----------------------------------------------------------------------------------------------------
# Output files: checked before any work, written atomically

IMAGE_EXTENSIONS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
MANIFEST = "prompts.jsonl"


def check_out(out):
    """Refuse an output path that would fail after the images are made: a folder, an unknown extension, then
    files.check_writable_folder on its folder (a parent that is a file, a folder we cannot write in)."""
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out}: is a folder; give a file name like {out / 'image.png'}")
    if out.suffix.lower() not in IMAGE_EXTENSIONS:
        raise ValueError(f"--out {out}: unknown image extension {out.suffix!r}; use "
                         f"{', '.join(IMAGE_EXTENSIONS)}")
    files.check_writable_folder(out.parent)  # created at save time


def output_paths(out, n, indexed):
    """OUT itself for one image; OUT_00000.png, OUT_00001.png, ... (index = seed offset) when indexed."""
    out = Path(out)
    return [out.with_name(f"{out.stem}_{i:05d}{out.suffix}") for i in range(n)] if indexed else [out]


def save_image(img, path):
    """One image, written atomically (files.atomic_write), its folder made first; the format from the
    extension."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write(path, lambda tmp: img.save(tmp, format=IMAGE_EXTENSIONS[Path(path).suffix.lower()]))


def identity(source):
    """What names an input for the manifest's settings: a local file or folder by its real path, size and
    modification time (a file rewritten in place is another input), anything else (a hub id) by its name."""
    if source is None or not Path(source).exists():
        return source
    st = Path(source).stat()
    return f"{Path(source).resolve()}:{st.st_size}:{st.st_mtime_ns}"


def settings_of(args, prediction, dtype):
    """A short fingerprint of everything but the prompt and seed that makes an image: the manifest records it
    per image, so a re-run with other settings redoes the image instead of keeping a stale one."""
    record = {"base": identity(args.base), "unet": identity(args.unet), "steps": args.steps,
              "loras": [(identity(f), scale) for f, scale in map(weights.parse_lora_spec, args.lora)],
              "prediction": prediction, "guidance": args.guidance, "negative": args.negative,
              "width": args.width, "height": args.height, "image": identity(args.image),
              "strength": args.strength, "resize": args.resize, "dtype": str(dtype)}
    if args.controlnet:  # only then, so the fingerprints of runs without ControlNets stay as they were
        record["controlnets"] = [(identity(c), identity(i), s) for c, i, s in zip(
            args.controlnet, args.control_image, args.control_scale or [1.0] * len(args.controlnet))]
    if getattr(args, "vae", "full") != "full":  # absent for the default: older manifests stay valid
        record["vae"] = identity(args.vae)
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def done_images(paths, jobs, settings):
    """{index: manifest entry} of the images of this job list already made: the file is on disk and the
    manifest lists it with the same prompt, seed and settings. Anything else is (re)done."""
    listed = {}
    try:
        lines = (paths[0].parent / MANIFEST).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        lines = []
    for line in lines:
        try:
            entry = json.loads(line)
            listed[entry["file"]] = entry
        except (ValueError, KeyError, TypeError):
            continue  # not a line we wrote: its image is redone
    done = {}
    for i, ((prompt, seed, _), path) in enumerate(zip(jobs, paths)):
        entry = {"prompt": prompt, "seed": seed, "file": path.name, "settings": settings}
        if listed.get(path.name) == entry and path.is_file():
            done[i] = entry
    return done


def write_manifest(folder, entries):
    """prompts.jsonl, atomically (files.atomic_write), one JSON line per image in index order."""
    text_out = "".join(json.dumps(entries[i], ensure_ascii=False) + "\n" for i in sorted(entries))
    files.atomic_write(Path(folder) / MANIFEST, lambda tmp: tmp.write_text(text_out, encoding="utf-8"))


def read_prompts(path):
    """One prompt per line of a UTF-8 file, blank lines skipped. -> [(line number, prompt)]"""
    try:
        lines = Path(path).read_bytes().decode("utf-8").splitlines()
    except FileNotFoundError:
        raise ValueError(f"--prompts {path}: cannot read it: no such file") from None
    except OSError as e:
        raise ValueError(f"--prompts {path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        line = Path(path).read_bytes()[:e.start].count(b"\n") + 1
        raise ValueError(f"--prompts {path}: line {line} is not UTF-8 (byte {e.start})") from None
    prompts = [(i + 1, s.strip()) for i, s in enumerate(lines) if s.strip()]
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts (one per line, blank lines are skipped)")
    return prompts


# ----------------------------------------------------------------------------------------------------
# The command line


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", help="the text prompt (or give --prompts)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="a UTF-8 text file with one prompt per line (blank lines skipped) instead of PROMPT; "
                        f"writes OUT_00000.png, OUT_00001.png, ... and {MANIFEST} (prompt, seed, file, "
                        "settings per image); re-run the same command to resume: images on disk and listed "
                        "with the same prompt, seed and settings are kept")
    p.add_argument("--negative", default=None, metavar="TEXT",
                   help="negative prompt: encoded as the unconditional input of CFG instead of SDXL's "
                        "all-zero input (diffusers' negative_prompt); needs --guidance > 1")
    p.add_argument("--steps", type=int, default=4,
                   help="the model's steps (official Lightning UNets: 1, 2, 4, 8); with --image, the steps "
                        "left after the time --strength selects are run")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of image 0's noise (CPU generator, as diffusers); image i uses seed + i, in "
                        "0..2**64-1")
    p.add_argument("--num", type=int, default=1,
                   help="images per prompt; more than one writes OUT_00000.png, ... and the manifest, as "
                        "--prompts")
    p.add_argument("--batch-size", type=int, default=1,
                   help="images generated together (memory vs speed); the images do not depend on it")
    p.add_argument("--width", type=int, default=None,
                   help="image width in pixels, a multiple of 8; default 1024, or the --image's own width")
    p.add_argument("--height", type=int, default=None,
                   help="image height in pixels, a multiple of 8; default 1024, or the --image's own height")
    p.add_argument("--out", default="out.png",
                   help="output image (.png, .jpg, .webp), written atomically; several images: "
                        f"OUT_00000.png, ... with {MANIFEST} next to them")
    p.add_argument("--base", default=weights.SDXL_BASE,
                   help="SDXL base for text encoders, tokenizers, VAE and UNet config: a hub id, a diffusers "
                        "folder, or a single-file .safetensors checkpoint")
    p.add_argument("--vae", default="full", metavar="{full,tiny,PATH}",
                   help="the VAE that encodes --image and decodes: 'full' (the base's, default), 'tiny' "
                        f"(the preview autoencoder {weights.TINY_VAE_REPO}: ~1/19 of the decoder's FLOPs, "
                        "softer detail), or a diffusers VAE folder, a .safetensors file or a hub id of "
                        "either kind (told apart by its config or keys)")
    p.add_argument("--unet", default=None,
                   help="UNet weights: default the official ByteDance/SDXL-Lightning UNet for --steps; a "
                        "UNet .safetensors file (diffusers or original layout); or 'base' for the base's own "
                        "UNet")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="a kohya-format LoRA .safetensors fused into the UNet at SCALE (default 1); repeat "
                        "to stack, fused in order (official names like sdxl_lightning_4step_lora.safetensors "
                        "come from the hub)")
    p.add_argument("--prediction", choices=lm.PREDICTIONS, default=None,
                   help="what the UNet predicts; default 'sample' (x0) for the official 1-step UNet and for "
                        "files named *_x0* or with a config.json saying prediction_type 'sample' next to "
                        "them, else 'epsilon'")
    p.add_argument("--guidance", type=float, default=0.0,
                   help="classifier-free guidance scale against an all-zero uncond (or --negative); <= 1 is "
                        "off (Lightning: off)")
    p.add_argument("--image", default=None, metavar="FILE",
                   help="img2img (SDEdit): start from this image, VAE-encoded and noised to the time "
                        "--strength selects")
    p.add_argument("--strength", type=float, default=None,
                   help="with --image: how much to change, 1 = all (t = strength * 1000); must be a time the "
                        "model was trained at: 0.25/0.5/0.75/1 for 1 and 2 steps, k/N for N steps")
    p.add_argument("--force", action="store_true", help="accept a --strength the model was not trained at")
    p.add_argument("--resize", choices=["stretch", "crop"], default="stretch",
                   help="how --image is fit to --width x --height: 'stretch' (diffusers' default) or 'crop' "
                        "(keep the aspect ratio, cut the centre)")
    g = p.add_argument_group("ControlNet (Sec. 5.3)", "repeat the three flags for several ControlNets: the "
                             "k-th --controlnet takes the k-th --control-image and --control-scale")
    g.add_argument("--controlnet", action="append", default=[], metavar="PATH",
                   help="an SDXL ControlNet: a hub id (diffusers/controlnet-canny-sdxl-1.0), a diffusers "
                        "folder (config.json + diffusion_pytorch_model.safetensors) or a .safetensors file")
    g.add_argument("--control-image", action="append", default=[], metavar="FILE",
                   help="the control image (canny edges, depth map, ...) of each --controlnet, as given: no "
                        "edge or depth detector is run; resized to --width x --height as --image (--resize); "
                        "without --width/--height/--image it sets the size")
    g.add_argument("--control-scale", action="append", type=float, default=[], metavar="S",
                   help="each --controlnet's residual scale (diffusers' controlnet_conditioning_scale), "
                        "default 1; give none or one per --controlnet")
    p.add_argument("--device", default=None, help="torch device; default cuda if available, else cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="UNet and text dtype; default float16 on GPU (the model card), float32 on CPU")
    add_speed_args(p)
    return p


def add_speed_args(p):
    g = p.add_argument_group("speed (docs/speed.md#the-fast-path): each keeps the image to float tolerance")
    g.add_argument("--fast", action="store_true",
                   help="what pays on the device: on CUDA --channels-last --fuse-qkv --compile "
                        "--cuda-graphs; on the CPU --channels-last --fuse-qkv (no compile, no CUDA graphs)")
    g.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
                   metavar="MODE",
                   help="torch.compile the UNet and the VAE decoder (slow first call, faster after); MODE "
                        f"one of {', '.join(COMPILE_MODES)} (default: default)")
    g.add_argument("--channels-last", action="store_true",
                   help="UNet and VAE weights in channels-last (NHWC) memory format for faster convolutions")
    g.add_argument("--fuse-qkv", action="store_true",
                   help="one matmul for each attention's q/k/v projections (k/v in cross-attention), as "
                        "diffusers' fuse_qkv_projections")
    g.add_argument("--cuda-graphs", action="store_true",
                   help="CUDA only: capture the UNet call once and replay it at every step (refused on "
                        "the CPU)")


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def check_args(args):
    """Every argument and the output path, before anything is loaded. -> [(prompt, seed, name)] per image"""
    if (args.prompt is None) == (args.prompts is None):
        raise ValueError("give a PROMPT or --prompts FILE (one of them)")
    for name in ("width", "height"):
        v = getattr(args, name)
        if v is not None and (v <= 0 or v % 8):
            raise ValueError("--width/--height must be positive multiples of 8, got "
                             f"{args.width}x{args.height}")
    if args.num < 1 or args.batch_size < 1:
        raise ValueError("--num and --batch-size must be at least 1")
    if not math.isfinite(args.guidance):
        raise ValueError(f"--guidance must be a finite number, got {args.guidance}")
    if args.negative is not None and not args.guidance > 1:
        raise ValueError("--negative needs --guidance > 1 (without classifier-free guidance it would do "
                         "nothing)")
    if args.unet is None:
        weights.lightning_unet_file(args.steps)  # refuse an unsupported step count before loading anything
    else:
        lm.trailing_timesteps(args.steps)
    if args.image is None and (args.strength is not None or args.force):
        raise ValueError("--strength and --force need --image")
    if args.image is not None:
        if args.strength is None:
            raise ValueError(f"--image needs --strength; the {args.steps}-step model was trained for "
                             f"{', '.join(f'{s:.3g}' for s in lm.trained_strengths(args.steps))}")
        check_strength(args.steps, args.strength, args.force)
    check_controls(args)
    lines = read_prompts(args.prompts) if args.prompts else [(None, args.prompt)]
    n = len(lines) * args.num
    if args.seed < 0 or args.seed + n - 1 >= 2**64:
        raise ValueError(f"--seed must be in 0..2**64-1 for all {n} images (seed + index), got {args.seed}")
    check_out(args.out)
    manifest = (Path(args.out).absolute().parent / MANIFEST).resolve()
    if args.prompts and manifest == Path(args.prompts).resolve():
        raise ValueError(f"--prompts {args.prompts} would be overwritten by the manifest; move it or change "
                         "--out")
    if args.unet not in (None, "base") and Path(args.unet).is_dir():
        raise ValueError(f"--unet {args.unet}: is a folder; expected a UNet .safetensors file (a diffusers "
                         f"folder's own UNet: --base {args.unet} --unet base)")
    if args.unet not in (None, "base") and (weights.is_file(args.unet) or Path(args.unet).exists()):
        weights.check_unet_file(args.unet)  # the header only: a missing or foreign file before any loading
    if args.vae not in ("full", "tiny"):
        weights.check_vae_source(args.vae)  # a missing path or a file that is no VAE, before any loading
    for spec in args.lora:
        path = weights.parse_lora_spec(spec)[0]
        if Path(path).exists():
            weights.check_lora_file(path)
        elif path not in weights.LIGHTNING_LORAS.values():
            raise ValueError(f"--lora {path}: no such file (official names, fetched from the hub: "
                             f"{', '.join(weights.LIGHTNING_LORAS.values())})")
    jobs = []
    for line, prompt in lines:
        for _ in range(args.num):
            where = f"{args.prompts}:{line}" if line else "the prompt"  # names it in warnings
            jobs.append((prompt, args.seed + len(jobs), where))
    return jobs


def check_controls(args):
    """The ControlNet flags paired in order, each source checked as far as it can be without loading it."""
    n = len(args.controlnet)
    if len(args.control_image) != n or len(args.control_scale) not in (0, n):
        raise ValueError(f"{n} --controlnet, {len(args.control_image)} --control-image and "
                         f"{len(args.control_scale)} --control-scale: give one image per ControlNet, and no "
                         "scale or one per ControlNet (paired in order)")
    for s in args.control_scale:
        if not math.isfinite(s):
            raise ValueError(f"--control-scale must be a finite number, got {s}")
    for source in args.controlnet:
        weights.check_controlnet_source(source)


def load_controls(args, images, unet, device, dtype):
    """[(ControlNet, control image (1, 3, H, W) in [0, 1], scale)] of the command line (images: the control
    images, loaded before the models), each ControlNet checked against the UNet."""
    variant = "fp16" if dtype == torch.float16 else None
    controls = []
    for source, image, scale in zip(args.controlnet, images, args.control_scale or [1.0] * len(images)):
        net = weights.load_controlnet(source, device, dtype, variant).eval()
        weights.check_controlnet_fits(net, unet.config, f"--controlnet {source}")
        controls.append((net, image, scale))
    return controls


def main(argv=None):
    args = parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = lambda msg, *a, **k: print(f"warning: {msg}", file=sys.stderr)  # one line each
        run(args)


def run(args):
    try:
        jobs = check_args(args)
        image, size = None, (args.width or 1024, args.height or 1024)
        if args.image is not None:
            image, size = load_image(args.image, args.width, args.height, args.resize)
        elif args.control_image:  # diffusers' ControlNet pipeline: the control image's own size by default
            size = load_image(args.control_image[0], args.width, args.height, args.resize,
                              flag="--control-image")[1]
        control_images = [load_image(path, *size, args.resize, flag="--control-image", normalize=False)[0]
                          for path in args.control_image]
        prediction = args.prediction or default_prediction(args.unet, args.base, args.steps)
        device, dtype = pick_device_dtype(args.device, args.dtype)
        speed = speed_options(args, device)  # a bad combination is refused before anything is loaded
        indexed = len(jobs) > 1 or args.prompts is not None
        paths = output_paths(args.out, len(jobs), indexed)
        settings = settings_of(args, prediction, dtype)
        manifest = done_images(paths, jobs, settings) if indexed else {}  # resume: kept, not redone
        todo = [i for i in range(len(jobs)) if i not in manifest]
        if not todo:
            print(f"all {len(jobs)} images are on disk already ({paths[0].parent / MANIFEST}); nothing to do")
            return
        if manifest:
            print(f"resuming: {len(manifest)} of {len(jobs)} images are on disk already")
        t0 = time.time()
        text, unet, vae = load(args.base, args.unet, [weights.parse_lora_spec(s) for s in args.lora],
                               args.steps, device, dtype, vae=args.vae)
        unet, vae = make_fast(unet, vae, device, **speed)
        controls = load_controls(args, control_images, unet, device, dtype) if args.controlnet else None
        t1 = time.time()
        if indexed:  # before any image is replaced: it lists only images that are on disk and still true
            Path(paths[0].parent).mkdir(parents=True, exist_ok=True)
            write_manifest(paths[0].parent, manifest)
        for b in range(0, len(todo), args.batch_size):
            batch = [jobs[i] for i in todo[b:b + args.batch_size]]
            outs = [paths[i] for i in todo[b:b + args.batch_size]]
            images = generate(text, unet, vae, [p for p, _, _ in batch], args.steps, [s for _, s, _ in batch],
                              *size, prediction, args.guidance, dtype, progress=len(jobs) == 1,
                              negative=args.negative, image=image, strength=args.strength or 1.0,
                              controls=controls,
                              names=[f"{where} ({f.name})" for (_, _, where), f in zip(batch, outs)])
            for img, i in zip(files.to_pil(images), todo[b:b + args.batch_size]):
                save_image(img, paths[i])
                manifest[i] = {"prompt": jobs[i][0], "seed": jobs[i][1], "file": paths[i].name,
                               "settings": settings}
            if indexed:  # rewritten after each batch: it lists exactly this job list's images on disk
                write_manifest(paths[0].parent, manifest)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.time()
    except (weights.CheckpointError, files.RunError, ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
    shown = ", ".join(map(str, paths)) if len(paths) <= 3 else \
        f"{paths[0]} ... {paths[-1]} ({len(paths)} images)"
    print(f"saved {shown} ({args.steps} steps, {prediction}, {size[0]}x{size[1]}, {device} "
          f"{str(dtype).removeprefix('torch.')}): load {t1 - t0:.1f}s, generate {t2 - t1:.2f}s")


if __name__ == "__main__":
    main()
