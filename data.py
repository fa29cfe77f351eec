"""
Image-caption data for distillation training: a folder of images with same-stem `.txt` captions, or
webdataset-style `.tar` shards (as img2dataset writes them), with the paper's filters (Sec. 3.6:
"We select images to be greater than 1024px ... We additionally filter images by sharpness using a
Laplacian filter"), SDXL's resize + center crop and its 6 time ids.

Nothing here depends on the number of GPUs: the data order is a function of (seed, global sample
position) only, so a run gives the same batches on 1 or 64 ranks and after a resume.

A cache written by prepare.py (VAE latents and text embeddings, encoded once) is read by CachedData
with the same order, so `open_data` hands train.py either reader.

Plain Python + Pillow + numpy + torch; tar members are read by offset, never extracted.
"""

import codecs
import contextlib
import glob
import hashlib
import html
import io
import json
import math
import os
import re
import stat
import struct
import tarfile
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
CAPTION_EXT = ".txt"
MAX_ATTEMPTS = 100  # replacement picks tried by `get` before we call the dataset broken
MAX_CAPTION_CHARS = 2000  # a caption is cut here at read time: CLIP sees 77 tokens (~300 characters)
HEADER_BYTES = 1 << 16  # enough for the size header of almost every JPEG/PNG/WebP; else read it all
# Sec. 3.6 sharpness filter, on by default: the variance of the Laplacian of the R x R training crop (grayscale
# 0..255) must reach this. 100 is the usual OpenCV blur-detection cut on the same 3x3 kernel. On scikit-image's
# sample images (README table) it keeps the sharp photos (176..5300) but the low-contrast moon (65), and drops
# the motion-blurred clock (24), every 4x upscale (4..44) and every Gaussian blur of sigma 2 (2..17).
DEFAULT_SHARPNESS = 100.0
# The aesthetic score in a sample's metadata .json, first key present wins: img2dataset copies parquet columns
# by name (LAION-Aesthetics V2: "aesthetic" / "AESTHETIC_SCORE", COYO-700M: "aesthetic_score_laion_v2").
AESTHETIC_KEYS = ("aesthetic_score", "AESTHETIC_SCORE", "aesthetic", "aesthetic_score_laion_v2")
META_EXT = ".json"

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


def resize_center_crop(img: Image.Image, R: int, W: int = None):
    """SDXL training crop: resize the shorter side to R, then a center R x R crop; with W, to an R x W
    (height x width) bucket: the smallest resize that covers it, then a center crop.

    Returns (img, crop_top, crop_left), the crop corner in the RESIZED image, which is what SDXL's
    `crops_coords_top_left` time id means (diffusers' train_text_to_image_sdxl computes it as
    int(round((size - R) / 2)), the same rounding as torchvision's CenterCrop). LANCZOS because we
    mostly downscale large photos, where it keeps the most detail without aliasing."""
    w, h = img.size
    H, W = R, R if W is None else W
    scale = max(H / h, W / w)  # = R / min(w, h) for a square crop
    new_w, new_h = max(W, round(w * scale)), max(H, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample=Image.Resampling.LANCZOS)
    top, left = int(round((new_h - H) / 2.0)), int(round((new_w - W) / 2.0))
    return img.crop((left, top, left + W, top + H)), top, left


# SDXL's aspect-ratio buckets (Podell et al. 2023, App. I, multi-aspect training): (height, width) at 1024
# px, multiples of 64 of about 1024^2 pixels, aspect ratios 1:4 to 4:1 (the table made symmetric).
SDXL_BUCKETS = ((512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664),
                (640, 1600), (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280),
                (832, 1216), (832, 1152), (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024),
                (1024, 960), (1088, 960), (1088, 896), (1152, 896), (1152, 832), (1216, 832), (1280, 768),
                (1344, 768), (1344, 704), (1408, 704), (1472, 704), (1536, 640), (1600, 640), (1664, 576),
                (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512))


def bucket_sizes(resolution: int, multiple: int) -> list:
    """SDXL_BUCKETS scaled from 1024 to `resolution` px: each side to the nearest multiple of q, q being the
    table's 64 scaled (64 at 1024, 32 at 512) rounded to a multiple of `multiple` (at least `multiple`:
    what the VAE and the UNet's downsamplings need, 32 for SDXL). Duplicates that the rounding makes at
    small resolutions are dropped. -> [(height, width)] in the table's order."""
    if resolution < 1 or multiple < 1:
        raise ValueError(f"data.py: buckets need resolution, multiple >= 1, got {resolution}, {multiple}")
    q = multiple * max(1, math.floor(64 * resolution / 1024 / multiple + 0.5))
    out = []
    for h, w in SDXL_BUCKETS:
        size = tuple(max(q, math.floor(x * resolution / 1024 / q + 0.5) * q) for x in (h, w))
        if size not in out:
            out.append(size)
    return out


def nearest_bucket(w: int, h: int, sizes) -> int:
    """The bucket (index into `sizes`, (height, width) each) nearest in aspect ratio, as log(h / w); a tie
    goes to the first."""
    r = math.log(h / w)
    return min(range(len(sizes)), key=lambda b: abs(math.log(sizes[b][0] / sizes[b][1]) - r))


_URL = re.compile(r"(?:https?://|ftp://|www\.)\S+", re.IGNORECASE)


def clean_caption(text: str) -> str:
    """Sec. 3.6 "clean up the text prompts": HTML entities decoded (twice: scraped alt text is often escaped
    twice, `&amp;quot;`), URLs removed, runs of whitespace (any Unicode space, newlines, tabs) made one
    space."""
    text = html.unescape(html.unescape(text))
    text = _URL.sub(" ", text)
    return " ".join(text.split())


def aesthetic_score(meta: bytes, keys=AESTHETIC_KEYS):
    """The score in a metadata .json (img2dataset writes one per sample), or None if absent or unreadable."""
    try:
        d = json.loads(meta)
    except (ValueError, UnicodeDecodeError):
        return None
    for k in keys if isinstance(d, dict) else ():
        v = d.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return None


def hash_seed(*parts) -> int:
    """The project's one hash for seeds: a 64-bit number from a tuple of ints/strings, the first 8 bytes
    (little-endian) of the sha256 of its repr. Stable across processes and machines (unlike hash() of
    strings) and free of collisions like seed*K + epoch. Callers take 63 bits of it for a generator seed:
    the low ones here (data order), the high ones in train.py (per-sample draws); each keeps the bits it
    always took, so runs stay bitwise the same."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


LOW_63 = (1 << 63) - 1  # the data order's seeds: the low 63 bits of hash_seed, as they always were


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
    """[(item, (meta_file, offset, size) or None)]: the same-stem .json is img2dataset's metadata."""
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
        meta = stem + META_EXT
        items.append(((p, 0, -1, txt, 0, -1), (meta, 0, -1) if os.path.isfile(meta) else None))
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
            meta = (shard, *exts[META_EXT]) if META_EXT in exts else None
            items.append(((shard, *exts[ext], shard, *exts[CAPTION_EXT]), meta))
    return items


def _walk(folder, stats):
    """os.walk following symlinks, but each real folder once: a symlink cycle (`a/loop -> ..`) would
    otherwise recurse until the path is too long, exponentially with two such links. Repeats are counted."""
    seen = {_dir_id(folder)}
    for root, dirs, names in os.walk(folder, followlinks=True):
        keep = []
        for d in sorted(dirs):
            key = _dir_id(os.path.join(root, d))
            if key in seen:
                stats["repeated_dirs"] += 1
            elif key is not None:  # None: vanished or unreadable, as os.walk itself skips those
                seen.add(key)
                keep.append(d)
        dirs[:] = keep  # os.walk descends only into what is left here
        yield root, names


def _regular(path):
    """A regular file (through symlinks); a broken link counts as one (reading it fails: corrupt)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return True


def _read_caption(file, offset, size):
    """The caption's text, cut at MAX_CAPTION_CHARS without reading the rest of the file (a 10 MB caption
    once made a step take minutes): -> (text, cut). Raises UnicodeDecodeError, OSError."""
    limit = 4 * MAX_CAPTION_CHARS + 4  # UTF-8: at most 4 bytes a character, and a byte-order mark
    raw = _read(file, offset, limit if size < 0 else min(size, limit + 1))
    more = len(raw) > limit
    text = codecs.getincrementaldecoder("utf-8-sig")().decode(raw[:limit], final=not more).strip()
    return text[:MAX_CAPTION_CHARS], more or len(text) > MAX_CAPTION_CHARS


def _dir_id(path):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _expand(path, stats):
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
            for root, names in _walk(p, stats):
                for n in names:
                    f, tar = os.path.join(root, n), n.lower().endswith(".tar")
                    if not (tar or _split_ext(n)[1] in IMAGE_EXTS):
                        continue
                    if not _regular(f):  # a FIFO named x.png would block the header read forever
                        stats["not_regular"] += 1
                        continue
                    (shards if tar else files).append(f)
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
# the data order, shared by the image reader and the cache reader


class _Ordered:
    """get(g): the sample at global position g, from (seed, g) only. Subclasses give __len__, load(i)
    (a sample, or None for a bad index), self.seed, self.stats and self._perm_cache = (None, None).

    With aspect-ratio buckets (self.bucket_of: the bucket of every index; self.global_batch: G), every
    optimizer step s (positions [s*G, (s+1)*G)) draws from one bucket, so every micro-batch of it, on
    every rank, has one shape: an epoch is each bucket's images in an order drawn from (seed, bucket,
    epoch), cut into batches of G (the last one of a bucket filled up from the start of its order), and
    these batches in an order drawn from (seed, epoch). Nothing depends on the rank count or the
    micro-batch: the global batch of a step is the same on 1 or 64 ranks and after a resume."""

    bucket_of = None  # np.ndarray (len,) of bucket ids, or None: one square size
    global_batch = None

    def set_buckets(self, bucket_of, global_batch):
        """Draw every step's global batch (global_batch samples) from one bucket; bucket_of[i]: index i's."""
        if global_batch is None or global_batch < 1:
            raise ValueError(f"data.py: buckets need the global batch size, got {global_batch!r}")
        self.bucket_of, self.global_batch = np.asarray(bucket_of, dtype=np.int64), int(global_batch)
        self._members = {int(b): np.flatnonzero(self.bucket_of == b) for b in np.unique(self.bucket_of)}
        # one epoch: (bucket, batch c of it) for every bucket in id order, ceil(n_b / G) batches each
        self._batches = [(b, c) for b, m in sorted(self._members.items())
                         for c in range(-(-len(m) // self.global_batch))]
        self._bucket_cache = (None, None, {})

    def _epoch_order(self, epoch: int):
        """(the batches of this epoch in their order, {bucket: its image order}), from (seed, epoch)."""
        if self._bucket_cache[0] != epoch:
            gen = torch.Generator().manual_seed(hash_seed(self.seed, "bucket batches", epoch) & LOW_63)
            self._bucket_cache = (epoch, torch.randperm(len(self._batches), generator=gen), {})
        return self._bucket_cache[1], self._bucket_cache[2]

    def _bucket_pick(self, g: int):
        """(dataset index, its bucket's members) at global position g with buckets."""
        step, k = divmod(g, self.global_batch)
        epoch, j = divmod(step, len(self._batches))
        order, perms = self._epoch_order(epoch)
        b, c = self._batches[int(order[j])]
        members = self._members[b]
        if b not in perms:
            gen = torch.Generator().manual_seed(hash_seed(self.seed, "bucket", b, epoch) & LOW_63)
            perms[b] = torch.randperm(len(members), generator=gen)
        return int(members[int(perms[b][(c * self.global_batch + k) % len(members)])]), members

    def permutation(self, epoch: int) -> torch.Tensor:
        """The data order of one epoch, drawn from (seed, epoch) only."""
        if self._perm_cache[0] != epoch:
            gen = torch.Generator().manual_seed(hash_seed(self.seed, "epoch", epoch) & LOW_63)
            self._perm_cache = (epoch, torch.randperm(len(self), generator=gen))
        return self._perm_cache[1]

    def get(self, g: int):
        """The sample at global position g = step * global_batch + k (epoch g // len).

        A bad pick is replaced by an index drawn from (seed, g, attempt), so the replacement, like
        the pick, is the same on every rank count and after any resume."""
        if g < 0:
            raise ValueError(f"data.py: global sample position must be >= 0, got {g}")
        n, members = len(self), None
        if self.bucket_of is None:
            i = int(self.permutation(g // n)[g % n])
        else:  # a replacement comes from the same bucket: the batch keeps its shape
            i, members = self._bucket_pick(g)
        for attempt in range(MAX_ATTEMPTS):
            sample = self.load(i)
            if sample is not None:
                return sample
            self.stats["skipped"] += 1
            gen = torch.Generator().manual_seed(hash_seed(self.seed, "retry", g, attempt) & LOW_63)
            i = int(torch.randint(n, (1,), generator=gen)) if members is None else \
                int(members[int(torch.randint(len(members), (1,), generator=gen))])
        s = self.stats
        raise RuntimeError(
            f"data.py: {MAX_ATTEMPTS} picks in a row failed at position {g} in {self.path!r}: the data "
            f"looks all corrupt or blurry (corrupt={s['corrupt']}, blurry={s['blurry']}, bad_caption="
            f"{s['bad_caption']} of {n} indexed; sharpness threshold {self.sharpness}, 0 turns it off)")


# -----------------------------------------------------------------------------
# the dataset


@dataclass
class Sample:
    pixels: torch.Tensor  # (3, R, R) float32 in [-1, 1]; (3, h, w) of its bucket with buckets
    caption: str
    time_ids: torch.Tensor  # (6,) float32: orig_h, orig_w, crop_top, crop_left, R, R (or h, w) (SDXL's order)
    index: int  # dataset index actually loaded (a replacement when the pick was bad)


class ImageCaptionData(_Ordered):
    """Image-caption pairs with the paper's filters (Sec. 3.6), resized and center-cropped to R.

    Filters, at init (headers and metadata only): a same-stem caption, shorter side >= min_size, and with
    min_aesthetic > 0 an aesthetic score >= min_aesthetic in the sample's metadata .json (AESTHETIC_KEYS, or
    `aesthetic_key`). At load time: a decodable image, a UTF-8 caption, and with sharpness > 0 the Laplacian
    variance of the grayscale R x R crop (what the model sees, so the threshold does not depend on the
    original size) >= sharpness. clean_captions applies clean_caption (URLs, HTML entities, whitespace).
    self.stats counts: images (found), no_caption, no_aesthetic (no score or no .json), low_aesthetic,
    too_small, corrupt (header at init or decode at load), bad_caption (not UTF-8), blurry, cleaned (captions
    changed by the clean-up), long_caption (cut at MAX_CAPTION_CHARS at read time, then trained on),
    not_regular (a FIFO, socket or device named like an image or shard: skipped at indexing), bad_shards,
    repeated_dirs (folders reached again through a symlink: indexed once), usable (the index size),
    skipped (bad picks that `get` replaced). Load-time counts are per bad
    index, once; later picks of it are only skipped.

    buckets: a list of (height, width) (bucket_sizes): each image goes to the one nearest its aspect ratio
    (from its header, at init: self.item_bucket), is resized to cover it and center-cropped there, and its
    time ids say so (original size, crop corner, the bucket's size as the target size, SDXL's
    multi-aspect conditioning); the sharpness filter sees that crop. set_buckets then makes `get` draw
    every step from one bucket (open_data does)."""

    def __init__(self, path, resolution=1024, min_size=1024, sharpness=DEFAULT_SHARPNESS, seed=0,
                 min_aesthetic=0.0, clean_captions=False, aesthetic_key=None, buckets=None):
        if int(resolution) != resolution or resolution < 1:
            raise ValueError(f"data.py: resolution must be a positive integer, got {resolution!r}")
        if not (min_size >= 0 and sharpness >= 0 and min_aesthetic >= 0):  # also refuses NaN
            raise ValueError(f"data.py: min_size, sharpness and min_aesthetic must be >= 0 (0 disables), got "
                             f"min_size={min_size!r}, sharpness={sharpness!r}, min_aesthetic={min_aesthetic!r}")
        self.path, self.resolution, self.min_size = path, int(resolution), min_size
        self.sharpness, self.seed = float(sharpness), int(seed)
        self.min_aesthetic, self.clean_captions = float(min_aesthetic), bool(clean_captions)
        keys = AESTHETIC_KEYS if aesthetic_key is None else (aesthetic_key,)
        self.stats = dict(images=0, no_caption=0, no_aesthetic=0, low_aesthetic=0, too_small=0, corrupt=0,
                          bad_caption=0, blurry=0, cleaned=0, bad_shards=0, repeated_dirs=0, usable=0,
                          skipped=0, long_caption=0, not_regular=0)
        self._bad = set()  # indices known to fail: a deterministic property of the file, so caching it
        self._cleaned = set()  # indices whose caption the clean-up changed (counted once)
        self._perm_cache = (None, None)  # (epoch, permutation): one randperm per epoch, not per sample

        files, shards = _expand(path, self.stats)
        candidates = _scan_folder_files(files, self.stats)
        for shard in shards:
            candidates += _scan_tar(shard, self.stats)
        self.items, sizes = [], []
        for item, meta in candidates:
            if self.min_aesthetic > 0:
                try:
                    score = None if meta is None else aesthetic_score(_read(*meta), keys)
                except OSError:
                    score = None
                if score is None or score < self.min_aesthetic:
                    self.stats["no_aesthetic" if score is None else "low_aesthetic"] += 1
                    continue
            try:
                w, h = _image_size(*item[:3])
            except _BAD_IMAGE:
                self.stats["corrupt"] += 1
                continue
            if min(w, h) < min_size:
                self.stats["too_small"] += 1
                continue
            self.items.append(item)
            sizes.append((w, h))
        self.stats["usable"] = len(self.items)
        self.buckets = None if buckets is None else [tuple(int(x) for x in b) for b in buckets]
        self.item_bucket = None if buckets is None else \
            np.array([nearest_bucket(w, h, self.buckets) for w, h in sizes], dtype=np.int64)
        if not self.items:
            s = self.stats
            raise ValueError(
                f"data.py: no usable image-caption pairs in {path!r}: found {s['images']} images "
                f"({', '.join(IMAGE_EXTS)}) in {len(files)} files and {len(shards)} .tar shards; skipped "
                f"{s['no_caption']} without a same-stem {CAPTION_EXT} caption, {s['too_small']} with "
                f"shorter side < min_size={min_size}, {s['corrupt']} unreadable"
                + (f", {s['no_aesthetic']} without an aesthetic score ({', '.join(keys)} in a same-stem "
                   f"{META_EXT}), {s['low_aesthetic']} with a score < min_aesthetic={min_aesthetic}"
                   if self.min_aesthetic > 0 else ""))

    def __len__(self):
        return len(self.items)

    def read(self, i: int):
        """(Sample, "ok" | "cleaned" | "long_caption") or (None, "corrupt" | "bad_caption" | "blurry"),
        counting nothing (a cut caption is not counted as cleaned too):
        safe to call from threads (prepare.py)."""
        if not 0 <= i < len(self.items):
            raise IndexError(f"data.py: index {i} out of range for {len(self.items)} samples")
        img_file, img_off, img_size, txt_file, txt_off, txt_size = self.items[i]
        try:  # strict UTF-8: replacement characters would train the model on mojibake; -sig: no BOM
            caption, cut = _read_caption(txt_file, txt_off, txt_size)
        except (OSError, UnicodeDecodeError):
            return None, "bad_caption"
        try:
            with Image.open(io.BytesIO(_read(img_file, img_off, img_size))) as im:
                im.load()  # decode now, inside the try: truncated data fails here
                img = to_rgb(im)
        except _BAD_IMAGE:
            return None, "corrupt"
        orig_w, orig_h = img.size
        H = W = self.resolution
        if self.buckets is not None:
            H, W = self.buckets[self.item_bucket[i]]
        img, top, left = resize_center_crop(img, H, W)
        if self.sharpness > 0 and laplacian_variance(np.asarray(img.convert("L"))) < self.sharpness:
            return None, "blurry"
        status = "long_caption" if cut else "ok"
        if self.clean_captions:
            cleaned = clean_caption(caption)
            status, caption = ("cleaned" if cleaned != caption and not cut else status), cleaned
        pixels = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
        pixels = pixels.float() / 255.0 * 2.0 - 1.0
        time_ids = torch.tensor([orig_h, orig_w, top, left, H, W], dtype=torch.float32)
        return Sample(pixels=pixels, caption=caption, time_ids=time_ids, index=i), status

    def load(self, i: int):
        """Sample i, or None when its image is unreadable, its caption not UTF-8, or it is blurry."""
        if i in self._bad:
            return None
        sample, status = self.read(i)
        if sample is None:
            self.stats[status] += 1
            self._bad.add(i)
        elif status != "ok" and i not in self._cleaned:  # cleaned or long_caption: counted once
            self.stats[status] += 1
            self._cleaned.add(i)
        return sample


# -----------------------------------------------------------------------------
# the cache written by prepare.py: one index JSON and safetensors shards
# Shard k holds the usable samples among dataset indices [k*S, (k+1)*S) of the ImageCaptionData that
# prepare.py built, so a sample keeps its index and CachedData.get(g) picks what ImageCaptionData.get(g)
# picks. Tensors per shard (m usable samples): index (m,) int64, latent and latent_std (m, 4, h, w) (the
# VAE's mean and std times its scaling factor: the UNet's scale), context (m, 77, C), pooled (m, P) in
# the cache dtype, time_ids (m, 6) float32 (fp16 would round original sizes above 2048).

CACHE_FORMAT, CACHE_VERSION = "sdxl-lightning-cache", 1
CACHE_INDEX = "cache_index.json"
CACHE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
CACHE_TENSORS = ("index", "latent", "latent_std", "context", "pooled", "time_ids")


def shard_name(k: int) -> str:
    return f"shard_{k:06d}.safetensors"


def is_cache(path) -> bool:
    """A prepare.py cache: a folder holding cache_index.json, or that file itself."""
    p = os.fspath(path) if not isinstance(path, (list, tuple)) else ""
    return p.endswith(CACHE_INDEX) or os.path.isfile(os.path.join(p, CACHE_INDEX)) if p else False


def same_base(a, b) -> bool:
    """Two --base arguments name the same weights: local paths compared resolved, hub ids as written."""
    norm = [os.path.realpath(x) if os.path.exists(x) else str(x) for x in (os.fspath(a), os.fspath(b))]
    return norm[0] == norm[1]


def shard_problem(meta: dict, shapes: dict, header: dict) -> str:
    """Why a shard does not belong to a cache whose index says `header`, or "" if it does. `meta` is the
    shard's safetensors metadata, `shapes` {tensor name: (shape, dtype name)}."""
    if meta.get("format") != CACHE_FORMAT:
        return f"not a {CACHE_FORMAT} shard (metadata format {meta.get('format')!r})"
    if meta.get("version") != str(CACHE_VERSION):
        return f"format version {meta.get('version')}, this code reads {CACHE_VERSION}"
    if meta.get("fingerprint") != header["fingerprint"]:
        mine = json.loads(meta.get("header", "{}"))
        diff = [k for k in ("base", "resolution", "dtype", "data", "filters", "shard_size", "buckets")
                if mine.get(k) != header.get(k)]
        return ("from another cache (differs in " + (", ".join(diff) if diff else "the data index") +
                f"): made for {', '.join(f'{k}={mine.get(k)!r}' for k in diff) or 'other data'}")
    if set(shapes) != set(CACHE_TENSORS):
        return f"tensors {sorted(shapes)}, expected {list(CACHE_TENSORS)}"
    m = shapes["index"][0][0] if len(shapes["index"][0]) == 1 else -1
    dt = {"fp16": "F16", "bf16": "BF16"}[header["dtype"]]
    # bucketed: each latent (C, h, w) of its bucket, flattened and zero-padded to the largest bucket's h * w
    lat = (m, header["latent_shape"][0], header["packed_latent"]) if "buckets" in header else \
        (m, *header["latent_shape"])
    want = {"index": ((m,), "I64"), "latent": (lat, dt), "latent_std": (lat, dt),
            "context": ((m, *header["context_shape"]), dt), "pooled": ((m, header["pooled_dim"]), dt),
            "time_ids": ((m, 6), "F32")}
    bad = [f"{k} {tuple(shapes[k][0])} {shapes[k][1]} (expected {w[0]} {w[1]})" for k, w in want.items()
           if (tuple(shapes[k][0]), shapes[k][1]) != w]
    return "; ".join(bad)


def read_shard_header(file, header=None):
    """(metadata, {name: (shape, dtype)}) of a shard; a clear ValueError naming the file if it is not a
    readable shard of the cache described by `header`."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"data.py: {file}: not a readable cache shard ({e}); re-run prepare.py "
                         f"(it rewrites missing shards)") from None
    problem = shard_problem(meta, shapes, header) if header is not None else ""
    if problem:
        raise ValueError(f"data.py: {file}: {problem}")
    return meta, shapes


@dataclass
class CachedSample:
    latent: torch.Tensor  # (4, h, w) float32: the VAE latent mean in the UNet's scale (training's x0)
    latent_std: torch.Tensor  # (4, h, w) float32: its std, for sampling the latent instead
    context: torch.Tensor  # (77, C) float32: both CLIPs' penultimate states (text.TextEncoders.encode)
    pooled: torch.Tensor  # (P,) float32: bigG's pooled output
    time_ids: torch.Tensor  # (6,) float32, as Sample.time_ids
    index: int  # dataset index actually loaded


class CachedData(_Ordered):
    """What a training step needs, read from a prepare.py cache with no VAE or text encoder: get(g) picks
    the same dataset index as ImageCaptionData.get(g) on the data the cache was made from (same seed).

    Every shard's header is checked at init (format version, the base, resolution, dtype and data it was
    made for, tensor shapes): a missing, truncated or foreign file is refused with its name. Values are
    checked finite when read."""

    def __init__(self, path, resolution=None, seed=0, base=None, buckets=False):
        path = os.fspath(path)
        self.dir = os.path.dirname(path) if path.endswith(CACHE_INDEX) else path
        self.path, self.seed = path, int(seed)
        index_file = os.path.join(self.dir, CACHE_INDEX)
        try:
            with open(index_file) as f:
                h = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"data.py: {index_file}: not a readable cache index ({e}); re-run "
                             f"prepare.py") from None
        if not isinstance(h, dict) or h.get("format") != CACHE_FORMAT:
            raise ValueError(f"data.py: {index_file}: not a {CACHE_FORMAT} index")
        if h.get("version") != CACHE_VERSION:
            raise ValueError(f"data.py: {index_file}: cache format version {h.get('version')}, this code reads "
                             f"{CACHE_VERSION}; re-run prepare.py into a new folder")
        need = ("base", "resolution", "dtype", "items", "shard_size", "shards", "fingerprint", "latent_shape",
                "context_shape", "pooled_dim", "stats")
        if any(k not in h for k in need) or h["dtype"] not in CACHE_DTYPES:
            raise ValueError(f"data.py: {index_file}: incomplete cache index (missing "
                             f"{[k for k in need if k not in h]} or bad dtype {h.get('dtype')!r})")
        if resolution is not None and int(resolution) != h["resolution"]:
            raise ValueError(f"data.py: {index_file}: the cache was made at resolution {h['resolution']}, "
                             f"not {resolution}; run prepare.py with --resolution {resolution}")
        if base is not None and not same_base(base, h["base"]):
            raise ValueError(f"data.py: {index_file}: the cache was encoded with the VAE and text encoders of "
                             f"{h['base']!r}, not {os.fspath(base)!r}; pass that --base or re-run prepare.py")
        if bool(buckets) != ("buckets" in h):
            raise ValueError(f"data.py: {index_file}: the cache was made " + (
                "with --buckets (aspect-ratio buckets); train with --buckets" if "buckets" in h else
                f"square ({h['resolution']} px crops), without --buckets; run prepare.py with --buckets"))
        self.header, self.resolution = h, h["resolution"]
        self.buckets = self.item_bucket = None
        if buckets:
            if "bucket_of" not in h or "packed_latent" not in h:
                raise ValueError(f"data.py: {index_file}: incomplete cache index (buckets without bucket_of "
                                 f"or packed_latent)")
            self.buckets = [tuple(b) for b in h["buckets"]]
            self.item_bucket = np.asarray(h["bucket_of"], dtype=np.int64)
            if len(self.item_bucket) != h["items"] or not all(0 <= b < len(self.buckets) for b in
                                                              set(self.item_bucket.tolist())):
                raise ValueError(f"data.py: {index_file}: bucket_of does not give a bucket for each of the "
                                 f"{h['items']} items")
        # (4, h, w), (77, C)
        self.latent_shape, self.context_shape = tuple(h["latent_shape"]), tuple(h["context_shape"])
        self.pooled_dim = h["pooled_dim"]
        self.stats = {**h["stats"], "skipped": 0}
        n, S = h["items"], h["shard_size"]
        if len(h["shards"]) != -(-n // S):
            raise ValueError(f"data.py: {index_file}: {len(h['shards'])} shards listed for {n} items of {S}")
        # row of dataset index i in its shard i // S, or -1 when prepare.py filtered it out
        self._row = np.full(n, -1, dtype=np.int64)
        from safetensors import safe_open
        for k, name in enumerate(h["shards"]):
            file = os.path.join(self.dir, name)
            meta, _ = read_shard_header(file, h)
            with safe_open(file, framework="pt") as f:
                idx = f.get_tensor("index").numpy()
            if meta.get("shard") != str(k) or len(idx) and (
                    idx.min() < k * S or idx.max() >= min(n, (k + 1) * S) or np.any(np.diff(idx) <= 0)):
                raise ValueError(f"data.py: {file}: holds indices outside shard {k}'s range [{k * S}, "
                                 f"{min(n, (k + 1) * S)}) (a renamed or corrupt shard)")
            self._row[idx] = np.arange(len(idx))
        self.usable = int((self._row >= 0).sum())
        if self.usable != h["stats"].get("cached"):
            raise ValueError(f"data.py: {index_file}: the shards hold {self.usable} samples, the index says "
                             f"{h['stats'].get('cached')}")
        self.sharpness = h.get("filters", {}).get("sharpness")
        self._files = {}  # shard -> open safe_open handle (memory-mapped, opened on first use)
        self._perm_cache = (None, None)

    def __len__(self):
        return self.header["items"]  # the dataset's index size, so the permutation equals ImageCaptionData's

    def _shard(self, k):
        if k not in self._files:
            from safetensors import safe_open
            self._files[k] = safe_open(os.path.join(self.dir, self.header["shards"][k]), framework="pt")
        return self._files[k]

    def load(self, i: int):
        """Sample i, or None when prepare.py filtered it out (counted in stats then)."""
        if not 0 <= i < len(self):
            raise IndexError(f"data.py: index {i} out of range for {len(self)} samples")
        row = int(self._row[i])
        if row < 0:
            return None
        k = i // self.header["shard_size"]
        f = self._shard(k)
        t = {name: f.get_slice(name)[row:row + 1][0].float() for name in CACHE_TENSORS[1:]}
        if self.buckets is not None:  # unpack (C, packed) -> (C, h, w) of the index's bucket
            bh, bw = self.buckets[self.item_bucket[i]]
            f_ = self.resolution // self.latent_shape[-1]
            for name in ("latent", "latent_std"):
                t[name] = t[name][:, :(bh // f_) * (bw // f_)].reshape(-1, bh // f_, bw // f_)
        if not all(torch.isfinite(v).all() for v in t.values()):
            raise ValueError(f"data.py: {os.path.join(self.dir, self.header['shards'][k])}: non-finite values "
                             f"in the sample of index {i} (row {row}): a corrupt shard; delete it and re-run "
                             f"prepare.py")
        return CachedSample(index=i, **t)


def open_data(path, resolution, min_size=1024, sharpness=DEFAULT_SHARPNESS, min_aesthetic=0.0,
              clean_captions=False, seed=0, base=None, aesthetic_key=None, buckets=False, multiple=None,
              global_batch=None):
    """The reader for --data: CachedData for a prepare.py cache (its filters were applied when it was
    made; `base`, when given, must be the one it was encoded with), else ImageCaptionData.
    buckets: SDXL's aspect-ratio buckets at `resolution` (bucket_sizes(resolution, multiple); a cache
    must have been made with them and holds its own), each step's `global_batch` drawn from one."""
    if is_cache(path):
        ds = CachedData(path, resolution, seed, base, buckets)
    else:
        ds = ImageCaptionData(path, resolution, min_size, sharpness, seed, min_aesthetic, clean_captions,
                              aesthetic_key, bucket_sizes(resolution, multiple) if buckets else None)
    if buckets:
        ds.set_buckets(ds.item_bucket, global_batch)
    return ds


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
    """Images: stack the samples at global positions: pixels (B, 3, R, R), captions [B], time_ids (B, 6)."""
    samples = [data.get(g) for g in positions]
    pixels = torch.stack([s.pixels for s in samples])  # (B, 3, R, R)
    time_ids = torch.stack([s.time_ids for s in samples])  # (B, 6)
    return pixels, [s.caption for s in samples], time_ids


def cached_batch(data, positions):
    """A cache: x0 (B, 4, h, w) (the latent mean, as training encodes it), context (B, 77, C), pooled
    (B, P), time_ids (B, 6), all float32."""
    samples = [data.get(g) for g in positions]
    keys = ("latent", "context", "pooled", "time_ids")
    return tuple(torch.stack([getattr(s, k) for s in samples]) for k in keys)


@torch.no_grad()
def encode(vae, text, pixels, captions, slice_size=4, autocast=False):
    """The one encoder of images + captions, for prepare.py's cache and train.py's steps on images:
    latent mean and std in the UNet's scale (B, 4, h, w) (training uses the mean: the latent of a cached
    and of a fresh image are the same), context (B, 77, C), pooled (B, P). slice_size images per VAE call
    (the paper's "VAE slicing"); autocast: under bf16 autocast when the pixels are on a GPU, as training
    runs; prepare.py runs its encoders in the dtype they were loaded in."""
    on = autocast and pixels.device.type == "cuda"
    with torch.autocast("cuda", torch.bfloat16) if on else contextlib.nullcontext():
        sf = vae.config.scaling_factor
        means, stds = [], []
        for x in pixels.split(slice_size):
            mean, logvar = vae.encode(x)
            means.append(mean * sf)
            stds.append((0.5 * logvar).exp() * sf)
        context, pooled = text.encode(list(captions))
    return torch.cat(means), torch.cat(stds), context, pooled
