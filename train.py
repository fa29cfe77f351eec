"""Progressive adversarial distillation (SDXL-Lightning, Sec. 3): every stage and phase, one file.

    python train.py --stage 8to4 --data images/ --batch-size 8 --micro-batch-size 1      # one GPU or CPU
    torchrun --nproc_per_node 8 train.py --stage 2to1 --data shards/ --batch-size 512 --micro-batch-size 4
    torchrun --nproc_per_node 8 train.py --stage 2to1 --data cache/ --shard fsdp --compile --tensorboard tb/  # shard.py
    torchrun --nnodes 8 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        train.py --stage 4to2 --data shards/ --batch-size 512 --micro-batch-size 8      # the paper's 64 GPUs
    for s in 128to32 32to8 8to4 4to2 2to1; do torchrun --nproc_per_node 8 train.py --stage $s --data shards/; done

Without --phase a stage runs its phases in order (lightning_min.PHASE_TABLE), each starting from the previous
one's fp32 checkpoint. Re-running the same command resumes from the last checkpoint; finished phases are
skipped; a larger --max-steps continues a finished phase. Outputs per phase in OUT/<stage>/<phase>/:
sdxl_lightning_{N}step_unet.safetensors (1 step: ..._1step_unet_x0), in LoRA phases also
sdxl_lightning_{N}step_lora.safetensors (fp16, the release format), checkpoint.pt (fp32, what the next phase
and the next stage start from), progress.json, phase.json, log.jsonl and sample grids. The save order and
the output lock are in files.py.

Read top to bottom: the distillation update as plain functions (the method), then one phase (models,
hand-offs, checkpoints), then the loop that wraps the update (accumulation, DDP, NaN votes, logging),
then the command line.
"""
import argparse
import hashlib
import json
import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import files
import lightning_min as lm
import lora
import sample
import parallel as shard  # renamed; train.py is rebuilt on it next
import unet as unet_lib  # the UNet class for strict builds
import weights
from discriminator import Discriminator, unconditional_from

SAMPLE_PROMPTS = ["a photo of a cat wearing a spacesuit", "a watercolor painting of a lighthouse at dawn",
                  "portrait of an old fisherman, dramatic light", "a bowl of ramen, studio photograph"]

# ----------------------------------------------------------------------------------------------------
# The method: one distillation update (Sec. 3.2-3.7) as plain functions


@dataclass
class Batch:
    """One micro-batch, its per-sample draws, and (after teacher_target) the teacher's target."""
    x0: torch.Tensor  # (B, 4, h, w) clean latents
    cond: tuple  # (context (B, 77, 2048), pooled (B, 1280), time ids (B, 6) float32)
    eps: torch.Tensor  # (B, 4, h, w) the noise of x_t
    eps2: torch.Tensor  # (B, 4, h, w) a fresh noise for re-noising (Sec. 3.7.2)
    t: torch.Tensor  # (B,) the student's timesteps
    t_star: torch.Tensor  # (B,) re-noise timesteps in {10, 250, 500, 750}
    renoise: bool  # whether the discriminator's clean inputs are noised again
    x_t: torch.Tensor = None  # (B, 4, h, w)
    t_tgt: torch.Tensor = None  # (B,) t - ns, clamped at 0
    target: torch.Tensor = None  # (B, 4, h, w) the teacher's x_{t-ns} (convert: its eps)


@torch.no_grad()
def teacher_target(teacher, b, spec, every_sample=False):
    """x_t (Eq. 1; pure noise at t = T, Eq. 24), then the teacher's x_{t-ns}: n moves of Eq. (7)-(13), t - ns
    clamped at 0. In the convert phase the frozen eps-model's prediction at x_t instead (Eq. 27).
    every_sample: the teacher runs on the whole batch at every move (see lm.teacher_rollout)."""
    b.x_t = lm.forward_fixed(b.x0, b.eps, b.t)
    b.t_tgt = lm.target_time(b.t, spec.n, spec.teacher_steps)
    if spec.loss == "convert":
        b.target = teacher(b.x_t, b.t)
    else:
        b.target = lm.teacher_rollout(teacher, b.x_t, b.t, b.t_tgt, spec.n, spec.teacher_prediction,
                                      s=lm.T / spec.teacher_steps, every_sample=every_sample)
    return b


def disc_logits(disc, x, b):
    """D on a sample at t - ns: Eq. (22) also sees x_t, Eq. (23) does not. Where re-noising is on (Sec. 3.7.2,
    Eq. 25-26), a clean sample (t - ns = 0) is first noised again to t* with a fresh noise."""
    t_d = b.t_tgt
    if b.renoise:
        clean = b.t_tgt == 0
        t_d = torch.where(clean, b.t_star, b.t_tgt)
        x = torch.where(clean[:, None, None, None], lm.forward(x, b.eps2, b.t_star).to(x.dtype), x)
    return disc(x, t_d, b.cond, b.x_t, b.t)


def discriminator_loss(disc, student, b, spec):
    """Eq. (20): -log D(teacher's x_{t-ns}) - log(1 - D(student's x_{t-ns})). The student only samples here."""
    with torch.no_grad():
        x_hat = lm.student_jump(lm.unet_model(student, b.cond), b.x_t, b.t, b.t_tgt, spec.student_prediction)
    real, fake = disc_logits(disc, b.target, b), disc_logits(disc, x_hat, b)
    return lm.loss_d(real, fake), real, fake


def student_loss(student, disc, b, spec):
    """The student's one jump from x_t to t - ns (Eq. 14-15) against the teacher's n moves: the
    non-saturating -log D(x_hat) (Eq. 21), or the MSE (Eq. 16); convert: its x0 against the eps-model's (Eq. 29)."""
    model = lm.unet_model(student, b.cond)
    if spec.loss == "convert":
        return lm.loss_convert(model(b.x_t, b.t), b.x_t, b.target, b.t)
    x_hat = lm.student_jump(model, b.x_t, b.t, b.t_tgt, spec.student_prediction)
    if spec.loss == "mse":
        return lm.loss_mse(x_hat, b.target)
    return lm.loss_g(disc_logits(disc, x_hat, b))


@contextmanager
def lora_off(unet):
    """The student with its LoRA off is the teacher of a LoRA phase (no second copy)."""
    lora.set_lora_enabled(unet, False)
    try:
        yield
    finally:
        lora.set_lora_enabled(unet, True)


# ----------------------------------------------------------------------------------------------------
# Small helpers: names, seeds, where teachers come from


def unet_filename(steps, prediction=None):
    """The release names; an x0 model (default: the 1-step one) says so, and sample.py reads the suffix."""
    x0 = prediction == "sample" if prediction else steps == 1
    return f"sdxl_lightning_{steps}step_unet{'_x0' if x0 else ''}.safetensors"


def lora_filename(steps):
    return f"sdxl_lightning_{steps}step_lora.safetensors"


def seed_for(*parts) -> int:
    """A 63-bit seed from anything printable, the same on every rank and every run."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


def phase_dir(args, stage, phase):
    return Path(args.out) / stage / phase


def default_teacher(args, steps):
    """The fp32 checkpoint of our own earlier stage that made `steps`-step models when OUT has it, else the
    official Lightning UNet (8, 4, 2 steps), else the SDXL base for 128 steps."""
    if steps == 128:
        return "base"
    for st in lm.STAGES.values():
        if st.student_steps == steps:
            last = phase_dir(args, st.name, st.phases[-1])
            if files.progress_step(last) > 0 and (last / "checkpoint.pt").exists():
                return str(last / "checkpoint.pt")
    if steps in weights.LIGHTNING_UNETS and steps != 1:
        return str(weights.fetch(weights.LIGHTNING_REPO, weights.lightning_unet_file(steps)))
    raise ValueError(f"no {steps}-step teacher: run the stage that makes it with the same --out, or pass --teacher")


def run_order(stage, prediction=None):
    """The phases a stage runs without --phase: PHASE_TABLE's order, less the x0 switch when the 1-step student
    keeps predicting epsilon (--prediction epsilon, the Sec. 3.7.3 ablation)."""
    return tuple(p for p in lm.stage_phases(stage) if not (p == "convert" and prediction == "epsilon"))


def predecessor(stage, phase, prediction=None):
    """The phase whose fp32 checkpoint this one starts from, or None (the stage's init). The MSE ablation of
    2to1 (Sec. 3.2) starts from the convert phase, so that its student already predicts x0."""
    if phase == "mse":
        return "convert" if stage == "2to1" and prediction != "epsilon" else None
    order = run_order(stage, prediction)
    i = order.index(phase)
    return order[i - 1] if i > 0 else None


def plan_phase(args, stage, phase):
    """Where the phase's student, LoRA, teacher and discriminator start from (Sec. 3.6 hand-offs):
    uncond continues cond's LoRA and discriminator backbone; full merges uncond's LoRA into its base in fp32
    and keeps uncond's discriminator and its optimizer state; 2to1's whole-UNet phases continue each other.
    Every hand-off reads the previous phase's fp32 checkpoint, never the fp16 release files."""
    st, spec = lm.STAGES[stage], lm.phase_spec(stage, phase, args.prediction)
    prev_phase = predecessor(stage, phase, args.prediction)
    prev = phase_dir(args, stage, prev_phase) / "checkpoint.pt" if prev_phase else None
    if prev is not None and not prev.exists():
        if args.phase is None:
            raise files.RunError(f"{prev.parent} has no checkpoint")
        prev = None  # a phase run alone without its predecessor starts from the stage's init
    first = lm.phase_spec(stage, st.phases[0])
    plan = {"init": args.init or args.teacher or default_teacher(args, first.teacher_steps), "lora_from": None,
            "disc_from": None}
    if prev is not None:
        ck = files.read_checkpoint(prev, stage, prev_phase)
        prev_spec = lm.phase_spec(stage, prev_phase)
        if prev_spec.lora:  # uncond continues the LoRA; full merges it into the same base
            plan["init"], plan["lora_from"] = ck["init"], str(prev)
        else:
            plan["init"] = str(prev)  # its fp32 whole UNet
        if spec.discriminator and prev_spec.discriminator:
            plan["disc_from"] = str(prev)
    skip_level = spec.teacher_steps != st.teacher_steps
    plan["teacher"] = (args.skip_level_teacher if skip_level else args.teacher) or \
        default_teacher(args, spec.teacher_steps)
    return plan


# ----------------------------------------------------------------------------------------------------
# One phase: models, optimizers, hand-offs, checkpoints


class Phase:
    """One phase of one stage: its student, teacher, discriminator and optimizers (set up from the hand-offs of
    plan_phase, or resumed from its own checkpoint), its saves, and the loop that runs the update."""

    def __init__(self, args, ctx, stage, phase):
        self.args, self.ctx, self.stage, self.phase = args, ctx, stage, phase
        self.spec = spec = lm.phase_spec(stage, phase, args.prediction)
        self.st = lm.STAGES[stage]
        self.dir = phase_dir(args, stage, phase)
        self.plan = plan = plan_phase(args, stage, phase)
        dev, self.dtype = ctx["device"], ctx["dtype"]
        resuming = (self.dir / "checkpoint.pt").exists()
        torch.manual_seed(seed_for(args.seed, stage, phase, "init"))  # LoRA and head init: the same anywhere
        # --- the student, fp32 master weights
        self.student = self.load_unet(plan["init"])
        lora_sd = files.read_checkpoint(plan["lora_from"])["student"] if plan["lora_from"] and not resuming else None
        if spec.lora:
            self.student.requires_grad_(False)
            lora.add_lora(self.student, args.lora_rank, args.lora_alpha)
            if lora_sd is not None:  # uncond continues the LoRA trained in cond
                self.student.lora.load_state_dict(lora_sd, strict=True)
        elif lora_sd is not None:  # full: the LoRA merged into its base in fp32
            lora.merge_lora(self.student, lora_sd, source=plan["lora_from"])
        self.student.to(dev, torch.float32)
        self.student.gradient_checkpointing = args.grad_checkpointing
        # --- the teacher: the student with LoRA off in LoRA phases whose teacher is the student's base;
        #     else a frozen copy in the compute dtype
        self.teacher_is_student = spec.lora and plan["teacher"] == plan["init"]
        self.teacher = None if self.teacher_is_student else \
            self.load_unet(plan["teacher"]).to(dev, self.dtype).requires_grad_(False).eval()
        # --- the discriminator: from the pretrained base at the stage's first adversarial phase, then carried
        self.disc, disc_opt = None, None
        if spec.discriminator:
            if ctx.get("base_unet") is None:  # loaded once, kept on the CPU
                ctx["base_unet"] = self.load_unet("base")
            self.disc = Discriminator(ctx["base_unet"], spec.discriminator == "conditional", ctx["latent_size"])
            if plan["disc_from"] and not resuming:
                ck = files.read_checkpoint(plan["disc_from"])
                if "head.0.weight" in ck["disc"] and ck["disc"]["head.0.weight"].shape[1] != \
                        self.disc.head[0].weight.shape[1]:
                    self.disc.load_state_dict(unconditional_from(ck["disc"]), strict=True)  # cond -> uncond
                else:
                    self.disc.load_state_dict(ck["disc"], strict=True)  # uncond -> full: D and its Adam state
                    disc_opt = ck["opt_d"]
            self.disc.to(dev, torch.float32)
            self.disc.backbone.gradient_checkpointing = args.grad_checkpointing
        # --- DDP, optimizers: Adam per Sec. 3.6; ZeRO shards the whole-UNet states across ranks. --shard fsdp:
        #     FSDP2 shards weights, gradients and Adam states of the teacher, the discriminator and a whole-UNet
        #     student instead (shard.py); a LoRA student (small trainable part) stays under DDP.
        ddp = ctx["world"] > 1
        self.fsdp = ddp and args.shard == "fsdp"
        if args.compile:  # the blocks, before FSDP2 makes them its units
            for m in (self.student, self.teacher, self.disc):
                compile_blocks(m)
        if self.fsdp:
            for m, trained in ((self.teacher, False), (self.disc, True), (None if spec.lora else self.student, True)):
                if m is not None:
                    shard.shard_model(m, dev, trained)
        params = [p for p in self.student.parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in params)
        self.g_model = self.wrap_ddp(self.student) if ddp and not self.sharded(self.student) else self.student
        self.opt_g = self.make_opt(params, zero=ddp and not spec.lora and not self.fsdp)
        self.opt_d = None
        if self.disc is not None:
            self.d_model = self.disc if not ddp or self.fsdp else self.wrap_ddp(self.disc)
            self.opt_d = self.make_opt(list(self.disc.parameters()), zero=ddp and not self.fsdp)
            if disc_opt is not None:
                self.load_opt(self.opt_d, self.disc, disc_opt)
        self.step, self.bad_in_row, self.bad_total, self.skipped_images, self.teacher_evals = 0, 0, 0, 0, 0
        self.switch_step = args.renoise_switch_step if args.renoise_switch_step is not None else args.max_steps // 2
        if resuming:
            self.resume()
        self.set_lr()
        files.forget_checkpoints()  # the optimizers now update the tensors they were loaded with

    @property
    def lr(self):
        return self.args.lr or self.spec.lr

    @property
    def renoise(self):
        return {"on": True, "off": False}.get(self.args.renoise, self.spec.renoise)

    def load_unet(self, src):
        """fp32 on the CPU: 'base', a UNet .safetensors (either layout), or a phase's fp32 checkpoint.pt."""
        cfg = self.ctx["unet_config"]
        if src == "base":
            return weights.load_unet(self.args.base, cfg, "cpu", torch.float32, sd=self.ctx.get("base_sd"))
        if src.endswith("checkpoint.pt"):
            ck = files.read_checkpoint(src)
            if lm.phase_spec(ck["stage"], ck["phase"]).lora:
                raise files.RunError(f"{src}: the checkpoint of a LoRA phase, not of a whole UNet")
            sd = {k: v.clone() for k, v in ck["student"].items()}  # out of the memory map
            return weights.build_strict(unet_lib.UNet, cfg, sd, src)
        unet = weights.load_unet(src, cfg, "cpu", torch.float32)
        if unet.config != cfg:
            raise weights.CheckpointError(f"{src}: architecture {unet.config} differs from the base's {cfg}")
        return unet

    @staticmethod
    def sharded(model):
        return model is not None and shard.is_sharded(model)

    def load_model(self, model, sd):
        shard.load_state_dict(model, sd) if self.sharded(model) else model.load_state_dict(sd, strict=True)

    def load_opt(self, opt, model, sd):
        """An Adam state in torch.optim's format (checkpoint.pt, whatever --shard or world size wrote it)."""
        shard.load_optim_state_dict(model, opt, sd) if self.sharded(model) else opt.load_state_dict(sd)

    def wrap_ddp(self, model):
        """The gradients are views into DDP's all-reduce buckets: without that DDP keeps a second copy of them
        (4 bytes per trained parameter, 10 GB for the whole SDXL UNet)."""
        return DDP(model, device_ids=self.ctx["ids"], gradient_as_bucket_view=True)

    def make_opt(self, params, zero):
        kw = dict(lr=self.lr, betas=self.spec.betas, weight_decay=0.0)
        if zero:
            return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.Adam, **kw)
        return torch.optim.Adam(params, **kw)

    def set_lr(self):
        """The phase's lr (or --lr) on both optimizers: a carried or resumed Adam state keeps its moments only."""
        for opt in (self.opt_g, self.opt_d):
            for group in (opt.param_groups if opt is not None else []):
                group["lr"] = self.lr

    # ------------------------------------------------------------------ checkpoints (order: files.py)
    def save(self):
        """checkpoint.pt, then the exports, then progress.json: any interruption leaves a state a re-run completes."""
        states = self.full_states()
        on_master(self.ctx, lambda: self.write_checkpoint_and_exports(states))

    def full_states(self):
        """Student, discriminator and both Adam states, whole, as rank 0 writes them (None elsewhere). Collective,
        every rank calls it: ZeRO consolidates its shards on rank 0, FSDP gathers everything there (shard.py)."""
        for opt in (self.opt_g, self.opt_d):
            if isinstance(opt, ZeroRedundancyOptimizer):
                opt.consolidate_state_dict(to=0)

        master = self.ctx["master"]

        def model(m):
            if self.sharded(m):
                return shard.full_state_dict(m)
            return {k: v.detach().cpu() for k, v in m.state_dict().items()} if master else None

        def opt(o, m):
            return shard.full_optim_state_dict(m, o) if self.sharded(m) else o.state_dict() if master else None
        student = model(self.student) if not self.spec.lora else lora.lora_state_dict(self.student)
        states = {"student": student, "disc": None if self.disc is None else model(self.disc),
                  "opt_g": opt(self.opt_g, self.student),
                  "opt_d": None if self.opt_d is None else opt(self.opt_d, self.disc)}
        return states if master else None

    def write_checkpoint_and_exports(self, states):
        state = {"stage": self.stage, "phase": self.phase, "step": self.step, "bad_total": self.bad_total,
                 "args": vars(self.args), "init": self.plan["init"], "renoise_switch_step": self.switch_step,
                 "student": {k: v.detach().cpu() for k, v in states["student"].items()}, "disc": states["disc"],
                 "opt_g": states["opt_g"], "opt_d": states["opt_d"], "rng": torch.get_rng_state()}
        self.dir.mkdir(parents=True, exist_ok=True)
        files.save_torch(state, self.dir / "checkpoint.pt")
        files.crash_point("checkpoint")
        self.export(states)

    def export(self, states):
        """The release formats, fp16: a diffusers-layout UNet (LoRA merged in fp32 on a copy), and the LoRA.
        Then progress.json says the exports are those of this step."""
        steps = self.st.student_steps
        base = states["student"] if not self.spec.lora else lora.base_state_dict(self.student)  # whole, on the CPU
        sd = {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in base.items()}
        if self.spec.lora:  # merge into a copy: the student's base (= the teacher) must stay untouched
            merged = weights.build_strict(unet_lib.UNet, self.student.config, sd, "student")
            lsd = {k: v.to("cpu", torch.float32, copy=True) for k, v in lora.lora_state_dict(self.student).items()}
            lora.merge_lora(merged, lsd, source="student LoRA")
            sd = merged.state_dict()
            files.atomic_write(self.dir / lora_filename(steps), lambda tmp: lora.save_lora(self.student, tmp))
        files.save_safetensors({k: v.half().contiguous() for k, v in sd.items()},
                               self.dir / unet_filename(steps, self.spec.student_prediction))
        files.save_json(self.student.config.to_diffusers(), self.dir / "config.json")
        files.crash_point("exports")
        files.save_json({"step": self.step}, self.dir / "progress.json")

    def resume(self):
        path = self.dir / "checkpoint.pt"
        state = files.read_checkpoint(path, self.stage, self.phase)
        self.load_model(self.student.lora if self.spec.lora else self.student, state["student"])
        if self.disc is not None:
            self.load_model(self.disc, state["disc"])
            self.load_opt(self.opt_d, self.disc, state["opt_d"])
        self.load_opt(self.opt_g, self.student, state["opt_g"])
        torch.set_rng_state(state["rng"])
        self.step, self.bad_total = state["step"], state["bad_total"]
        if self.args.renoise_switch_step is None:
            self.switch_step = state.get("renoise_switch_step", self.switch_step)
        old_lr = state["args"].get("lr") or self.spec.lr
        note = f"; --lr {old_lr:g} -> {self.lr:g} from here" if old_lr != self.lr else ""
        self.log(f"resumed {path} at step {self.step}{note}")

    # ------------------------------------------------------------------ the update, wrapped
    def micro_batches(self):
        """This rank's micro-batches of the current step: latents, conditioning, and per-sample draws."""
        a, ctx, spec = self.args, self.ctx, self.spec
        accum = a.batch_size // (a.micro_batch_size * ctx["world"])
        late = tuple(float(w) for w in a.renoise_weights_late.split(","))
        renoise_weights = late if self.step >= self.switch_step else (1, 1, 1, 1)
        for i in range(accum):
            pos = data.rank_positions(self.step, a.batch_size, a.micro_batch_size, ctx["rank"], ctx["world"], i)
            x0, cond = self.encode(pos)
            dev = ctx["device"]
            # per-sample draws from (seed, stage, phase, global position): rank- and resume-independent
            eps, eps2, t, t_star = [], [], [], []
            for g in pos:
                gen = torch.Generator().manual_seed(seed_for(a.seed, self.stage, self.phase, g))
                eps.append(torch.randn(x0.shape[1:], generator=gen))
                eps2.append(torch.randn(x0.shape[1:], generator=gen))
                t.append(spec.timesteps[torch.randint(len(spec.timesteps), (1,), generator=gen).item()])
                t_star.append(lm.renoise_timesteps(gen, 1, renoise_weights)[0].item())
            yield Batch(x0=x0, cond=cond, eps=torch.stack(eps).to(dev), eps2=torch.stack(eps2).to(dev),
                        t=torch.tensor(t, device=dev), t_star=torch.tensor(t_star, device=dev), renoise=self.renoise)

    def encode(self, pos):
        """Latents (B, 4, h, w) float32 and conditioning of the samples at global positions `pos`."""
        ctx = self.ctx
        before = ctx["data"].stats.get("skipped", 0)
        if isinstance(ctx["data"], data.CachedData):  # prepare.py encoded them once: no VAE, no text encoders
            x0, context, pooled, ids = data.cached_batch(ctx["data"], pos)
            self.skipped_images += ctx["data"].stats.get("skipped", 0) - before
            dev = ctx["device"]
            return x0.to(dev, torch.float32), (context.to(dev, self.dtype), pooled.to(dev, self.dtype),
                                               ids.to(dev, torch.float32))
        pixels, captions, ids = data.batch(ctx["data"], pos)
        self.skipped_images += ctx["data"].stats.get("skipped", 0) - before
        with torch.no_grad(), self.autocast():
            x0 = ctx["vae"].encode_latents(pixels.to(ctx["device"], ctx["vae_dtype"]), self.args.vae_slice).float()
        return x0, conditioning(ctx["text"], captions, ids, ctx["device"], self.dtype)

    def autocast(self):
        return torch.autocast("cuda", torch.bfloat16) if self.ctx["device"].type == "cuda" else nullcontext()

    def teacher_model(self, cond):
        model = lm.unet_model(self.student if self.teacher is None else self.teacher, cond, self.spec.cfg)

        def counted(x, t, rows=None):
            self.teacher_evals += x.shape[0]
            with lora_off(self.student) if self.teacher is None else nullcontext():
                return model(x, t, rows)
        return counted

    def train_step(self):
        """The discriminator on Eq. (20), then the student on Eq. (21) (Sec. 3.2); or the student alone on
        Eq. (16) / (29). Gradients are accumulated over micro-batches and synced on the last one only."""
        spec, logs = self.spec, {}
        batches = []
        for b in self.micro_batches():
            with self.autocast():  # a sharded teacher needs the same calls on every rank, whatever the samples
                batches.append(teacher_target(self.teacher_model(b.cond), b, spec, self.sharded(self.teacher)))
        n = len(batches)
        if self.disc is not None:  # --- discriminator update
            self.disc.requires_grad_(True)
            self.opt_d.zero_grad(set_to_none=True)
            for i, b in enumerate(batches):
                with no_sync_unless_last(self.d_model, i, n):
                    with self.autocast():
                        loss, real, fake = discriminator_loss(self.d_model, self.student, b, spec)
                    (loss / n).backward()
                add(logs, loss_d=loss.item() / n, d_real=torch.sigmoid(real).mean().item() / n,
                    d_fake=torch.sigmoid(fake).mean().item() / n)
            if self.finite(logs["loss_d"]):
                self.opt_d.step()
            self.disc.requires_grad_(False)  # the student's update must not touch D
        self.opt_g.zero_grad(set_to_none=True)
        key = {"adversarial": "loss_g"}.get(spec.loss, f"loss_{spec.loss}")
        for i, b in enumerate(batches):  # --- student update
            with no_sync_unless_last(self.g_model, i, n):
                with self.autocast():
                    loss = student_loss(self.g_model, self.disc, b, spec)
                (loss / n).backward()
            add(logs, **{key: loss.item() / n})
        if self.finite(logs[key]) and (self.disc is None or self.finite(logs["loss_d"])):
            self.opt_g.step()
            self.bad_in_row = 0
        else:
            self.bad_in_row += 1
            self.bad_total += 1
            if self.bad_in_row >= self.args.max_bad_steps:
                raise RuntimeError(f"{self.bad_in_row} steps in a row had a NaN/Inf loss (at step {self.step}); "
                                   f"lower --lr or check the data and the teacher")
        return logs

    def mean_over_ranks(self, logs):
        if self.ctx["world"] > 1:
            v = torch.tensor(list(logs.values()), device=self.ctx["device"], dtype=torch.float64)
            dist.all_reduce(v)
            logs = dict(zip(logs, (v / self.ctx["world"]).tolist()))
        return logs

    def finite(self, value):
        """All ranks agree whether a loss is finite, so they skip a bad step together."""
        flag = torch.tensor([0.0 if math.isfinite(value) else 1.0], device=self.ctx["device"])
        if self.ctx["world"] > 1:
            dist.all_reduce(flag)
        return flag.item() == 0

    # ------------------------------------------------------------------ samples, logging, the loop
    @torch.no_grad()
    def sample_grid(self):
        """Rank 0 writes the grid; a sharded student needs every rank in its forward, so all of them sample."""
        ctx, res = self.ctx, self.args.resolution
        if not (ctx["master"] or self.sharded(self.student)):
            return
        with self.autocast() if self.sharded(self.student) else nullcontext():  # FSDP2 on GPU: bf16 weights
            imgs = sample.generate(ctx["text"], self.student, ctx["vae"], SAMPLE_PROMPTS, self.st.student_steps, 0,
                                   res, res, self.spec.student_prediction, 0.0, torch.float32)
        from PIL import Image
        grid = Image.new("RGB", (res * 2, res * 2))
        for i, im in enumerate(sample.to_pil(imgs)[:4]):
            grid.paste(im, ((i % 2) * res, (i // 2) * res))
        if ctx["master"]:
            files.atomic_write(self.dir / f"samples_{self.step:06d}.png", lambda tmp: grid.save(tmp, format="PNG"))
            if ctx.get("tensorboard"):
                ctx["tensorboard"].add_image(f"{self.stage}/{self.phase}/samples", np.asarray(grid), self.step,
                                             dataformats="HWC")

    def write_meta(self):
        """phase.json: what this phase trains with, for the reader of a run folder (and the tests).
        log.jsonl keeps the steps of the checkpoint only (a crash may have logged steps it never saved)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = {"stage": self.stage, "phase": self.phase, "teacher": self.plan["teacher"],
                "teacher_is_student_without_lora": self.teacher_is_student, "student_init": self.plan["init"],
                "lora_from": self.plan["lora_from"], "discriminator_from": self.plan["disc_from"] or
                ("base" if self.disc is not None else None), "trainable_params": self.n_trainable,
                "world_size": self.ctx["world"], "fsdp": self.fsdp, "args": vars(self.args), **self.spec.__dict__,
                "lr": self.lr,
                "renoise": self.renoise, "renoise_switch_step": self.switch_step,
                "renoise_weights_late": self.args.renoise_weights_late}
        files.save_json(meta, self.dir / "phase.json")
        log = self.dir / "log.jsonl"
        if log.exists():
            lines = [ln for ln in log.read_text().splitlines() if logged_step(ln) <= self.step]
            files.atomic_write(log, lambda tmp: tmp.write_text("".join(ln + "\n" for ln in lines)))

    def log(self, msg):
        if self.ctx["master"]:
            tqdm.write(f"[{self.stage}/{self.phase}] {msg}")

    def run(self):
        a, ctx = self.args, self.ctx
        if self.step > files.progress_step(self.dir):  # a save was interrupted after its checkpoint
            self.log(f"completing the interrupted save of step {self.step}")
            states = self.full_states()
            on_master(ctx, lambda: self.export(states))
        if self.step >= a.max_steps:
            self.log(f"finished already (step {self.step} >= --max-steps {a.max_steps}); skipped")
            return
        on_master(ctx, self.write_meta)
        self.log(f"teacher {self.plan['teacher']}{' (the student with LoRA off)' if self.teacher_is_student else ''}"
                 f"; trainable {self.n_trainable:,} params; lr {self.lr}; timesteps {self.spec.timesteps}")
        bar = tqdm(total=a.max_steps, initial=self.step, disable=not ctx["master"], desc=f"{self.stage}/{self.phase}")
        while self.step < a.max_steps:
            t0 = time.time()
            self.teacher_evals = 0
            logs = self.mean_over_ranks({**self.train_step(), "teacher_evals": self.teacher_evals})
            if ctx["device"].type == "cuda":
                torch.cuda.synchronize()
            dt = time.time() - t0
            logs["teacher_evals"] *= ctx["world"]  # summed over ranks: sample-evaluations of the teacher UNet
            renoise_weights = a.renoise_weights_late if self.step >= self.switch_step else "1,1,1,1"
            self.step += 1
            logs.update(step=self.step, lr=self.opt_g.param_groups[0]["lr"], step_time=dt,
                        images_per_s=a.batch_size / dt, bad_steps=self.bad_total, skipped_images=self.skipped_images,
                        renoise=self.renoise, renoise_weights=renoise_weights if self.renoise else None)
            if ctx["master"]:
                with open(self.dir / "log.jsonl", "a") as f:
                    f.write(json.dumps(logs) + "\n")
                bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k.startswith(("loss", "d_"))})
                bar.update(1)
                if ctx.get("tensorboard"):
                    tensorboard_scalars(ctx["tensorboard"], f"{self.stage}/{self.phase}", logs)
            files.crash_point(f"step{self.step}")
            if self.step % a.save_every == 0 or self.step == a.max_steps:
                self.save()
            if a.sample_every and self.step % a.sample_every == 0:
                self.sample_grid()
        bar.close()
        self.log(f"done: {self.dir / unet_filename(self.st.student_steps, self.spec.student_prediction)}")


def conditioning(text, captions, ids, device, dtype):
    """(context, pooled) in the compute dtype; the 6 time ids stay float32 (bf16 rounds 1365 to 1368)."""
    with torch.no_grad(), (torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()):
        context, pooled = text.encode(captions)
    return context.to(device, dtype), pooled.to(device, dtype), ids.to(device, torch.float32)


def logged_step(line):
    """The step of a log.jsonl line; a line a kill cut short counts as never written."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def tensorboard_scalars(writer, prefix, logs):
    """Every number of a log.jsonl line (each loss term, D(real)/D(fake), lr, step time, images/s, teacher
    evaluations, bad steps) as the scalar PREFIX/key at its step; flags and strings stay in log.jsonl only."""
    for k, v in logs.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
            writer.add_scalar(f"{prefix}/{k}", v, logs["step"])


def compile_blocks(model):
    """--compile: torch.compile every ResnetBlock2D and BasicTransformerBlock (nearly all the FLOPs), not the
    whole model: Module.compile wraps nothing, so checkpoint names stay; the same blocks are FSDP2's units
    (shard.UNITS), compiled before they are sharded; LoRA's on/off switch (the teacher of LoRA phases) is a
    guard, one graph each way. The glue between blocks (embeddings, samplers) stays eager.
    Each block shape (channels x resolution) x grad mode x batch is its own graph: more than dynamo's default 8
    per block class (past that it runs the rest eager)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for m in (model.modules() if model is not None else []):
        if isinstance(m, shard.UNITS):
            m.compile()


def no_sync_unless_last(model, i, n):
    """Accumulating micro-batches: DDP all-reduces the gradients on the last one only."""
    return model.no_sync() if isinstance(model, DDP) and i < n - 1 else nullcontext()


def add(logs, **kv):
    for k, v in kv.items():
        logs[k] = logs.get(k, 0.0) + v


def on_master(ctx, fn):
    """Run fn on rank 0 while the others wait; an error there stops every rank with the same message."""
    msg = None
    if ctx["master"]:
        try:
            fn()
        except (files.RunError, weights.CheckpointError, ValueError, RuntimeError, OSError) as e:
            msg = str(e)
            if ctx["world"] == 1:
                raise
    if ctx["world"] > 1:
        box = [msg]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise files.RunError(box[0])


# ----------------------------------------------------------------------------------------------------
# Main: arguments, checks before any work, the lock, DDP, shared frozen parts, then the phases in order

# A resume may change these (the rest must match the checkpoint's run, or it is refused naming the flag):
# the step target and the bookkeeping, the micro-batch and rank count (the global batch and its draws do not
# depend on them), --lr (applied from the resumed step on) and the re-noise switch step.
RESUME_MAY_CHANGE = {"max_steps", "save_every", "sample_every", "grad_checkpointing", "vae_slice", "max_bad_steps",
                     "device", "micro_batch_size", "lr", "renoise_switch_step", "phase", "out", "shard", "compile",
                     "tensorboard"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, choices=list(lm.STAGES), help="which distillation stage (Sec. 3.6)")
    p.add_argument("--phase", choices=["mse", "convert", "cond", "uncond", "full"], default=None,
                   help="run one phase only; default: all the stage's phases in order. mse outside 128to32 is the "
                   "MSE-only progressive distillation ablation (Sec. 3.2), run only when named")
    p.add_argument("--prediction", choices=list(lm.PREDICTIONS), default=None,
                   help="2to1 only: the 1-step student's output. Default sample (x0, Sec. 3.7.3); epsilon is the "
                   "ablation without the x0 switch (the convert phase is then skipped)")
    p.add_argument("--data", required=True, help="a folder of images with same-stem .txt captions, "
                   ".tar shards, or a prepare.py cache (no VAE or text encoder is then loaded)")
    p.add_argument("--base", default=weights.SDXL_BASE, help="SDXL base: text encoders, VAE, UNet config, "
                   "discriminator init and the 128to32 teacher (hub id, diffusers folder or single file)")
    p.add_argument("--teacher", default=None, help="teacher UNet file; default: this --out's earlier stage (its "
                   "fp32 checkpoint), else the official Lightning UNet (8/4/2 steps), else the base (128 steps)")
    p.add_argument("--skip-level-teacher", default=None, help="teacher of the uncond/full phases of 4to2 and 2to1 "
                   "(Sec. 3.4); default as --teacher, one level up")
    p.add_argument("--init", default=None, help="student initial UNet for the stage's first phase; default the teacher")
    p.add_argument("--out", default="runs", help="output folder; OUT/<stage>/<phase>/ per phase")
    p.add_argument("--resolution", type=int, default=1024, help="square training resolution in pixels")
    p.add_argument("--min-size", type=int, default=1024, help="skip images whose shorter side is below this (Sec. 3.6)")
    p.add_argument("--sharpness", type=float, default=data.DEFAULT_SHARPNESS,
                   help="skip images whose Laplacian variance at the training crop is below this (Sec. 3.6); 0 off")
    p.add_argument("--min-aesthetic", type=float, default=0.0, help="skip samples whose metadata .json aesthetic "
                   "score is below this or missing (Sec. 3.6: 5.5 for LAION); 0 off")
    p.add_argument("--aesthetic-key", default=None, help="the .json key of the aesthetic score; default: "
                   + ", ".join(data.AESTHETIC_KEYS) + " (the first present)")
    p.add_argument("--clean-captions", action="store_true",
                   help="prompt clean-up (Sec. 3.6): remove URLs, decode HTML entities, collapse whitespace")
    p.add_argument("--batch-size", type=int, default=512, help="global batch (paper: 512), reached by accumulation")
    p.add_argument("--micro-batch-size", type=int, default=1, help="samples per GPU per forward")
    p.add_argument("--max-steps", type=int, default=1000, help="optimizer steps per phase (a target: re-run to extend)")
    p.add_argument("--lr", type=float, default=None, help="learning rate; default the paper's for the phase")
    p.add_argument("--lora-rank", type=int, default=64, help="LoRA rank (released: 64)")
    p.add_argument("--lora-alpha", type=float, default=8.0, help="LoRA alpha (released: 8)")
    p.add_argument("--renoise", choices=["on", "off"], default=None, help="noise clean targets again before the "
                   "discriminator (Sec. 3.7.2); default on in 4to2 and 2to1, off elsewhere (lightning_min.PHASE_TABLE)")
    p.add_argument("--renoise-weights-late", default="5,1,1,1",
                   help="weights of t* in {10,250,500,750} from --renoise-switch-step on (Sec. 3.7.2: 5,1,1,1)")
    p.add_argument("--renoise-switch-step", type=int, default=None, help="step from which the late re-noise weights "
                   "apply ('after the model is trained stable'); default half the phase's --max-steps")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint and export every N steps")
    p.add_argument("--sample-every", type=int, default=0, help="write a sample grid every N steps; 0 off")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward (memory)")
    p.add_argument("--vae-slice", type=int, default=4, help="images per VAE encode call (memory)")
    p.add_argument("--max-bad-steps", type=int, default=20, help="stop after this many NaN/Inf steps in a row")
    p.add_argument("--seed", type=int, default=0, help="seed of data order, noise and timesteps")
    p.add_argument("--device", default=None, help="cuda or cpu; default cuda when available")
    p.add_argument("--shard", choices=["zero", "fsdp"], default="zero", help="how several ranks split the models: "
                   "zero = DDP + ZeroRedundancyOptimizer (whole-UNet Adam states only); fsdp = FSDP2 (shard.py): "
                   "weights, gradients and Adam states of the teacher, discriminator and whole-UNet student, bf16 "
                   "compute with fp32 masters on GPU (a LoRA student stays DDP). Same checkpoint.pt either way")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet blocks of the student, teacher and "
                   "discriminator (slow first steps; same results to float tolerance)")
    p.add_argument("--tensorboard", metavar="DIR", default=None, help="also log to TensorBoard in DIR (rank 0): every "
                   "loss term, D(real)/D(fake), lr, step time, images/s, sample grids; needs `pip install "
                   "tensorboard`; log.jsonl stays the record")
    return p.parse_args(argv)


def check_args(args, world):
    """Every argument, before any work and without writing anything. Returns the phases to run."""
    for flag in ("batch_size", "micro_batch_size", "save_every", "max_steps", "vae_slice", "max_bad_steps",
                 "lora_rank", "resolution"):
        if getattr(args, flag) < 1:
            raise files.RunError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.sample_every < 0 or (args.renoise_switch_step is not None and args.renoise_switch_step < 0):
        raise files.RunError("--sample-every and --renoise-switch-step must be >= 0")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise files.RunError(f"--lr must be a positive number, got {args.lr}")
    try:
        w = [float(x) for x in args.renoise_weights_late.split(",")]
    except ValueError:
        w = []
    if len(w) != 4 or not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
        raise files.RunError(f"--renoise-weights-late must be 4 non-negative numbers, not all 0, like 5,1,1,1; "
                             f"got {args.renoise_weights_late!r}")
    if args.batch_size % (args.micro_batch_size * world):
        raise files.RunError(f"--batch-size {args.batch_size} must be a multiple of --micro-batch-size "
                             f"{args.micro_batch_size} x {world} ranks")
    every = lm.stage_phases(args.stage, ablations=True)
    if args.phase is not None and args.phase not in every:
        raise files.RunError(f"stage {args.stage} has no phase {args.phase!r}; its phases: {', '.join(every)}")
    if args.prediction is not None and args.stage != "2to1":
        raise files.RunError(f"--prediction applies to stage 2to1 only (the 1-step student); stage {args.stage} "
                             f"predicts epsilon")
    if args.prediction == "epsilon" and args.phase == "convert":
        raise files.RunError("--phase convert is the switch to x0 itself; --prediction epsilon skips it")
    files.check_writable_folder(args.out)
    if args.tensorboard is not None:
        try:
            import torch.utils.tensorboard  # noqa: F401 -- only when asked; it needs the tensorboard package
        except ImportError:
            raise files.RunError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        files.check_writable_folder(args.tensorboard)
    return [args.phase] if args.phase else list(run_order(args.stage, args.prediction))


def check_resume(args, phases):
    """Each phase's checkpoint, if any, is ours and was trained with the same arguments (RESUME_MAY_CHANGE aside).
    Run on rank 0 under the lock, before any work; leftover temp files of an interrupted save go first."""
    files.remove_temp_files(Path(args.out) / args.stage)
    for phase in phases:
        path = phase_dir(args, args.stage, phase) / "checkpoint.pt"
        if not path.exists():
            continue
        saved = files.read_checkpoint(path, args.stage, phase)["args"]
        for k, v in vars(args).items():
            if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != v:
                raise files.RunError(f"{path} was trained with --{k.replace('_', '-')} {saved[k]}, this run has "
                                     f"{v}: resume with the same value, or use another --out")


def setup_ddp(args):
    """The plain torchrun pattern: RANK / LOCAL_RANK / WORLD_SIZE from the environment."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local, world = (int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])) \
        if ddp else (0, 0, 1)
    use_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if ddp:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed + rank)  # per-rank offset; the training draws themselves are per sample
    return {"rank": rank, "world": world, "master": rank == 0, "device": device,
            "ids": [local] if use_cuda else None, "dtype": torch.bfloat16 if use_cuda else torch.float32}


def load_frozen(args, ctx):
    """Shared by every phase: data, text encoders, VAE, the base UNet's config (and weights, for a single file)."""
    dev = ctx["device"]
    ctx["data"] = data.open_data(args.data, args.resolution, args.min_size, args.sharpness, args.min_aesthetic,
                                 args.clean_captions, args.seed, base=args.base, aesthetic_key=args.aesthetic_key)
    cached = isinstance(ctx["data"], data.CachedData)
    single = weights.is_file(args.base)
    ctx["base_sd"] = weights.read_safetensors(args.base) if single else None
    if not cached or args.sample_every:  # a cache needs no VAE or text encoder, except for sample grids
        ctx["text"] = weights.load_text(args.base, dev, ctx["dtype"], sd=ctx["base_sd"])
        ctx["vae_dtype"] = ctx["dtype"]
        ctx["vae"] = weights.load_vae(args.base, dev, ctx["vae_dtype"], sd=ctx["base_sd"]).eval().requires_grad_(False)
    ctx["latent_size"] = ctx["data"].latent_shape[-1] if cached else args.resolution // ctx["vae"].config.downscale
    ctx["unet_config"] = weights.unet_config(args.base, ctx["base_sd"])
    if ctx["master"]:
        kind = f"cache {args.data} (filters applied when it was made)" if cached else "images"
        print(f"data: {kind}: {len(ctx['data'])} usable {ctx['data'].stats}; world {ctx['world']}; device {dev}")


def main(argv=None):
    args = parse_args(argv)
    try:
        phases = check_args(args, int(os.environ.get("WORLD_SIZE", 1)))
    except files.RunError as e:
        raise SystemExit(f"error: {e}")
    ctx = setup_ddp(args)
    lock, error = files.OutputLock(args.out), None
    try:
        on_master(ctx, lambda: (lock.acquire(), check_resume(args, phases)))
        if args.tensorboard and ctx["master"]:
            from torch.utils.tensorboard import SummaryWriter
            ctx["tensorboard"] = SummaryWriter(args.tensorboard)
        load_frozen(args, ctx)
        for phase in phases:
            if files.progress_step(phase_dir(args, args.stage, phase)) >= args.max_steps:
                if ctx["master"]:
                    print(f"[{args.stage}/{phase}] finished already (--max-steps {args.max_steps}); skipped")
                continue
            Phase(args, ctx, args.stage, phase).run()
    except (files.RunError, weights.CheckpointError, ValueError, RuntimeError) as e:
        error = e
    finally:
        if ctx.get("tensorboard"):
            ctx["tensorboard"].close()
        if ctx["master"]:
            lock.release()
        if ctx["world"] > 1:
            dist.destroy_process_group()
    if error is not None:
        raise SystemExit(f"error: {error}")


if __name__ == "__main__":
    main()
