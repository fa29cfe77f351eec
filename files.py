"""The run folder: atomic writes (one function, atomic_write), the lock on the output folder, checkpoints
saved and read with clear errors, the release-format exports, progress.json and log.jsonl, the checks
before a resume, and the crash points that test the save sequence. No method here; train.py uses it.

A phase's folder OUT/<stage>/<phase>/ is saved in this order (train.save), so that a crash at any point
leaves a state that re-running the same command completes:
  1. checkpoint.pt        everything to resume, fp32 (temp file, fsync, rename)
  2. the exports          sdxl_lightning_*.safetensors, config.json (each: temp file, fsync, rename)
  3. progress.json        {"step": k}: the exports are those of checkpoint step k
A re-run removes leftover *.tmp files, resumes from checkpoint.pt, and when progress.json is behind the
checkpoint writes the exports again before anything else.

Crash points, for tests: LIGHTNING_CRASH_AT=<name> makes the run stop dead at the point of that name (it
raises SimulatedCrash, which nothing catches and nothing cleans up after, so the files are left as a kill
would leave them). Names: "step<k>" after optimizer step k (before its save), "checkpoint.tmp" (temp
checkpoint written, not renamed), "checkpoint" (renamed, no exports), "export.tmp" (the first export's
temp file written, not renamed), "exports" (exports written, progress.json not). With
LIGHTNING_CRASH_HARD=1 the process exits on the spot instead (os._exit(137), like kill -9: the lock stays
behind, stale).

Read top to bottom: crash points and errors, atomic writes, the lock, names, checkpoints, where UNets come
from, exports, the log.
"""
import errno
import fcntl
import json
import os
import pickle
import re
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

import lightning_min as lm
import lora
import unet as unet_lib
import weights

CHECKPOINT_KEYS = {"stage", "phase", "step", "args", "init", "student", "disc", "opt_g", "opt_d", "rng"}


class SimulatedCrash(BaseException):
    """Raised at a crash point (LIGHTNING_CRASH_AT); a BaseException so no `except Exception` swallows it."""


def crash_point(name):
    if os.environ.get("LIGHTNING_CRASH_AT") == name:
        if os.environ.get("LIGHTNING_CRASH_HARD"):  # dies on the spot, as with kill -9: no cleanup
            os._exit(137)
        raise SimulatedCrash(name)


class RunError(Exception):
    """Bad input or a run folder we must not touch: the command line shows one line, 'error: ...'."""


# ----------------------------------------------------------------------------------------------------
# Atomic writes


def temp_path(path):
    """Where atomic_write writes `path` before the rename; a killed run leaves it behind for a re-run to
    remove."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def atomic_write(path, write):
    """write(tmp) fills a temp file (or folder) next to `path`; it is flushed to disk and renamed over `path`,
    so `path` is always either the old file or the whole new one. A full disk says so and names the file.
    A folder's regular files are flushed one by one; write() must clear an old folder at `path` itself
    (os.replace cannot replace a non-empty one)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        for f in [p for p in tmp.rglob("*") if p.is_file()] if tmp.is_dir() else [tmp]:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)  # the data is on disk before the rename makes it visible
            finally:
                os.close(fd)
        if path.suffix in (".pt", ".safetensors"):
            crash_point("checkpoint.tmp" if path.suffix == ".pt" else "export.tmp")
        os.replace(tmp, path)
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save: RuntimeError; safetensors: its own
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or \
            (not isinstance(e, OSError) and (f"os error {errno.ENOSPC})" in str(e) or
                                             f"os error {errno.EDQUOT})" in str(e) or
                                             shutil.disk_usage(path.parent).free < 1 << 20))
        if full:
            raise RunError(f"{path}: the disk is full (writing it failed: {e}); the previous file, if any, "
                           f"is unchanged; free some space and re-run the same command to resume") from None
        raise
    return path


def save_torch(obj, path):
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_safetensors(tensors, path, metadata=None):
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def save_json(obj, path):
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1, default=str)))


def to_pil(images):
    """(B, 3, H, W) in [-1, 1] -> PIL images, rounding as diffusers' image processor does."""
    from PIL import Image
    arr = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]


def save_grid(images, path):
    """Four PIL images of one size as a 2x2 PNG grid. -> the grid as an (H, W, 3) uint8 array."""
    from PIL import Image
    w, h = images[0].size
    grid = Image.new("RGB", (w * 2, h * 2))
    for i, im in enumerate(images[:4]):
        grid.paste(im, ((i % 2) * w, (i // 2) * h))
    atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
    return np.asarray(grid)


def remove_temp_files(folder):
    """Leftovers of an interrupted save; the files they would have replaced are still whole."""
    for tmp in Path(folder).rglob("*.tmp*"):
        if tmp.is_file():
            tmp.unlink()


# ----------------------------------------------------------------------------------------------------
# The output folder's lock: one run per --out


def check_writable_folder(out):
    """--out must be a folder we can create or write, checked before any work."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a folder")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RunError(f"--out {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunError(f"--out {out}: {parent} is not writable")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


class OutputLock:
    """OUT/train.lock holds the pid and host of the run using OUT; a second run is refused. The run holds an
    flock on the file for its lifetime (the kernel drops it when the process dies, kill -9 included), so
    taking over a stale lock is atomic: only the one process holding the flock reads and rewrites the file.
    A file naming a live process (or one on another host, where flock may not reach) is refused as well."""

    def __init__(self, out):
        self.out, self.path, self.made, self.fd = Path(out), Path(out) / "train.lock", [], None

    @property
    def held(self):
        return self.fd is not None

    def acquire(self):
        check_writable_folder(self.out)
        p = self.out
        while not p.exists():
            self.made.append(p)
            p = p.parent
        self.out.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        while True:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                self._refuse(self._holder() or {})
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else its holder released (unlinked) it between our open and flock: open it again
                break
            os.close(fd)
        other = self._holder(fd)
        if other is not None and (other["host"] != me["host"] or _alive(other["pid"])):
            os.close(fd)
            self._refuse(other)
        os.ftruncate(fd, 0)  # empty (just made) or stale: its process is gone
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self.fd = fd
        return self

    def _holder(self, fd=None):
        """The lock's {"pid", "host", "since"}; None when empty; a file this program did not write is
        refused."""
        try:
            text = os.pread(fd, 1 << 16, 0).decode() if fd is not None else self.path.read_text()
        except (OSError, UnicodeDecodeError):
            text = "?"
        if not text.strip():
            return None
        try:
            other = json.loads(text)
            other["pid"], other["host"] = int(other["pid"]), str(other["host"])
            return other
        except (ValueError, KeyError, TypeError):
            if fd is not None:
                os.close(fd)
            raise RunError(f"{self.path} exists but is not a lock this program wrote; if no other "
                           f"run uses {self.out}, delete it") from None

    def _refuse(self, other):
        raise RunError(f"{self.out} is in use by another train.py run (pid {other.get('pid', '?')} on "
                       f"{other.get('host', '?')}, since {other.get('since')}); wait for it or use another "
                       f"--out (if that run is gone, delete {self.path})")

    def release(self):
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still holding the flock: see acquire's inode check
            os.close(self.fd)
            self.fd = None
        for p in self.made:  # folders this run created and left empty (refused before any work)
            try:
                p.rmdir()
            except OSError:
                break


# ----------------------------------------------------------------------------------------------------
# Names


def phase_dir(out, stage, phase):
    return Path(out) / stage / phase


def unet_filename(steps, prediction=None):
    """The release names; an x0 model (default: the 1-step one) says so, and sample.py reads the suffix."""
    x0 = prediction == "sample" if prediction else steps == 1
    return f"sdxl_lightning_{steps}step_unet{'_x0' if x0 else ''}.safetensors"


def lora_filename(steps):
    """The release name: the LoRA relative to the base (--base), the one to fuse into SDXL base or a
    fine-tune of it (Sec. 2.6)."""
    return f"sdxl_lightning_{steps}step_lora.safetensors"


def lora_on_init_filename(steps):
    """The LoRA as trained: relative to the phase's init (e.g. the 8-step model in 8to4), not to the base."""
    return f"sdxl_lightning_{steps}step_lora_on_init.safetensors"


# ----------------------------------------------------------------------------------------------------
# Checkpoints


_READ = {}  # (path, mtime, size) -> the last checkpoint read: a phase and its successor read the same file


def read_checkpoint(path, stage=None, phase=None):
    """checkpoint.pt of a phase, memory-mapped (tensors are read when used), with errors naming the file.
    The result is shared between callers (read-only)."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    if key not in _READ:
        _READ.clear()
        _READ[key] = _read_checkpoint(path)
    state = _READ[key]
    if stage is not None and (state["stage"], state["phase"]) != (stage, phase):
        raise RunError(f"{path}: a checkpoint of {state['stage']}/{state['phase']}, not {stage}/{phase}")
    return state


def forget_checkpoints():
    """Drop the shared read: optimizers loaded from it use its tensors (a private, copy-on-write map) in
    place."""
    _READ.clear()


def _read_checkpoint(path):
    if path.stat().st_size == 0:
        raise RunError(f"{path}: the file is empty (an interrupted copy?); delete it to restart the phase")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:  # weights_only refused a Python object: never unpickle what we didn't write
        raise RunError(f"{path}: not a train.py checkpoint (it holds pickled Python objects, not plain "
                       f"tensors)") from None
    except Exception as e:  # noqa: BLE001 -- torch raises many kinds for a foreign file
        first = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().split("\n")[0] or type(e).__name__
        raise RunError(f"{path}: not a train.py checkpoint (cannot be read: {first[:200]})") from None
    missing = CHECKPOINT_KEYS - set(state) if isinstance(state, dict) else CHECKPOINT_KEYS
    if missing:
        raise RunError(f"{path}: not a train.py checkpoint (missing {', '.join(sorted(missing))})")
    return state


def progress_step(folder):
    """The step whose exports are complete (progress.json), 0 if none."""
    p = Path(folder) / "progress.json"
    try:
        return int(json.loads(p.read_text())["step"]) if p.exists() else 0
    except (ValueError, KeyError, TypeError):
        return 0  # unreadable: the exports are redone from the checkpoint


def save_checkpoint(folder, state):
    """Step 1 of a save: checkpoint.pt, whole fp32 tensors (what a resume and the next phase read)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    save_torch(state, Path(folder) / "checkpoint.pt")
    crash_point("checkpoint")


def check_resume(out, stage, phases, args, may_change, planned=()):
    """Each phase's checkpoint, if any, is ours and was trained with the same arguments (`may_change` aside;
    `planned` too where the checkpoint records its teacher: check_resume_plan compares what they name).
    Run on rank 0 under the lock, before any work; leftover temp files of an interrupted save go first."""
    remove_temp_files(Path(out) / stage)
    for phase in phases:
        path = phase_dir(out, stage, phase) / "checkpoint.pt"
        if not path.exists():
            continue
        state = read_checkpoint(path, stage, phase)
        saved, skip = state["args"], set(may_change) | (set(planned) if "teacher" in state else set())
        for k, v in vars(args).items():
            if k not in skip and k in saved and saved[k] != v:
                raise RunError(f"{path} was trained with --{k.replace('_', '-')} {saved[k]}, this run has "
                               f"{v}: resume with the same value, or use another --out")


def _source(src, out):
    """A UNet source as a resume compares it: "base", a file inside the run folder relative to it (the
    folder may have moved), else the absolute path (a hub id's cached file included)."""
    if src in (None, "base"):
        return src
    p, o = os.path.abspath(src), os.path.abspath(out)
    return "OUT/" + os.path.relpath(p, o) if p.startswith(o + os.sep) else os.path.realpath(p)


def check_resume_plan(path, plan, out):
    """A resumed phase keeps the init (the student's base) and the teacher it was trained with: refused when
    this run's plan (plan_phase) names others, e.g. a finished earlier stage that appeared in OUT since."""
    state = read_checkpoint(path)
    saved_out = state["args"].get("out", out)
    was = {k: _source(state.get(k), saved_out) for k in ("init", "teacher")}
    now = {k: _source(plan[k], out) for k in ("init", "teacher")}
    if was["init"] != now["init"] or (was["teacher"] is not None and was["teacher"] != now["teacher"]):
        raise RunError(f"{path} was trained with init {state['init']} and teacher {state.get('teacher')}, "
                       f"this run would resume it with init {plan['init']} and teacher {plan['teacher']}: "
                       f"pass the same --init/--teacher, or use another --out")


# ----------------------------------------------------------------------------------------------------
# Where a phase's UNets come from: the base, a file, or an earlier phase of this run folder

def stage_finished(out, stage):
    """The stage's last phase is finished: its checkpoint reached that run's --max-steps and progress.json
    says its exports are of that step (a stage stopped or crashed half-way is not a teacher)."""
    last = phase_dir(out, stage, lm.STAGES[stage].phases[-1])
    if not (last / "checkpoint.pt").exists():
        return False
    ck = read_checkpoint(last / "checkpoint.pt", stage, lm.STAGES[stage].phases[-1])
    return ck["step"] >= int(ck["args"].get("max_steps", 0)) > 0 and progress_step(last) >= ck["step"]


def default_teacher(out, steps):
    """The fp32 checkpoint of our own earlier stage that made `steps`-step models when OUT has it finished,
    else the official Lightning UNet (8, 4, 2 steps), else the SDXL base for 128 steps."""
    if steps == 128:
        return "base"
    for st in lm.STAGES.values():
        if st.student_steps == steps and stage_finished(out, st.name):
            return str(phase_dir(out, st.name, st.phases[-1]) / "checkpoint.pt")
    if steps in weights.LIGHTNING_UNETS and steps != 1:
        return str(weights.fetch(weights.LIGHTNING_REPO, weights.lightning_unet_file(steps)))
    raise ValueError(f"no {steps}-step teacher: run the stage that makes it with this --out, or pass --teacher")


def load_unet(src, base, cfg, base_sd=None):
    """A UNet with the base's architecture `cfg`, fp32 on the CPU: "base" (the base's own; base_sd: its
    tensors when it is a single file), a UNet .safetensors (either layout), or a whole-UNet phase's
    checkpoint.pt (a LoRA phase's checkpoint holds no whole UNet: refused)."""
    if src == "base":
        return weights.load_unet(base, cfg, "cpu", torch.float32, sd=base_sd)
    if src.endswith("checkpoint.pt"):
        ck = read_checkpoint(src)
        if lm.phase_spec(ck["stage"], ck["phase"]).lora:
            raise RunError(f"{src}: the checkpoint of a LoRA phase, not of a whole UNet")
        sd = {k: v.clone() for k, v in ck["student"].items()}  # out of the memory map
        return weights.build_strict(unet_lib.UNet, cfg, sd, src)
    unet = weights.load_unet(src, cfg, "cpu", torch.float32)
    if unet.config != cfg:
        raise weights.CheckpointError(f"{src}: architecture {unet.config} differs from the base's {cfg}")
    return unet


# ----------------------------------------------------------------------------------------------------
# Exports: the release formats


def export(folder, student, student_sd, is_lora, steps, prediction, step, base_sd=None):
    """Steps 2 and 3 of a save: the release formats in fp16, a diffusers-layout UNet (a LoRA merged in fp32
    into a copy: the student's base is a LoRA phase's teacher and must stay untouched), in LoRA phases the
    LoRA twice (below), then progress.json saying the exports are those of `step`. student_sd: the
    student's state as checkpoint.pt holds it, whole on the CPU (gathered from its shards); a LoRA phase
    reads its base from `student`.
    The two LoRAs: lora_on_init_filename, the trained one, on top of the phase's init (the previous
    stage's model); lora_filename (the release name), the one that turns `base_sd` (the --base UNet, fp32)
    into the student: lora.extract_lora of their difference at the trained rank and alpha, computed on the
    student's device. -> its error summary (what train.py logs and writes to phase.json), else None."""
    folder = Path(folder)
    base = lora.base_state_dict(student) if is_lora else student_sd
    sd = {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in base.items()}
    report = None
    if is_lora:
        with torch.device("meta"):  # no wasted init: every tensor is assigned from the student's base
            merged = unet_lib.UNet(student.config)
        merged.load_state_dict(sd, strict=True, assign=True)
        lsd = {k: v.to("cpu", torch.float32, copy=True) for k, v in lora.lora_state_dict(student).items()}
        lora.merge_lora(merged, lsd, source="student LoRA")
        sd = merged.state_dict()
        tensors, metadata = lora.kohya_file(student)  # fp16, as released
        save_safetensors(tensors, folder / lora_on_init_filename(steps),
                         {**metadata, "lightning_relative_to": "init"})
        if base_sd is not None:
            rank, alpha = int(metadata["ss_network_dim"]), float(metadata["ss_network_alpha"])
            device = next(iter(lora.lora_state_dict(student).values())).device
            ext, errors = lora.extract_lora(base_sd, sd, lora.lora_targets(merged), rank, alpha, device)
            save_safetensors({k: v.half().contiguous() for k, v in ext.items()},
                             folder / lora_filename(steps),
                             {**lora.kohya_metadata(rank, alpha), "lightning_relative_to": "base"})
            worst = max(errors, key=errors.get)
            # what no LoRA carries: biases, norms, conv_in/out, the embeddings (a whole-UNet phase before
            # this one trained them): their share of the student's difference to the base
            adapted = {n + ".weight" for n in errors}
            sq = {k: float((v - base_sd[k].to(v.dtype)).double().square().sum()) for k, v in sd.items()}
            outside = sum(v for k, v in sq.items() if k not in adapted)
            report = {"file": lora_filename(steps), "relative_to": "base", "rank": rank, "alpha": alpha,
                      "step": step, "layers": len(errors), "worst_rel_error": errors[worst],
                      "worst_layer": worst, "mean_rel_error": sum(errors.values()) / len(errors),
                      "tensors_outside_lora_that_differ": sum(1 for k, v in sq.items()
                                                              if k not in adapted and v > 0),
                      "outside_lora_share_of_difference": (outside / sum(sq.values())) ** 0.5
                      if sum(sq.values()) > 0 else 0.0}
    fp16 = {k: v.half().contiguous() for k, v in sd.items()}
    save_safetensors(fp16, folder / unet_filename(steps, prediction))
    save_json(student.config.to_diffusers(), folder / "config.json")
    crash_point("exports")
    save_json({"step": step}, folder / "progress.json")
    return report


# ----------------------------------------------------------------------------------------------------
# The log: log.jsonl, one line per step, appended by rank 0


def logged_step(line):
    """The step of a log.jsonl line; a line a kill cut short counts as never written."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def trim_log(folder, step):
    """log.jsonl keeps the steps of the checkpoint only (a crash may have logged steps it never saved)."""
    log = Path(folder) / "log.jsonl"
    if log.exists():
        lines = [ln for ln in log.read_text().splitlines() if logged_step(ln) <= step]
        atomic_write(log, lambda tmp: tmp.write_text("".join(ln + "\n" for ln in lines)))


def append_log(folder, logs, tensorboard=None, prefix=None):
    """One step's line; with a TensorBoard writer also each of its numbers as the scalar PREFIX/key (each
    loss term, D(real)/D(fake), lr, step time, images/s, ...); flags and strings stay in log.jsonl only."""
    with open(Path(folder) / "log.jsonl", "a") as f:
        f.write(json.dumps(logs) + "\n")
    for k, v in (logs.items() if tensorboard is not None else ()):
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
            tensorboard.add_scalar(f"{prefix}/{k}", v, logs["step"])
