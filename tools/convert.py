"""The command that writes a checkpoint in another layout: a single file or a diffusers folder.

The renames themselves are weights.py's (every layout conversion, both directions); this file gathers the
parts with strict loads, fuses LoRAs and writes (run from the repository root):

    python -m tools.convert my_sdxl_finetune/ my_finetune.safetensors --to single-file # diffusers folder
    python -m tools.convert runs/8to4/full/sdxl_lightning_4step_unet.safetensors my4step.safetensors \\
        --to single-file --base my_finetune.safetensors --fp16                   # a training export
    python -m tools.convert my_finetune.safetensors my_finetune_4step.safetensors --to single-file \\
        --lora sdxl_lightning_4step_lora.safetensors:1.0                         # LoRA fused in
    python -m tools.convert sdxl_lightning_4step.safetensors sdxl_lightning_4step/ --to diffusers
    python -m tools.convert --extract-lora sdxl_base.safetensors my_4step.safetensors --rank 64 \
        --out my_4step_lora.safetensors                                          # a LoRA: B minus A

--extract-lora A B writes the kohya LoRA that turns UNet A into UNet B (same architecture, either layout):
lora.extract_lora, a truncated SVD of every LoRA target's difference at --rank (kohya's
extract_lora_from_models), fp16 as released; it prints the per-layer relative error (worst and mean).
"""
import argparse
import json
import os
import shutil
from pathlib import Path


import files
import lora as lora_mod
import weights
from unet import UNetConfig
from weights import SGM_VAE, canonical_state_dict, to_single_file

# ----------------------------------------------------------------------------------------------------
# Gather the parts with weights.py (strict loads, clear errors), fuse LoRAs, write.

_BASE = weights.SDXL_BASE

SDXL_SCHEDULER = {  # stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}
PIPELINE_INDEX = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
                  "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                  "text_encoder": ["transformers", "CLIPTextModel"],
                  "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                  "tokenizer": ["transformers", "CLIPTokenizer"],
                  "tokenizer_2": ["transformers", "CLIPTokenizer"],
                  "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}


def load_parts(args):
    """(UNet, VAE, (CLIP-L, bigG), TextEncoders or None) from IN and --base, every part loaded strictly,
    in the source's dtypes; the LoRAs fused into the UNet. Tokenizers are loaded only where they are at hand
    or needed (--to diffusers)."""
    src, base = args.input, args.base
    single = weights.is_file(src)
    sd = weights.read_safetensors(src) if single else None
    whole = single and any(k.startswith(SGM_VAE) for k in sd)  # a UNet-only file needs a base for the rest
    if base is not None and (whole or not single):
        raise weights.CheckpointError(f"{src} holds its own VAE and text encoders; --base is for UNet-only "
                                      "inputs")
    base = src if (whole or not single) else (base or weights.SDXL_BASE)
    base_single = weights.is_file(base)
    base_sd = sd if base == src else (weights.read_safetensors(base) if base_single else None)
    if single and weights.detect_layout(sd, src) == "diffusers":
        cfg_json = Path(src).with_name("config.json")  # train.py exports a UNet file and its config.json
        cfg = UNetConfig.from_diffusers(weights.read_json(cfg_json), str(cfg_json)) \
            if cfg_json.is_file() else weights.unet_config(base, base_sd)
        unet = weights.load_unet(src, cfg, sd=sd, dtype=None)
    else:
        unet = weights.load_unet(src, sd=sd, dtype=None)
    for spec in args.lora:
        path, scale = weights.parse_lora_spec(spec)
        try:
            lora_mod.merge_lora(unet, weights.read_lora(path, unet.config), scale=scale, source=path)
        except ValueError as e:
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
    for sub, model, cfg in (("unet", unet, unet.config.to_diffusers()),
                            ("vae", vae, vae.config.to_diffusers())):
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
    p.add_argument("input", metavar="IN", nargs="?",
                   help="what to convert: a diffusers SDXL folder or hub id; a single-file .safetensors "
                        "(original layout, all parts); or a UNet-only .safetensors (either layout; our "
                        "training export, whose config.json next to it gives the architecture), completed "
                        "from --base")
    p.add_argument("output", metavar="OUT", nargs="?",
                   help="the .safetensors file (--to single-file) or folder (--to diffusers)")
    p.add_argument("--to", choices=["single-file", "diffusers"],
                   help="single-file: the original Stability layout in one .safetensors (ComfyUI, A1111, "
                        "kohya); diffusers: a folder StableDiffusionXLPipeline.from_pretrained loads")
    p.add_argument("--base", default=None,
                   help="for a UNet-only IN: where the VAE, text encoders (and the UNet config, if no "
                        "config.json lies next to IN) come from: hub id, diffusers folder or single file; "
                        f"default {_BASE}")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="kohya-format LoRA fused into the UNet at SCALE (default 1.0); repeatable, fused in "
                        "order")
    p.add_argument("--tokenizers", default=_BASE,
                   help="with --to diffusers from a single file: the SDXL repo or folder whose tokenizer/ "
                        "and tokenizer_2/ are copied (single files carry none)")
    p.add_argument("--fp16", action="store_true",
                   help="store floating tensors in float16 (half the size); default: keep the source's "
                        "dtypes")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (default: refuse)")
    g = p.add_argument_group("extract a LoRA (instead of IN OUT --to)")
    g.add_argument("--extract-lora", nargs=2, metavar=("A", "B"),
                   help="write the LoRA that turns UNet A into UNet B (same architecture; each a single "
                        "file, a UNet .safetensors in either layout, a diffusers UNet folder or SDXL folder)")
    g.add_argument("--rank", type=int, default=64, help="the extracted LoRA's rank (released: 64)")
    g.add_argument("--alpha", type=float, default=8.0, help="the extracted LoRA's alpha (released: 8)")
    g.add_argument("--out", metavar="FILE", help="with --extract-lora: the LoRA .safetensors to write")
    return p


def extract(args):
    """--extract-lora A B: lora.extract_lora of B - A on every LoRA target, written fp16 to --out.
    -> the error summary printed."""
    if args.input or args.output or args.to or args.lora:
        raise ValueError("--extract-lora A B takes --rank, --alpha, --base, --out and --overwrite, not IN, "
                         "OUT, --to or --lora")
    if not args.out:
        raise ValueError("--extract-lora needs --out FILE.safetensors")
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out} must end in .safetensors")
    if out.exists() and not args.overwrite:
        raise ValueError(f"--out {out} exists (pass --overwrite to replace it)")
    if args.rank < 1 or not args.alpha > 0:
        raise ValueError(f"--rank must be >= 1 and --alpha > 0, got {args.rank} and {args.alpha}")
    for src in args.extract_lora:
        if not os.path.exists(src) and not weights.is_hub_id(src):
            raise ValueError(f"--extract-lora: no such file or folder {src}")
        if os.path.exists(src) and Path(src).resolve() == out.resolve():
            raise ValueError(f"--out {out} is the input {src}")
    if not out.parent.resolve().is_dir():
        raise ValueError(f"--out's folder {out.parent} does not exist")
    stale = files.temp_path(out)  # files.atomic_write's temp file of a killed run
    if stale.is_file():
        stale.unlink()
    a, b = (weights.load_any_unet(src, args.base) for src in args.extract_lora)
    if a.config != b.config:
        raise weights.CheckpointError(f"--extract-lora: {args.extract_lora[0]} and {args.extract_lora[1]} "
                                      f"are UNets of different architectures ({a.config} vs {b.config})")
    tensors, errors = lora_mod.extract_lora(a.state_dict(), b.state_dict(), lora_mod.lora_targets(a),
                                            args.rank, args.alpha)
    files.save_safetensors({k: v.half().contiguous() for k, v in tensors.items()}, out,
                           lora_mod.kohya_metadata(args.rank, args.alpha))
    worst = max(errors, key=errors.get)
    print(f"wrote {out}: the LoRA of {args.extract_lora[1]} minus {args.extract_lora[0]}, rank {args.rank}, "
          f"alpha {args.alpha:g}, {len(errors)} layers; per-layer relative error worst {errors[worst]:.3e} "
          f"({worst}), mean {sum(errors.values()) / len(errors):.3e}")
    return errors


def check_args(args):
    """Everything that can be checked before reading gigabytes."""
    out = Path(args.output)
    if args.to == "single-file" and out.suffix != ".safetensors":
        raise ValueError(f"OUT {out} must end in .safetensors for --to single-file")
    if args.to == "diffusers" and out.suffix:
        raise ValueError(f"OUT {out} names a file; --to diffusers writes a folder")
    here = Path.cwd()
    if not out.name or out.resolve() == here or out.resolve() in here.parents:
        raise ValueError(f"OUT {out} is the current folder or one above it; name a new file or folder")
    if out.exists() and not args.overwrite:
        raise ValueError(f"OUT {out} exists (pass --overwrite to replace it)")
    inputs = [("IN", args.input), ("--base", args.base), ("--tokenizers", args.tokenizers)]
    inputs += [("--lora", weights.parse_lora_spec(spec)[0]) for spec in args.lora]
    for flag, path in inputs:
        if path is None or not os.path.exists(path):
            continue
        path = Path(path).resolve()
        if path == out.resolve() or out.resolve() in path.parents:  # replacing OUT would destroy the input
            raise ValueError(f"OUT {out} is {flag} {path}" if path == out.resolve() else
                             f"OUT {out} holds {flag} {path}; replacing OUT would delete it")
        if out.exists() and path in out.resolve().parents:
            raise ValueError(f"OUT {out} is inside {flag} {path}; replacing it would change that input")
    if not out.parent.resolve().is_dir():  # convert makes no folders but OUT itself
        raise ValueError(f"OUT's folder {out.parent} does not exist")
    try:
        files.check_writable_folder(out.parent)
    except files.RunError as e:  # its message says --out; this command's output is OUT
        raise ValueError(f"OUT {out}: {e}") from None
    # every input file by its header (no tensor read), before gigabytes are loaded
    if weights.is_file(args.input):
        weights.check_unet_file(args.input)
    if args.base is not None and weights.is_file(args.base):
        weights.read_header(args.base)
    for spec in args.lora:
        path, _ = weights.parse_lora_spec(spec)
        if not Path(path).exists():
            raise ValueError(f"--lora {spec}: no such file {path}")
        weights.check_lora_file(path)


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.extract_lora:
        try:
            extract(args)
        except (ValueError, files.RunError) as e:
            raise SystemExit(f"error: {e}")
        except OSError as e:
            raise SystemExit(f"error: {e}" if getattr(e, "filename", None) else
                             f"error: writing {args.out}: {e}")
        return
    if not (args.input and args.output and args.to):
        raise SystemExit("error: give IN, OUT and --to (or --extract-lora A B --out FILE)")
    out = Path(args.output)

    def write(tmp):  # OUT.tmp, a file or a folder; files.atomic_write renames it over OUT
        if args.to == "single-file":
            write_single_file(tmp, unet, vae, encoders, args.fp16)
        else:
            write_diffusers(tmp, unet, vae, encoders, text, args.fp16)
        if out.is_dir():  # --overwrite of a folder: os.replace cannot replace a non-empty one
            shutil.rmtree(out)
    try:
        check_args(args)
        stale = files.temp_path(out)  # files.atomic_write's temp file of a killed run
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
        unet, vae, encoders, text = load_parts(args)
        files.atomic_write(out, write)
    except (ValueError, files.RunError) as e:  # weights.CheckpointError is a ValueError; a full disk RunError
        raise SystemExit(f"error: {e}")
    except OSError as e:  # a missing file names itself; another failed write is named here
        raise SystemExit(f"error: {e}" if getattr(e, "filename", None) else f"error: writing {out}: {e}")
    n = sum(p.numel() for m in (unet, vae, *encoders) for p in m.parameters())
    print(f"wrote {out} ({args.to}, {n / 1e6:,.1f}M parameters{', float16' if args.fp16 else ''})")


if __name__ == "__main__":
    main()
