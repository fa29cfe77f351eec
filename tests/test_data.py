"""data.py: folder vs tar shards, the Sec. 3.6 filters, corrupt files, time ids, determinism."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from data import (DEFAULT_SHARPNESS, ImageCaptionData, Sample, aesthetic_score, batch, clean_caption,
                  laplacian_variance, open_data, rank_positions, resize_center_crop)

R = 32

# -----------------------------------------------------------------------------
# helpers: tiny generated images


def noise_image(w, h, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def encode(img, fmt):
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write_pair(folder, rel, data, caption):
    """Write `rel` (image bytes) and, when caption is not None, its same-stem .txt."""
    p = os.path.join(folder, rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb") as f:
        f.write(data)
    if caption is not None:
        with open(os.path.splitext(p)[0] + ".txt", "w", encoding="utf-8") as f:
            f.write(caption)


def write_tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def content():
    """(relative name, bytes, caption): png/jpeg/webp, RGBA, palette, grayscale; keys with dots and dirs."""
    return [
        ("a/img.0.png", encode(noise_image(48, 64, 0), "PNG"), "a noisy png"),
        ("a/b.c/photo.jpg", encode(noise_image(72, 40, 1), "JPEG"), "a jpeg, wide"),
        ("x.jpeg", encode(noise_image(40, 40, 2), "JPEG"), "ünïcode caption"),
        ("w.webp", encode(noise_image(56, 48, 3), "WEBP"), "a webp"),
        ("rgba.png", encode(noise_image(40, 50, 4, "RGBA"), "PNG"), "alpha"),
        ("pal.png", encode(noise_image(44, 40, 5, "P"), "PNG"), "palette"),
        ("gray.png", encode(noise_image(40, 60, 6, "L"), "PNG"), "grayscale"),
    ]


def as_dict(ds):
    out = {}
    for i in range(len(ds)):
        s = ds.load(i)
        assert s is not None
        out[s.caption] = s
    return out


# -----------------------------------------------------------------------------
# sources


def test_folder_and_tar_give_the_same_samples(tmp_path):
    folder, shards = tmp_path / "folder", tmp_path / "shards"
    shards.mkdir()
    items = content()
    for rel, data, cap in items:
        write_pair(folder, rel, data, cap)
    half = len(items) // 2
    for k, part in enumerate([items[:half], items[half:]]):
        members = []
        for rel, data, cap in part:
            key = os.path.splitext(rel)[0]
            members += [(rel, data), (key + ".json", b"{}"), (key + ".txt", cap.encode())]
        write_tar(shards / f"{k:05d}.tar", members)  # .json (img2dataset metadata) is ignored

    f = ImageCaptionData(folder, resolution=R, min_size=32)
    fd = as_dict(f)
    assert len(f) == len(items) and set(fd) == {cap for _, _, cap in items}
    assert f.stats["images"] == len(items) and f.stats["usable"] == len(items)
    for src, n in [(shards, len(items)), (str(shards / "*.tar"), len(items)), (shards / "00000.tar", half)]:
        t = ImageCaptionData(src, resolution=R, min_size=32)
        td = as_dict(t)
        assert len(t) == n
        for cap, s in td.items():
            assert s.pixels.shape == (3, R, R) and s.pixels.dtype == torch.float32
            assert -1.0 <= s.pixels.min() and s.pixels.max() <= 1.0
            torch.testing.assert_close(s.pixels, fd[cap].pixels, rtol=0, atol=0)
            torch.testing.assert_close(s.time_ids, fd[cap].time_ids, rtol=0, atol=0)


def test_pixels_match_a_hand_decode(tmp_path):
    """Pixels are to_tensor * 2 - 1 of the resized center crop; alpha goes on white."""
    img = noise_image(40, 40, 7, "RGBA")
    a = np.array(img)
    a[:, :, 3] = 0  # fully transparent: must come out white
    a[:20, :, 3] = 255
    write_pair(tmp_path, "t.png", encode(Image.fromarray(a), "PNG"), "t")
    s = ImageCaptionData(tmp_path, resolution=40, min_size=40).load(0)
    ref = torch.from_numpy(a[:, :, :3].astype(np.float32)).permute(2, 0, 1) / 255.0
    ref[:, 20:, :] = 1.0
    ref = ref * 2 - 1
    err = (s.pixels - ref).abs()
    print(f"pixels vs hand decode: max {err.max():.3e} mean {err.mean():.3e}")
    torch.testing.assert_close(s.pixels, ref, rtol=0, atol=1e-6)


# -----------------------------------------------------------------------------
# filters (Sec. 3.6)


def test_laplacian_variance_against_loops():
    rng = np.random.default_rng(0)
    g = rng.integers(0, 256, (7, 9)).astype(np.float64)
    vals = []
    for y in range(1, g.shape[0] - 1):
        for x in range(1, g.shape[1] - 1):
            vals.append(g[y - 1, x] + g[y + 1, x] + g[y, x - 1] + g[y, x + 1] - 4 * g[y, x])
    mean = sum(vals) / len(vals)
    ref = sum((v - mean) ** 2 for v in vals) / len(vals)
    got = laplacian_variance(g.astype(np.uint8))
    print(f"laplacian variance: ours {got:.6f} loops {ref:.6f} abs err {abs(got - ref):.3e}")
    assert abs(got - ref) <= 1e-9 * ref
    assert laplacian_variance(np.full((5, 5), 17, np.uint8)) == 0.0
    with pytest.raises(ValueError, match="laplacian_variance"):
        laplacian_variance(np.zeros((2, 5)))


def test_min_size_and_sharpness_filters(tmp_path):
    write_pair(tmp_path, "small.png", encode(noise_image(20, 50, 0), "PNG"), "small")  # shorter side 20
    write_pair(tmp_path, "noisy.png", encode(noise_image(48, 48, 1), "PNG"), "noisy")
    write_pair(tmp_path, "flat.png", encode(Image.new("RGB", (48, 48), (90, 120, 30)), "PNG"), "flat")
    blurred = noise_image(48, 48, 2).filter(ImageFilter.GaussianBlur(4))
    write_pair(tmp_path, "blurred.png", encode(blurred, "PNG"), "blurred")
    write_pair(tmp_path, "orphan.png", encode(noise_image(48, 48, 3), "PNG"), None)  # no caption

    v_noisy = laplacian_variance(np.asarray(noise_image(48, 48, 1).convert("L")))
    v_blur = laplacian_variance(np.asarray(blurred.convert("L")))
    print(f"laplacian variance: noisy {v_noisy:.1f} blurred {v_blur:.1f}")
    threshold = 100.0
    assert v_blur < threshold < v_noisy

    ds = ImageCaptionData(tmp_path, resolution=R, min_size=32, sharpness=threshold)
    assert len(ds) == 3  # small (header) and orphan (no caption) never enter the index
    assert ds.stats["too_small"] == 1 and ds.stats["no_caption"] == 1 and ds.stats["images"] == 5
    kept = [s.caption for s in (ds.load(i) for i in range(len(ds))) if s is not None]
    assert kept == ["noisy"]
    assert ds.stats["blurry"] == 2
    # every pick of the epoch lands on the one sharp image; blurry ones are skipped, not fatal
    assert {ds.get(g).caption for g in range(3 * len(ds))} == {"noisy"}
    assert ds.stats["skipped"] > 0 and ds.stats["blurry"] == 2  # counted once per index

    no_filter = ImageCaptionData(tmp_path, resolution=R, min_size=0, sharpness=0.0)
    assert len(no_filter) == 4 and all(no_filter.load(i) is not None for i in range(4))


# -----------------------------------------------------------------------------
# corrupt data and clear errors


def test_corrupt_files_are_skipped_and_counted(tmp_path):
    jpg = encode(noise_image(64, 64, 0), "JPEG")
    write_pair(tmp_path, "good1.jpg", encode(noise_image(48, 48, 1), "JPEG"), "good1")
    write_pair(tmp_path, "good2.png", encode(noise_image(48, 40, 2), "PNG"), "good2")
    write_pair(tmp_path, "trunc.jpg", jpg[: len(jpg) // 2], "trunc")  # header fine, data cut
    write_pair(tmp_path, "junk.png", np.random.default_rng(0).bytes(500), "junk")
    ds = ImageCaptionData(tmp_path, resolution=R, min_size=32)
    assert ds.stats["corrupt"] == 1 and len(ds) == 3  # junk: no header; trunc: found at load
    caps = [ds.get(g).caption for g in range(5 * len(ds))]
    assert set(caps) == {"good1", "good2"}
    assert ds.stats["corrupt"] == 2 and ds.stats["skipped"] >= 1
    # the replacement of a bad pick does not depend on what this instance saw before
    fresh = ImageCaptionData(tmp_path, resolution=R, min_size=32)
    assert [fresh.get(g).caption for g in reversed(range(5 * len(ds)))] == caps[::-1]


def test_all_corrupt_raises(tmp_path):
    jpg = encode(noise_image(64, 64, 0), "JPEG")
    for k in range(3):
        write_pair(tmp_path, f"t{k}.jpg", jpg[: len(jpg) // 3], f"t{k}")
    ds = ImageCaptionData(tmp_path, resolution=R, min_size=32)
    with pytest.raises(RuntimeError, match="all corrupt"):
        ds.get(0)
    junk = tmp_path / "junk"
    write_pair(junk, "j.png", b"not an image at all", "j")
    with pytest.raises(ValueError, match="1 unreadable"):
        ImageCaptionData(junk, resolution=R, min_size=32)


def test_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ImageCaptionData(tmp_path / "nope", resolution=R, min_size=32)
    with pytest.raises(ValueError, match="matches no files"):
        ImageCaptionData(str(tmp_path / "*.tar"), resolution=R, min_size=32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="found 0 images"):
        ImageCaptionData(tmp_path / "empty", resolution=R, min_size=32)
    write_pair(tmp_path / "nocap", "a.png", encode(noise_image(40, 40, 0), "PNG"), None)
    with pytest.raises(ValueError, match="1 without a same-stem .txt"):
        ImageCaptionData(tmp_path / "nocap", resolution=R, min_size=32)
    write_pair(tmp_path / "small", "a.png", encode(noise_image(40, 40, 0), "PNG"), "a")
    with pytest.raises(ValueError, match="1 with shorter side < min_size=64"):
        ImageCaptionData(tmp_path / "small", resolution=R, min_size=64)


# -----------------------------------------------------------------------------
# crop and time ids


@pytest.mark.parametrize("w,h", [(96, 48), (48, 72), (50, 50), (81, 47)])
def test_time_ids_of_non_square_images(tmp_path, w, h):
    img = noise_image(w, h, 0)
    write_pair(tmp_path, "i.png", encode(img, "PNG"), "i")
    s = ImageCaptionData(tmp_path, resolution=R, min_size=32).load(0)
    # hand computation: shorter side -> R, keep aspect, centre crop (offsets in the resized image)
    if w <= h:
        new_w, new_h = R, int(h * R / w + 0.5)
    else:
        new_w, new_h = int(w * R / h + 0.5), R
    top, left = (new_h - R) // 2, (new_w - R) // 2
    if (new_h - R) % 2 or (new_w - R) % 2:  # half-pixel centre: round-half-even as torchvision
        top, left = round((new_h - R) / 2), round((new_w - R) / 2)
    assert s.time_ids.tolist() == [h, w, top, left, R, R]
    ref = img.resize((new_w, new_h), Image.Resampling.LANCZOS).crop((left, top, left + R, top + R))
    ref = torch.from_numpy(np.array(ref)).permute(2, 0, 1).float() / 127.5 - 1
    err = (s.pixels - ref).abs()
    print(f"{w}x{h}: time_ids {s.time_ids.tolist()} pixels max {err.max():.3e} mean {err.mean():.3e}")
    torch.testing.assert_close(s.pixels, ref, rtol=0, atol=1e-6)


def test_resize_center_crop_known_values():
    img, top, left = resize_center_crop(Image.new("RGB", (200, 100)), 50)
    assert img.size == (50, 50) and (top, left) == (0, 25)  # resized to 100x50, crop from x=25
    img, top, left = resize_center_crop(Image.new("RGB", (30, 90)), 30)
    assert img.size == (30, 30) and (top, left) == (30, 0)  # no resize, crop from y=30


# -----------------------------------------------------------------------------
# determinism and the split over ranks


def make_dataset(tmp_path, n=6, seed=0):
    for k in range(n):
        write_pair(tmp_path, f"{k:02d}.png", encode(noise_image(40, 40, k), "PNG"), f"cap{k}")
    return ImageCaptionData(tmp_path, resolution=R, min_size=32, seed=seed)


def test_get_is_deterministic_and_epochs_are_permutations(tmp_path):
    a = make_dataset(tmp_path)
    b = ImageCaptionData(tmp_path, resolution=R, min_size=32, seed=0)
    n = len(a)
    for g in [3 * n + 2, 0, 5, n, 2 * n - 1]:  # any order, as after a resume
        sa, sb = a.get(g), b.get(g)
        assert sa.index == sb.index and sa.caption == sb.caption
        torch.testing.assert_close(sa.pixels, sb.pixels, rtol=0, atol=0)
    orders = [[a.get(e * n + k).index for k in range(n)] for e in range(3)]
    for order in orders:
        assert sorted(order) == list(range(n))  # every index exactly once per epoch
    assert orders[0] != orders[1]  # a fresh permutation each epoch
    other = ImageCaptionData(tmp_path, resolution=R, min_size=32, seed=1)
    assert [other.get(k).index for k in range(n)] != orders[0]


def test_rank_positions_cover_the_global_batch():
    for step in range(3):
        one = set(rank_positions(step, 2, 2, 0, 1, 0))
        two = set(rank_positions(step, 2, 1, 0, 2, 0)) | set(rank_positions(step, 2, 1, 1, 2, 0))
        assert one == two == {2 * step, 2 * step + 1}
        # G = 8 on 1, 2 and 4 ranks with accumulation: same set, no overlaps
        for micro, world in [(8, 1), (2, 2), (1, 4), (2, 1)]:
            acc = 8 // (micro * world)
            got = [g for r in range(world) for a in range(acc)
                   for g in rank_positions(step, 8, micro, r, world, a)]
            assert sorted(got) == list(range(8 * step, 8 * step + 8))
    with pytest.raises(ValueError, match="global_batch=6"):
        rank_positions(0, 6, 4, 0, 1, 0)
    with pytest.raises(ValueError, match="out of range"):
        rank_positions(0, 4, 1, 2, 2, 0)


def test_batch_shapes(tmp_path):
    ds = make_dataset(tmp_path)
    pixels, caps, tids = batch(ds, rank_positions(1, 4, 2, 1, 2, 0))
    assert pixels.shape == (2, 3, R, R) and tids.shape == (2, 6) and len(caps) == 2
    assert caps == [ds.get(6).caption, ds.get(7).caption]
    assert isinstance(ds.get(0), Sample)


def test_truncated_shard_keeps_what_it_can_read(tmp_path):
    members = []
    for k in range(4):
        members += [(f"{k}.png", encode(noise_image(40, 40, k), "PNG")), (f"{k}.txt", f"c{k}".encode())]
    write_tar(tmp_path / "s.tar", members)
    data = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "s.tar").write_bytes(data[: len(data) // 2])
    ds = ImageCaptionData(tmp_path / "s.tar", resolution=R, min_size=32)
    assert ds.stats["bad_shards"] == 1 and 1 <= len(ds) < 4
    assert all(ds.load(i) is not None for i in range(len(ds)))


# -----------------------------------------------------------------------------
# issue 6: symlink cycles, captions that are not UTF-8


def test_symlink_cycle_is_indexed_once(tmp_path):
    """Two links back up the tree: following them naively recurses 2^40 times (ELOOP is the only stop).
    Runs in a subprocess so that a hang is a failure, not a stuck test run."""
    root = tmp_path / "d"
    write_pair(root, "a.png", encode(noise_image(40, 40, 0), "PNG"), "a")
    write_pair(root, "sub/b.png", encode(noise_image(40, 40, 1), "PNG"), "b")
    os.symlink("..", root / "sub" / "up")  # sub/up -> d: a cycle
    os.symlink(".", root / "sub" / "here")  # sub/here -> sub: another
    write_pair(tmp_path / "elsewhere", "c.png", encode(noise_image(40, 40, 2), "PNG"), "c")
    os.symlink(tmp_path / "elsewhere", root / "linked")  # a linked folder outside: still followed
    code = ("import data, json; d = data.ImageCaptionData({!r}, 32, 32); "
            "print(json.dumps([len(d), d.stats['repeated_dirs'], sorted(d.load(i).caption for i in range(len(d)))]))")
    r = subprocess.run([sys.executable, "-c", code.format(str(root))], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
    n, repeated, caps = json.loads(r.stdout.splitlines()[-1])
    print(f"symlink cycles: {n} items, {repeated} repeated folders skipped")
    assert n == 3 and caps == ["a", "b", "c"] and repeated == 2


def test_caption_not_utf8_is_skipped_and_counted(tmp_path):
    write_pair(tmp_path, "good.png", encode(noise_image(40, 40, 0), "PNG"), "good")
    write_pair(tmp_path, "latin.png", encode(noise_image(40, 40, 1), "PNG"), None)
    (tmp_path / "latin.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))  # a valid Latin-1, invalid UTF-8
    write_pair(tmp_path, "bom.png", encode(noise_image(40, 40, 2), "PNG"), None)
    (tmp_path / "bom.txt").write_bytes("\ufeffcaf\xe9".encode("utf-8"))  # UTF-8 with a byte-order mark: fine
    ds = ImageCaptionData(tmp_path, resolution=R, min_size=32)
    caps = {ds.get(g).caption for g in range(4 * len(ds))}
    assert caps == {"good", "caf\xe9"}  # no U+FFFD replacement characters, no BOM
    assert ds.stats["bad_caption"] == 1 and ds.stats["skipped"] >= 1 and ds.stats["corrupt"] == 0


def test_long_caption_cut_at_read_time_and_fifo_skipped(tmp_path):
    """Issue 19.6: a 10 MB caption is read only up to data.MAX_CAPTION_CHARS (cut, trained on, counted as
    long_caption), also in a shard and with a multi-byte character at the cut; a FIFO named like an image
    is skipped at indexing (counted as not_regular), where reading it would block forever."""
    import time
    import data
    n = data.MAX_CAPTION_CHARS
    write_pair(tmp_path, "good.png", encode(noise_image(40, 40, 0), "PNG"), "good")
    write_pair(tmp_path, "long.png", encode(noise_image(40, 40, 1), "PNG"), "\u00e9" * (5 << 20))  # 10 MB
    write_pair(tmp_path, "edge.png", encode(noise_image(40, 40, 2), "PNG"), "a" * n)  # exactly the cap
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "fifo.txt").write_text("a fifo")
    write_tar(tmp_path / "s.tar", [("t.png", encode(noise_image(40, 40, 3), "PNG")),
                                   ("t.txt", ("x" * (3 * n)).encode())])
    t0 = time.time()
    ds = ImageCaptionData(tmp_path, resolution=R, min_size=32)
    caps = {ds.load(i).caption for i in range(len(ds))}
    assert time.time() - t0 < 10
    assert caps == {"good", "\u00e9" * n, "a" * n, "x" * n}
    assert ds.stats["not_regular"] == 1 and ds.stats["usable"] == 4 and ds.stats["long_caption"] == 2
    assert ds.stats["bad_caption"] == 0 and ds.stats["cleaned"] == 0


# -----------------------------------------------------------------------------
# issue 7.7: the paper's filters (Sec. 3.6), on by default where the paper is explicit


def test_sharpness_on_by_default_and_measured_on_the_training_crop(tmp_path):
    write_pair(tmp_path, "noisy.png", encode(noise_image(48, 48, 1), "PNG"), "noisy")
    write_pair(tmp_path, "blurred.png", encode(noise_image(48, 48, 2).filter(ImageFilter.GaussianBlur(2)), "PNG"),
               "blurred")
    # an 8x upscale: blurry at its own 256 px, sharp again at a 32 px crop
    write_pair(tmp_path, "up.png", encode(noise_image(32, 32, 3).resize((256, 256), Image.Resampling.BICUBIC), "PNG"),
               "upscaled")
    ds = ImageCaptionData(tmp_path, resolution=R, min_size=32)  # no sharpness argument: the default
    assert ds.sharpness == DEFAULT_SHARPNESS == 100.0
    assert {ds.get(g).caption for g in range(9)} == {"noisy", "upscaled"} and ds.stats["blurry"] == 1
    big = ImageCaptionData(tmp_path, resolution=256, min_size=32)
    assert {big.get(g).caption for g in range(9)} == {"noisy"} and big.stats["blurry"] == 2
    v = laplacian_variance(np.asarray(Image.open(tmp_path / "up.png").convert("L")))
    print(f"8x upscale: Laplacian variance {v:.1f} at 256 px")
    assert v < DEFAULT_SHARPNESS


def test_default_sharpness_keeps_the_train_and_bench_test_data(tmp_path):
    """tests/test_train.py and bench.py train on 40x48 uniform noise at 32 px with --min-size 32."""
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"a picture number {i}")
    ds = ImageCaptionData(tmp_path, resolution=32, min_size=32)
    scores = [laplacian_variance(np.asarray(resize_center_crop(Image.open(tmp_path / f"{i}.png").convert("RGB"),
                                                               32)[0].convert("L"))) for i in range(8)]
    print(f"test data Laplacian variance at 32 px: min {min(scores):.0f}")
    assert all(ds.load(i) is not None for i in range(8)) and ds.stats["blurry"] == 0


def test_aesthetic_score_from_img2dataset_metadata(tmp_path):
    metas = {"s6": {"aesthetic_score": 6.0}, "u5": {"AESTHETIC_SCORE": 5.0}, "l56": {"aesthetic": 5.6},
             "c7": {"aesthetic_score_laion_v2": 7}, "none": {"aesthetic_score": None}, "nokey": {"url": "x"},
             "bad": "{not json", "nojson": None}
    members = []
    for k, (key, meta) in enumerate(metas.items()):
        members += [(f"{key}.png", encode(noise_image(40, 40, k), "PNG")), (f"{key}.txt", key.encode())]
        if meta is not None:
            members.append((f"{key}.json", (meta if isinstance(meta, str) else json.dumps(meta)).encode()))
    write_tar(tmp_path / "00000.tar", members)
    off = ImageCaptionData(tmp_path, resolution=R, min_size=32)  # default: off, .json ignored
    assert len(off) == 8 and off.stats["no_aesthetic"] == 0
    ds = ImageCaptionData(tmp_path, resolution=R, min_size=32, min_aesthetic=5.5)
    assert sorted(ds.load(i).caption for i in range(len(ds))) == ["c7", "l56", "s6"]
    assert ds.stats["low_aesthetic"] == 1 and ds.stats["no_aesthetic"] == 4 and ds.stats["usable"] == 3
    one_key = ImageCaptionData(tmp_path, resolution=R, min_size=32, min_aesthetic=4.0, aesthetic_key="AESTHETIC_SCORE")
    assert [one_key.load(i).caption for i in range(len(one_key))] == ["u5"]
    # a folder as img2dataset's "files" output format writes it: same-stem .json
    folder = tmp_path / "files"
    write_pair(folder, "a.png", encode(noise_image(40, 40, 0), "PNG"), "a")
    (folder / "a.json").write_text(json.dumps({"aesthetic": 6.5}))
    write_pair(folder, "b.png", encode(noise_image(40, 40, 1), "PNG"), "b")
    (folder / "b.json").write_text(json.dumps({"aesthetic": 4.5}))
    write_pair(folder, "c.png", encode(noise_image(40, 40, 2), "PNG"), "c")
    f = ImageCaptionData(folder, resolution=R, min_size=32, min_aesthetic=5.5)
    assert len(f) == 1 and f.load(0).caption == "a" and (f.stats["low_aesthetic"], f.stats["no_aesthetic"]) == (1, 1)
    with pytest.raises(ValueError, match="1 without an aesthetic score"):
        ImageCaptionData(folder, resolution=R, min_size=32, min_aesthetic=7)
    assert aesthetic_score(b'{"aesthetic": true}') is None and aesthetic_score(b'{"aesthetic": NaN}') is None


def test_clean_captions(tmp_path):
    raw = "  Tom &amp;amp; Jerry&nbsp;on&#39;the\n\tbeach  https://example.com/a?b=1 see WWW.site.org/x &lt;3  "
    assert clean_caption(raw) == "Tom & Jerry on'the beach see <3"
    assert clean_caption("a plain caption") == "a plain caption"
    write_pair(tmp_path, "a.png", encode(noise_image(40, 40, 0), "PNG"), raw)
    write_pair(tmp_path, "b.png", encode(noise_image(40, 40, 1), "PNG"), "already clean")
    off = ImageCaptionData(tmp_path, resolution=R, min_size=32)  # default: captions as written (stripped)
    assert off.load(0).caption == raw.strip() and off.stats["cleaned"] == 0
    on = ImageCaptionData(tmp_path, resolution=R, min_size=32, clean_captions=True)
    caps = [on.get(g).caption for g in range(6)]
    assert set(caps) == {"Tom & Jerry on'the beach see <3", "already clean"}
    assert on.stats["cleaned"] == 1  # counted once per index, however often it is read


def test_open_data_picks_the_reader(tmp_path):
    write_pair(tmp_path, "a.png", encode(noise_image(40, 40, 0), "PNG"), "a")
    ds = open_data(tmp_path, R, min_size=32, sharpness=0, seed=5, clean_captions=True)
    assert isinstance(ds, ImageCaptionData) and ds.seed == 5 and ds.sharpness == 0 and ds.clean_captions
    with pytest.raises(ValueError, match="min_aesthetic"):
        open_data(tmp_path, R, min_aesthetic=float("nan"))


# -----------------------------------------------------------------------------
# Issue 16.3: aspect-ratio buckets


def test_bucket_table_at_1024_and_scaled():
    """At 1024 px the SDXL paper's buckets themselves (multiples of 64, ~1024^2 pixels, the usual nine among
    them); at 512 and 32 px the same ratios with sides in multiples of what the models need."""
    from data import SDXL_BUCKETS, bucket_sizes
    full = bucket_sizes(1024, 32)
    assert full == list(SDXL_BUCKETS) and len(full) == 41
    for hw in [(1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768), (768, 1344),
               (1536, 640), (640, 1536)]:
        assert hw in full
    for R, m in [(1024, 32), (512, 32), (256, 32), (32, 4)]:
        sizes = bucket_sizes(R, m)
        assert (R, R) in sizes and all(h % m == 0 and w % m == 0 for h, w in sizes)
        px = [h * w / R ** 2 for h, w in sizes]
        print(f"{R} px (sides x{m}): {len(sizes)} buckets, pixels / R^2 from {min(px):.3f} to {max(px):.3f}")
        assert 0.85 < min(px) and max(px) < 1.25


def _bucket_data(folder, seed=0):
    """10 images of five aspect ratios (1:2, 1:1, 4:3, 3:1, 2:1), 32 px at least."""
    for k, (w, h) in enumerate([(32, 64), (40, 80), (48, 48), (40, 40), (64, 48), (80, 60), (96, 32),
                                (120, 40), (36, 36), (64, 32)]):
        write_pair(folder, f"{k:02d}.png", encode(noise_image(w, h, k), "PNG"), f"cap{k}")
    return open_data(folder, R, min_size=32, seed=seed, buckets=True, multiple=4, global_batch=4)


def test_buckets_crop_time_ids_and_one_bucket_per_step(tmp_path):
    """Each image in the bucket nearest its aspect ratio, resized to cover it and center-cropped (as by hand),
    time ids (original size, crop corner, the bucket as target size); every step's global batch from one
    bucket, every image at least once an epoch, the same batches however the step is split over ranks and
    micro-batches and in a fresh reader (a resume)."""
    import math
    from data import nearest_bucket
    ds = _bucket_data(tmp_path)
    for i, (img_file, *_) in enumerate(ds.items):
        w, h = Image.open(img_file).size
        bh, bw = ds.buckets[ds.item_bucket[i]]
        others = [abs(math.log(b[0] / b[1]) - math.log(h / w)) for b in ds.buckets]
        assert abs(math.log(bh / bw) - math.log(h / w)) == min(others)
        assert nearest_bucket(w, h, ds.buckets) == ds.item_bucket[i]
        s = ds.load(i)
        scale = max(bh / h, bw / w)
        nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
        top, left = round((nh - bh) / 2), round((nw - bw) / 2)
        assert s.time_ids.tolist() == [h, w, top, left, bh, bw]
        ref = Image.open(img_file).convert("RGB")
        if (nw, nh) != (w, h):
            ref = ref.resize((nw, nh), Image.Resampling.LANCZOS)
        ref = torch.from_numpy(np.array(ref.crop((left, top, left + bw, top + bh)))).permute(2, 0, 1)
        torch.testing.assert_close(s.pixels, ref.float() / 127.5 - 1, rtol=0, atol=1e-6)
    assert len(set(ds.item_bucket.tolist())) == 5  # 64x48 and 80x60 share one
    steps = len(ds._batches)  # one epoch
    fresh = open_data(tmp_path, R, min_size=32, seed=0, buckets=True, multiple=4, global_batch=4)
    seen = set()
    for step in reversed(range(2 * steps)):  # any order, as after a resume
        ref = [ds.get(g) for g in range(4 * step, 4 * step + 4)]
        assert len({tuple(s.pixels.shape) for s in ref}) == 1
        for micro, world in [(4, 1), (2, 2), (1, 4), (1, 2)]:
            got = [fresh.get(g) for r in range(world) for a in range(4 // (micro * world))
                   for g in rank_positions(step, 4, micro, r, world, a)]
            assert [s.index for s in got] == [s.index for s in ref]
        if step < steps:
            seen |= {s.index for s in ref}
    assert seen == set(range(len(ds)))
    other = open_data(tmp_path, R, min_size=32, seed=1, buckets=True, multiple=4, global_batch=4)
    assert [other.get(g).index for g in range(4 * steps)] != [ds.get(g).index for g in range(4 * steps)]
