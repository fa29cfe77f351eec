"""The toy world: a tiny SDXL-shaped base trained from scratch on a procedural captioned data set, on a CPU.

    python -m tools.toy --out toy          # toy/data (captioned 64 px images), toy/base (a diffusers SDXL
                                           # folder), toy/classifier (the toy's "Inception"); 23 min on 2 CPUs
    python -m tools.toy --out toy --quick  # a smaller base in 5-8 minutes (tests)
    python -m tools.toy all --out toy      # the whole experiment: base, every stage and the ablations with
                                           # train.py, tools/eval.py tables; ~35 min after the base on 2 CPUs
    python -m tools.toy tiny-vae --out toy # a tiny preview VAE for the base (toy/tiny_vae, sample.py --vae)
                                           # and its quality against the full decoder (results.md)

Every other file uses the base unchanged: `sample.py --base toy/base --unet base --steps 32 --guidance 6
--width 64 --height 64`, `train.py --base toy/base --data toy/data --resolution 64 --min-size 64 ...`, and
diffusers' StableDiffusionXLPipeline.from_pretrained("toy/base") samples the same images.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import files
import lightning_min as lm
from tools.toy_world import QUICK, RES, ToyConfig, build, write_json

ROOT = Path(__file__).resolve().parent.parent  # the repository root: train.py and the tools package

# ----------------------------------------------------------------------------------------------------
# The experiment: every stage through train.py, then tools/eval.py


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs="?", default="base", choices=["base", "all", "tiny-vae"],
                   help="base: data + base + classifier (default); all: also every stage with train.py and "
                        "tools/eval.py; tiny-vae: also a tiny preview VAE (OUT/tiny_vae, sample.py --vae) "
                        "and its quality against the full decoder (OUT/tiny_vae/results.md)")
    p.add_argument("--out", default="toy", help="output folder: OUT/data, OUT/base, OUT/classifier, OUT/runs")
    p.add_argument("--quick", action="store_true", help="a smaller base in a few minutes (tests)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data set and all training draws")
    p.add_argument("--images", type=int, default=None, help="data set size (default 3000, --quick 500)")
    p.add_argument("--unet-steps", type=int, default=None,
                   help="teacher training steps (default 2000, --quick 1000)")
    p.add_argument("--vae-steps", type=int, default=None,
                   help="VAE training steps (default 400, --quick 300)")
    p.add_argument("--clf-steps", type=int, default=None,
                   help="classifier training steps (default 300, --quick 100)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--phase-steps", type=int, default=120, help="all: train.py --max-steps of every phase")
    p.add_argument("--batch", type=int, default=16, help="all: train.py --batch-size (one micro-batch)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = ToyConfig(**{**asdict(QUICK if args.quick else ToyConfig()), "seed": args.seed})
    if args.images is not None:
        cfg.images = args.images
    for name in ("unet_steps", "vae_steps", "clf_steps"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if cfg.images < 64 or min(cfg.unet_steps, cfg.vae_steps, cfg.clf_steps, args.phase_steps, args.batch) < 1:
        raise SystemExit("error: --images must be >= 64 and --unet-steps, --vae-steps, --clf-steps, "
                         f"--phase-steps, --batch >= 1; got {cfg.images}, {cfg.unet_steps}, {cfg.vae_steps}, "
                         f"{cfg.clf_steps}, {args.phase_steps}, {args.batch}")
    out = Path(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        files.check_writable_folder(out)
        t0 = time.time()
        times = build(out, cfg, args.quick)
        print(f"toy.py: {out}/data, {out}/base, {out}/classifier ready ({time.time() - t0:.0f}s this run; "
              f"parts: {', '.join(f'{k} {v:.0f}s' for k, v in times.items())})")
        if args.command == "all":
            experiment(out, args)
        if args.command == "tiny-vae":
            tiny_vae_quality(out, steps=4 * cfg.vae_steps, seed=args.seed)  # no norms: it learns slower
            print(f"toy.py: {out / 'tiny_vae' / 'results.md'}")
    except (ValueError, files.RunError) as e:
        raise SystemExit(f"error: {e}")


# Every phase of every stage, in order, each its own `train.py --phase` run so each gets its learning rate.
# The paper's rates (1e-6 LoRA, 5e-7 whole UNet) move a tiny model nowhere in a few hundred steps, so the toy
# uses larger ones; what else differs from the paper is only the scale (batch, steps).
PLAN = [("128to32", "mse"), ("32to8", "cond"), ("32to8", "uncond"), ("32to8", "full"), ("8to4", "cond"),
        ("8to4", "uncond"), ("8to4", "full"), ("4to2", "cond"), ("4to2", "uncond"), ("4to2", "full"),
        ("2to1", "convert"), ("2to1", "cond"), ("2to1", "uncond")]
TOY_LR = {"mse": 1e-4, "convert": 1e-4, "lora": 1e-4, "whole": 2e-5}


def phase_lr(stage, phase):
    spec = lm.phase_spec(stage, phase)
    return TOY_LR[phase] if phase in ("mse", "convert") else TOY_LR["lora" if spec.lora else "whole"]


def checkpoint(out, folder, stage, phase):
    return str(Path(out) / folder / stage / phase / "checkpoint.pt")


def teachers_2to1(out, phase):
    """A 2to1 run's teachers, from the method's runs/: the 2-step student, and for uncond the skip-level
    4-step."""
    return ["--teacher", checkpoint(out, "runs", "4to2", "full")] + \
        (["--skip-level-teacher", checkpoint(out, "runs", "8to4", "full")] if phase == "uncond" else [])


def ablations(out):
    """The paper's ablations that the toy can decide, each in its own folder beside runs/ (the method's):
    (folder, stage, phase, extra train.py arguments). MSE-only progressive distillation all the way to 1 step
    (Sec. 3.1-3.2, from the same 128to32 student); the 1-step student without the x0 switch (Sec. 3.7.3) and
    without re-noising the discriminator's input (Sec. 3.7.2), both from the method's 2-step student."""
    def ck(folder, stage, phase):
        return checkpoint(out, folder, stage, phase)
    return [("runs-mse", "32to8", "mse", ["--teacher", ck("runs", "128to32", "mse")]),
            ("runs-mse", "8to4", "mse", ["--teacher", ck("runs-mse", "32to8", "mse")]),
            ("runs-mse", "4to2", "mse", ["--teacher", ck("runs-mse", "8to4", "mse")]),
            ("runs-mse", "2to1", "convert", ["--teacher", ck("runs-mse", "4to2", "mse")]),
            ("runs-mse", "2to1", "mse", ["--teacher", ck("runs-mse", "4to2", "mse")]),
            ("runs-eps", "2to1", "cond", ["--prediction", "epsilon", *teachers_2to1(out, "cond")]),
            ("runs-eps", "2to1", "uncond", ["--prediction", "epsilon", *teachers_2to1(out, "uncond")]),
            ("runs-norenoise", "2to1", "cond", ["--renoise", "off", "--init", ck("runs", "2to1", "convert"),
                                                *teachers_2to1(out, "cond")]),
            ("runs-norenoise", "2to1", "uncond", ["--renoise", "off", *teachers_2to1(out, "uncond")])]


# What was changed where a stage failed to learn at the default budget, as more runs beside the first, so the
# table shows both: 2to1's convert phase had not converged in 120 steps (its 1-step samples were far worse
# than the eps model's own 1-step x0, which is what it imitates), so the whole stage again with convert 8x
# and the adversarial phases 2x longer; and the epsilon ablation with the same adversarial budget.
# (folder, stage, phase, factor on --phase-steps, extra arguments)
LONGER = [("runs-long", "2to1", "convert", 8, []), ("runs-long", "2to1", "cond", 2, []),
          ("runs-long", "2to1", "uncond", 2, []),
          ("runs-eps-long", "2to1", "cond", 2, ["--prediction", "epsilon"]),
          ("runs-eps-long", "2to1", "uncond", 2, ["--prediction", "epsilon"])]


def full_plan(out, steps):
    """Every train.py run of `toy.py all`, in order, as (folder, stage, phase, max steps, extra arguments):
    the method's 13 phases in runs/, the ablations, then the longer runs."""
    return [("runs", stage, phase, steps, []) for stage, phase in PLAN] + \
        [(f, stage, phase, steps, extra) for f, stage, phase, extra in ablations(out)] + \
        [(f, stage, phase, steps * k, extra + teachers_2to1(out, phase))
         for f, stage, phase, k, extra in LONGER]


def train_command(out, stage, phase, steps, batch, seed=0, folder="runs", extra=()):
    """The user's command for one phase of the toy experiment (1 rank; --save-every = --max-steps, see
    README)."""
    return [sys.executable, str(ROOT / "train.py"), "--stage", stage, "--phase", phase, "--base",
            str(Path(out) / "base"),
            "--data", str(Path(out) / "data"), "--out", str(Path(out) / folder), "--resolution", str(RES),
            "--min-size", str(RES), "--sharpness",
            "0",  # flat-colour shapes score below the photo default (100)
            "--batch-size", str(batch), "--micro-batch-size", str(batch),
            "--max-steps", str(steps), "--save-every", str(steps), "--lr", str(phase_lr(stage, phase)),
            "--seed", str(seed), "--device", "cpu", *extra]


def unet_file(out, stage, phase, folder="runs", prediction=None):
    """The phase's exported UNet, named as train.py names it."""
    name = files.unet_filename(lm.STAGES[stage].student_steps, prediction)
    return Path(out) / folder / stage / phase / name


def eval_rows(out):
    """The table's rows: the teacher at 32 (CFG 6), 8, 4, 2, 1 steps (CFG 6), our students, the ablations."""
    rows = [f"teacher{n}:base:{n}:6" for n in (32, 8, 4, 2, 1)]
    for name, stage, phase, n in [("mse32", "128to32", "mse", 32), ("lightning8", "32to8", "full", 8),
                                  ("lightning4", "8to4", "full", 4), ("lightning4-lora", "8to4", "uncond", 4),
                                  ("lightning4-cond-only", "8to4", "cond", 4),
                                  ("lightning2", "4to2", "full", 2),
                                  ("lightning2-cond-only", "4to2", "cond", 2),
                                  ("convert1", "2to1", "convert", 1),
                                  ("lightning1", "2to1", "uncond", 1),
                                  ("lightning1-cond-only", "2to1", "cond", 1)]:
        f = unet_file(out, stage, phase)
        if f.exists():
            rows.append(f"{name}:{f}:{n}:0:{'sample' if n == 1 else 'epsilon'}")
    # controls: the teacher without CFG (as the students sample), and each stage's starting model sampled at
    # the student's step count, which separates what a stage adds from what the CFG-free MSE student brings
    rows += [f"teacher{n}-nocfg:base:{n}" for n in (32, 8, 4, 2, 1)]
    for name, stage, phase, steps in [("mse32", "128to32", "mse", (8, 4, 2, 1)),
                                      ("lightning8", "32to8", "full", (4, 2)),
                                      ("lightning4", "8to4", "full", (2,)),
                                      ("lightning2", "4to2", "full", (1,))]:
        f = unet_file(out, stage, phase)
        if f.exists():
            rows += [f"{name}-at{n}:{f}:{n}" for n in steps]
    # the ablations: MSE-only progressive distillation at 8, 4, 2, 1 steps; the 1-step student without the
    # x0 switch (epsilon) and without re-noising
    for name, folder, stage, phase, n, pred in [
            ("mse-pd8", "runs-mse", "32to8", "mse", 8, "epsilon"),
            ("mse-pd4", "runs-mse", "8to4", "mse", 4, "epsilon"),
            ("mse-pd2", "runs-mse", "4to2", "mse", 2, "epsilon"),
            ("mse-pd1", "runs-mse", "2to1", "mse", 1, "sample"),
            ("lightning1-eps", "runs-eps", "2to1", "uncond", 1, "epsilon"),
            ("lightning1-no-renoise", "runs-norenoise", "2to1", "uncond", 1, "sample"),
            ("convert1-long", "runs-long", "2to1", "convert", 1, "sample"),
            ("lightning1-long", "runs-long", "2to1", "uncond", 1, "sample"),
            ("lightning1-eps-long", "runs-eps-long", "2to1", "uncond", 1, "epsilon")]:
        f = unet_file(out, stage, phase, folder, pred)
        if f.exists():
            rows.append(f"{name}:{f}:{n}:0:{pred}")
    return rows


GRID_ROWS = ["teacher32", "teacher4", "teacher1", "lightning8", "lightning4", "lightning2", "lightning1",
             "lightning1-long", "lightning1-eps-long"]


def grid(eval_dir, path, rows=GRID_ROWS, columns=8, every=28):
    """One PNG: a labelled row per eval row (those present), the same prompts and noise in each column."""
    from PIL import ImageFont
    eval_dir = Path(eval_dir)
    rows = [r for r in rows if (eval_dir / r).is_dir()]
    label_w = 6 * max(len(r) for r in rows) + 8
    img = Image.new("RGB", (label_w + RES * columns, RES * len(rows)), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for y, r in enumerate(rows):
        d.text((4, y * RES + RES // 2 - 5), r, fill=(0, 0, 0), font=ImageFont.load_default())
        for x in range(columns):
            img.paste(Image.open(eval_dir / r / f"{x * every:05d}.png"), (label_w + x * RES, y * RES))
    files.atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
    return rows


def experiment(out, args):
    """Every phase through train.py (skipping finished ones), then tools/eval.py; wall times to
    OUT/runs/times.json."""
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    tfile = out / "runs" / "times.json"
    times = json.loads(tfile.read_text()) if tfile.exists() else {}
    for folder, stage, phase, steps, extra in full_plan(out, args.phase_steps):
        pred = extra[extra.index("--prediction") + 1] if "--prediction" in extra else None
        if unet_file(out, stage, phase, folder, pred).exists():
            continue
        cmd = train_command(out, stage, phase, steps, args.batch, args.seed, folder, extra)
        print("toy.py:", " ".join(cmd[1:]), flush=True)
        t0 = time.time()
        r = subprocess.run(cmd)
        if r.returncode:
            raise ValueError(f"train.py failed on {folder}/{stage}/{phase} (exit {r.returncode}); fix and "
                             f"re-run to resume")
        times[f"{stage}/{phase}" if folder == "runs" else f"{folder}/{stage}/{phase}"] = time.time() - t0
        write_json(tfile, times)
    cmd = [sys.executable, "-m", "tools.eval", "--toy", str(out), "--out", str(out / "eval"),
           "--device", "cpu"]
    for row in eval_rows(out):
        cmd += ["--row", row]
    print("toy.py:", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if subprocess.run(cmd, env=env).returncode:  # the tools package, wherever this is run from
        raise ValueError("tools/eval.py failed")
    times["eval"] = time.time() - t0
    write_json(tfile, times)
    grid(out / "eval", out / "eval" / "grid.png")
    print(f"toy.py: {out / 'eval' / 'results.md'}, {out / 'eval' / 'grid.png'}; wall times in {tfile}")


# ----------------------------------------------------------------------------------------------------
# tiny-vae: the tiny preview VAE (sample.py --vae) for the toy, trained by toy_world.train_tiny_vae, and what
# decoding with it costs in quality against the full toy decoder


def _decoded(model, latents):
    with torch.no_grad():
        return torch.cat([model.decode_latents(z, 64) for z in latents.split(256)]).clamp(-1, 1)


def tiny_vae_quality(out, steps=1200, seed=0, n=450, sample_steps=32, guidance=6.0):
    """Train (or reuse) OUT/tiny_vae, then decode the same latents with the full toy decoder and the tiny one:
    the VAE latents of n data images (reconstruction) and n teacher samples (sample_steps, with CFG guidance
    and without; tools/eval.py's toy prompts). Judged by tools/eval.py's toy judge: fd (to the data's
    classifier features), caption accuracy, sharpness, and for the tiny decoder psnr_vs_teacher = PSNR
    against the full decoder's image, plus fd_vs_full, the Frechet distance between the two decoders'
    features, and latent_std (TAESD soft-clamps latents to |z| < 3). Writes OUT/tiny_vae/results.json and
    results.md; returns the rows."""
    import sample as sample_mod
    import weights
    from tools.eval import ToyJudge, fd_of, to_pil, to_tensor
    from tools.toy_world import all_captions, load_data, train_tiny_vae, write_model
    out = Path(out)
    base, folder = out / "base", out / "tiny_vae"
    if not (base / "model_index.json").exists():
        raise ValueError(f"{base}: no toy base (run `python -m tools.toy --out {out}` first)")
    full = weights.load_vae(str(base)).eval().requires_grad_(False)
    n_data = json.loads((out / "data" / "done.json").read_text())["images"]
    pixels, captions = load_data(out / "data", n_data)
    t0 = time.time()
    if not (folder / "diffusion_pytorch_model.safetensors").exists():
        write_model(folder, train_tiny_vae(full, pixels, steps=steps, seed=seed))
    train_s = time.time() - t0
    tiny = weights.load_tiny_vae(str(folder)).eval()  # as sample.py --vae OUT/tiny_vae loads it
    judge = ToyJudge(out)
    prompts = all_captions() * 2
    prompts = prompts[:n]
    with torch.no_grad():
        text, unet, _ = sample_mod.load(str(base), "base", None, sample_steps, torch.device("cpu"),
                                        torch.float32)
        gen = {cfg: torch.cat([sample_mod.generate(text, unet, full, prompts[b:b + 50], sample_steps,
                                                   seed + b // 50, RES, RES, guidance=cfg, decode=False)
                               for b in range(0, len(prompts), 50)]) for cfg in (guidance, 0.0)}
        m = min(n, len(pixels))  # held-in images: the tiny VAE's own training set, as the full VAE's
        recon = torch.cat([full.encode_latents(x, 64) for x in pixels[:m].split(256)])
    rows = []
    for what, lat, texts in (("reconstruction", recon, captions[:m]),
                             (f"teacher{sample_steps} cfg{guidance:g}", gen[guidance], prompts),
                             (f"teacher{sample_steps} no cfg", gen[0.0], prompts)):
        imgs = {name: to_pil(_decoded(model, lat)) for name, model in (("full", full), ("tiny", tiny))}
        feats = {name: judge.features_of(to_tensor(v)) for name, v in imgs.items()}
        for name in ("full", "tiny"):
            r = judge.measure(imgs[name], texts, imgs["full"] if name == "tiny" else None)
            r = {"latents": what, "latent_std": float(lat.std()), "decoder": name, "images": len(texts), **r,
                 "fd_vs_full": fd_of(feats[name], feats["full"]) if name == "tiny" else 0.0}
            rows.append(r)
            print("tiny-vae: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in r.items()))
    flops = {}
    from torch.utils.flop_counter import FlopCounterMode
    for name, model in (("full", full), ("tiny", tiny)):
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model.decode_latents(torch.zeros(1, 4, RES // 8, RES // 8))
        flops[name] = fc.get_total_flops()
    result = {"rows": rows, "decoder_flops_64px": flops, "train_s": train_s, "steps": steps,
              "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(tiny.config).items()}}
    write_json(folder / "results.json", result)
    cols = ["latents", "latent_std", "decoder", "fd", "fd_vs_full", "acc_all", "sharpness", "psnr_vs_teacher"]
    md = ["| " + " | ".join(c if c != "psnr_vs_teacher" else "psnr vs full" for c in cols) + " |",
          "|" + "---|" * len(cols)]
    for r in rows:
        md.append("| " + " | ".join("-" if r.get(c) is None else f"{r[c]:.3g}" if isinstance(r[c], float)
                                    else str(r[c]) for c in cols) + " |")
    md.append(f"\nDecoder FLOPs per 64 px image: full {flops['full'] / 1e6:.0f} M, tiny "
              f"{flops['tiny'] / 1e6:.0f} M ({flops['tiny'] / flops['full']:.2f}x); tiny VAE trained {steps} "
              f"steps ({train_s:.0f} s).")
    files.atomic_write(folder / "results.md", lambda tmp: tmp.write_text("\n".join(md) + "\n"))
    return rows


if __name__ == "__main__":
    main()
