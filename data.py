"""
Image-caption data for distillation training: a folder of images with same-stem `.txt` captions, or
webdataset-style `.tar` shards (as img2dataset writes them), with the paper's filters (Sec. 3.6:
"We select images to be greater than 1024px ... We additionally filter images by sharpness using a
Laplacian filter"), SDXL's resize + center crop and its 6 time ids.

Nothing here depends on the number of GPUs: the data order is a function of (seed, global sample
position) only, so a run gives the same batches on 1 or 64 ranks and after a resume.

Plain Python + Pillow + numpy + torch; tar members are read by offset, never extracted.
"""

import glob
import hashlib
import io
import os
import struct
import tarfile
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_EXT = ".txt"
MAX_ATTEMPTS = 100  # replacement picks tried by `get` before we call the dataset broken
HEADER_BYTES = 1 << 16  # enough for the size header of almost every JPEG/PNG/WebP; else read it all

# What a bad image file can make Pillow raise (truncated data is an OSError, bad headers are
# SyntaxError/ValueError in some plugins, too many pixels is DecompressionBombError).
_BAD_IMAGE = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)

# -----------------------------------------------------------------------------
# small pieces: sharpness, colour mode, crop, seeds


def laplacian_variance(gray: np.ndarray) -> float:
    """Sec. 3.6 sharpness filter: variance of the 3x3 Laplacian [[0,1,0],[1,-4,1],[0,1,0]].

    `gray` is a (H, W) array in 0..255 (the scale matters: the threshold is in these units). Only
    the interior is used (no padding), so a constant image scores exactly 0."""
    g = np.asarray(gray, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] < 3 or g.shape[1] < 3:
        raise ValueError(f"data.py: laplacian_variance needs a (H, W) array with H, W >= 3, got {g.shape}")
    lap = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4.0 * g[1:-1, 1:-1]  # (H-2, W-2)
    return float(lap.var())


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB. Transparent pixels are put on white: a plain convert would show
    whatever colour the encoder left under alpha 0 (often black)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit grayscale: a plain convert clips everything above 255 to white
        a = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, R: int):
    """SDXL training crop: resize the shorter side to R, then a center R x R crop.

    Returns (img, crop_top, crop_left), the crop corner in the RESIZED image, which is what SDXL's
    `crops_coords_top_left` time id means (diffusers' train_text_to_image_sdxl computes it as
    int(round((size - R) / 2)), the same rounding as torchvision's CenterCrop). LANCZOS because we
    mostly downscale large photos, where it keeps the most detail without aliasing."""
    w, h = img.size
    scale = R / min(w, h)
    new_w, new_h = max(R, round(w * scale)), max(R, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample=Image.Resampling.LANCZOS)
    top, left = int(round((new_h - R) / 2.0)), int(round((new_w - R) / 2.0))
    return img.crop((left, top, left + R, top + R)), top, left


def _seed(*parts) -> int:
    """A 63-bit generator seed from a tuple of ints/strings; stable across processes and machines
    (unlike hash() of strings) and free of collisions like seed*K + epoch."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _read(file: str, offset: int, size: int) -> bytes:
    """Bytes of a loose file (offset 0, size -1) or of one tar member."""
    with open(file, "rb") as f:
        f.seek(offset)
        return f.read(size)


def _image_size(file: str, offset: int, size: int):
    """(width, height) from the image header only; no pixel decoding."""
    if size < 0:  # a loose file: Pillow reads only what the header needs
        with Image.open(file) as im:
            return im.size
    try:  # a tar member: the first 64 KiB almost always hold the header
        with Image.open(io.BytesIO(_read(file, offset, min(size, HEADER_BYTES)))) as im:
            return im.size
    except _BAD_IMAGE:
        if size <= HEADER_BYTES:
            raise
    with Image.open(io.BytesIO(_read(file, offset, size))) as im:  # e.g. a JPEG with a huge EXIF block
        return im.size


# -----------------------------------------------------------------------------
# index: where every (image, caption) pair lives
# An item is (image_file, image_offset, image_size, caption_file, caption_offset, caption_size);
# a loose file has offset 0 and size -1 (read it all), a tar member its data offset and size.


def _split_ext(name: str):
    """'a.b/c.d.JPG' -> ('a.b/c.d', '.jpg'): the key is the name without its LAST extension."""
    stem, ext = os.path.splitext(name)
    return stem, ext.lower()


def _scan_folder_files(files, stats):
    items = []
    for p in files:
        stem, ext = _split_ext(p)
        if ext not in IMAGE_EXTS:
            continue
        stats["images"] += 1
        txt = stem + CAPTION_EXT
        if not os.path.isfile(txt):
            stats["no_caption"] += 1
            continue
        items.append((p, 0, -1, txt, 0, -1))
    return items


def _scan_tar(shard, stats):
    """One pass over the tar headers (tarfile seeks past member data); keys group the members."""
    members = {}  # key -> {ext: (offset, size)}
    try:
        with tarfile.open(shard, mode="r:") as tf:
            for m in tf:
                if m.isfile():
                    key, ext = _split_ext(m.name)
                    members.setdefault(key, {})[ext] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError, EOFError):
        stats["bad_shards"] += 1  # truncated/unreadable shard: keep the members read so far
    items = []
    for key, exts in members.items():
        for ext in IMAGE_EXTS:
            if ext not in exts:
                continue
            stats["images"] += 1
            if CAPTION_EXT not in exts:
                stats["no_caption"] += 1
                continue
            items.append((shard, *exts[ext], shard, *exts[CAPTION_EXT]))
    return items


def _expand(path):
    """The path argument -> sorted loose files and .tar shards. A folder is searched recursively for
    both; a glob pattern or a list may name folders, shards and images."""
    if isinstance(path, (list, tuple)):
        parts = [os.fspath(p) for p in path]
    else:
        p = os.fspath(path)
        if any(c in p for c in "*?[") and not os.path.exists(p):
            parts = sorted(glob.glob(p, recursive=True))
            if not parts:
                raise ValueError(f"data.py: the pattern {p!r} matches no files")
        else:
            parts = [p]
    files, shards = [], []
    for p in parts:
        if os.path.isdir(p):
            for root, dirs, names in os.walk(p, followlinks=True):
                dirs.sort()
                for n in names:
                    (shards if n.lower().endswith(".tar") else files).append(os.path.join(root, n))
        elif os.path.isfile(p):
            if p.lower().endswith(".tar"):
                shards.append(p)
            elif _split_ext(p)[1] in IMAGE_EXTS:
                files.append(p)
            else:
                raise ValueError(f"data.py: {p!r} is neither a folder, a .tar shard nor an image "
                                 f"({', '.join(IMAGE_EXTS)})")
        else:
            raise ValueError(f"data.py: data path {p!r} does not exist")
    # sorted: every rank and every resume must see the same index order
    return sorted(set(files)), sorted(set(shards))


# -----------------------------------------------------------------------------
# the dataset


@dataclass
class Sample:
    pixels: torch.Tensor  # (3, R, R) float32 in [-1, 1]
    caption: str
    time_ids: torch.Tensor  # (6,) float32: orig_h, orig_w, crop_top, crop_left, R, R (SDXL's order)
    index: int  # dataset index actually loaded (a replacement when the pick was bad)


class ImageCaptionData:
    """Image-caption pairs with the paper's filters (Sec. 3.6), resized and center-cropped to R.

    Filters: shorter side >= min_size (at init, from the header only) and, when sharpness > 0, the
    Laplacian variance of the decoded grayscale image (original size) >= sharpness (at load time).
    self.stats counts what was dropped: images (found), no_caption, too_small, corrupt (header at
    init or decode at load), blurry, bad_shards, usable (the index size), skipped (bad picks that
    `get` replaced). corrupt/blurry count each bad index once; later picks of it are only skipped."""

    def __init__(self, path, resolution=1024, min_size=1024, sharpness=0.0, seed=0):
        if int(resolution) != resolution or resolution < 1:
            raise ValueError(f"data.py: resolution must be a positive integer, got {resolution!r}")
        if min_size < 0 or sharpness < 0:
            raise ValueError(f"data.py: min_size and sharpness must be >= 0 (0 disables), "
                             f"got min_size={min_size!r}, sharpness={sharpness!r}")
        self.path, self.resolution, self.min_size = path, int(resolution), min_size
        self.sharpness, self.seed = float(sharpness), int(seed)
        self.stats = dict(images=0, no_caption=0, too_small=0, corrupt=0, blurry=0, bad_shards=0,
                          usable=0, skipped=0)
        self._bad = set()  # indices known to fail: a deterministic property of the file, so caching it
        self._perm_cache = (None, None)  # (epoch, permutation): one randperm per epoch, not per sample

        files, shards = _expand(path)
        candidates = _scan_folder_files(files, self.stats)
        for shard in shards:
            candidates += _scan_tar(shard, self.stats)
        self.items = []
        for item in candidates:
            try:
                w, h = _image_size(*item[:3])
            except _BAD_IMAGE:
                self.stats["corrupt"] += 1
                continue
            if min(w, h) < min_size:
                self.stats["too_small"] += 1
                continue
            self.items.append(item)
        self.stats["usable"] = len(self.items)
        if not self.items:
            s = self.stats
            raise ValueError(
                f"data.py: no usable image-caption pairs in {path!r}: found {s['images']} images "
                f"({', '.join(IMAGE_EXTS)}) in {len(files)} files and {len(shards)} .tar shards; skipped "
                f"{s['no_caption']} without a same-stem {CAPTION_EXT} caption, {s['too_small']} with "
                f"shorter side < min_size={min_size}, {s['corrupt']} unreadable")

    def __len__(self):
        return len(self.items)

    def load(self, i: int):
        """Sample i, or None when its image is unreadable or fails the sharpness filter."""
        if not 0 <= i < len(self.items):
            raise IndexError(f"data.py: index {i} out of range for {len(self.items)} samples")
        if i in self._bad:
            return None
        img_file, img_off, img_size, txt_file, txt_off, txt_size = self.items[i]
        try:
            with Image.open(io.BytesIO(_read(img_file, img_off, img_size))) as im:
                im.load()  # decode now, inside the try: truncated data fails here
                img = to_rgb(im)
            caption = _read(txt_file, txt_off, txt_size).decode("utf-8", errors="replace").strip()
        except _BAD_IMAGE:
            self.stats["corrupt"] += 1
            self._bad.add(i)
            return None
        if self.sharpness > 0 and laplacian_variance(np.asarray(img.convert("L"))) < self.sharpness:
            self.stats["blurry"] += 1
            self._bad.add(i)
            return None
        orig_w, orig_h = img.size
        R = self.resolution
        img, top, left = resize_center_crop(img, R)
        pixels = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)  # (H, W, 3) -> (3, R, R)
        pixels = pixels.float() / 255.0 * 2.0 - 1.0
        time_ids = torch.tensor([orig_h, orig_w, top, left, R, R], dtype=torch.float32)
        return Sample(pixels=pixels, caption=caption, time_ids=time_ids, index=i)

    def permutation(self, epoch: int) -> torch.Tensor:
        """The data order of one epoch, drawn from (seed, epoch) only."""
        if self._perm_cache[0] != epoch:
            gen = torch.Generator().manual_seed(_seed(self.seed, "epoch", epoch))
            self._perm_cache = (epoch, torch.randperm(len(self.items), generator=gen))
        return self._perm_cache[1]

    def get(self, g: int) -> Sample:
        """The sample at global position g = step * global_batch + k (epoch g // len).

        A bad pick is replaced by an index drawn from (seed, g, attempt), so the replacement, like
        the pick, is the same on every rank count and after any resume."""
        if g < 0:
            raise ValueError(f"data.py: global sample position must be >= 0, got {g}")
        n = len(self.items)
        i = int(self.permutation(g // n)[g % n])
        for attempt in range(MAX_ATTEMPTS):
            sample = self.load(i)
            if sample is not None:
                return sample
            self.stats["skipped"] += 1
            gen = torch.Generator().manual_seed(_seed(self.seed, "retry", g, attempt))
            i = int(torch.randint(n, (1,), generator=gen))
        raise RuntimeError(
            f"data.py: {MAX_ATTEMPTS} picks in a row failed at position {g} in {self.path!r}: the data "
            f"looks all corrupt or blurry (corrupt={self.stats['corrupt']}, blurry={self.stats['blurry']} "
            f"of {n} indexed; sharpness threshold {self.sharpness})")


# -----------------------------------------------------------------------------
# batches and the split of a global batch over ranks and accumulation steps


def rank_positions(step, global_batch, micro_batch, rank, world_size, accum_index):
    """Global sample positions of micro-batch `accum_index` on `rank` at optimizer step `step`.

    Step s owns positions [s*G, (s+1)*G). The split is contiguous: rank r owns the block
    [s*G + r*G/W, s*G + (r+1)*G/W), cut into accum_steps consecutive micro-batches. The SET of
    positions of a step never depends on W or micro_batch, so the global batch (and the averaged
    gradient) is the same on any number of ranks."""
    per_step = micro_batch * world_size
    if global_batch < 1 or micro_batch < 1 or world_size < 1 or global_batch % per_step:
        raise ValueError(
            f"data.py: global_batch={global_batch} must equal micro_batch={micro_batch} x world_size="
            f"{world_size} x gradient accumulation steps (an integer >= 1)")
    accum_steps = global_batch // per_step
    if not 0 <= rank < world_size or not 0 <= accum_index < accum_steps:
        raise ValueError(f"data.py: rank {rank} / accum_index {accum_index} out of range for "
                         f"world_size={world_size}, accum_steps={accum_steps}")
    start = step * global_batch + rank * (global_batch // world_size) + accum_index * micro_batch
    return list(range(start, start + micro_batch))


def batch(data, positions):
    """Stack the samples at global positions: pixels (B, 3, R, R), captions [B], time_ids (B, 6)."""
    samples = [data.get(g) for g in positions]
    pixels = torch.stack([s.pixels for s in samples])  # (B, 3, R, R)
    time_ids = torch.stack([s.time_ids for s in samples])  # (B, 6)
    return pixels, [s.caption for s in samples], time_ids
