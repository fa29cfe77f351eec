"""Progressive adversarial distillation (SDXL-Lightning, Sec. 3): every stage and phase, one file.

    python train.py --stage 8to4 --data images/ --batch-size 8 --micro-batch-size 1      # one GPU or CPU
    torchrun --nproc_per_node 8 train.py --stage 2to1 --data shards/ --batch-size 512 --micro-batch-size 4
    torchrun --nnodes 8 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        train.py --stage 4to2 --data shards/ --batch-size 512 --micro-batch-size 8      # the paper's 64 GPUs
    for s in 128to32 32to8 8to4 4to2 2to1; do torchrun --nproc_per_node 8 train.py --stage $s --data shards/; done

Without --phase a stage runs its phases in order (lightning_min.STAGES), each starting from the previous
one's output. Re-running the same command resumes from the last checkpoint; finished phases are skipped;
a larger --max-steps continues a finished phase. Outputs per phase in OUT/<stage>/<phase>/:
sdxl_lightning_{N}step_unet.safetensors (1 step: ..._1step_unet_x0), in LoRA phases also
sdxl_lightning_{N}step_lora.safetensors, checkpoint.pt, log.jsonl and sample grids.
"""
import argparse
import hashlib
import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data as data_mod
import lightning_min as lm
import lora as lora_mod
import sample as sample_mod
import weights
from discriminator import Discriminator
from safetensors.torch import save_file

SAMPLE_PROMPTS = ["a photo of a cat wearing a spacesuit", "a watercolor painting of a lighthouse at dawn",
                  "portrait of an old fisherman, dramatic light", "a bowl of ramen, studio photograph"]


def unet_filename(steps):
    return "sdxl_lightning_1step_unet_x0.safetensors" if steps == 1 else f"sdxl_lightning_{steps}step_unet.safetensors"


def seed_for(*parts) -> int:
    """A 63-bit seed from anything printable, the same on every rank and every run."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


# ----------------------------------------------------------------------------------------------------
# Where the teacher, skip-level teacher and student come from


def previous_output(out, steps):
    """The newest UNet with `steps` steps that an earlier stage wrote under OUT, or None."""
    for stage in lm.STAGES.values():
        if stage.student_steps == steps:
            p = Path(out) / stage.name / stage.phases[-1] / unet_filename(steps)
            if p.exists():
                return str(p)
    return None


def default_teacher(args, steps):
    """Our own earlier stage's result when OUT has it, else the official Lightning UNet (8, 4, 2 steps),
    else the SDXL base for 128 steps."""
    if steps == 128:
        return "base"
    found = previous_output(args.out, steps)
    if found:
        return found
    if steps in weights.LIGHTNING_UNETS and steps != 1:
        return str(weights.fetch(weights.LIGHTNING_REPO, weights.lightning_unet_file(steps)))
    raise ValueError(f"no {steps}-step teacher: run the stage that makes it with the same --out, or pass --teacher")


def phase_output(args, stage, phase):
    return Path(args.out) / stage / phase


def finished_step(args, phase):
    """The step of the phase's last complete checkpoint and exports (0 if none), without loading it."""
    p = phase_output(args, args.stage, phase) / "progress.json"
    return json.loads(p.read_text())["step"] if p.exists() else 0


# ----------------------------------------------------------------------------------------------------
# One phase


class Phase:
    """Everything one phase holds: models, optimizers, data, and the step."""

    def __init__(self, args, ctx, stage, phase, init_unet, prev_lora):
        self.args, self.ctx, self.stage, self.phase = args, ctx, stage, phase
        self.spec = spec = lm.phase_spec(stage, phase)
        self.st = lm.STAGES[stage]
        self.dir = phase_output(args, stage, phase)
        dev, self.dtype = ctx["device"], ctx["dtype"]
        lr = args.lr or spec.lr
        # --- the student
        self.student = self.load_unet(init_unet).to(dev, torch.float32)  # fp32 master weights
        self.student.gradient_checkpointing = args.grad_checkpointing
        if spec.lora:
            self.student.requires_grad_(False)
            lora_mod.add_lora(self.student, args.lora_rank, args.lora_alpha)
            if prev_lora:  # uncond continues the LoRA trained in cond
                self.student.lora.load_state_dict(lora_mod.read_lora(prev_lora), strict=True)
            self.student.lora.to(dev, torch.float32)
        # --- the teacher: the student with LoRA off in LoRA phases whose teacher is the student's base
        #     (no second copy); else a frozen copy in the compute dtype
        t_src = args.teacher if phase not in self.st.skip_level_phases else args.skip_level_teacher
        t_src = t_src or default_teacher(args, spec.teacher_steps)
        self.teacher_is_student = spec.lora and t_src == init_unet
        self.teacher = None if self.teacher_is_student else self.load_unet(t_src).to(dev, self.dtype).requires_grad_(False).eval()
        self.teacher_src = t_src
        # --- the discriminator, re-initialized from the pretrained base UNet (Sec. 3.3, 3.6)
        self.disc = None
        if spec.discriminator:
            if ctx.get("base_unet") is None:  # loaded once, kept on the CPU, copied per phase
                ctx["base_unet"] = self.load_unet("base")
            self.disc = Discriminator(ctx["base_unet"], spec.discriminator == "conditional",
                                      args.resolution // ctx["vae"].config.downscale).to(dev, torch.float32)
            self.disc.backbone.gradient_checkpointing = args.grad_checkpointing
        # --- DDP, optimizers: Adam per Sec. 3.6; ZeRO shards the whole-UNet states across ranks
        params = [p for p in self.student.parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in params)
        ddp = ctx["world"] > 1
        self.g_model = DDP(self.student, device_ids=ctx["ids"]) if ddp else self.student
        self.opt_g = self.make_opt(params, lr, spec.betas, zero=ddp and not spec.lora)
        if self.disc is not None:
            self.d_model = DDP(self.disc, device_ids=ctx["ids"]) if ddp else self.disc
            self.opt_d = self.make_opt(list(self.disc.parameters()), lr, spec.betas, zero=ddp)
        self.step, self.bad_in_row, self.bad_total, self.skipped_images = 0, 0, 0, 0
        self.resume()

    def load_unet(self, src):
        ctx = self.ctx
        if src == "base":
            return weights.load_unet(self.args.base, ctx["unet_config"], "cpu", torch.float32, sd=ctx.get("base_sd"))
        unet = weights.load_unet(src, ctx["unet_config"], "cpu", torch.float32)
        if unet.config != ctx["unet_config"]:
            raise weights.CheckpointError(f"{src}: architecture {unet.config} differs from the base's {ctx['unet_config']}")
        return unet

    def make_opt(self, params, lr, betas, zero):
        if zero:
            return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.Adam, lr=lr, betas=betas, weight_decay=0.0)
        return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=0.0)

    # ------------------------------------------------------------------ checkpoints
    def trainable_state(self):
        return self.student.lora.state_dict() if self.spec.lora else self.student.state_dict()

    def save(self):
        """One file with everything to resume, written atomically (temp file, then rename)."""
        for opt in (self.opt_g, getattr(self, "opt_d", None)):
            if isinstance(opt, ZeroRedundancyOptimizer):
                opt.consolidate_state_dict(to=0)  # collective: every rank takes part
        if not self.ctx["master"]:
            return
        state = {"stage": self.stage, "phase": self.phase, "step": self.step, "bad_total": self.bad_total,
                 "student": {k: v.cpu() for k, v in self.trainable_state().items()},
                 "disc": None if self.disc is None else {k: v.cpu() for k, v in self.disc.state_dict().items()},
                 "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict() if self.disc is not None else None,
                 "rng": torch.get_rng_state(), "data_position": (self.step + 1) * self.args.batch_size}
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / "checkpoint.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.dir / "checkpoint.pt")
        self.export()
        (self.dir / "progress.json").write_text(json.dumps({"step": self.step}))  # last: marks the exports complete

    def resume(self):
        path = self.dir / "checkpoint.pt"
        if not path.exists():
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        if (state["stage"], state["phase"]) != (self.stage, self.phase):
            raise ValueError(f"{path}: a checkpoint of {state['stage']}/{state['phase']}, not {self.stage}/{self.phase}")
        target = self.student.lora if self.spec.lora else self.student
        target.load_state_dict(state["student"], strict=True)
        if self.disc is not None:
            self.disc.load_state_dict(state["disc"], strict=True)
            self.opt_d.load_state_dict(state["opt_d"])
        self.opt_g.load_state_dict(state["opt_g"])
        torch.set_rng_state(state["rng"])
        self.step, self.bad_total = state["step"], state["bad_total"]
        self.log(f"resumed {path} at step {self.step}")

    def export(self):
        """The official file formats: a fp16 diffusers-layout UNet (LoRA merged in), and the LoRA."""
        steps = self.st.student_steps
        sd = {k: v.detach().float().cpu() for k, v in lora_mod.base_state_dict(self.student).items()}
        if self.spec.lora:
            lsd = {k: v.detach().float().cpu() for k, v in lora_mod.lora_state_dict(self.student).items()}
            merged = weights.build_strict(type(self.student), self.student.config, sd, "student")
            lora_mod.merge_lora(merged, lsd, source="student LoRA")
            sd = merged.state_dict()
            lora_mod.save_lora(self.student, self.dir / f"sdxl_lightning_{steps}step_lora.safetensors")
        atomic_save_file({k: v.half().contiguous() for k, v in sd.items()}, self.dir / unet_filename(steps))
        (self.dir / "config.json").write_text(json.dumps(self.student.config.to_diffusers(), indent=1))

    # ------------------------------------------------------------------ one optimizer step
    def micro_batches(self):
        """This rank's micro-batches of the current step: latents, conditioning, and per-sample draws."""
        a, ctx, spec = self.args, self.ctx, self.spec
        accum = a.batch_size // (a.micro_batch_size * ctx["world"])
        for i in range(accum):
            pos = data_mod.rank_positions(self.step, a.batch_size, a.micro_batch_size, ctx["rank"], ctx["world"], i)
            before = ctx["data"].stats.get("skipped", 0)
            pixels, captions, ids = data_mod.batch(ctx["data"], pos)
            self.skipped_images += ctx["data"].stats.get("skipped", 0) - before
            dev = ctx["device"]
            with torch.no_grad(), self.autocast():
                x0 = ctx["vae"].encode_latents(pixels.to(dev, ctx["vae_dtype"]), a.vae_slice).float()
                context, pooled = ctx["text"].encode(captions)
            cond = (context.to(dev, self.dtype), pooled.to(dev, self.dtype), ids.to(dev, self.dtype))
            # per-sample draws from (seed, stage, phase, global position): rank- and resume-independent
            eps, eps2, t, t_star = [], [], [], []
            weights_ = a.renoise_weights_late if (a.renoise_switch_step is not None and self.step >= a.renoise_switch_step) \
                else (1, 1, 1, 1)
            for g in pos:
                gen = torch.Generator().manual_seed(seed_for(a.seed, self.stage, self.phase, g))
                eps.append(torch.randn(x0.shape[1:], generator=gen))
                eps2.append(torch.randn(x0.shape[1:], generator=gen))
                t.append(spec.timesteps[torch.randint(len(spec.timesteps), (1,), generator=gen).item()])
                t_star.append(lm.renoise_timesteps(gen, 1, weights_)[0].item())
            t = torch.tensor(t, device=dev)
            yield {"x0": x0, "cond": cond, "eps": torch.stack(eps).to(dev), "eps2": torch.stack(eps2).to(dev),
                   "t": t, "t_star": torch.tensor(t_star, device=dev), "accum": accum}

    def autocast(self):
        return torch.autocast("cuda", torch.bfloat16) if self.ctx["device"].type == "cuda" else nullcontext()

    def model_fn(self, unet, cond, guidance=0.0):
        return sample_mod.unet_model(unet, *cond, guidance, next(unet.parameters()).dtype)

    def teacher_fn(self, cond):
        if self.teacher_is_student:
            return self.model_fn(self.student, cond)  # called with LoRA disabled, see below
        return self.model_fn(self.teacher, cond, self.spec.cfg)

    @torch.no_grad()
    def targets(self, mb):
        """x_t (Eq. 1, with Eq. 24 at t = T), t - ns, and the teacher's x_{t-ns} (Eq. 7-13) or eps (Eq. 27)."""
        spec = self.spec
        x_t = lm.forward_fixed(mb["x0"], mb["eps"], mb["t"])
        t_tgt = lm.target_time(mb["t"], spec.n, spec.teacher_steps)
        if self.teacher_is_student:
            lora_mod.set_lora_enabled(self.student, False)
        with self.autocast():
            fn = self.teacher_fn(mb["cond"])
            if spec.loss == "convert":
                tgt = fn(x_t, mb["t"]).float()  # the frozen eps-model's prediction, Eq. (27)
            else:
                tgt = lm.teacher_rollout(fn, x_t, mb["t"], t_tgt, spec.n, spec.teacher_prediction,
                                         s=lm.T / spec.teacher_steps)
        if self.teacher_is_student:
            lora_mod.set_lora_enabled(self.student, True)
        return x_t, t_tgt, tgt

    def disc_input(self, x, t_tgt, mb):
        """Sec. 3.7.2: a clean target (t - ns = 0) is noised again to t* with a fresh noise (Eq. 25-26)."""
        clean = t_tgt == 0
        t_d = torch.where(clean, mb["t_star"], t_tgt)
        x = torch.where(clean[:, None, None, None], lm.forward(x, mb["eps2"], mb["t_star"]).to(x.dtype), x)
        return x, t_d

    def logits(self, disc, x, t_tgt, x_t, mb):
        x, t_d = self.disc_input(x, t_tgt, mb)
        return disc(x, t_d, mb["cond"], x_t, mb["t"])

    def train_step(self):
        """Alternating updates (Sec. 3.2): the discriminator on Eq. (20), then the student on Eq. (21);
        or the student alone on Eq. (16) / Eq. (29). Gradients sync on the last micro step only."""
        spec, logs = self.spec, {}
        cache = [(mb, *self.targets(mb)) for mb in self.micro_batches()]
        n = len(cache)
        if self.disc is not None:  # --- discriminator update
            self.disc.requires_grad_(True)
            self.opt_d.zero_grad(set_to_none=True)
            for i, (mb, x_t, t_tgt, tgt) in enumerate(cache):
                with torch.no_grad(), self.autocast():
                    x_hat = lm.student_jump(self.model_fn(self.student, mb["cond"]), x_t, mb["t"], t_tgt, spec.student_prediction)
                sync = i == n - 1 or not isinstance(self.d_model, DDP)
                with nullcontext() if sync else self.d_model.no_sync():
                    with self.autocast():
                        real = self.logits(self.d_model, tgt, t_tgt, x_t, mb)
                        fake = self.logits(self.d_model, x_hat, t_tgt, x_t, mb)
                        loss = lm.loss_d(real, fake)
                    (loss / n).backward()
                add(logs, loss_d=loss.item() / n, d_real=torch.sigmoid(real).mean().item() / n,
                    d_fake=torch.sigmoid(fake).mean().item() / n)
            if self.finite(logs["loss_d"]):
                self.opt_d.step()
            self.disc.requires_grad_(False)  # the student's update must not touch D
        self.opt_g.zero_grad(set_to_none=True)
        for i, (mb, x_t, t_tgt, tgt) in enumerate(cache):  # --- student update
            sync = i == n - 1 or not isinstance(self.g_model, DDP)
            with nullcontext() if sync else self.g_model.no_sync():
                with self.autocast():
                    fn = self.model_fn(self.g_model, mb["cond"])
                    if spec.loss == "convert":
                        loss = lm.loss_convert(fn(x_t, mb["t"]), x_t, tgt, mb["t"])
                    else:
                        x_hat = lm.student_jump(fn, x_t, mb["t"], t_tgt, spec.student_prediction)
                        loss = lm.loss_mse(x_hat, tgt) if spec.loss == "mse" else \
                            lm.loss_g(self.logits(self.disc, x_hat, t_tgt, x_t, mb))
                (loss / n).backward()
            add(logs, **{"loss_g" if spec.loss == "adversarial" else f"loss_{spec.loss}": loss.item() / n})
        key = next(k for k in logs if k.startswith("loss_") and k != "loss_d")
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
        ctx, res = self.ctx, self.args.resolution
        imgs = sample_mod.generate(ctx["text"], self.student, ctx["vae"], SAMPLE_PROMPTS, self.st.student_steps, 0,
                                   res, res, self.spec.student_prediction, 0.0, torch.float32)
        pil = sample_mod.to_pil(imgs)
        from PIL import Image
        grid = Image.new("RGB", (res * 2, res * 2))
        for i, im in enumerate(pil[:4]):
            grid.paste(im, ((i % 2) * res, (i // 2) * res))
        grid.save(self.dir / f"samples_{self.step:06d}.png")

    def write_meta(self):
        """phase.json: what this phase trains with, for the reader of a run folder (and the tests)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = {"stage": self.stage, "phase": self.phase, "teacher": self.teacher_src,
                "teacher_is_student_without_lora": self.teacher_is_student, "trainable_params": self.n_trainable,
                "world_size": self.ctx["world"], "args": vars(self.args), **self.spec.__dict__}
        (self.dir / "phase.json").write_text(json.dumps(meta, indent=1, default=str))

    def log(self, msg):
        if self.ctx["master"]:
            tqdm.write(f"[{self.stage}/{self.phase}] {msg}")

    def run(self):
        a, ctx = self.args, self.ctx
        if self.step >= a.max_steps:
            self.log(f"finished already (step {self.step} >= --max-steps {a.max_steps}); skipped")
            return
        self.log(f"teacher {self.teacher_src}{' (the student with LoRA off)' if self.teacher_is_student else ''}; "
                 f"trainable {self.n_trainable:,} params; lr {a.lr or self.spec.lr}; timesteps {self.spec.timesteps}")
        bar = tqdm(total=a.max_steps, initial=self.step, disable=not ctx["master"], desc=f"{self.stage}/{self.phase}")
        while self.step < a.max_steps:
            t0 = time.time()
            logs = self.mean_over_ranks(self.train_step())
            if ctx["device"].type == "cuda":
                torch.cuda.synchronize()
            dt = time.time() - t0
            self.step += 1
            logs.update(step=self.step, lr=self.opt_g.param_groups[0]["lr"], step_time=dt,
                        images_per_s=a.batch_size / dt, bad_steps=self.bad_total, skipped_images=self.skipped_images)
            if ctx["master"]:
                if self.step == 1 or not self.dir.exists():
                    self.write_meta()
                with open(self.dir / "log.jsonl", "a") as f:
                    f.write(json.dumps(logs) + "\n")
                bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if k.startswith(("loss", "d_"))})
                bar.update(1)
            if self.step % a.save_every == 0 or self.step == a.max_steps:
                self.save()
            if ctx["master"] and a.sample_every and self.step % a.sample_every == 0:
                self.sample_grid()
        bar.close()
        self.log(f"done: {self.dir / unet_filename(self.st.student_steps)}")


def add(logs, **kv):
    for k, v in kv.items():
        logs[k] = logs.get(k, 0.0) + v


def atomic_save_file(tensors, path):
    tmp = Path(str(path) + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------
# Main: arguments, DDP, shared frozen parts, then the phases in order


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, choices=list(lm.STAGES), help="which distillation stage (Sec. 3.6)")
    p.add_argument("--phase", choices=["mse", "convert", "cond", "uncond", "full"], default=None,
                   help="run one phase only; default: all the stage's phases in order")
    p.add_argument("--data", required=True, help="a folder of images with same-stem .txt captions, or .tar shards")
    p.add_argument("--base", default=weights.SDXL_BASE, help="SDXL base: text encoders, VAE, UNet config, "
                   "discriminator init and the 128to32 teacher (hub id, diffusers folder or single file)")
    p.add_argument("--teacher", default=None, help="teacher UNet file; default: this --out's earlier stage, else the "
                   "official Lightning UNet (8/4/2 steps), else the base (128 steps)")
    p.add_argument("--skip-level-teacher", default=None, help="teacher of the uncond/full phases of 4to2 and 2to1 "
                   "(Sec. 3.4); default as --teacher, one level up")
    p.add_argument("--init", default=None, help="student initial UNet for the stage's first phase; default the teacher")
    p.add_argument("--out", default="runs", help="output folder; OUT/<stage>/<phase>/ per phase")
    p.add_argument("--resolution", type=int, default=1024, help="square training resolution in pixels")
    p.add_argument("--min-size", type=int, default=1024, help="skip images whose shorter side is below this (Sec. 3.6)")
    p.add_argument("--sharpness", type=float, default=0.0, help="skip images whose Laplacian variance is below this; 0 off")
    p.add_argument("--batch-size", type=int, default=512, help="global batch (paper: 512), reached by accumulation")
    p.add_argument("--micro-batch-size", type=int, default=1, help="samples per GPU per forward")
    p.add_argument("--max-steps", type=int, default=1000, help="optimizer steps per phase (a target: re-run to extend)")
    p.add_argument("--lr", type=float, default=None, help="learning rate; default the paper's for the phase")
    p.add_argument("--lora-rank", type=int, default=64, help="LoRA rank (released: 64)")
    p.add_argument("--lora-alpha", type=float, default=8.0, help="LoRA alpha (released: 8)")
    p.add_argument("--renoise-weights-late", type=lambda s: tuple(float(x) for x in s.split(",")), default=(5, 1, 1, 1),
                   help="weights of t* in {10,250,500,750} after --renoise-switch-step (Sec. 3.7.2: 5,1,1,1)")
    p.add_argument("--renoise-switch-step", type=int, default=None,
                   help="step from which the late re-noise weights apply; default never (1:1:1:1 throughout)")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint and export every N steps")
    p.add_argument("--sample-every", type=int, default=0, help="write a sample grid every N steps; 0 off")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward (memory)")
    p.add_argument("--vae-slice", type=int, default=4, help="images per VAE encode call (memory)")
    p.add_argument("--max-bad-steps", type=int, default=20, help="stop after this many NaN/Inf steps in a row")
    p.add_argument("--seed", type=int, default=0, help="seed of data order, noise and timesteps")
    p.add_argument("--device", default=None, help="cuda or cpu; default cuda when available")
    return p.parse_args(argv)


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


def check_args(args, world):
    if args.batch_size % (args.micro_batch_size * world):
        raise ValueError(f"--batch-size {args.batch_size} must be a multiple of --micro-batch-size "
                         f"{args.micro_batch_size} x {world} ranks")
    phases = lm.STAGES[args.stage].phases
    if args.phase is not None and args.phase not in phases:
        raise ValueError(f"stage {args.stage} has no phase {args.phase!r}; its phases: {', '.join(phases)}")
    return [args.phase] if args.phase else list(phases)


def main(argv=None):
    args = parse_args(argv)
    ctx = setup_ddp(args)
    try:
        phases = check_args(args, ctx["world"])
        dev = ctx["device"]
        # frozen parts shared by every phase: data, text encoders, VAE, the pretrained base UNet
        ctx["data"] = data_mod.ImageCaptionData(args.data, args.resolution, args.min_size, args.sharpness, args.seed)
        single = weights.is_file(args.base)
        ctx["base_sd"] = weights.read_safetensors(args.base) if single else None
        ctx["text"] = weights.load_text(args.base, dev, ctx["dtype"], sd=ctx["base_sd"])
        ctx["vae_dtype"] = ctx["dtype"]
        ctx["vae"] = weights.load_vae(args.base, dev, ctx["vae_dtype"], sd=ctx["base_sd"]).eval().requires_grad_(False)
        ctx["unet_config"] = weights.unet_config(args.base, ctx["base_sd"])
        if ctx["master"]:
            print(f"data: {len(ctx['data'])} usable images {ctx['data'].stats}; world {ctx['world']}; device {dev}")
        all_phases = lm.STAGES[args.stage].phases
        for phase in phases:
            i = all_phases.index(phase)
            prev = phase_output(args, args.stage, all_phases[i - 1]) if i > 0 else None
            steps = lm.STAGES[args.stage].student_steps
            spec = lm.phase_spec(args.stage, phase)
            init, prev_lora = args.init, None
            if prev is not None and (prev / unet_filename(steps)).exists():
                prev_spec = lm.phase_spec(args.stage, all_phases[i - 1])
                if spec.lora and prev_spec.lora:  # same base, continue the LoRA
                    init, prev_lora = None, prev / f"sdxl_lightning_{steps}step_lora.safetensors"
                else:  # merged LoRA or whole UNet: start from its exported UNet
                    init = str(prev / unet_filename(steps))
            elif prev is not None and args.phase is None:
                raise RuntimeError(f"{prev} has no output")
            if init is None:
                init = args.teacher or default_teacher(args, lm.phase_spec(args.stage, all_phases[0]).teacher_steps)
            if finished_step(args, phase) >= args.max_steps:
                if ctx["master"]:
                    print(f"[{args.stage}/{phase}] finished already (--max-steps {args.max_steps}); skipped")
                continue
            Phase(args, ctx, args.stage, phase, init, prev_lora).run()
    except (weights.CheckpointError, ValueError, RuntimeError) as e:
        if ctx["world"] > 1:
            dist.destroy_process_group()
        raise SystemExit(f"error: {e}")
    if ctx["world"] > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
