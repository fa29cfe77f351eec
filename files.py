"""The files of a training run: atomic writes, the lock on the output folder, checkpoints read with clear
errors, and the crash points that test the save sequence. No method here; train.py uses it.

A run folder OUT/<stage>/<phase>/ is saved in this order (train.Phase.save), so that a crash at any point
leaves a state that re-running the same command completes:
  1. checkpoint.pt        everything to resume, fp32 (temp file, fsync, rename)
  2. the exports          sdxl_lightning_*.safetensors, config.json (each: temp file, fsync, rename)
  3. progress.json        {"step": k}: the exports are those of checkpoint step k
A re-run removes leftover *.tmp files, resumes from checkpoint.pt, and when progress.json is behind the
checkpoint writes the exports again before anything else.

Crash points, for tests: LIGHTNING_CRASH_AT=<name> makes the run stop dead at the point of that name (it
raises SimulatedCrash, which nothing catches and nothing cleans up after, so the files are left as a kill
would leave them). Names: "step<k>" after optimizer step k (before its save), "checkpoint.tmp" (temp
checkpoint written, not renamed), "checkpoint" (renamed, no exports), "export.tmp" (the first export's temp
file written, not renamed), "exports" (exports written, progress.json not). With LIGHTNING_CRASH_HARD=1 the process
exits on the spot instead (os._exit(137), like kill -9: the lock stays behind, stale).
"""
import errno
import json
import os
import pickle
import re
import shutil
import socket
import time
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

CHECKPOINT_KEYS = {"stage", "phase", "step", "args", "init", "student", "disc", "opt_g", "opt_d", "rng"}


class SimulatedCrash(BaseException):
    """Raised at a crash point (LIGHTNING_CRASH_AT); a BaseException so no `except Exception` swallows it."""


def crash_point(name):
    if os.environ.get("LIGHTNING_CRASH_AT") == name:
        if os.environ.get("LIGHTNING_CRASH_HARD"):  # the process dies on the spot, as with kill -9: no cleanup
            os._exit(137)
        raise SimulatedCrash(name)


class RunError(Exception):
    """Bad input or a run folder we must not touch: the command line shows one line, 'error: ...'."""


# ----------------------------------------------------------------------------------------------------
# Atomic writes


def atomic_write(path, write):
    """write(tmp) fills a temp file (or folder) next to `path`; it is flushed to disk and renamed over `path`,
    so `path` is always either the old file or the whole new one. A full disk says so and names the file.
    A folder's regular files are flushed one by one; write() must clear an old folder at `path` itself
    (os.replace cannot replace a non-empty one)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
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
            raise RunError(f"{path}: the disk is full (writing it failed: {e}); the previous file, if any, is "
                           f"unchanged; free some space and re-run the same command to resume") from None
        raise
    return path


def save_torch(obj, path):
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_safetensors(tensors, path, metadata=None):
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def save_json(obj, path):
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1, default=str)))


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
    """OUT/train.lock holds the pid and host of the run using OUT; a second run is refused. A lock whose
    process is gone (same host, pid not alive) is stale and taken over. Created with O_EXCL: atomic."""

    def __init__(self, out):
        self.out, self.path, self.made, self.held = Path(out), Path(out) / "train.lock", [], False

    def acquire(self):
        check_writable_folder(self.out)
        p = self.out
        while not p.exists():
            self.made.append(p)
            p = p.parent
        self.out.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    other = json.loads(self.path.read_text())
                    pid, host = int(other["pid"]), other["host"]
                except (OSError, ValueError, KeyError, TypeError):
                    raise RunError(f"{self.path} exists but is not a lock this program wrote; if no other run "
                                   f"uses {self.out}, delete it") from None
                if host == me["host"] and not _alive(pid):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise RunError(f"{self.out} is in use by another train.py run (pid {pid} on {host}, since "
                               f"{other.get('since')}); wait for it or use another --out (if that run is gone, "
                               f"delete {self.path})") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RunError(f"could not take the lock {self.path}")

    def release(self):
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
        for p in self.made:  # folders this run created and left empty (refused before any work)
            try:
                p.rmdir()
            except OSError:
                break


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
    """Drop the shared read: optimizers loaded from it use its tensors (a private, copy-on-write map) in place."""
    _READ.clear()


def _read_checkpoint(path):
    if path.stat().st_size == 0:
        raise RunError(f"{path}: the file is empty (an interrupted copy?); delete it to restart the phase")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:  # weights_only refused a Python object: never unpickle what we did not write
        raise RunError(f"{path}: not a train.py checkpoint (it holds pickled Python objects, not plain tensors)") \
            from None
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
