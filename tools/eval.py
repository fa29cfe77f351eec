"""Measuring generators: a prompt file in, images and a table (JSON and Markdown) out.

    # the toy world (toy.py): Frechet distance on the toy classifier's features, caption accuracy,
    # sharpness relative to the data, agreement with the teacher's 32-step CFG-6 image from the same noise
    python -m tools.eval --toy toy --out toy/eval --row teacher32:base:32:6 --row teacher4:base:4 \\
        --row lightning4:toy/runs/8to4/full/sdxl_lightning_4step_unet.safetensors:4

    # real SDXL, the paper's protocol (Sec. 4.3): FID-Whole, FID-Patch, CLIP score over e.g. the first 10K
    # COCO val captions, one 1024 px image each, against a folder of reference images
    python -m tools.eval --prompts coco10k.txt --ref-images coco_val2014/ --out eval/ \\
        --width 1024 --height 1024 \\
        --fid-model inception-2015-12-05.pt --clip-model laion/CLIP-ViT-g-14-laion2B-s12B-b42K \\
        --row lightning4::4 --row sdxl32:base:32:5

A row is NAME:UNET:STEPS[:GUIDANCE[:PREDICTION]]: UNET as `sample.py --unet` takes it (a file, `base`, or
empty for the official Lightning UNet of STEPS), GUIDANCE <= 1 is off, PREDICTION epsilon or sample (x0;
default sample for a 1-step x0 file, by its name). Image i of the prompt file is drawn in batch i // --batch
with seed --seed + i // --batch, so every row sees the same noise for the same prompt. Images are written
as OUT/NAME/00000.png ... with OUT/NAME/settings.json (base, UNet file, steps, guidance, prediction, size,
seed, batch, dtype, a hash of the prompts); a re-run keeps the batches whose images all exist, and refuses
a row whose folder holds images made with other settings (another name or --out, or delete the folder).
Images are read a batch at a time (never all files open at once); a reference image that cannot be read
(corrupt, or past Pillow's decompression-bomb limit) is refused by name.

The rules that move FID by points, written here once (and next to every number):
- FID-Whole: the whole image resized to 299x299, bicubic, per channel in float (clean-fid's "clean" mode:
  no uint8 quantization between resize and network).
- FID-Patch: the 299x299 centre crop of the full-resolution image, top/left = round((size - 299) / 2)
  (torchvision's CenterCrop rule); reference images are cropped the same way at their own resolution.
- The Frechet distance ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64, with the trace of the
  matrix square root from the eigenvalues of S1^(1/2) S2 S1^(1/2) (symmetric, so no complex sqrtm).
- CLIP score: 100 * max(cos(image embedding, text embedding), 0), averaged over images (torchmetrics'
  definition), with the model's own CLIPProcessor for tokens and pixels.
Feature extractors: a TorchScript InceptionV3 file (clean-fid's / StyleGAN's `inception-2015-12-05.pt`, the
weights every published FID uses; torch.jit.load, no torchvision needed), or any transformers vision model
(a hub id or folder; pooled output), e.g. DINOv2 for FD-DINOv2. CLIP: a transformers CLIPModel.
"""
import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

FID_SIZE = 299

# ----------------------------------------------------------------------------------------------------
# The Frechet distance


def feature_stats(features):
    """(N, D) -> mean (D,), covariance (D, D), float64, unbiased (numpy's np.cov, as pytorch-fid)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"eval.py: need at least 2 feature vectors of shape (N, D), got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)). S1 S2 is similar to the symmetric PSD
    S1^(1/2) S2 S1^(1/2), so tr((S1 S2)^(1/2)) is the sum of the square roots of its eigenvalues."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"eval.py: mismatched statistics {mu1.shape}, {s1.shape} vs {mu2.shape}, {s2.shape}")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # S1^(1/2)
    m = root1 @ s2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def fd_of(features_a, features_b):
    return frechet_distance(*feature_stats(features_a), *feature_stats(features_b))

# ----------------------------------------------------------------------------------------------------
# The paper's image rules: whole image resized, or centre patch


def resize_whole(img: Image.Image, size=FID_SIZE) -> np.ndarray:
    """FID-Whole: the whole image to size x size, bicubic per channel in float32 -> (size, size, 3) float32
    0..255."""
    chans = [np.asarray(Image.fromarray(np.asarray(c, dtype=np.float32), mode="F").resize((size, size),
             Image.Resampling.BICUBIC)) for c in img.convert("RGB").split()]
    return np.stack(chans, axis=-1).clip(0, 255)


def center_patch(img: Image.Image, size=FID_SIZE) -> np.ndarray:
    """FID-Patch: the size x size centre crop at full resolution -> (size, size, 3) float32 0..255."""
    w, h = img.size
    if min(w, h) < size:
        raise ValueError(f"eval.py: FID-Patch needs images of at least {size} px, got {w}x{h}")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return np.asarray(img.convert("RGB").crop((left, top, left + size, top + size)), dtype=np.float32)

# ----------------------------------------------------------------------------------------------------
# Feature extractors and CLIP score (weights through weights.py: a file, a folder or a hub id)


class InceptionFeatures:
    """clean-fid's / StyleGAN's TorchScript InceptionV3 (`inception-2015-12-05.pt`): (B, 3, 299, 299) floats
    in 0..255 -> (B, 2048) pool features. The file is code + weights; torch.jit.load reads it without
    torchvision."""

    def __init__(self, path, device="cpu"):
        import weights
        p = Path(path) if Path(path).is_file() else None
        if p is None:
            raise weights.CheckpointError(f"{path}: no such file (the TorchScript inception-2015-12-05.pt)")
        try:
            self.model = torch.jit.load(str(p), map_location=device).eval()
        except RuntimeError as e:
            raise weights.CheckpointError(f"{p}: not a TorchScript model "
                                          f"({str(e).splitlines()[0]})") from None
        self.device = device

    @torch.no_grad()
    def __call__(self, batch):  # (B, H, W, 3) float 0..255
        x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).to(self.device)  # (B, 3, H, W)
        return self.model(x, return_features=True).double().cpu().numpy()


class HFVisionFeatures:
    """A transformers vision model from a hub id or folder (e.g. facebook/dinov2-base, a CLIP vision tower):
    its own image processor, then the pooled output (CLIP: the projected image embedding)."""

    def __init__(self, source, device="cpu"):
        from transformers import AutoImageProcessor, AutoModel
        folder = _model_folder(source)
        self.processor = AutoImageProcessor.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder, use_safetensors=True).eval().to(device)
        self.device = device

    @torch.no_grad()
    def __call__(self, batch):  # (B, H, W, 3) float 0..255
        imgs = [Image.fromarray(np.asarray(b).round().clip(0, 255).astype(np.uint8)) for b in batch]
        px = self.processor(images=imgs, return_tensors="pt")["pixel_values"].to(self.device)
        if hasattr(self.model, "get_image_features"):
            out = _tensor(self.model.get_image_features(pixel_values=px))
        else:
            out = self.model(pixel_values=px).pooler_output
        return out.double().cpu().numpy()


def _model_folder(source):
    """A local folder with a transformers model: the folder itself, or a hub id through weights.py's cache
    path."""
    import weights
    if Path(source).is_dir():
        return Path(source)
    return weights.fetch_folder(str(source), ["*.json", "*.txt", "*.safetensors"])


def feature_extractor(source, device="cpu"):
    if str(source).endswith((".pt", ".pth")):
        return InceptionFeatures(source, device)
    return HFVisionFeatures(source, device)


class ClipScore:
    """CLIP score (Hessel et al. 2021, torchmetrics' definition): 100 * max(cos(E_img, E_txt), 0)."""

    def __init__(self, source, device="cpu"):
        from transformers import CLIPModel, CLIPProcessor
        folder = _model_folder(source)
        self.processor = CLIPProcessor.from_pretrained(folder)
        self.model = CLIPModel.from_pretrained(folder, use_safetensors=True).eval().to(device)
        self.device = device

    def __call__(self, images, prompts):
        """images: PIL list, prompts: str list -> (B,) scores."""
        return 100 * np.maximum(self.cosine(images, prompts), 0)

    @torch.no_grad()
    def cosine(self, images, prompts):
        """(B,) cosine similarity of the image and text embeddings."""
        inp = self.processor(text=list(prompts), images=list(images), return_tensors="pt",
                             padding="max_length",
                             truncation=True,
                             max_length=self.model.config.text_config.max_position_embeddings)
        inp = {k: v.to(self.device) for k, v in inp.items()}
        img = _tensor(self.model.get_image_features(pixel_values=inp["pixel_values"]))
        txt = _tensor(self.model.get_text_features(input_ids=inp["input_ids"],
                                                   attention_mask=inp["attention_mask"]))
        return torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1).cpu().numpy()


def _tensor(out):
    return out if torch.is_tensor(out) else out.pooler_output

# ----------------------------------------------------------------------------------------------------
# The toy protocol (toy.py): classifier features, caption accuracy, sharpness, teacher agreement


def sharpness(images):
    """Mean variance of the 3x3 Laplacian of the grayscale images (data.py's filter): high-frequency
    energy."""
    import data as data_mod
    return float(np.mean([data_mod.laplacian_variance(np.asarray(im.convert("L"))) for im in images]))


def to_tensor(images):
    """PIL list -> (B, 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGB"))
                                      for im in images])).permute(0, 3, 1, 2).float() / 127.5 - 1


def within_caption_spread(features, captions):
    """The median over captions (those with at least 2 images) of the features' variance within the caption:
    the trace of their covariance, unbiased, so 2 images per caption estimate it without bias. The median,
    not the mean: one image with a wrong background differs from its pair over the whole image and would
    outweigh the rest. (N, F), [N] -> float, or None when no caption has 2 images"""
    groups = {}
    for f, c in zip(features, captions):
        groups.setdefault(c, []).append(f)
    spreads = [np.var(np.stack(g), axis=0, ddof=1).sum() for g in groups.values() if len(g) >= 2]
    return float(np.median(spreads)) if spreads else None


class ToyJudge:
    """The toy world's stand-in for Inception: toy.py's classifier, its reference statistics on the data."""

    def __init__(self, toy_dir, n_ref=2000):
        from tools import toy_world as toy
        self.toy, self.dir = toy, Path(toy_dir)
        self.clf = toy.load_classifier(self.dir / "classifier")
        data = self.dir / "data"
        if not (data / "done.json").exists():
            raise ValueError(f"{data}: no toy data set (run `python -m tools.toy --out {self.dir}` first)")
        n = min(n_ref, json.loads((data / "done.json").read_text())["images"])
        pixels, captions = toy.load_data(data, n)
        self.ref_features = self.features_of(pixels)
        self.ref_sharpness = sharpness(to_pil(pixels))
        self.ref_spread = within_caption_spread(pixels.flatten(1).double().numpy(), captions)

    @torch.no_grad()
    def features_of(self, x):
        return torch.cat([self.clf.features(b) for b in x.split(256)]).double().numpy()

    @torch.no_grad()
    def measure(self, images, prompts, teacher_images=None):
        """fd, acc_* per attribute and acc_all, sharpness and diversity (each relative to the data's), and
        psnr_vs_teacher when teacher images (same prompts and noise) are given. Diversity is measured on the
        pixels: the classifier's features are trained to ignore what a caption leaves open (where in the
        region, size, rotation), so their spread within a caption counts mistakes, not variety (the teacher's
        was 2-10x the data's)."""
        x = to_tensor(images)
        feats = self.features_of(x)
        labels = [self.toy.parse_caption(p) for p in prompts]
        logits = {k: torch.cat([self.clf(b)[k] for b in x.split(256)]) for k in self.toy.ATTRIBUTES}
        correct = {k: (logits[k].argmax(-1) == torch.tensor([lab[k] for lab in labels])) for k in logits}
        res = {"fd": fd_of(feats, self.ref_features)}
        res.update({f"acc_{k}": float(v.float().mean()) for k, v in correct.items()})
        res["acc_all"] = float(torch.stack(list(correct.values())).all(0).float().mean())
        res["sharpness"] = sharpness(images) / self.ref_sharpness
        spread = within_caption_spread(x.flatten(1).double().numpy(), prompts)
        res["diversity"] = None if spread is None else spread / self.ref_spread
        if teacher_images is not None:
            mse = ((x - to_tensor(teacher_images)) ** 2).mean(dim=(1, 2, 3))  # per image, [-1, 1] scale
            res["psnr_vs_teacher"] = float((10 * torch.log10(4.0 / mse.clamp(min=1e-10))).mean())
        return res


def to_pil(x):
    arr = ((x / 2 + 0.5).clamp(0, 1) * 255).round().permute(0, 2, 3, 1).byte().numpy()
    return [Image.fromarray(a) for a in arr]

# ----------------------------------------------------------------------------------------------------
# Generating a row's images


@dataclass
class Row:
    name: str
    unet: str | None  # file, "base", or None (the official Lightning UNet)
    steps: int
    guidance: float = 0.0
    prediction: str | None = None  # None: sample for an x0 file name, else epsilon


def parse_row(spec):
    parts = spec.split(":")
    if not 3 <= len(parts) <= 5 or not parts[0] or not parts[2].isdigit():
        raise ValueError(f"--row {spec!r}: expected NAME:UNET:STEPS[:GUIDANCE[:PREDICTION]], e.g. "
                         "teacher32:base:32:6")
    if any(c in parts[0] for c in "/\\. "):
        raise ValueError(f"--row {spec!r}: NAME names an output folder; use letters, digits, - and _")
    guidance = float(parts[3]) if len(parts) > 3 and parts[3] else 0.0
    prediction = parts[4] if len(parts) > 4 else None
    if prediction not in (None, "epsilon", "sample"):
        raise ValueError(f"--row {spec!r}: PREDICTION must be epsilon or sample, got {prediction!r}")
    return Row(parts[0], parts[1] or None, int(parts[2]), guidance, prediction)


SETTINGS = "settings.json"


def row_prediction(row):
    return row.prediction or ("sample" if row.unet and "_x0" in Path(row.unet).name else "epsilon")


def row_settings(row, base, prompts, batch, seed, width, height, dtype):
    """Everything a row's images depend on (files by path, size and time: sample.identity), recorded in
    OUT/NAME/settings.json."""
    import hashlib
    import sample as sample_mod
    return {"base": sample_mod.identity(base), "unet": sample_mod.identity(row.unet), "steps": row.steps,
            "guidance": row.guidance, "prediction": row_prediction(row), "width": width, "height": height,
            "seed": seed, "batch": batch, "dtype": str(dtype), "prompts": len(prompts),
            "prompts_sha256": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()}


def recorded_settings(folder):
    """OUT/NAME/settings.json, or None when absent or unreadable."""
    try:
        return json.loads((Path(folder) / SETTINGS).read_text())
    except (OSError, ValueError):
        return None


def check_row_folder(folder, settings):
    """Refuse a row folder whose images were made with other settings (or with none recorded): its images
    would be reported as this row's numbers. Checked for every row before any image is generated."""
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.glob("*.png")):
        return
    old = recorded_settings(folder)
    if old == settings:
        return
    what = "no settings.json records how they were made" if not isinstance(old, dict) else \
        "other " + ", ".join(k for k in settings if old.get(k) != settings[k])
    raise ValueError(f"{folder}: holds images made with other settings ({what}); use another row name or "
                     f"--out, or delete {folder}")


def read_image(path, what="image"):
    """One image file, read whole and closed -> RGB PIL image; unreadable or a decompression bomb: one line
    naming the file."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise ValueError(f"{what} {path}: too many pixels, refused as a possible decompression bomb "
                         f"({e})") from None
    except OSError as e:  # UnidentifiedImageError is an OSError
        raise ValueError(f"{what} {path}: not a readable image ({e})") from None


def generate_row(row, base, prompts, out, batch, seed, width, height, device, dtype, cache):
    """Images for every prompt (OUT/NAME/00000.png ...), generated in batches; existing batches are kept
    when OUT/NAME/settings.json matches (check_row_folder). -> (the image paths, seconds per image)"""
    import files
    import sample as sample_mod
    import lightning_min as lm
    folder = Path(out) / row.name
    settings = row_settings(row, base, prompts, batch, seed, width, height, dtype)
    check_row_folder(folder, settings)
    folder.mkdir(parents=True, exist_ok=True)
    if recorded_settings(folder) != settings:
        files.save_json(settings, folder / SETTINGS)  # before any image: an image never outlives its record
    paths = [folder / f"{i:05d}.png" for i in range(len(prompts))]
    todo = [b for b in range(0, len(prompts), batch) if not all(p.exists() for p in paths[b:b + batch])]
    t0, n = time.time(), 0
    if todo:
        lm.trailing_timesteps(row.steps)  # a bad step count fails before any loading
        key = (base, row.unet)
        if key not in cache:
            cache.clear()  # one UNet in memory at a time
            cache[key] = sample_mod.load(base, row.unet, None, row.steps, device, dtype)
        text, unet, vae = cache[key]
        pred = row_prediction(row)
        for b in todo:
            imgs = sample_mod.generate(text, unet, vae, prompts[b:b + batch], row.steps, seed + b // batch,
                                       width, height, pred, row.guidance, dtype)
            for p, im in zip(paths[b:b + batch], files.to_pil(imgs)):
                sample_mod.save_image(im, p)
            n += len(imgs)
    secs = time.time() - t0
    return paths, (secs / n if n else None)


def read_prompts(path):
    """sample.py's prompt file (one per line, UTF-8, blank lines skipped; errors name the file and line)."""
    import sample as sample_mod
    return [prompt for _, prompt in sample_mod.read_prompts(path)]

# ----------------------------------------------------------------------------------------------------
# Tables


def markdown(rows, columns):
    head = "| " + " | ".join(["row"] + [c for c, _ in columns]) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    for r in rows:
        cells = [r["row"]]
        for c, fmt in columns:
            v = r.get(c)
            cells.append("-" if v is None else (fmt.format(v) if isinstance(v, (int, float)) else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


TOY_COLUMNS = [("steps", "{}"), ("guidance", "{:g}"), ("fd", "{:.2f}"), ("acc_all", "{:.3f}"),
               ("acc_shape", "{:.3f}"),
               ("acc_colour", "{:.3f}"), ("acc_position", "{:.3f}"), ("acc_background", "{:.3f}"),
               ("sharpness", "{:.2f}"), ("diversity", "{:.2f}"), ("psnr_vs_teacher", "{:.2f}"),
               ("s_per_image", "{:.3f}")]
REAL_COLUMNS = [("steps", "{}"), ("guidance", "{:g}"), ("fid_whole", "{:.2f}"), ("fid_patch", "{:.2f}"),
                ("clip_score", "{:.2f}"), ("s_per_image", "{:.3f}")]


def write_tables(out, results, columns, notes):
    """OUT/results.json and OUT/results.md, each written atomically."""
    import files
    out = Path(out)
    files.save_json({"rows": results, "notes": notes}, out / "results.json")
    md = markdown(results, columns) + "\n" + notes + "\n"
    files.atomic_write(out / "results.md", lambda tmp: tmp.write_text(md))

# ----------------------------------------------------------------------------------------------------
# The command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--row", action="append", required=True,
                   help="NAME:UNET:STEPS[:GUIDANCE[:PREDICTION]], repeatable")
    p.add_argument("--out", required=True,
                   help="output folder: OUT/NAME/*.png, OUT/results.json, OUT/results.md")
    p.add_argument("--toy", default=None,
                   help="a toy.py folder: use its base, data, classifier and the toy protocol")
    p.add_argument("--prompts", default=None,
                   help="prompt file, one per line (toy default: every toy caption, twice)")
    p.add_argument("--base", default=None,
                   help="base as in sample.py (toy default: TOY/base; else SDXL base)")
    p.add_argument("--ref-images", default=None, help="real SDXL: folder of reference images for FID")
    p.add_argument("--fid-model", default=None, help="real SDXL: inception-2015-12-05.pt (TorchScript) or a "
                   "transformers vision model (hub id or folder)")
    p.add_argument("--clip-model", default=None,
                   help="real SDXL: a transformers CLIPModel (hub id or folder)")
    p.add_argument("--reference", action="store_true", help="toy: also rows `data` (held-out images of the "
                   "same prompts) and `recon` (their VAE reconstructions): what the classifier reads at best")
    p.add_argument("--num", type=int, default=None, help="use the first NUM prompts (default all)")
    p.add_argument("--batch", type=int, default=16, help="images per generation batch (and per noise seed)")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the first batch; batch k uses seed + k")
    p.add_argument("--width", type=int, default=None, help="image width (toy 32, else 1024)")
    p.add_argument("--height", type=int, default=None, help="image height (toy 32, else 1024)")
    p.add_argument("--device", default=None, help="torch device; default cuda if available")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="as in sample.py")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import files
    import sample as sample_mod
    import weights
    try:
        rows = [parse_row(s) for s in args.row]
        if len({r.name for r in rows}) != len(rows):
            raise ValueError("--row names must differ")
        if args.reference and not args.toy:
            raise ValueError("--reference is a toy row pair (held-out data, VAE reconstructions): needs --toy")
        if args.reference and {"data", "recon"} & {r.name for r in rows}:
            raise ValueError("--reference writes rows data and recon: name the --row otherwise")
        if args.batch < 1 or (args.num is not None and args.num < 1):
            raise ValueError("--batch and --num must be at least 1")
        out = Path(args.out)
        files.check_writable_folder(out)
        device, dtype = sample_mod.pick_device_dtype(args.device, args.dtype)
        if args.toy:
            results = run_toy(args, rows, out, device, dtype)
        else:
            results = run_real(args, rows, out, device, dtype)
    except (weights.CheckpointError, files.RunError, ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
    print(Path(args.out, "results.md").read_text())
    return results


def run_toy(args, rows, out, device, dtype):
    from tools import toy_world as toy
    toy_dir = Path(args.toy)
    base = args.base or str(toy_dir / "base")
    if not (Path(base) / "model_index.json").exists() and not weights_is_file(base):
        raise ValueError(f"{base}: no toy base (run `python -m tools.toy --out {toy_dir}` first)")
    prompts = read_prompts(args.prompts) if args.prompts else toy.all_captions() * 2
    prompts = prompts[:args.num] if args.num else prompts
    for p in prompts:
        toy.parse_caption(p)  # refuse a non-toy prompt before generating anything
    w, h = args.width or toy.RES, args.height or toy.RES
    out.mkdir(parents=True, exist_ok=True)
    teacher_row = Row("_teacher32", "base", 32, 6.0)
    for r in [teacher_row, *rows]:  # every row's folder before anything is generated
        check_row_folder(out / r.name, row_settings(r, base, prompts, args.batch, args.seed, w, h, dtype))
    judge, cache = ToyJudge(toy_dir), {}
    teacher, _ = generate_row(teacher_row, base, prompts, out, args.batch, args.seed,
                              w, h, device, dtype, cache)
    teacher = [read_image(p) for p in teacher]  # toy images: all of them fit in memory
    results = []
    if args.reference:
        for name, imgs in reference_images(toy, base, prompts, out).items():
            m = judge.measure(imgs, prompts)
            results.append({"row": name, "unet": None, "steps": None, "guidance": None, **m,
                            "s_per_image": None, "images": len(imgs)})
            print(f"eval.py: {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in m.items() if v is not None))
    for r in rows:
        paths, spi = generate_row(r, base, prompts, out, args.batch, args.seed, w, h, device, dtype, cache)
        imgs = [read_image(p) for p in paths]
        m = judge.measure(imgs, prompts, teacher)
        if r.unet == "base" and r.steps == 32 and r.guidance == 6.0:
            m["psnr_vs_teacher"] = None  # the reference itself
        results.append({"row": r.name, "unet": r.unet, "steps": r.steps, "guidance": r.guidance, **m,
                        "s_per_image": spi, "images": len(imgs)})
        print(f"eval.py: {r.name}: " + ", ".join(f"{k} {v:.4g}" for k, v in m.items() if v is not None))
    notes = (f"Toy protocol, {len(prompts)} images per row ({w}x{h}), noise seed {args.seed} + batch index "
             f"(batch {args.batch}); fd: Frechet distance of toy-classifier features (128-d) to "
             f"{len(judge.ref_features)} data images; acc: caption attributes recognised by the classifier "
             "(all: all four); sharpness: mean Laplacian variance / the data's; diversity: the pixels' "
             "variance within a caption (median over captions) / the data's ('-' when no caption repeats); "
             "data, recon: held-out images of the same prompts and their VAE reconstructions; "
             "psnr_vs_teacher: dB against "
             "the teacher's 32-step CFG-6 image from the same noise; s_per_image: generation time (CPU, "
             "this run; '-' when cached).")
    write_tables(out, results, TOY_COLUMNS, notes)
    return results


REFERENCE_SEED = 1 << 20  # held-out images: the data set is drawn from seeds 0, 1, ...


def reference_images(toy, base, prompts, out):
    """The toy's ceiling, two rows: `data`, a held-out image of each prompt drawn as the data set is
    (toy_world.draw_caption with REFERENCE_SEED), and `recon`, its reconstruction by the base's VAE (encode
    the latent mean, decode). Written to OUT/data and OUT/recon like a generated row. -> {name: [PIL]}"""
    import files
    import weights
    vae = weights.load_vae(base).eval()
    data = [toy.draw_caption(p, REFERENCE_SEED, i) for i, p in enumerate(prompts)]
    with torch.no_grad():
        x = to_tensor(data)
        recon = to_pil(torch.cat([vae.decode_latents(vae.encode_latents(b, 64), 64)
                                  for b in x.split(256)]).clamp(-1, 1))
    rows = {"data": data, "recon": recon}
    for name, imgs in rows.items():
        (Path(out) / name).mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(imgs):
            files.atomic_write(Path(out) / name / f"{i:05d}.png", lambda tmp, im=im: im.save(tmp, format="PNG"))
    return rows


def weights_is_file(p):
    import weights
    return weights.is_file(p)


def run_real(args, rows, out, device, dtype):
    import weights
    if not args.prompts:
        raise ValueError("--prompts is required without --toy (e.g. the first 10K COCO val captions)")
    prompts = read_prompts(args.prompts)
    prompts = prompts[:args.num] if args.num else prompts
    if args.fid_model and not args.ref_images:
        raise ValueError("--fid-model needs --ref-images (the real images FID compares against)")
    refs = []
    if args.ref_images:
        ref_dir = Path(args.ref_images)
        if not ref_dir.is_dir():
            raise ValueError(f"--ref-images {ref_dir}: no such folder")
        refs = sorted(p for p in ref_dir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        if len(refs) < 2:
            raise ValueError(f"--ref-images {ref_dir}: fewer than 2 images")
    w, h = args.width or 1024, args.height or 1024
    base = args.base or weights.SDXL_BASE
    for r in rows:  # every row's folder before anything is loaded, read or generated
        check_row_folder(out / r.name, row_settings(r, base, prompts, args.batch, args.seed, w, h, dtype))
    fe = feature_extractor(args.fid_model, device) if args.fid_model else None
    clip = ClipScore(args.clip_model, device) if args.clip_model else None
    out.mkdir(parents=True, exist_ok=True)
    ref_whole = ref_patch = None
    if fe is not None:
        ref_whole, ref_patch = image_features(fe, refs, what="--ref-images")
    results, cache = [], {}
    for r in rows:
        paths, spi = generate_row(r, base, prompts, out, args.batch, args.seed, w, h, device, dtype, cache)
        res = {"row": r.name, "unet": r.unet, "steps": r.steps, "guidance": r.guidance, "s_per_image": spi,
               "images": len(paths)}
        if fe is not None:
            whole, patch = image_features(fe, paths)
            res["fid_whole"] = fd_of(whole, ref_whole)
            both = patch is not None and ref_patch is not None
            res["fid_patch"] = fd_of(patch, ref_patch) if both else None
        if clip is not None:
            res["clip_score"] = float(np.mean(np.concatenate(
                [clip([read_image(p) for p in paths[i:i + 32]], prompts[i:i + 32])
                 for i in range(0, len(paths), 32)])))
        results.append(res)
    notes = (f"{len(prompts)} prompts, {w}x{h}; FID-Whole: whole image bicubic-resized to 299 (float, per "
             f"channel); FID-Patch: 299 px centre crop at full resolution; features: {args.fid_model}; CLIP "
             f"score: 100 max(cos, 0) with {args.clip_model}; noise seed {args.seed} + batch index (batch "
             f"{args.batch}).")
    write_tables(out, results, REAL_COLUMNS, notes)
    return results


def image_features(fe, images, batch=32, what="image"):
    """(whole features, patch features or None when an image is smaller than 299 px). images: PIL images or
    paths; paths are opened `batch` at a time, each read whole and closed (read_image), so 10K files never
    stay open together (the open-file limit is about 1,024)."""
    whole, patch = [], []
    for i in range(0, len(images), batch):
        chunk = [im if isinstance(im, Image.Image) else read_image(im, what) for im in images[i:i + batch]]
        whole.append(fe([resize_whole(im) for im in chunk]))
        if patch is not None and min(min(im.size) for im in chunk) >= FID_SIZE:
            patch.append(fe([center_patch(im) for im in chunk]))
        else:
            patch = None  # one small image: no FID-Patch for the set
    return np.concatenate(whole), (np.concatenate(patch) if patch is not None else None)


if __name__ == "__main__":
    main()
