"""The toy world: a tiny SDXL-shaped base trained from scratch on a procedural captioned data set, on a CPU.

    python -m tools.toy --out toy          # toy/data (captioned 32 px images), toy/base (a diffusers SDXL
                                           # folder), toy/classifier (the toy's "Inception"); 21 min on 2 CPUs
    python -m tools.toy --out toy --quick  # a smaller base in ~7 minutes on one thread (the tests')
    python -m tools.toy all --out toy --seeds 3  # the whole experiment: base, every stage and the ablations
                                           # with train.py (the claims' rows with 3 training seeds),
                                           # tools/eval.py, the claims table and the grid (docs/toy.md)
    python -m tools.toy tiny-vae --out toy # a tiny preview VAE for the base (toy/tiny_vae, sample.py --vae)
                                           # and its quality against the full decoder (results.md)

Every other file uses the base unchanged: `sample.py --base toy/base --unet base --steps 32 --guidance 6
--width 32 --height 32`, `train.py --base toy/base --data toy/data --resolution 32 --min-size 32 ...`, and
diffusers' StableDiffusionXLPipeline.from_pretrained("toy/base") samples the same images.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

import files
import lightning_min as lm
from tools.toy_world import FACTOR, QUICK, RES, ToyConfig, build, write_json

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
    p.add_argument("--images", type=int, default=None,
                   help=f"data set size (default {ToyConfig.images}, --quick {QUICK.images})")
    p.add_argument("--unet-steps", type=int, default=None,
                   help=f"teacher training steps (default {ToyConfig.unet_steps}, --quick {QUICK.unet_steps})")
    p.add_argument("--vae-steps", type=int, default=None,
                   help=f"VAE training steps (default {ToyConfig.vae_steps}, --quick {QUICK.vae_steps})")
    p.add_argument("--clf-steps", type=int, default=None,
                   help=f"classifier training steps (default {ToyConfig.clf_steps}, --quick {QUICK.clf_steps})")
    p.add_argument("--offset-noise", type=float, default=None,
                   help=f"teacher: offset noise std (default {ToyConfig.offset_noise}, --quick "
                   f"{QUICK.offset_noise}: without it the quick base's backgrounds follow the noise, docs/toy.md)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--phase-steps", type=int, default=120, help="all: train.py --max-steps of every phase")
    p.add_argument("--batch", type=int, default=16, help="all: train.py --batch-size (one micro-batch)")
    p.add_argument("--seeds", type=int, default=1, help="all: training seeds; seeds 1.. re-run the stages "
                   f"{', '.join(SEEDED)} and their ablations from seed 0's 8-step model (mean and spread in "
                   "the claims table)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = ToyConfig(**{**asdict(QUICK if args.quick else ToyConfig()), "seed": args.seed})
    if args.images is not None:
        cfg.images = args.images
    for name in ("unet_steps", "vae_steps", "clf_steps"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.offset_noise is not None:
        if not (math.isfinite(args.offset_noise) and args.offset_noise >= 0):
            raise SystemExit(f"error: --offset-noise must be a number >= 0, got {args.offset_noise}")
        cfg.offset_noise = args.offset_noise
    if cfg.images < 64 or min(cfg.unet_steps, cfg.vae_steps, cfg.clf_steps, args.phase_steps, args.batch,
                              args.seeds) < 1:
        raise SystemExit("error: --images must be >= 64 and --unet-steps, --vae-steps, --clf-steps, "
                         f"--phase-steps, --batch, --seeds >= 1; got {cfg.images}, {cfg.unet_steps}, "
                         f"{cfg.vae_steps}, {cfg.clf_steps}, {args.phase_steps}, {args.batch}, {args.seeds}")
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


# The method: every phase of every stage, in order, each its own `train.py --phase` run so each gets its
# learning rate. The paper's rates (1e-6 LoRA, 5e-7 whole UNet) move a tiny model nowhere in a few hundred
# steps, so the toy uses larger ones; what else differs from the paper is only the scale (batch, steps).
PLAN = [("128to32", "mse"), ("32to8", "cond"), ("32to8", "uncond"), ("32to8", "full"), ("8to4", "cond"),
        ("8to4", "uncond"), ("8to4", "full"), ("4to2", "cond"), ("4to2", "uncond"), ("4to2", "full"),
        ("2to1", "convert"), ("2to1", "cond"), ("2to1", "uncond")]
SEEDED = ("8to4", "4to2", "2to1")  # the stages that other training seeds re-run (from seed 0's 8-step model)
TOY_LR = {"mse": 1e-4, "convert": 1e-4, "lora": 1e-4, "whole": 2e-5}
# 2to1 uncond, the 1-step student's last phase: its D (cond's backbone, half its head) barely separated at the
# student's rate (d_gap 0.013 after 300 steps) and the student ended at acc_all 0.37, below the teacher at 4
# steps. Seed 0, from the same cond model, acc_all / FD: D at 10x 0.40 / 12.0; with the student at 3x too
# 0.41 / 13.3 at 300 steps, 0.52 / 7.0 at 600 (docs/toy.md). The student's rate, the D's, the phase's steps:
# train.py's --lr, --lr-disc, --max-steps, nothing else.
ONE_STEP_UNCOND = {"lr": 6e-5, "lr_disc": 2e-4, "steps": 5}  # steps: times --phase-steps


def phase_lr(stage, phase):
    """train.py --lr of a phase."""
    spec = lm.phase_spec(stage, phase)
    if (stage, phase) == ("2to1", "uncond"):
        return ONE_STEP_UNCOND["lr"]
    return TOY_LR[phase] if phase in ("mse", "convert") else TOY_LR["lora" if spec.lora else "whole"]


def phase_lr_disc(stage, phase):
    """train.py --lr-disc of a phase; None: --lr (the paper's one rate)."""
    return ONE_STEP_UNCOND["lr_disc"] if (stage, phase) == ("2to1", "uncond") else None


def phase_budget(stage, phase, steps):
    """(train.py --max-steps, --disc-warmup) of a phase, from --phase-steps S. Adversarial phases: S steps; a
    stage's first one (cond: a fresh discriminator) trains the discriminator alone for the first S/2
    (train.py --disc-warmup), so the student's first updates come from a discriminator that separates:
    without it, Adam with beta1 = 0 turns the near-zero gradients of a D at chance into full-size steps in
    random directions (docs/toy.md). uncond and full carry a trained discriminator on: no warm-up (with one,
    they made the 8- and 4-step students worse, FD 1.27 -> 5.43 at 8 steps). 2to1, where the one-step
    student has the most to learn: convert 8 S (its target at t = T amplifies eps errors 14.6x: at S it stayed
    far from the eps model's own one-step x0), cond 2.5 S (S * 5/6 of them D alone), uncond 5 S
    (ONE_STEP_UNCOND). An MSE-only ablation gets the steps of the adversarial phases it replaces (4to2: cond +
    uncond + full; 2to1: cond + uncond)."""
    spec = lm.phase_spec(stage, phase)
    fresh_d = spec.loss == "adversarial" and spec.carry_disc is None
    if stage == "2to1" and phase == "convert":
        return 8 * steps, 0
    if (stage, phase) == ("2to1", "uncond"):
        return ONE_STEP_UNCOND["steps"] * steps, 0
    if stage == "2to1" and spec.loss == "adversarial":
        return round(2.5 * steps), (round(steps * 5 / 6) if fresh_d else 0)
    if phase == "mse" and stage != "128to32":
        return sum(phase_budget(stage, p, steps)[0] for p in lm.STAGES[stage].phases if p != "convert"), 0
    return steps, (steps // 2 if fresh_d else 0)


def checkpoint(out, folder, stage, phase):
    return str(Path(out) / folder / stage / phase / "checkpoint.pt")


def runs_folder(seed, what=""):
    """runs/ holds seed 0's method, runs-seed1/ seed 1's; an ablation adds its name: runs-eps, runs-seed1-eps."""
    return "runs" + (f"-seed{seed}" if seed else "") + (f"-{what}" if what else "")


def seed_plan(out, seed):
    """One training seed's train.py runs, in order, as (folder, stage, phase, extra arguments). Seed 0 runs
    every stage; other seeds re-run SEEDED, the first from seed 0's 8-step model. Then the ablations that
    decide the paper's claims, each from the same models as the method's phase it is compared with:
    MSE-only distillation at 2 and 1 step(s) (Sec. 3.1-3.2: 4to2 from the same 4-step teacher; 2to1 from the
    same converted x0 student), the 1-step student without the x0 switch (Sec. 3.7.3) and without re-noising
    the discriminator's input (Sec. 3.7.2)."""
    runs = runs_folder(seed)
    ck = lambda stage, phase, folder=runs: checkpoint(out, folder, stage, phase)
    eight = ck("32to8", "full", runs_folder(0))  # seed 0's 8-step model: where other seeds start

    def given(stage, phase):  # what train.py cannot find in another seed's folder: the 8-step model
        if seed and stage == "8to4":
            return ["--teacher", eight]
        if seed and stage == "4to2" and phase in ("uncond", "full"):
            return ["--skip-level-teacher", eight]
        return []
    method = [(runs, stage, phase, given(stage, phase)) for stage, phase in PLAN if seed == 0 or stage in SEEDED]
    teachers = lambda phase: ["--teacher", ck("4to2", "full")] + \
        (["--skip-level-teacher", ck("8to4", "full")] if phase == "uncond" else [])
    ablations = [(runs, "4to2", "mse", []), (runs, "2to1", "mse", []),
                 (runs_folder(seed, "eps"), "2to1", "cond", ["--prediction", "epsilon", *teachers("cond")]),
                 (runs_folder(seed, "eps"), "2to1", "uncond", ["--prediction", "epsilon", *teachers("uncond")]),
                 (runs_folder(seed, "norenoise"), "2to1", "cond",
                  ["--renoise", "off", "--init", ck("2to1", "convert"), *teachers("cond")]),
                 (runs_folder(seed, "norenoise"), "2to1", "uncond", ["--renoise", "off", *teachers("uncond")])]
    return method + ablations


def full_plan(out, steps, seeds=1):
    """Every train.py run of `toy.py all`, in order, as (folder, stage, phase, max steps, extra arguments,
    training seed): seed 0's plan, then each further seed's."""
    return [(f, stage, phase, steps, extra, seed) for seed in range(seeds)
            for f, stage, phase, extra in seed_plan(out, seed)]


def train_command(out, stage, phase, steps, batch, seed=0, folder="runs", extra=()):
    """The user's command for one phase of the toy experiment, `steps` = --phase-steps (phase_budget; 1 rank;
    --save-every = --max-steps)."""
    max_steps, warmup = phase_budget(stage, phase, steps)
    return [sys.executable, str(ROOT / "train.py"), "--stage", stage, "--phase", phase, "--base",
            str(Path(out) / "base"),
            "--data", str(Path(out) / "data"), "--out", str(Path(out) / folder), "--resolution", str(RES),
            "--min-size", str(RES), "--sharpness",
            "0",  # flat-colour shapes score below the photo default (100)
            "--batch-size", str(batch), "--micro-batch-size", str(batch),
            "--max-steps", str(max_steps), "--save-every", str(max_steps), "--lr", str(phase_lr(stage, phase)),
            *(["--lr-disc", str(phase_lr_disc(stage, phase))] if phase_lr_disc(stage, phase) else []),
            *(["--disc-warmup", str(warmup)] if warmup else []), "--seed", str(seed), "--device", "cpu", *extra]


def unet_file(out, stage, phase, folder="runs", prediction=None):
    """The phase's exported UNet, named as train.py names it."""
    name = files.unet_filename(lm.STAGES[stage].student_steps, prediction)
    return Path(out) / folder / stage / phase / name


# The students' eval rows: (row name, stage, phase, steps, ablation, prediction); another seed's rows add
# "-seed{N}" to the name. The reference rows (data, recon) and the teacher rows come once.
STUDENT_ROWS = [("mse32", "128to32", "mse", 32, "", "epsilon"),
                ("lightning8", "32to8", "full", 8, "", "epsilon"),
                ("lightning4-lora", "8to4", "uncond", 4, "", "epsilon"),
                ("lightning4", "8to4", "full", 4, "", "epsilon"),
                ("lightning2-cond", "4to2", "cond", 2, "", "epsilon"),
                ("lightning2-uncond", "4to2", "uncond", 2, "", "epsilon"),
                ("lightning2", "4to2", "full", 2, "", "epsilon"),
                ("mse2", "4to2", "mse", 2, "", "epsilon"),
                ("convert1", "2to1", "convert", 1, "", "sample"),
                ("lightning1-cond", "2to1", "cond", 1, "", "sample"),
                ("lightning1", "2to1", "uncond", 1, "", "sample"),
                ("mse1", "2to1", "mse", 1, "", "sample"),
                ("lightning1-eps", "2to1", "uncond", 1, "eps", "epsilon"),
                ("lightning1-no-renoise", "2to1", "uncond", 1, "norenoise", "sample")]
TEACHER_STEPS = (32, 8, 4, 2, 1)


def row_name(name, seed):
    return name + (f"-seed{seed}" if seed else "")


def eval_rows(out, seeds=1):
    """tools/eval.py's --row specs: the teacher at 32, 8, 4, 2, 1 steps with CFG 6 and without (as the
    students sample), then every student of every seed whose export exists."""
    rows = [f"teacher{n}:base:{n}:6" for n in TEACHER_STEPS] + [f"teacher{n}-nocfg:base:{n}" for n in TEACHER_STEPS]
    for seed in range(seeds):
        for name, stage, phase, n, what, pred in STUDENT_ROWS:
            f = unet_file(out, stage, phase, runs_folder(seed, what), "epsilon" if what == "eps" else None)
            if f.exists():
                rows.append(f"{row_name(name, seed)}:{f}:{n}:0:{pred}")
    return rows


# The paper's claims the toy decides: (claim, row a, row b); a is claimed better than b. Teacher rows have one
# value (no training seed); student rows one per seed.
CLAIMS = [("adversarial beats MSE-only distillation at 2 steps (Sec. 3.1-3.2)", "lightning2", "mse2"),
          ("adversarial beats MSE-only distillation at 1 step (Sec. 3.1-3.2)", "lightning1", "mse1"),
          ("conditional + unconditional beats conditional only, 2 steps (Sec. 3.4)", "lightning2-uncond",
           "lightning2-cond"),
          ("conditional + unconditional beats conditional only, 1 step (Sec. 3.4)", "lightning1",
           "lightning1-cond"),
          ("the x0 switch beats epsilon at 1 step (Sec. 3.7.3)", "lightning1", "lightning1-eps"),
          ("re-noising the discriminator's input helps at 1 step (Sec. 3.7.2)", "lightning1",
           "lightning1-no-renoise"),
          ("the whole UNet beats its LoRA at 4 steps (Sec. 3.6)", "lightning4", "lightning4-lora")] + \
    [(f"the student beats the teacher at {n} step{'s' * (n > 1)} {how}", f"lightning{n}", f"teacher{n}{sfx}")
     for n in (4, 2, 1) for how, sfx in (("with CFG 6", ""), ("without CFG", "-nocfg"))]
CLAIM_METRICS = (("fd", -1), ("acc_all", 1))  # (column, +1 if higher is better)


def seed_values(results, name, column):
    """A row's values over the training seeds (name, name-seed1, ...) that were evaluated."""
    by_name = {r["row"]: r for r in results}
    vals, seed = [], 0
    while row_name(name, seed) in by_name:
        vals.append(by_name[row_name(name, seed)][column])
        seed += 1
    return vals


def verdict(a, b, better):
    """holds: every seed's a is better than every seed's b; fails: every one worse; not decided: the ranges
    over the seeds overlap (the spread covers the gap). better: +1 if higher is better, -1 if lower."""
    if not a or not b or None in a or None in b:
        return "-"
    lo_a, hi_a, lo_b, hi_b = min(a), max(a), min(b), max(b)
    if (better > 0 and lo_a > hi_b) or (better < 0 and hi_a < lo_b):
        return "holds"
    if (better > 0 and hi_a < lo_b) or (better < 0 and lo_a > hi_b):
        return "fails"
    return "not decided"


DECIMALS = {"fd": 2, "sharpness": 2, "diversity": 2}  # the rest (accuracies): 3


def spread(vals, column="fd"):
    """mean +- standard deviation over seeds (one value: the value), at the column's decimals."""
    d = DECIMALS.get(column, 3)
    if len(vals) == 1:
        return f"{vals[0]:.{d}f}"
    return f"{np.mean(vals):.{d}f} +- {np.std(vals, ddof=1):.{d}f}"


def claims_table(results):
    """The claims, each with both rows' fd and acc_all (mean +- sd over seeds) and a verdict per metric."""
    head = "| claim | a | b | " + " | ".join(f"{m} a | {m} b | {m}" for m, _ in CLAIM_METRICS) + " |"
    lines = [head, "|" + "---|" * (3 + 3 * 2)]
    out = []
    for text, a, b in CLAIMS:
        cells, rec = [text, a, b], {"claim": text, "a": a, "b": b}
        for m, better in CLAIM_METRICS:
            va, vb = seed_values(results, a, m), seed_values(results, b, m)
            v = verdict(va, vb, better)
            cells += [spread(va, m) if va else "-", spread(vb, m) if vb else "-", v]
            rec[m] = {"a": va, "b": vb, "verdict": v}
        lines.append("| " + " | ".join(cells) + " |")
        out.append(rec)
    return "\n".join(lines) + "\n", out


SUMMARY_COLUMNS = ("fd", "acc_all", "acc_shape", "acc_colour", "acc_position", "acc_background", "sharpness",
                   "diversity")


def summary_table(results):
    """Every row once, its training seeds folded into mean +- sd (n seeds): the table the README shows."""
    names = [r["row"] for r in results if "-seed" not in r["row"]]
    by_name = {r["row"]: r for r in results}
    lines = ["| row | steps | CFG | seeds | " + " | ".join(SUMMARY_COLUMNS) + " |",
             "|" + "---|" * (4 + len(SUMMARY_COLUMNS))]
    for name in names:
        r = by_name[name]
        cells = [name, "-" if r["steps"] is None else str(r["steps"]), "-" if not r["guidance"] else
                 f"{r['guidance']:g}", str(len(seed_values(results, name, "fd")))]
        for c in SUMMARY_COLUMNS:
            vals = seed_values(results, name, c)
            cells.append("-" if None in vals else spread(vals, c))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def disc_table(out, plan, steps):
    """D(real) - D(fake) (sigmoid units, log.jsonl's d_gap and d_gap_t{t}) of every adversarial phase of the
    method, the mean over seeds of the mean over 20 steps: the last 20 of the warm-up (the discriminator
    alone: can it separate?), overall and per student timestep, and the last 20 of the phase (the game: does
    the student keep up?)."""
    gaps = {}
    for folder, stage, phase, _, extra, seed in plan:
        log = Path(out) / folder / stage / phase / "log.jsonl"
        if folder != runs_folder(seed) or not log.exists() or \
                lm.phase_spec(stage, phase).loss != "adversarial":
            continue
        rows = [json.loads(x) for x in log.read_text().splitlines()]
        warm = phase_budget(stage, phase, steps)[1]
        end_warm = [r for r in rows if warm - 20 < r["step"] <= warm]
        per_t = {t: np.mean([r[f"d_gap_t{t}"] for r in end_warm if f"d_gap_t{t}" in r])
                 for t in lm.phase_spec(stage, phase).timesteps if any(f"d_gap_t{t}" in r for r in end_warm)}
        gaps.setdefault((stage, phase), []).append(
            (np.mean([r["d_gap"] for r in end_warm]) if end_warm else None, per_t,
             np.mean([r["d_gap"] for r in rows[-20:]])))
    lines = ["| phase | seeds | D alone, end of warm-up | per student timestep | last 20 steps |",
             "|---|---|---|---|---|"]
    for (stage, phase), v in gaps.items():
        w = [a for a, _, _ in v if a is not None]
        ts = sorted({t for _, p, _ in v for t in p}, reverse=True)
        per_t = ", ".join(f"{t}: {np.mean([p[t] for _, p, _ in v if t in p]):.3f}" for t in ts) or "-"
        lines.append(f"| {stage} {phase} | {len(v)} | {f'{np.mean(w):.3f}' if w else '-'} | {per_t} | "
                     f"{np.mean([c for _, _, c in v]):.3f} |")
    return "\n".join(lines) + "\n"


GRID_ROWS = ["data", "teacher32", "teacher4", "teacher1", "lightning8", "lightning4", "lightning2", "lightning1",
             "mse2", "mse1"]


def grid(eval_dir, path, rows=GRID_ROWS, columns=10, every=23, scale=2):
    """One PNG: a labelled row per eval row (those present), the same prompts and noise in each column, each
    image `scale` times its size (nearest)."""
    from PIL import ImageFont
    eval_dir, size = Path(eval_dir), RES * scale
    rows = [r for r in rows if (eval_dir / r).is_dir()]
    label_w = 6 * max(len(r) for r in rows) + 8
    img = Image.new("RGB", (label_w + size * columns, size * len(rows)), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for y, r in enumerate(rows):
        d.text((4, y * size + size // 2 - 5), r, fill=(0, 0, 0), font=ImageFont.load_default())
        for x in range(columns):
            im = Image.open(eval_dir / r / f"{x * every:05d}.png").resize((size, size), Image.Resampling.NEAREST)
            img.paste(im, (label_w + x * size, y * size))
    files.atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))
    return rows


def experiment(out, args):
    """Every run of full_plan through train.py (finished ones skipped), then tools/eval.py on every row,
    the claims table and the grid. Wall times to OUT/runs/times.json; OUT/eval/claims.md, grid.png."""
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    tfile = out / "runs" / "times.json"
    times = json.loads(tfile.read_text()) if tfile.exists() else {}
    plan = full_plan(out, args.phase_steps, args.seeds)
    # the tools package, wherever this is run from
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for k, (folder, stage, phase, steps, extra, seed) in enumerate(plan):
        pred = extra[extra.index("--prediction") + 1] if "--prediction" in extra else None
        if unet_file(out, stage, phase, folder, pred).exists():
            continue
        cmd = train_command(out, stage, phase, steps, args.batch, seed, folder, extra)
        print(f"toy.py: run {k + 1}/{len(plan)}:", " ".join(cmd[1:]), flush=True)
        t0 = time.time()
        r = subprocess.run(cmd, env=env)
        if r.returncode:
            raise ValueError(f"train.py failed on {folder}/{stage}/{phase} (exit {r.returncode}); fix and "
                             f"re-run to resume")
        times[f"{folder}/{stage}/{phase}"] = time.time() - t0
        write_json(tfile, times)
    cmd = [sys.executable, "-m", "tools.eval", "--toy", str(out), "--out", str(out / "eval"),
           "--device", "cpu", "--reference", "--batch", "50"]
    for row in eval_rows(out, args.seeds):
        cmd += ["--row", row]
    print("toy.py:", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    if subprocess.run(cmd, env=env).returncode:
        raise ValueError("tools/eval.py failed")
    times["eval"] = time.time() - t0
    write_json(tfile, times)
    results = json.loads((out / "eval" / "results.json").read_text())["rows"]
    md, recs = claims_table(results)
    md = summary_table(results) + "\n" + md + "\n" + disc_table(out, plan, args.phase_steps)
    write_json(out / "eval" / "claims.json", recs)
    files.atomic_write(out / "eval" / "claims.md", lambda tmp: tmp.write_text(md))
    grid(out / "eval", out / "eval" / "grid.png")
    print(md)
    print(f"toy.py: {out / 'eval' / 'results.md'} (every row), {out / 'eval' / 'claims.md'} (the seeds folded, "
          f"the claims), {out / 'eval' / 'grid.png'}; wall times in {tfile}")


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
            model.decode_latents(torch.zeros(1, 4, RES // FACTOR, RES // FACTOR))
        flops[name] = fc.get_total_flops()
    result = {"rows": rows, "decoder_flops_per_image": flops, "train_s": train_s, "steps": steps,
              "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(tiny.config).items()}}
    write_json(folder / "results.json", result)
    cols = ["latents", "latent_std", "decoder", "fd", "fd_vs_full", "acc_all", "sharpness", "psnr_vs_teacher"]
    md = ["| " + " | ".join(c if c != "psnr_vs_teacher" else "psnr vs full" for c in cols) + " |",
          "|" + "---|" * len(cols)]
    for r in rows:
        md.append("| " + " | ".join("-" if r.get(c) is None else f"{r[c]:.3g}" if isinstance(r[c], float)
                                    else str(r[c]) for c in cols) + " |")
    md.append(f"\nDecoder FLOPs per {RES} px image: full {flops['full'] / 1e6:.0f} M, tiny "
              f"{flops['tiny'] / 1e6:.0f} M ({flops['tiny'] / flops['full']:.2f}x); tiny VAE trained {steps} "
              f"steps ({train_s:.0f} s).")
    files.atomic_write(folder / "results.md", lambda tmp: tmp.write_text("\n".join(md) + "\n"))
    return rows


if __name__ == "__main__":
    main()
