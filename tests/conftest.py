"""Tests never touch the network: the hub is offline (huggingface_hub reads this at import)."""
import os
import shutil
import subprocess

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
