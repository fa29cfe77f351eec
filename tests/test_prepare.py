"""prepare.py and data.CachedData: the cache equals encoding the images, on any number of ranks, resumes
after a crash, and refuses corrupt or foreign files by name. Tiny base, 32 px."""
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import data
import files
from conftest import free_port
from tools import prepare
import weights
from tools.tiny import make_tiny_base

ROOT = Path(__file__).resolve().parents[1]
R = 32


def write_data(folder):
    """9 images: 6 good (sizes 32..56, so time ids differ), a flat one (blurry), a truncated JPEG (corrupt),
    one whose caption is Latin-1 (not UTF-8). Captions in the tiny tokenizer's words."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    words = ["a photo of the red cat", "the dog in the snow", "a red car", "photo of a dog",
             "the cat in the car", "snow"]
    for i, (w, h) in enumerate([(32, 32), (48, 40), (40, 56), (56, 32), (36, 44), (50, 50)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(words[i])
    Image.new("RGB", (40, 40), (10, 200, 30)).save(folder / "flat.png")
    (folder / "flat.txt").write_text("flat")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
    (folder / "trunc.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # header fine, data cut
    (folder / "trunc.txt").write_text("trunc")
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / "latin.png")
    (folder / "latin.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))


def args(env, out, *extra):
    return ["--data", str(env["data"]), "--base", str(env["base"]), "--out", str(out), "--resolution", str(R),
            "--min-size", "32", "--shard-size", "3", "--batch-size", "2", "--workers", "2", *map(str, extra)]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepare")
    make_tiny_base(root / "base")
    write_data(root / "data")
    env = {"root": root, "base": root / "base", "data": root / "data", "cache": root / "cache"}
    prepare.main(args(env, env["cache"]))
    return env


def shard_files(cache):
    return sorted(p.name for p in Path(cache).glob("shard_*.safetensors"))


def assert_same_cache(a, b):
    """Every shard tensor bitwise equal, the same metadata, the same index."""
    assert shard_files(a) == shard_files(b) and shard_files(a)
    for name in shard_files(a):
        ta, tb = load_file(Path(a) / name), load_file(Path(b) / name)
        assert ta.keys() == tb.keys()
        for k in ta:
            assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), f"{name}:{k}"
        with safe_open(str(Path(a) / name), "pt") as fa, safe_open(str(Path(b) / name), "pt") as fb:
            assert fa.metadata() == fb.metadata()
    ia, ib = (json.loads((Path(c) / data.CACHE_INDEX).read_text()) for c in (a, b))
    assert ia == ib


# ----------------------------------------------------------------------------------------------------
# the cache equals the images encoded the way training encodes them


def test_cached_sample_equals_encoded_image(env):
    seed = 3
    cached = data.open_data(env["cache"], R, seed=seed, base=env["base"])
    images = data.open_data(env["data"], R, min_size=32, seed=seed)
    assert isinstance(cached, data.CachedData) and isinstance(images, data.ImageCaptionData)
    assert len(cached) == len(images) == 9
    vae, text = weights.load_vae(str(env["base"])).eval(), weights.load_text(str(env["base"])).eval()
    errs, exact, total = {}, 0, 0
    positions = range(3 * len(images))  # three epochs: every index, the filtered ones replaced
    for g in positions:
        c, s = cached.get(g), images.get(g)
        assert c.index == s.index
        assert torch.equal(c.time_ids, s.time_ids)
        with torch.no_grad():
            mean, logvar = vae.encode(s.pixels[None])
            ref = {"latent": vae.encode_latents(s.pixels[None])[0],
                   "latent_std": (0.5 * logvar).exp()[0] * 0.13025, "context": None, "pooled": None}
            ref["context"], ref["pooled"] = (t[0] for t in text.encode([s.caption]))
        assert torch.equal(ref["latent"], mean[0] * vae.config.scaling_factor)
        for k, r in ref.items():
            got = getattr(c, k)
            assert got.dtype == torch.float32 and got.shape == r.shape, k
            # fp16 rounding: half an ulp (2^-11 relative); a batch of 2 vs 1 in fp32 may move a value across a
            # rounding boundary, so allow one ulp
            torch.testing.assert_close(got, r, rtol=2 ** -10, atol=1e-6)
            d = (got.double() - r.double()).abs()
            errs[k] = max(errs.get(k, 0.0), d.max().item())
            exact += (got == r.half().float()).sum().item()
            total += r.numel()
    print(f"cache vs encoding the image, max abs err: {errs}; {exact / total:.4%} of values equal "
          "fp16(reference)")
    assert exact / total > 0.99
    # the counts: what prepare.py dropped at load is what the image reader finds
    for i in range(len(images)):
        images.load(i)
    for k in ("corrupt", "bad_caption", "blurry", "images", "usable", "too_small"):
        assert cached.stats[k] == images.stats[k], k
    s = cached.stats
    assert (s["corrupt"], s["bad_caption"], s["blurry"], s["cached"]) == (1, 1, 1, 6)
    # the batch function train.py calls
    x0, context, pooled, ids = data.cached_batch(cached, data.rank_positions(2, 4, 2, 1, 2, 0))
    assert x0.shape == (2, 4, 16, 16) and context.shape == (2, 77, 80) and pooled.shape == (2, 48)
    assert ids.shape == (2, 6)
    assert torch.equal(x0[1], cached.get(11).latent) and torch.equal(ids[0], images.get(10).time_ids)


def test_two_ranks_equal_one_rank(env, tmp_path):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "tools.prepare", *args(env, out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**os.environ,
                            "OMP_NUM_THREADS": str(torch.get_num_threads())})  # bitwise: same threads
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert len(shard_files(out)) == 3  # 9 indices, 3 per shard: rank 0 wrote 0 and 2, rank 1 wrote 1
    assert_same_cache(env["cache"], out)


class Killed(BaseException):
    pass


def test_interrupted_prepare_resumes(env, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cache"
    real_read, calls = data.ImageCaptionData.read, []

    def dying_read(self, i):
        calls.append(i)
        if i == 4:  # the middle of the second shard (indices 3..5)
            raise Killed()
        return real_read(self, i)

    monkeypatch.setattr(data.ImageCaptionData, "read", dying_read)
    with pytest.raises(Killed):
        prepare.main(args(env, out))
    monkeypatch.setattr(data.ImageCaptionData, "read", real_read)
    assert shard_files(out) == ["shard_000000.safetensors"] and not (out / data.CACHE_INDEX).exists()
    # as a kill inside save_file leaves it
    (out / "shard_000001.safetensors.tmp").write_bytes(b"half a shard")
    first = (out / "shard_000000.safetensors").stat()
    capsys.readouterr()
    prepare.main(args(env, out))
    log = capsys.readouterr().out
    assert "1 kept" in log, log
    again = (out / "shard_000000.safetensors").stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # kept, not rewritten
    assert not list(out.glob("*.tmp"))
    assert_same_cache(env["cache"], out)
    prepare.main(args(env, out))  # complete: a re-run changes nothing
    assert_same_cache(env["cache"], out)


# ----------------------------------------------------------------------------------------------------
# corrupt and foreign files are refused with their name


def _refused(path, match, **kw):
    with pytest.raises(ValueError, match=match) as e:
        data.CachedData(path, **kw)
    print(e.value)
    return str(e.value)


def test_corrupt_or_foreign_cache_refused(env, tmp_path, capsys):
    good = env["cache"]

    def copy(name):
        dst = tmp_path / name
        shutil.copytree(good, dst)
        return dst

    c = copy("truncated")
    f = c / "shard_000001.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    assert "shard_000001.safetensors: not a readable cache shard" in _refused(c, "shard_000001")
    c = copy("missing")
    (c / "shard_000002.safetensors").unlink()
    _refused(c, "shard_000002.safetensors: not a readable")
    c = copy("garbage_index")
    (c / data.CACHE_INDEX).write_text("{not json")
    _refused(c, f"{data.CACHE_INDEX}: not a readable cache index")
    c = copy("newer")
    idx = json.loads((c / data.CACHE_INDEX).read_text())
    (c / data.CACHE_INDEX).write_text(json.dumps({**idx, "version": data.CACHE_VERSION + 1}))
    _refused(c, "cache format version 2, this code reads 1")
    _refused(good, "made at resolution 32, not 64", resolution=64)
    _refused(good, "encoded with the VAE and text encoders of",
             base="stabilityai/stable-diffusion-xl-base-1.0")
    # a shard of another cache: same data and base, stored in bf16
    other = tmp_path / "bf16"
    prepare.main(args(env, other, "--dtype", "bf16"))
    assert load_file(other / "shard_000000.safetensors")["context"].dtype == torch.bfloat16
    assert data.CachedData(other).header["dtype"] == "bf16"
    c = copy("foreign")
    shutil.copy(other / "shard_000001.safetensors", c / "shard_000001.safetensors")
    _refused(c, r"shard_000001.safetensors: from another cache \(differs in dtype\)")
    # a shard renamed into another's place
    c = copy("renamed")
    shutil.copy(c / "shard_000000.safetensors", c / "shard_000001.safetensors")
    _refused(c, "shard_000001.safetensors: holds indices outside shard 1")
    # bits flipped to NaN inside the data: found when read, with the file named
    c = copy("nan")
    f = c / "shard_000001.safetensors"
    with safe_open(str(f), "pt") as h:
        meta, t = h.metadata(), {k: h.get_tensor(k) for k in h.keys()}
    t["context"][0, 3, 5] = float("nan")
    save_file(t, str(f), metadata=meta)
    cd = data.CachedData(c)
    with pytest.raises(ValueError, match="shard_000001.safetensors: non-finite values"):
        for i in range(len(cd)):
            cd.load(i)
    # prepare.py into a folder holding a foreign shard, or another cache's index: refused, nothing changed
    c = copy("resume_foreign")
    (c / data.CACHE_INDEX).unlink()
    shutil.copy(other / "shard_000002.safetensors", c / "shard_000002.safetensors")
    with pytest.raises(SystemExit, match="shard_000002.safetensors: from another cache.*delete it"):
        prepare.main(args(env, c))
    with pytest.raises(SystemExit, match=f"{data.CACHE_INDEX}: --out holds another cache"):
        prepare.main(args(env, other))
    assert data.CachedData(other).header["dtype"] == "bf16"


def test_prepare_bad_arguments_write_nothing(env, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    for extra, match in [(["--shard-size", "0"], "--shard-size must be >= 1"),
                         (["--batch-size", "0"], "--batch-size must be >= 1")]:
        with pytest.raises(SystemExit, match=match):
            prepare.main(args(env, tmp_path / "out", *extra))
    with pytest.raises(SystemExit, match="is a file, not a folder"):  # files.check_writable_folder
        prepare.main(args(env, f))
    with pytest.raises(SystemExit,
                       match="--resolution 37: must be a multiple of the VAE's downscale factor 2"):
        prepare.main(args(env, tmp_path / "out", "--resolution", "37"))
    cmd = args(env, tmp_path / "out")
    cmd[cmd.index("--data") + 1] = str(env["cache"])
    with pytest.raises(SystemExit, match="is a cache already"):
        prepare.main(cmd)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_disk_full_names_the_shard_and_leaves_no_temp_file(env, tmp_path, monkeypatch):
    def full(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "save_file", full)  # what files.save_safetensors writes with
    with pytest.raises(SystemExit, match=r"shard_000000.safetensors: the disk is full"):
        prepare.main(args(env, tmp_path / "out"))
    assert not list((tmp_path / "out").iterdir())


def test_stale_temp_files_of_a_killed_run_are_removed(env, tmp_path):
    """Issue 19.8: a kill -9 inside a save left shard_*.safetensors.tmp / cache_index.json.tmp that nothing
    removed when the shard was not redone (a finished shard, another shard size); the next run removes
    them."""
    out = tmp_path / "cache"
    shutil.copytree(env["cache"], out)
    for name in ("shard_000001.safetensors.tmp", "shard_000007.safetensors.tmp", data.CACHE_INDEX + ".tmp"):
        (out / name).write_bytes(b"half a file")
    prepare.main(args(env, out))
    assert not list(out.glob("*.tmp"))
    assert_same_cache(env["cache"], out)


def test_full_disk_for_real_is_one_line(env, small_disk, capsys):
    """Issue 18: on a real full disk (a 256 KiB tmpfs) safetensors raises SafetensorError ('No space left on
    device'), which was a traceback: now the one line naming the shard, no temp file, earlier shards kept."""
    out = small_disk.path / "cache"
    out.mkdir()
    shutil.copy(env["cache"] / "shard_000000.safetensors", out)  # a finished shard of an earlier run
    kept = (out / "shard_000000.safetensors").read_bytes()
    small_disk(free=0)
    with pytest.raises(SystemExit) as e:
        prepare.main(args(env, out))
    msg = str(e.value.code)
    print(msg)
    assert msg.startswith(f"error: {out / 'shard_000001.safetensors'}: the disk is full") and "\n" not in msg
    assert sorted(p.name for p in out.iterdir()) == ["shard_000000.safetensors"]
    assert (out / "shard_000000.safetensors").read_bytes() == kept


# ----------------------------------------------------------------------------------------------------
# Issue 16.3: aspect-ratio buckets


def test_bucketed_cache_equals_the_bucketed_images(env, tmp_path):
    """prepare.py --buckets: every sample is its image cropped in its bucket and encoded, to the fp16
    rounding of the cache; the cache's order is the image reader's (each step's batch from one bucket);
    a bucketed cache read without --buckets, or a square one with, is refused naming the flag."""
    cache, seed, G = tmp_path / "cache", 3, 2
    prepare.main(args(env, cache, "--buckets"))
    cached = data.open_data(cache, R, seed=seed, base=env["base"], buckets=True, global_batch=G)
    images = data.open_data(env["data"], R, min_size=32, seed=seed, buckets=True, multiple=4, global_batch=G)
    assert cached.buckets == images.buckets == data.bucket_sizes(R, 4)
    vae, text = weights.load_vae(str(env["base"])).eval(), weights.load_text(str(env["base"])).eval()
    shapes, worst = set(), 0.0
    for step in range(2 * len(images._batches)):  # two epochs of steps
        batch = [(cached.get(g), images.get(g)) for g in range(step * G, (step + 1) * G)]
        assert len({c.latent.shape for c, _ in batch}) == 1  # one bucket per step
        for c, s in batch:
            assert c.index == s.index and torch.equal(c.time_ids, s.time_ids)
            h, w = images.buckets[images.item_bucket[s.index]]
            assert tuple(s.pixels.shape) == (3, h, w) and s.time_ids[4:].tolist() == [h, w]
            with torch.no_grad():
                ref = vae.encode_latents(s.pixels[None])[0]
                context, pooled = (t[0] for t in text.encode([s.caption]))
            assert c.latent.shape == ref.shape == (4, h // 2, w // 2)
            for got, r in ((c.latent, ref), (c.context, context), (c.pooled, pooled)):
                torch.testing.assert_close(got, r, rtol=2 ** -10, atol=1e-6)
                worst = max(worst, (got - r).abs().max().item())
            shapes.add((h, w))
    print(f"bucketed cache vs the images: buckets used {sorted(shapes)}, max abs err {worst:.2e}")
    assert len(shapes) >= 3
    x0, _, _, ids = data.cached_batch(cached, data.rank_positions(1, G, 1, 0, 1, 0) +
                                      data.rank_positions(1, G, 1, 0, 1, 1))
    assert x0.shape[0] == G and len(set(map(tuple, ids[:, 4:].tolist()))) == 1
    with pytest.raises(ValueError, match="with --buckets"):
        data.open_data(cache, R, base=env["base"])
    with pytest.raises(ValueError, match="run prepare.py with --buckets"):
        data.open_data(env["cache"], R, base=env["base"], buckets=True, global_batch=G)
