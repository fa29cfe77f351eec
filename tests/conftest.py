"""Tests never touch the network: the hub is offline (huggingface_hub reads this at import)."""
import os
import shutil
import socket
import subprocess

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if "PYTEST_XDIST_WORKER" in os.environ:
    # `pytest -n N` (the README's command): N worker processes share the cores. Idle OpenMP threads must sleep,
    # not spin (spinning made oversubscribed runs several times slower; the programs the tests start inherit
    # this), and each worker's own torch calls get its share of the cores. No number depends on it: the
    # bitwise and toy tests pin their thread counts themselves.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def free_port():
    """A TCP port nobody listens on now, for torchrun's --master_port: tests run in parallel (pytest -n 2),
    and a port derived from the pid could be taken by the other worker's run."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def small_disk(tmp_path, request):
    """A real full disk: a 256 KiB tmpfs at tmp_path/disk (root only; skipped where mount is not permitted);
    another size with @pytest.mark.disk_size("64m"). fill(free) writes a filler file leaving about `free`
    bytes. Unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    marker = request.node.get_closest_marker("disk_size")
    size = marker.args[0] if marker else "256k"
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.decode().strip()[:80]})")

    def fill(free=2048):
        n = shutil.disk_usage(disk).free - free
        with open(disk / "filler", "wb") as f:
            f.write(b"\0" * max(n, 0))
        return disk
    fill.path = disk
    try:
        yield fill
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)  # busy: detach it now


def pytest_configure(config):
    """Under the README's `pytest -n 2 --dist loadfile` the files go to the workers in the order collected
    (xdist would otherwise hand out the files with the most tests first, and the toy file, few tests but the
    longest, came last)."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


FIRST = ("tests/test_toy.py", "tests/test_train.py")  # the two longest files (the toy base alone takes minutes)


def pytest_collection_modifyitems(config, items):
    """The longest files first, so that under `pytest -n 2 --dist loadfile` each worker starts on one and the
    short files fill in behind them, instead of a long file starting last. Otherwise the order is as
    collected."""
    def rank(item):
        path = item.nodeid.split("::")[0]
        return FIRST.index(path) if path in FIRST else len(FIRST)
    items.sort(key=rank)
