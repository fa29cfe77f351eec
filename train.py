"""Progressive adversarial distillation (SDXL-Lightning, Sec. 3): every stage and phase, one file.

    python train.py --stage 8to4 --data images/ --batch-size 8 --micro-batch-size 1      # one GPU or CPU
    torchrun --nproc_per_node 8 train.py --stage 2to1 --data shards/ --batch-size 512 --micro-batch-size 4
    torchrun --nproc_per_node 8 train.py --stage 2to1 --data cache/ --shard fsdp --compile --tensorboard tb/
    torchrun --nnodes 8 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        train.py --stage 4to2 --data shards/ --batch-size 512 --micro-batch-size 8      # the paper's 64 GPUs
    for s in 128to32 32to8 8to4 4to2 2to1; do torchrun --nproc_per_node 8 train.py --stage $s --data d/; done

Without --phase a stage runs its phases in order (lightning_min.PHASE_TABLE), each starting from the
previous one's fp32 checkpoint as the table's hand-off columns say. Re-running the same command resumes
from the last checkpoint; finished phases are skipped; a larger --max-steps continues a finished phase.
Outputs per phase in OUT/<stage>/<phase>/: sdxl_lightning_{N}step_unet.safetensors (1 step:
..._1step_unet_x0), in LoRA phases also two fp16 kohya LoRAs: sdxl_lightning_{N}step_lora.safetensors (the
release name: relative to --base, to fuse into SDXL base or a fine-tune; a truncated SVD of student minus
base, its error in phase.json) and ..._{N}step_lora_on_init.safetensors (the LoRA as trained, on top of the
phase's init, e.g. the 8-step model), checkpoint.pt (fp32, what the next phase and the next stage start
from), progress.json, phase.json, log.jsonl and sample grids.

Read top to bottom: the config (the command line), what every phase shares, the models of a phase, the
data of a step, one step, one phase (the loop: log, save, sample grid), main. The update on one batch is
lightning_min's; the distributed side (DDP, ZeRO, FSDP2, compile, the NaN vote) is parallel.py; the run
folder (atomic writes, the lock, checkpoints, exports, resume checks) is files.py.
"""
import argparse
import importlib
import json
import math
import os
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

import data
import files
import lightning_min as lm
import lora
import parallel
import text as text_mod
import unet as unet_lib
import weights
from discriminator import Discriminator, unconditional_from

SAMPLE_PROMPTS = ["a photo of a cat wearing a spacesuit", "a watercolor painting of a lighthouse at dawn",
                  "portrait of an old fisherman, dramatic light", "a bowl of ramen, studio photograph"]
# what stops a run with one line, 'error: ...' (every rank, when rank 0 meets it in parallel.on_master)
ERRORS = (files.RunError, weights.CheckpointError, ValueError, RuntimeError, OSError)

# --- Config: the command line, checked before any work ------------------------------------------------------

# A resume may change these (the rest must match the checkpoint's run, or it is refused naming the flag):
# the step target and the bookkeeping, the micro-batch and rank count (the global batch and its draws do
# not depend on them), --lr and --lr-disc (applied from the resumed step on) and the re-noise switch step.
RESUME_MAY_CHANGE = {"max_steps", "save_every", "sample_every", "grad_checkpointing", "vae_slice",
                     "max_bad_steps", "device", "micro_batch_size", "lr", "renoise_switch_step", "phase",
                     "out", "shard", "compile", "tensorboard", "lr_disc"}
PLANNED = {"init", "teacher", "skip_level_teacher"}  # may be spelled otherwise if they name the same UNets


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("stage and phase")
    g.add_argument("--stage", required=True, choices=list(lm.STAGES), help="the distillation stage (Sec. 3.6)")
    g.add_argument("--phase", choices=["mse", "convert", "cond", "uncond", "full"], help="one phase only; "
                   "default: the stage's phases in order; mse outside 128to32: the MSE-only ablation (3.2)")
    g.add_argument("--prediction", choices=list(lm.PREDICTIONS), help="2to1 only: the 1-step student's "
                   "output; default sample (x0, Sec. 3.7.3); epsilon: no x0 switch (no convert phase)")
    g = p.add_argument_group("models")
    g.add_argument("--base", default=weights.SDXL_BASE, help="SDXL base: text encoders, VAE, UNet config, D's "
                   "init and the 128to32 teacher (hub id, diffusers folder or single file)")
    g.add_argument("--teacher", help="teacher UNet; default: this --out's earlier stage (its fp32 "
                   "checkpoint), else the official Lightning UNet (8/4/2 steps), else the base (128 steps)")
    g.add_argument("--skip-level-teacher", help="teacher of 4to2's and 2to1's uncond/full (Sec. 3.4)")
    g.add_argument("--init", help="the student's UNet at the stage's first phase; default the teacher")
    g.add_argument("--teacher-guidance", type=float, help="the teacher's CFG scale (zero uncond); default the "
                   "stage's: 6 in 128to32, off later (their teachers, earlier students, have it distilled "
                   "in). Set it when a later stage's teacher is a base model (<= 1: off; not in convert)")
    g.add_argument("--lora-rank", type=int, default=64, help="LoRA rank (released: 64)")
    g.add_argument("--lora-alpha", type=float, default=8.0, help="LoRA alpha (released: 8)")
    g = p.add_argument_group("data (filters: Sec. 3.6)")
    g.add_argument("--data", required=True, help="a folder of images with same-stem .txt captions, .tar "
                   "shards, or a prepare.py cache (no VAE or text encoder is then loaded)")
    g.add_argument("--resolution", type=int, default=1024, help="square training resolution in pixels")
    g.add_argument("--buckets", action="store_true", help="SDXL's aspect-ratio buckets of about "
                   "--resolution squared pixels (data.SDXL_BUCKETS): each image cropped in the nearest, every "
                   "step's batch from one bucket (a cache: made with prepare.py --buckets)")
    g.add_argument("--min-size", type=int, default=1024, help="skip images with a shorter side below this")
    g.add_argument("--sharpness", type=float, default=data.DEFAULT_SHARPNESS, help="skip images whose "
                   "Laplacian variance at the training crop is below this; 0 off")
    g.add_argument("--min-aesthetic", type=float, default=0.0, help="skip samples whose .json aesthetic "
                   "score is below this or missing (5.5 for LAION); 0 off")
    g.add_argument("--aesthetic-key", help=f"the .json key of that score; default: the first of "
                   f"{', '.join(data.AESTHETIC_KEYS)}")
    g.add_argument("--clean-captions", action="store_true", help="remove URLs, decode HTML entities, "
                   "collapse whitespace")
    g.add_argument("--seed", type=int, default=0, help="seed of data order, noise and timesteps")
    g = p.add_argument_group("batch and optimizer")
    g.add_argument("--batch-size", type=int, default=512, help="global batch (paper: 512), by accumulation")
    g.add_argument("--micro-batch-size", type=int, default=1, help="samples per GPU per forward")
    g.add_argument("--max-steps", type=int, default=1000, help="optimizer steps per phase (re-run to extend)")
    g.add_argument("--lr", type=float, help="learning rate; default the paper's for the phase")
    g.add_argument("--lr-disc", type=float, help="the discriminator's learning rate; default --lr (the paper: "
                   "one rate for both). A much higher one can stop a fresh D from separating at all, "
                   "and help a carried one (uncond after cond) that barely separates (docs/training.md); "
                   "where d_gap in log.jsonl stays near 0, try --disc-warmup first")
    g.add_argument("--disc-warmup", type=int, default=0, help="adversarial phases: the first N steps of a "
                   "phase train the discriminator only (the student stays as it is): its first updates then "
                   "come from a D that separates; = --max-steps asks whether D can separate at all. Counted "
                   "in --max-steps; 0 (the paper) off")
    g.add_argument("--max-bad-steps", type=int, default=20, help="stop after this many NaN/Inf steps in a row")
    g = p.add_argument_group("re-noising (Sec. 3.7.2)")
    g.add_argument("--renoise", choices=["on", "off"], help="noise clean targets again before the "
                   "discriminator; default on in 4to2 and 2to1 (lightning_min.PHASE_TABLE)")
    g.add_argument("--renoise-weights-late", default="5,1,1,1", help="weights of t* in {10,250,500,750} from "
                   "--renoise-switch-step on (1,1,1,1 before)")
    g.add_argument("--renoise-switch-step", type=int, help="step from which the late weights apply ('after "
                   "the model is trained stable'); default half the phase's --max-steps")
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--out", default="runs", help="output folder; OUT/<stage>/<phase>/ per phase")
    g.add_argument("--save-every", type=int, default=500, help="checkpoint and export every N steps")
    g.add_argument("--sample-every", type=int, default=0, help="write a sample grid every N steps; 0 off")
    g.add_argument("--tensorboard", metavar="DIR", help="also log to TensorBoard in DIR: every number of "
                   "log.jsonl, sample grids (needs `pip install tensorboard`; log.jsonl stays the record)")
    g = p.add_argument_group("distributed and performance")
    g.add_argument("--device", help="cuda or cpu; default cuda when available")
    g.add_argument("--shard", choices=["zero", "fsdp"], default="zero", help="how ranks split the models: "
                   "zero = DDP + ZeroRedundancyOptimizer (whole-UNet Adam states); fsdp = FSDP2 "
                   "(parallel.py): weights, gradients and Adam states. Same checkpoint.pt either way")
    g.add_argument("--compile", action="store_true", help="torch.compile the UNet blocks (slow first steps; "
                   "same results to float tolerance)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    g.add_argument("--vae-slice", type=int, default=4, help="images per VAE encode call (memory)")
    return p.parse_args(argv)


def check_args(args, world):
    """Every argument, before any work and without writing anything.
    -> the phases to run, and the late re-noise weights as a tuple of 4 floats (parsed here only)."""
    for flag in ("batch_size", "micro_batch_size", "save_every", "max_steps", "vae_slice", "max_bad_steps",
                 "lora_rank", "resolution"):
        if getattr(args, flag) < 1:
            raise files.RunError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.sample_every < 0 or args.disc_warmup < 0 or \
            (args.renoise_switch_step is not None and args.renoise_switch_step < 0):
        raise files.RunError("--sample-every, --disc-warmup and --renoise-switch-step must be >= 0")
    for flag in ("lr", "lr_disc"):
        v = getattr(args, flag)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise files.RunError(f"--{flag.replace('_', '-')} must be a positive number, got {v}")
    if args.teacher_guidance is not None and not (math.isfinite(args.teacher_guidance) and
                                                  args.teacher_guidance >= 0):
        raise files.RunError(f"--teacher-guidance must be a number >= 0, got {args.teacher_guidance}")
    if not (math.isfinite(args.lora_alpha) and args.lora_alpha > 0):
        raise files.RunError(f"--lora-alpha must be a positive number, got {args.lora_alpha}")
    if not 0 <= args.seed < 2 ** 63 - world:  # torch.manual_seed(seed + rank) takes 64 bits
        raise files.RunError(f"--seed must be between 0 and 2**63 - {world + 1}, got {args.seed}")
    if args.device not in (None, "cpu", "cuda"):
        raise files.RunError(f"--device {args.device}: cpu or cuda (each rank takes the GPU of its "
                             f"LOCAL_RANK)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise files.RunError("--device cuda: no GPU is available here (torch.cuda.is_available() is False)")
    try:
        late = tuple(float(x) for x in args.renoise_weights_late.split(","))
    except ValueError:
        late = ()
    if len(late) != 4 or not all(math.isfinite(x) and x >= 0 for x in late) or sum(late) <= 0:
        raise files.RunError(f"--renoise-weights-late must be 4 non-negative numbers, not all 0, like "
                             f"5,1,1,1; got {args.renoise_weights_late!r}")
    if args.batch_size % (args.micro_batch_size * world):
        raise files.RunError(f"--batch-size {args.batch_size} must be a multiple of --micro-batch-size "
                             f"{args.micro_batch_size} x {world} ranks")
    every = lm.stage_phases(args.stage, ablations=True)
    if args.phase is not None and args.phase not in every:
        raise files.RunError(f"stage {args.stage} has no phase {args.phase!r}; its phases: "
                             f"{', '.join(every)}")
    if args.prediction is not None and args.stage != "2to1":
        raise files.RunError(f"--prediction applies to stage 2to1 only (the 1-step student); stage "
                             f"{args.stage} predicts epsilon")
    if args.prediction == "epsilon" and args.phase == "convert":
        raise files.RunError("--phase convert is the switch to x0 itself; --prediction epsilon skips it")
    files.check_writable_folder(args.out)
    if args.tensorboard is not None:
        try:
            importlib.import_module("torch.utils.tensorboard")  # only when asked: it needs the package
        except ImportError:
            raise files.RunError("--tensorboard needs the tensorboard package: pip install tensorboard") \
                from None
        files.check_writable_folder(args.tensorboard)
    return ([args.phase] if args.phase else list(lm.run_order(args.stage, args.prediction))), late


# --- What every phase shares: the ranks, the data, the frozen encoders --------------------------------------


@dataclass
class Run:
    args: argparse.Namespace
    ranks: parallel.Ranks
    renoise_late: tuple  # the --renoise-weights-late weights, parsed by check_args
    data: object  # data.ImageCaptionData or data.CachedData
    unet_config: unet_lib.UNetConfig  # the base's: every UNet of the run has it
    latent_size: int
    base_sd: dict = None  # the base's tensors when --base is a single file
    text: object = None  # text encoders and VAE: None with a cache and no sample grids
    vae: object = None
    base_unet: torch.nn.Module = None  # fp32, CPU: the discriminator's init, loaded once when first needed
    tensorboard: object = None
    dtype: torch.dtype = torch.float32  # the compute dtype: bf16 on GPUs (Sec. 3.6), fp32 on the CPU


def load_frozen(args, ranks, renoise_late):
    """Shared by every phase: TensorBoard, data, text encoders, VAE, the base UNet's config (and weights, for
    a single file)."""
    tensorboard = None
    if args.tensorboard and ranks.master:
        from torch.utils.tensorboard import SummaryWriter
        tensorboard = SummaryWriter(args.tensorboard)
    dev, dtype = ranks.device, torch.bfloat16 if ranks.device.type == "cuda" else torch.float32
    cached = data.is_cache(args.data)
    base_sd = weights.read_safetensors(args.base) if weights.is_file(args.base) else None
    text = vae = None
    if not cached or args.sample_every:  # a cache needs no VAE or text encoder, except for sample grids
        text = weights.load_text(args.base, dev, dtype, sd=base_sd)
        vae = weights.load_vae(args.base, dev, dtype, sd=base_sd).eval().requires_grad_(False)
    unet_config = weights.unet_config(args.base, base_sd)
    # bucket sides: multiples of what the VAE and the UNet's downsamplings divide (32 for SDXL)
    multiple = vae.config.downscale * 2 ** (len(unet_config.block_out_channels) - 1) if vae else None
    ds = data.open_data(args.data, args.resolution, args.min_size, args.sharpness, args.min_aesthetic,
                        args.clean_captions, args.seed, base=args.base, aesthetic_key=args.aesthetic_key,
                        buckets=args.buckets, multiple=multiple, global_batch=args.batch_size)
    latent_size = ds.latent_shape[-1] if cached else args.resolution // vae.config.downscale
    if ranks.master:
        kind = f"cache {args.data} (filters applied when it was made)" if cached else "images"
        if args.buckets:
            counts = Counter(ds.buckets[b] for b in ds.item_bucket.tolist())
            kind += " in buckets " + ", ".join(f"{h}x{w}: {n}" for (h, w), n in sorted(counts.items()))
        print(f"data: {kind}: {len(ds)} usable {ds.stats}; world {ranks.world}; device {dev}")
    return Run(args, ranks, renoise_late, ds, unet_config, latent_size, base_sd, text, vae,
               tensorboard=tensorboard, dtype=dtype)


# --- The models of a phase: where they start from (the hand-offs of lightning_min.PHASE_TABLE), set up ------


def plan_phase(args, stage, phase):
    """Where the phase's student, LoRA, discriminator and teacher start from: the stage's init, or the fp32
    checkpoint of the phase it comes after (spec.after), never the fp16 release files. A LoRA carried on
    (uncond) or merged (full) lives on the base its phase started from, so that base is the init again."""
    st, spec = lm.STAGES[stage], lm.phase_spec(stage, phase, args.prediction)
    prev = files.phase_dir(args.out, stage, spec.after) / "checkpoint.pt" if spec.after else None
    if prev is not None and not prev.exists():
        if args.phase is None:
            raise files.RunError(f"{prev.parent} has no checkpoint")
        prev = None  # a phase run alone without its predecessor starts from the stage's init
    init = args.init or args.teacher or files.default_teacher(args.out, st.teacher_steps)
    plan = {"init": init, "lora_from": None, "disc_from": None}
    if prev is not None:
        ck = files.read_checkpoint(prev, stage, spec.after)
        if spec.carry_lora:
            plan["init"], plan["lora_from"] = ck["init"], str(prev)
        else:
            plan["init"] = str(prev)  # its fp32 whole UNet
        plan["disc_from"] = str(prev) if spec.carry_disc else None
    skip_level = spec.teacher_steps != st.teacher_steps
    plan["teacher"] = (args.skip_level_teacher if skip_level else args.teacher) or \
        files.default_teacher(args.out, spec.teacher_steps)
    return plan


def check_plans(args, phases):
    """Before any work: each phase with a checkpoint resumes on the init and teacher it was trained with."""
    for phase in phases:
        path = files.phase_dir(args.out, args.stage, phase) / "checkpoint.pt"
        if path.exists():
            files.check_resume_plan(path, plan_phase(args, args.stage, phase), args.out)


def load_unet(run, src):
    """fp32 on the CPU, with the base's architecture: "base", a UNet file, or a phase's checkpoint.pt."""
    return files.load_unet(src, run.args.base, run.unet_config, run.base_sd)


@dataclass
class Phase:
    """One phase's settings and the loop's counters (step, bad_total, switch_step go into checkpoint.pt)."""
    stage: str
    name: str
    spec: lm.PhaseSpec
    dir: Path
    lr: float  # --lr or the paper's
    lr_d: float  # the discriminator's: --lr-disc, else lr
    renoise: bool  # --renoise or the table's
    switch_step: int  # from here the late re-noise weights
    step: int = 0
    bad_total: int = 0
    bad_in_row: int = 0
    skipped_images: int = 0
    teacher_evals: int = 0


@dataclass
class PhaseModels:
    plan: dict  # where each part started from (plan_phase)
    student: torch.nn.Module  # fp32 masters; in a LoRA phase its frozen base is the teacher
    teacher: torch.nn.Module  # a frozen copy in the compute dtype, or None: the student with its LoRA off
    disc: Discriminator
    g_model: torch.nn.Module  # the student as the step calls it: DDP-wrapped, sharded in place, or itself
    d_model: torch.nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    n_trainable: int
    fsdp: bool


def renoise_on(args, spec):
    return {"on": True, "off": False}.get(args.renoise, spec.renoise)


def build_phase(run, ph):
    """The phase's student, teacher, discriminator and optimizers (Sec. 3.6), from plan_phase's hand-offs;
    a resumed phase then loads its own checkpoint over them (resume)."""
    args, spec, dev = run.args, ph.spec, run.ranks.device
    plan = plan_phase(args, ph.stage, ph.name)
    resuming = (ph.dir / "checkpoint.pt").exists()  # then the carried LoRA, D and Adam state are not read
    # LoRA and head init, the same on every rank and run: the high 63 bits of data.hash_seed (>> 1), as the
    # per-sample draws take them
    torch.manual_seed(data.hash_seed(args.seed, ph.stage, ph.name, "init") >> 1)
    student = load_unet(run, plan["init"])
    carried = plan["lora_from"] and not resuming
    lora_sd = files.read_checkpoint(plan["lora_from"])["student"] if carried else None
    if spec.lora:
        student.requires_grad_(False)
        lora.add_lora(student, args.lora_rank, args.lora_alpha)
        if lora_sd is not None:  # carry_lora "continue": uncond trains cond's LoRA on
            student.lora.load_state_dict(lora_sd, strict=True)
    elif lora_sd is not None:  # carry_lora "merge": full starts from the LoRA merged into its base in fp32
        lora.merge_lora(student, lora_sd, source=plan["lora_from"])
    student.to(dev, torch.float32)
    student.gradient_checkpointing = args.grad_checkpointing
    # the teacher of a LoRA phase whose teacher is the student's base: the student with LoRA off (no copy)
    teacher = None if spec.lora and plan["teacher"] == plan["init"] else \
        load_unet(run, plan["teacher"]).to(dev, run.dtype).requires_grad_(False).eval()
    disc, disc_opt = None, None
    if spec.discriminator:  # from the pretrained base at the stage's first adversarial phase, then carried
        if run.base_unet is None:
            run.base_unet = load_unet(run, "base")
        disc = Discriminator(run.base_unet, spec.discriminator == "conditional", run.latent_size)
        if plan["disc_from"] and not resuming:
            ck = files.read_checkpoint(plan["disc_from"])
            if spec.carry_disc == "backbone":  # cond -> uncond: the head loses its x_t half, Adam anew
                disc.load_state_dict(unconditional_from(ck["disc"]), strict=True)
            else:  # "whole": uncond -> full, D and its Adam state
                disc.load_state_dict(ck["disc"], strict=True)
                disc_opt = ck["opt_d"]
        disc.to(dev, torch.float32)
        disc.backbone.gradient_checkpointing = args.grad_checkpointing
    n_trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    # Adam per Sec. 3.6, for student and discriminator alike; DDP, ZeRO or FSDP2 and compile: parallel.py
    g_model, d_model, opt_g, opt_d, fsdp = parallel.wrap_phase(
        run.ranks, student, teacher, disc, spec.lora, args.shard, args.compile, lr=ph.lr, betas=spec.betas,
        weight_decay=0.0)
    if disc_opt is not None:
        parallel.load_optim(opt_d, disc, disc_opt)
    return PhaseModels(plan, student, teacher, disc, g_model, d_model, opt_g, opt_d, n_trainable, fsdp)


def open_phase(run, stage, name):
    """A phase ready for its first (or next) step: settings, models, its own checkpoint if any, the lr."""
    args, spec = run.args, lm.phase_spec(stage, name, run.args.prediction)
    if args.teacher_guidance is not None and spec.loss != "convert":  # convert re-expresses its own model
        spec = replace(spec, cfg=args.teacher_guidance)
    switch = args.renoise_switch_step if args.renoise_switch_step is not None else args.max_steps // 2
    lr = args.lr or spec.lr
    ph = Phase(stage, name, spec, files.phase_dir(args.out, stage, name), lr, args.lr_disc or lr,
               renoise_on(args, spec), switch)
    m = build_phase(run, ph)
    if (ph.dir / "checkpoint.pt").exists():
        resume(run, ph, m)
    for opt, lr in ((m.opt_g, ph.lr), (m.opt_d, ph.lr_d)):  # a carried or resumed Adam state keeps its
        for group in (opt.param_groups if opt is not None else []):  # moments only, not its lr
            group["lr"] = lr
    files.forget_checkpoints()  # the optimizers now update the tensors they were loaded with
    return ph, m


# --- The data of a step: this rank's micro-batches, encoded, with their per-sample draws --------------------


def autocast(device):
    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()


def conditioning(context, pooled, ids, device, dtype):
    """(context, pooled) in the compute dtype; the 6 time ids stay float32 (bf16 rounds 1365 to 1368)."""
    return context.to(device, dtype), pooled.to(device, dtype), ids.to(device, torch.float32)


def micro_batches(run, ph):
    """This rank's micro-batches of step ph.step (data.rank_positions: the global batch and its draws do not
    depend on the rank count): latents float32, conditioning, and lightning_min's per-sample draws."""
    a, r = run.args, run.ranks
    renoise_weights = run.renoise_late if ph.step >= ph.switch_step else (1, 1, 1, 1)
    for i in range(a.batch_size // (a.micro_batch_size * r.world)):
        pos = data.rank_positions(ph.step, a.batch_size, a.micro_batch_size, r.rank, r.world, i)
        before = run.data.stats.get("skipped", 0)
        if isinstance(run.data, data.CachedData):  # prepare.py encoded them once: no VAE, no text encoders
            x0, context, pooled, ids = data.cached_batch(run.data, pos)
        else:
            pixels, captions, ids = data.batch(run.data, pos)
            x0, _, context, pooled = data.encode(run.vae, run.text, pixels.to(r.device, run.dtype), captions,
                                                 a.vae_slice, autocast=True)
        ph.skipped_images += run.data.stats.get("skipped", 0) - before
        cond = conditioning(context, pooled, ids, r.device, run.dtype)
        # per-sample draws from (seed, stage, phase, global position): rank- and resume-independent; the high
        # 63 bits of data.hash_seed (>> 1), as train.py always took them
        gens = [torch.Generator().manual_seed(data.hash_seed(a.seed, ph.stage, ph.name, g) >> 1) for g in pos]
        yield lm.make_batch(x0.to(r.device, torch.float32), cond, gens, ph.spec.timesteps, renoise_weights,
                            ph.renoise)


# --- One step -----------------------------------------------------------------------------------------------


def teacher_model(ph, m, cond):
    """The teacher as a model(x, t, rows) (CFG in 128to32 or at --teacher-guidance), counting the samples it
    evaluates. In a LoRA phase without a teacher copy it is the student with its LoRA off."""
    model = lm.unet_model(m.student if m.teacher is None else m.teacher, cond, ph.spec.cfg)

    def counted(x, t, rows=None):
        ph.teacher_evals += x.shape[0]
        if m.teacher is not None:
            return model(x, t, rows)
        lora.set_lora_enabled(m.student, False)
        try:
            return model(x, t, rows)
        finally:
            lora.set_lora_enabled(m.student, True)
    return counted


def train_step(run, ph, m):
    """The teacher's targets, the discriminator on Eq. (20), then the student on Eq. (21) (Sec. 3.2; within
    --disc-warmup the discriminator only); or the student alone on Eq. (16) / (29). Gradients are
    accumulated over micro-batches and synced on the last one only; a loss that is not finite on any rank
    skips that update on every rank (the NaN vote)."""
    spec, ranks, logs = ph.spec, run.ranks, Counter()  # sums over the micro-batches
    batches = []
    for b in micro_batches(run, ph):
        every = parallel.is_sharded(m.teacher)  # then every rank makes the same calls, whatever the data
        with autocast(ranks.device):
            batches.append(lm.teacher_target(teacher_model(ph, m, b.cond), b, spec, every))
    n, d_ok = len(batches), True
    if m.disc is not None:  # --- the discriminator's update, Eq. (20)
        m.disc.requires_grad_(True)
        m.opt_d.zero_grad(set_to_none=True)
        for i, b in enumerate(batches):
            with parallel.no_sync_unless_last(m.d_model, i, n):
                with autocast(ranks.device):
                    loss, real, fake = lm.discriminator_loss(m.d_model, m.student, b, spec)
                (loss / n).backward()
            logs.update(loss_d=loss.item() / n, d_real=torch.sigmoid(real).mean().item() / n,
                        d_fake=torch.sigmoid(fake).mean().item() / n)
            gap = (torch.sigmoid(real) - torch.sigmoid(fake)).detach().float()  # (B,) per sample
            for t in spec.timesteps:  # sums and counts per student timestep: the same keys on every rank
                at = b.t == t
                logs.update({f"gap_sum_t{t}": gap[at].sum().item(), f"gap_n_t{t}": at.sum().item()})
        d_ok = parallel.finite(logs["loss_d"], ranks)
        if d_ok:
            m.opt_d.step()
        m.disc.requires_grad_(False)  # the student's update must not touch D
    ok = d_ok
    if m.disc is None or ph.step >= run.args.disc_warmup:  # within --disc-warmup the student stays as it is
        key = {"adversarial": "loss_g"}.get(spec.loss, f"loss_{spec.loss}")
        m.opt_g.zero_grad(set_to_none=True)
        for i, b in enumerate(batches):  # --- the student's update, Eq. (21), (16) or (29)
            with parallel.no_sync_unless_last(m.g_model, i, n):
                with autocast(ranks.device):
                    loss = lm.student_loss(m.g_model, m.disc, b, spec)
                (loss / n).backward()
            logs.update({key: loss.item() / n})
        ok = parallel.finite(logs[key], ranks) and d_ok
        if ok:
            m.opt_g.step()
    if ok:
        ph.bad_in_row = 0
    else:
        ph.bad_in_row += 1
        ph.bad_total += 1
        if ph.bad_in_row >= run.args.max_bad_steps:
            raise RuntimeError(f"{ph.bad_in_row} steps in a row had a NaN/Inf loss (at step {ph.step}); lower "
                               f"--lr or check the data and the teacher")
    return logs


# --- Saves (the order is files.py's), resume, the phase's record, sample grids ------------------------------


def save(run, ph, m, checkpoint=True):
    """checkpoint.pt, then the exports, then progress.json: any interruption leaves a state a re-run
    completes. checkpoint=False: the exports only (completing a save interrupted after its checkpoint)."""
    st = parallel.gather_states(m.student, m.disc, m.opt_g, m.opt_d, run.ranks.master, ph.spec.lora)

    def write():
        if checkpoint:
            files.save_checkpoint(ph.dir, {
                "stage": ph.stage, "phase": ph.name, "step": ph.step, "bad_total": ph.bad_total,
                "args": vars(run.args), "init": m.plan["init"], "teacher": m.plan["teacher"],
                "renoise_switch_step": ph.switch_step,
                "student": {k: v.detach().cpu() for k, v in st["student"].items()}, "disc": st["disc"],
                "opt_g": st["opt_g"], "opt_d": st["opt_d"], "rng": torch.get_rng_state()})
        base_sd = None
        if ph.spec.lora:  # the LoRA relative to --base needs the base's weights (fp32, CPU; loaded once)
            if run.base_unet is None:
                run.base_unet = load_unet(run, "base")
            base_sd = run.base_unet.state_dict()
        report = files.export(ph.dir, m.student, st["student"], ph.spec.lora,
                              lm.STAGES[ph.stage].student_steps, ph.spec.student_prediction, ph.step, base_sd)
        if report is not None:
            record_base_lora(ph, report)
    parallel.on_master(run.ranks, write, ERRORS)


def record_base_lora(ph, report):
    """The base-relative LoRA's approximation error (files.export): in the log and in phase.json."""
    log_line = (f"{report['file']} (relative to --base, rank {report['rank']}): per-layer relative error "
                f"worst {report['worst_rel_error']:.3e} ({report['worst_layer']}), mean "
                f"{report['mean_rel_error']:.3e} over {report['layers']} layers; "
                f"{report['tensors_outside_lora_that_differ']} other tensors differ from the base (no LoRA "
                f"carries them: {report['outside_lora_share_of_difference']:.1%} of the difference's norm)")
    tqdm.write(f"[{ph.stage}/{ph.name}] {log_line}")  # as log(): save's write runs on rank 0 only
    meta_file = ph.dir / "phase.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    files.save_json({**meta, "base_lora": report}, meta_file)


def resume(run, ph, m):
    """The phase's own checkpoint over build_phase's models (whatever --shard or world size wrote it)."""
    path = ph.dir / "checkpoint.pt"
    state = files.read_checkpoint(path, ph.stage, ph.name)
    parallel.load_states(state, m.student.lora if ph.spec.lora else m.student, m.student, m.disc, m.opt_g,
                         m.opt_d)
    torch.set_rng_state(state["rng"])
    ph.step, ph.bad_total = state["step"], state["bad_total"]
    if run.args.renoise_switch_step is None:
        ph.switch_step = state.get("renoise_switch_step", ph.switch_step)
    old_lr = state["args"].get("lr") or ph.spec.lr
    log(run, ph, f"resumed {path} at step {ph.step}" + (f"; --lr {old_lr:g} -> {ph.lr:g} from here"
                                                        if old_lr != ph.lr else ""))


def write_meta(run, ph, m):
    """phase.json: what this phase trains with, for the reader of a run folder (and the tests)."""
    ph.dir.mkdir(parents=True, exist_ok=True)
    meta = {"stage": ph.stage, "phase": ph.name, "teacher": m.plan["teacher"],
            "teacher_is_student_without_lora": m.teacher is None, "student_init": m.plan["init"],
            "lora_from": m.plan["lora_from"],
            "discriminator_from": m.plan["disc_from"] or ("base" if m.disc is not None else None),
            "trainable_params": m.n_trainable, "world_size": run.ranks.world, "fsdp": m.fsdp,
            "args": vars(run.args), **ph.spec.__dict__, "lr": ph.lr, "renoise": ph.renoise,
            "renoise_switch_step": ph.switch_step, "renoise_weights_late": run.args.renoise_weights_late}
    old = ph.dir / "phase.json"
    if old.exists() and "base_lora" in (previous := json.loads(old.read_text())):  # of the checkpoint's step
        meta["base_lora"] = previous["base_lora"]
    files.save_json(meta, ph.dir / "phase.json")
    files.trim_log(ph.dir, ph.step)  # the steps of the checkpoint only


@torch.no_grad()
def sample_grid(run, ph, m):
    """A 2x2 grid of SAMPLE_PROMPTS from the student through the one sampler (lm.sample), with the noise
    sample.py draws for seed 0 (one CPU generator for the batch), so `sample.py --seed 0` gives the same
    images; written by rank 0. A sharded student needs every rank in its forward, so all of them sample."""
    res, sharded, dev = run.args.resolution, parallel.is_sharded(m.student), run.ranks.device
    if not (run.ranks.master or sharded):
        return
    context, pooled = run.text.encode(SAMPLE_PROMPTS)  # (4, 77, C), (4, P)
    cond = (context.to(dev, torch.float32), pooled.to(dev, torch.float32),
            text_mod.time_ids(res, res).to(dev).expand(len(SAMPLE_PROMPTS), 6))
    f = run.vae.config.downscale
    noise = torch.randn((len(SAMPLE_PROMPTS), m.student.config.in_channels, res // f, res // f),
                        generator=torch.Generator("cpu").manual_seed(0))
    with autocast(dev) if sharded else nullcontext():  # FSDP2 on GPU: bf16 weights
        latents = lm.sample(lm.unet_model(m.student, cond), noise.to(dev), lm.STAGES[ph.stage].student_steps,
                            ph.spec.student_prediction)
        imgs = run.vae.decode_latents(latents.to(next(run.vae.parameters()).dtype)).float()
    if run.ranks.master:
        grid = files.save_grid(files.to_pil(imgs), ph.dir / f"samples_{ph.step:06d}.png")
        if run.tensorboard:
            run.tensorboard.add_image(f"{ph.stage}/{ph.name}/samples", grid, ph.step, dataformats="HWC")


def log(run, ph, msg):
    if run.ranks.master:
        tqdm.write(f"[{ph.stage}/{ph.name}] {msg}")


# --- One phase: the loop ------------------------------------------------------------------------------------


def train_phase(run, stage, name):
    args, ranks = run.args, run.ranks
    ph, m = open_phase(run, stage, name)
    if ph.step > files.progress_step(ph.dir):  # a save was interrupted after its checkpoint
        log(run, ph, f"completing the interrupted save of step {ph.step}")
        save(run, ph, m, checkpoint=False)
    if ph.step >= args.max_steps:
        log(run, ph, f"finished already (step {ph.step} >= --max-steps {args.max_steps}); skipped")
        return
    parallel.on_master(ranks, lambda: write_meta(run, ph, m), ERRORS)
    log(run, ph, f"teacher {m.plan['teacher']}{' (the student with LoRA off)' if m.teacher is None else ''}; "
        f"trainable {m.n_trainable:,} params; lr {ph.lr}; timesteps {ph.spec.timesteps}")
    bar = tqdm(total=args.max_steps, initial=ph.step, disable=not ranks.master, desc=f"{stage}/{name}")
    while ph.step < args.max_steps:
        t0, ph.teacher_evals = time.time(), 0
        logs = gaps(parallel.mean_over_ranks({**train_step(run, ph, m), "teacher_evals": ph.teacher_evals},
                                             ranks))
        if ranks.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t0
        logs["teacher_evals"] *= ranks.world  # summed over ranks: sample-evaluations of the teacher UNet
        renoise_weights = args.renoise_weights_late if ph.step >= ph.switch_step else "1,1,1,1"
        ph.step += 1
        logs.update(step=ph.step, lr=m.opt_g.param_groups[0]["lr"],
                    **({"lr_d": m.opt_d.param_groups[0]["lr"]} if m.opt_d is not None else {}), step_time=dt,
                    images_per_s=args.batch_size / dt, bad_steps=ph.bad_total,
                    skipped_images=ph.skipped_images, renoise=ph.renoise,
                    renoise_weights=renoise_weights if ph.renoise else None)
        if ranks.master:
            files.append_log(ph.dir, logs, run.tensorboard, f"{stage}/{name}")
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()
                            if k.startswith(("loss", "d_")) and not k.startswith("d_gap_t")})
            bar.update(1)
        files.crash_point(f"step{ph.step}")
        if ph.step % args.save_every == 0 or ph.step == args.max_steps:
            save(run, ph, m)
        if args.sample_every and ph.step % args.sample_every == 0:
            sample_grid(run, ph, m)
    bar.close()
    steps = lm.STAGES[stage].student_steps
    if ph.spec.discriminator:
        parallel.on_master(ranks, lambda: log(run, ph, disc_summary(ph.dir)), ERRORS)
    log(run, ph, f"done: {ph.dir / files.unet_filename(steps, ph.spec.student_prediction)}")


def gaps(logs):
    """A step's per-timestep sums and counts of D(real) - D(fake) (train_step, over micro-batches and ranks)
    -> d_gap (the batch's mean) and d_gap_t{t} for each student timestep t the batch drew."""
    out = {k: v for k, v in logs.items() if not k.startswith("gap_")}
    sums = {k[len("gap_sum_t"):]: v for k, v in logs.items() if k.startswith("gap_sum_t")}
    ns = {t: logs[f"gap_n_t{t}"] for t in sums}
    if sums and sum(ns.values()) > 0:
        out["d_gap"] = sum(sums.values()) / sum(ns.values())
        out.update({f"d_gap_t{t}": sums[t] / ns[t] for t in sums if ns[t] > 0})
    return out


SUMMARY_STEPS = 20  # the phase summary's window: D(real) - D(fake) at the end of the phase, not its start


def disc_summary(folder, last=SUMMARY_STEPS):
    """OUT/<stage>/<phase>/summary.json: the mean D(real) - D(fake) (sigmoid outputs) over the phase's last
    `last` logged steps, overall and per student timestep; 0 means the discriminator does not tell the
    teacher's samples from the student's (Sec. 3.3): it cannot yet, or the student keeps up with it
    (docs/training.md; --disc-warmup tells the two apart). -> the line the log prints."""
    rows = [json.loads(ln) for ln in (Path(folder) / "log.jsonl").read_text().splitlines()][-last:]
    mean = {k: sum(r[k] for r in rows if k in r) / sum(k in r for r in rows)
            for k in sorted({k for r in rows for k in r if k.startswith("d_gap")})}
    files.save_json({"steps": [rows[0]["step"], rows[-1]["step"]] if rows else [], **mean},
                    Path(folder) / "summary.json")
    per_t = ", ".join(f"t={k[len('d_gap_t'):]} {v:.3f}" for k, v in mean.items() if k != "d_gap")
    return (f"D(real) - D(fake) over the last {len(rows)} steps: {mean.get('d_gap', float('nan')):.4f} "
            f"({per_t})")


# --- Main: checks before any work, the ranks, the lock, the shared frozen parts, then the phases in order ---


def main(argv=None):
    args = parse_args(argv)
    try:
        phases, renoise_late = check_args(args, int(os.environ.get("WORLD_SIZE", 1)))
    except files.RunError as e:
        raise SystemExit(f"error: {e}")
    ranks = parallel.init(args.device)
    torch.manual_seed(args.seed + ranks.rank)  # per-rank offset; the training draws themselves are per sample
    lock, error, run = files.OutputLock(args.out), None, None
    try:
        parallel.on_master(ranks, lambda: (lock.acquire(), files.check_resume(
            args.out, args.stage, phases, args, RESUME_MAY_CHANGE, PLANNED), check_plans(args, phases)),
            ERRORS)
        run = load_frozen(args, ranks, renoise_late)
        for phase in phases:
            if files.progress_step(files.phase_dir(args.out, args.stage, phase)) >= args.max_steps:
                if ranks.master:
                    print(f"[{args.stage}/{phase}] finished already (--max-steps {args.max_steps}); skipped")
                continue
            train_phase(run, args.stage, phase)
    except (files.RunError, weights.CheckpointError, ValueError, RuntimeError) as e:
        error = e
    finally:
        if run is not None and run.tensorboard is not None:
            run.tensorboard.close()
        if ranks.master:
            lock.release()
        parallel.close(ranks)
    if error is not None:
        raise SystemExit(f"error: {error}")


if __name__ == "__main__":
    main()
