"""The toy world, built: a procedural captioned data set, tiny text encoders and tokenizers, a tiny VAE, a
tiny SDXL-shaped teacher UNet trained from scratch, and a classifier; `build` writes them (tools/toy.py is
the command).

What is in the base, smallest piece first:
- data: one shape (circle, square, triangle) of one of five colours in one of five named regions on one of
  three backgrounds, 32 px, drawn at 4x and box-filtered; caption "a red circle at the top left on a gray
  background". The caption leaves much of the image open: the shape lies anywhere inside its region, at any
  size from 7 to 12 px and any rotation, so each caption has many visibly different images, and an average
  of several (what an MSE-trained model draws for an uncertain input) is a blurred, rounded blob. Image i
  is drawn from (seed, i) alone, so the set is the same on every machine.
- text: two CLIP text encoders (transformers classes, widths 32 and 64, as CLIP-L and bigG differ in width)
  with random frozen weights, and CLIPTokenizers whose vocabulary (letters + one merge chain per caption
  word) is written here. Random encoders are enough: the UNet learns to read their features.
- VAE: our vae.py at widths (32, 64, 64), one resnet per level: factor 4, 32 px -> 8x8x4 latents (SDXL's
  factor 8 would leave a shape 1-2 latent pixels: the VAE then loses it). Trained on reconstruction of the
  latent mean, with the shape's pixels weighted up and an edge term; its scaling factor is set so the
  latents have unit variance, as SDXL's.
- teacher: our unet.py, SDXL layout (text-time embedding, cross-attention), widths (32, 64, 128), trained for
  epsilon on SDXL's scaled-linear schedule (min-SNR-5 weighting) with 15% of captions dropped to the
  all-zero unconditional input (SDXL's force_zeros_for_empty_prompt), EMA weights exported.
- classifier: a small CNN predicting shape, colour, position and background, trained on the images and their
  VAE reconstructions; eval.py uses its penultimate features for a Frechet distance and its heads for caption
  accuracy.
Each part is written atomically when done and skipped when present; the UNet checkpoints every 200 steps,
so an interrupted run resumes where it stopped.
"""

import json
import math
import os
import shutil
import string
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from tqdm import tqdm

import files
import lightning_min as lm
import text as text_mod
import unet as unet_mod
import vae as vae_mod
import weights
from tools.convert import PIPELINE_INDEX, SDXL_SCHEDULER


# ----------------------------------------------------------------------------------------------------
# The data set: shapes, colours, positions, backgrounds -> 32 px images with captions

RES = 32
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (215, 45, 45), "green": (45, 170, 70), "blue": (45, 85, 215), "yellow": (235, 205, 40),
           "purple": (150, 60, 190)}
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")  # the quadrants, the middle
BACKGROUNDS = {"gray": (128, 128, 128), "black": (25, 25, 25), "white": (235, 235, 235)}
ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS), "position": POSITIONS,
              "background": tuple(BACKGROUNDS)}
HALF_SIZE = (0.22, 0.36)  # the shape's radius range, in units of half the image (3.5..5.8 px at 32 px)
CENTER_JITTER = 0.19  # "center": the shape's centre anywhere within +-19% of half the image of the middle


def caption(shape, colour, position, background):
    where = "the center" if position == "center" else f"the {position}"
    return f"a {colour} {shape} at {where} on a {background} background"


def parse_caption(text):
    """A toy caption -> {"shape": i, "colour": i, "position": i, "background": i} (indices into
    ATTRIBUTES)."""
    for s in SHAPES:
        for c in COLOURS:
            for p in POSITIONS:
                for b in BACKGROUNDS:
                    if caption(s, c, p, b) == text.strip():
                        return {"shape": SHAPES.index(s), "colour": list(COLOURS).index(c),
                                "position": POSITIONS.index(p), "background": list(BACKGROUNDS).index(b)}
    raise ValueError(f"{text.strip()!r} is not a toy caption (like "
                     f"{caption('circle', 'red', 'center', 'gray')!r})")


def all_captions():
    return [caption(s, c, p, b) for s in SHAPES for c in COLOURS for p in POSITIONS for b in BACKGROUNDS]


def draw(seed, i, width=RES, height=RES, palette=None):
    """Image i of the set from (seed, i) only -> (PIL width x height RGB, caption): the caption's four
    attributes drawn uniformly, then render()."""
    rng = np.random.default_rng([seed, i])
    s, c, p, b = (int(rng.integers(len(v))) for v in ATTRIBUTES.values())
    text = caption(SHAPES[s], list(COLOURS)[c], POSITIONS[p], list(BACKGROUNDS)[b])
    return render(rng, text, width, height, palette), text


def draw_caption(text, seed, i):
    """Image i of `text` (a toy caption) from (seed, i): a held-out image of a given caption (eval.py's data
    row). -> PIL RES x RES RGB"""
    return render(np.random.default_rng([seed, i]), text)


def render(rng, text, width=RES, height=RES, palette=None):
    """The caption's image with what it does not say drawn from rng: the radius (HALF_SIZE), the centre
    anywhere that keeps the shape inside its quadrant (or near the middle for "center"), the rotation of a
    square or triangle. Another width or height (the aspect-ratio buckets' data) keeps the shape's size and
    the centre's jitter in pixels of a RES image and the quadrants those of the whole canvas; palette: another
    {colour word: RGB} (a fine-tune's style), default COLOURS. -> PIL width x height RGB"""
    a = parse_caption(text)
    shape, colour, position = SHAPES[a["shape"]], list(COLOURS)[a["colour"]], POSITIONS[a["position"]]
    h, k = RES / 2, 4  # drawn at 4x, box-filtered down: anti-aliased edges
    hw, hh = width / 2, height / 2
    r = rng.uniform(*HALF_SIZE) * h
    if position == "center":
        cx, cy = np.array([hw, hh]) + rng.uniform(-CENTER_JITTER, CENTER_JITTER, 2) * h
    else:  # inside the quadrant, a margin of 5% of half a RES image from its sides
        cx, cy = rng.uniform(r + 0.05 * h, np.array([hw, hh]) - r - 0.05 * h)
        cx, cy = cx + hw * ("right" in position), cy + hh * ("bottom" in position)
    angle = rng.uniform(0, 2 * math.pi)
    img = Image.new("RGB", (width * k, height * k), list(BACKGROUNDS.values())[a["background"]])
    d = ImageDraw.Draw(img)
    fill = (palette or COLOURS)[colour]
    if shape == "circle":
        d.ellipse([k * (cx - r), k * (cy - r), k * (cx + r), k * (cy + r)], fill=fill)
    else:  # a regular polygon; square and triangle radii scaled to about the circle's area
        n, rr = (4, 0.89 * r) if shape == "square" else (3, 1.1 * r)
        d.polygon([(k * (cx + rr * math.cos(angle + 2 * math.pi * j / n)),
                    k * (cy + rr * math.sin(angle + 2 * math.pi * j / n))) for j in range(n)], fill=fill)
    return img.resize((width, height), Image.Resampling.BOX)


def write_data(folder, n, seed, sizes=((RES, RES),), palette=None):
    """An image-caption folder data.py reads: 00000.png + 00000.txt, ... Written as one folder
    (files.atomic_write: a temp folder, then renamed). Image i is sizes[i % len(sizes)] ((width, height)
    each) in palette (render())."""
    folder = Path(folder)
    if (folder / "done.json").exists():
        return

    def write(tmp):
        shutil.rmtree(tmp, ignore_errors=True)  # a killed run's leftover
        tmp.mkdir(parents=True)
        for i in tqdm(range(n), desc="data", mininterval=2):
            img, cap = draw(seed, i, *sizes[i % len(sizes)], palette)
            img.save(tmp / f"{i:05d}.png")
            (tmp / f"{i:05d}.txt").write_text(cap)
        (tmp / "done.json").write_text(json.dumps({"images": n, "seed": seed}))
        shutil.rmtree(folder, ignore_errors=True)  # an unfinished folder: os.replace needs it gone
    files.atomic_write(folder, write)


def load_data(folder, n):
    """(pixels (N, 3, RES, RES) in [-1, 1], captions [N]) of the first n images of a toy data folder."""
    pix, caps = [], []
    for i in range(n):
        pix.append(np.asarray(Image.open(Path(folder) / f"{i:05d}.png").convert("RGB")))
        caps.append((Path(folder) / f"{i:05d}.txt").read_text().strip())
    # (N, H, W, 3) -> (N, 3, H, W)
    x = torch.from_numpy(np.stack(pix)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, caps

# ----------------------------------------------------------------------------------------------------
# Text: a locally made CLIP vocabulary and two random CLIP text encoders of different widths

MAX_LENGTH = 77
TEXT_WIDTHS = (32, 64)  # CLIP-L and bigG stand-ins; context = 32 + 64 = 96, pooled = 64


def vocab_and_merges(words=None):
    """CLIP-shaped byte-level BPE: letters, letters + </w>, one merge chain per word (default: every caption
    word; a word is then one token), then the specials with the largest ids (the SDXL configs' eos_token_id =
    2 means 'pool at the largest id')."""
    letters = ["!"] + list(string.ascii_lowercase)
    vocab = {t: i for i, t in enumerate(letters + [ch + "</w>" for ch in letters])}
    merges = []
    words = words or sorted({w for cap in all_captions() for w in cap.split()})
    for word in words:
        cur = word[0]
        for j, ch in enumerate(word[1:], start=2):
            nxt = ch + "</w>" if j == len(word) else ch
            if f"{cur} {nxt}" not in merges:
                merges.append(f"{cur} {nxt}")
            cur += nxt
            vocab.setdefault(cur, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def write_tokenizer(folder, pad_token, vocab_merges=None):
    """A CLIPTokenizer folder as the hub has it (vocab.json, merges.txt, tokenizer_config.json,
    special_tokens_map.json); the toy's vocabulary unless (vocab, merges) are given."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocab_merges or vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {**special, "model_max_length": MAX_LENGTH, "tokenizer_class": "CLIPTokenizer",
         "do_lower_case": True}))


def text_encoders(seed):
    """(CLIPTextModel width 32, CLIPTextModelWithProjection width 64), random and frozen. Embeddings are
    drawn at unit scale (CLIP's own init, std 0.02, would give the UNet near-zero context)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    common = dict(vocab_size=len(vocab_and_merges()[0]), num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=MAX_LENGTH, bos_token_id=0, eos_token_id=2, pad_token_id=1,
                  layer_norm_eps=1e-5)
    w1, w2 = TEXT_WIDTHS
    te = CLIPTextModel(CLIPTextConfig(hidden_size=w1, intermediate_size=4 * w1, projection_dim=w1,
                                      hidden_act="quick_gelu", **common))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=w2, intermediate_size=4 * w2,
                                                     projection_dim=w2, hidden_act="gelu", **common))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (te, te2):
            for name, p in model.named_parameters():
                if "embedding" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "position" in name else 1.0))
                elif "norm" in name:
                    p.fill_(1.0 if name.endswith("weight") else 0.0)
                elif p.ndim == 1:
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return te.eval(), te2.eval()


def write_text(base, seed):
    write_tokenizer(base / "tokenizer", pad_token="<|endoftext|>")  # CLIP-L pads with EOS
    write_tokenizer(base / "tokenizer_2", pad_token="!")  # bigG pads with "!" (id 0)
    te, te2 = text_encoders(seed)
    te.save_pretrained(base / "text_encoder")
    te2.save_pretrained(base / "text_encoder_2")

# ----------------------------------------------------------------------------------------------------
# Sizes


@dataclass
class ToyConfig:
    images: int = 6000  # data set size
    vae_steps: int = 1500  # VAE optimizer steps
    vae_batch: int = 32  # VAE batch
    vae_lr: float = 1e-3  # Adam peak learning rate (100 warmup steps, cosine to 10%)
    clf_steps: int = 2000  # classifier optimizer steps
    unet_steps: int = 4000  # teacher optimizer steps
    unet_batch: int = 64  # teacher batch
    unet_lr: float = 1e-3  # AdamW peak learning rate (linear warmup, cosine to 10%)
    min_snr: float = 5.0  # min-SNR-gamma loss weight (Hang et al. 2023): min(SNR, gamma) / SNR on eps
    ema: float = 0.999  # EMA decay of the exported teacher weights
    p_uncond: float = 0.15  # caption dropout to the all-zero unconditional input
    offset_noise: float = 0.0  # std of a per-channel constant added to the training noise (see eps_loss)
    widths: tuple = (32, 64, 128)  # UNet block_out_channels
    seed: int = 0  # data, initialization and training draws


# the tests' base, ~7 minutes on one thread: a fifth of the UNet's samples at twice its rate, a blurrier VAE,
# a classifier that reads shapes less well; offset noise, or its backgrounds follow the noise's mean and not
# the background word (docs/toy.md)
QUICK = ToyConfig(images=3000, vae_steps=400, vae_batch=24, clf_steps=600, unet_steps=800, unet_lr=2e-3,
                  ema=0.995, offset_noise=0.3)


def unet_config(cfg):
    return unet_mod.UNetConfig(block_out_channels=tuple(cfg.widths), layers_per_block=1,
                               transformer_depth=(0, 1, 1), num_heads=(1, 2, 4),
                               cross_attention_dim=sum(TEXT_WIDTHS), pooled_dim=TEXT_WIDTHS[1],
                               addition_time_embed_dim=32)


VAE_CONFIG = vae_mod.VAEConfig(block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
                               scaling_factor=1.0)
FACTOR = VAE_CONFIG.downscale  # 4: RES px -> RES / 4 latents

# ----------------------------------------------------------------------------------------------------
# Training pieces


def save_tensors(tensors, path):
    """A state dict as .safetensors, detached, on the CPU, written atomically."""
    files.save_safetensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path)


def cosine_lr(peak, step, steps, warmup):
    """Linear warmup over `warmup` steps, then cosine from `peak` to 10% of it."""
    return peak * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))


def foreground_weight(x, weight=4.0):
    """1 on the background, 1 + weight on the shape and one pixel around it: the shape is ~10% of the image,
    and without this the VAE spends its capacity on the flat background and returns shapes as round blobs.
    The background is the median of the four corners (a shape covers at most one). x (B, 3, H, W) ->
    (B, 1, H, W)"""
    corners = torch.stack([x[:, :, 0, 0], x[:, :, 0, -1], x[:, :, -1, 0], x[:, :, -1, -1]], -1)
    bg = corners.median(-1).values[..., None, None]  # (B, 3, 1, 1)
    shape = ((x - bg).abs().sum(1, keepdim=True) > 0.05).float()
    return 1 + weight * F.max_pool2d(shape, 3, stride=1, padding=1)


def edge_l1(a, b):
    """L1 between the images' horizontal and vertical differences: keeps corners and edges sharp."""
    dy = lambda x: x[..., 1:, :] - x[..., :-1, :]
    dx = lambda x: x[..., 1:] - x[..., :-1]
    return (dy(a) - dy(b)).abs().mean() + (dx(a) - dx(b)).abs().mean()


def train_vae(pixels, cfg, seed):
    """Reconstruction of the decoded latent mean: foreground-weighted MSE + L1, an edge term, and a tiny
    penalty on the latents' size. No sampled latent: at this budget the KL's noise drowns the early latents
    and the decoder learns only the background. Returns the VAE with scaling_factor set so the scaled latent
    means have unit variance."""
    torch.manual_seed(seed)
    vae = vae_mod.VAE(vae_mod.VAEConfig(**asdict(VAE_CONFIG)))
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(cfg.vae_steps), desc="vae", mininterval=5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(cfg.vae_lr, step, cfg.vae_steps, warmup=100)
        x = pixels[torch.randint(len(pixels), (cfg.vae_batch,), generator=g)]
        mean, logvar = vae.encode(x)
        rec = vae.decode(mean)
        w = foreground_weight(x)
        loss = (w * (rec - x) ** 2).mean() + 0.1 * (w * (rec - x).abs()).mean() + 0.5 * edge_l1(rec, x) \
            + 1e-4 * (mean**2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)  # 2e-3 without clipping diverged at step ~1000
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(x)[0] for x in pixels[:1024].split(64)])
    vae.config.scaling_factor = float(1.0 / means.std())
    return vae


class Classifier(nn.Module):
    """The toy's Inception: a stem conv, then per level a conv and a stride-2 conv (32 -> 4 px), global average
    pool, 128 features, one head per attribute. Two convs per level: with one (the 64 px toy's classifier)
    it read the shape of held-out images right 68% of the time after 1200 steps, with two 100%."""

    def __init__(self, width=32, features=128):
        super().__init__()
        chans = [width, 2 * width, 4 * width, features]
        layers = [nn.Conv2d(3, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU()]
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cin, 3, padding=1), nn.GroupNorm(8, cin), nn.SiLU(),
                       nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({k: nn.Linear(features, len(v)) for k, v in ATTRIBUTES.items()})

    def features(self, x):
        """x (B, 3, 32, 32) in [-1, 1] -> (B, 128)."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x):
        f = self.features(x)
        return {k: head(f) for k, head in self.heads.items()}


def labels(captions):
    parsed = [parse_caption(c) for c in captions]
    return {k: torch.tensor([p[k] for p in parsed]) for k in ATTRIBUTES}


def train_classifier(pixels, recon, captions, cfg, seed):
    """On the images and, half the time, their VAE reconstructions: generated images are VAE decodes too."""
    torch.manual_seed(seed)
    clf = Classifier()
    opt = torch.optim.Adam(clf.parameters(), lr=2e-3)
    y = labels(captions)
    g = torch.Generator().manual_seed(seed + 1)
    bar = tqdm(range(cfg.clf_steps), desc="classifier", mininterval=5)
    for step in bar:
        idx = torch.randint(len(pixels), (64,), generator=g)
        use_rec = torch.rand(64, generator=g) < 0.5
        x = torch.where(use_rec[:, None, None, None], recon[idx], pixels[idx])
        x = x + 0.03 * torch.randn(x.shape, generator=g)  # a little robustness to sampler noise
        out = clf(x)
        loss = sum(F.cross_entropy(out[k], y[k][idx]) for k in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return clf.eval()


def load_classifier(folder):
    """The classifier toy.py wrote (folder/classifier.safetensors), strictly."""
    path = Path(folder) / "classifier.safetensors"
    if not path.is_file():
        raise ValueError(f"{path}: no such file (run `python -m tools.toy --out {Path(folder).parent}` "
                         "first)")
    clf = Classifier()
    sd = load_file(str(path))
    missing = set(clf.state_dict()) - set(sd)
    unexpected = set(sd) - set(clf.state_dict())
    if missing or unexpected:
        raise ValueError(f"{path}: not a toy classifier: missing {sorted(missing)[:3]}, unexpected "
                         f"{sorted(unexpected)[:3]}")
    clf.load_state_dict(sd, strict=True)
    return clf.eval()


def eps_loss(predict, x0, min_snr, g, offset=0.0):
    """The base's loss: epsilon prediction on SDXL's schedule (Eq. 1) at t uniform in 1..T, min-SNR-gamma
    weighted (low-noise steps weigh less). predict(x_t, t - 1) -> eps-hat; draws t, then the noise, from g.
    offset > 0: offset noise (Guttenberg 2023), eps + offset * (one normal per image and channel). At T the
    schedule leaves sqrt(alpha_bar) = 0.068 of the image in x_t, and an 8x8 latent's channel means are noise
    of std only 1/8, so a model reads the background (black / gray / white) from the noise's mean and ignores
    the caption's word for it; sampled from plain noise, its backgrounds follow the noise (measured on the
    quick base without it: the same noise shifted by -0.5 / +0.5 gave black / white for every caption)."""
    t = torch.randint(1, lm.T + 1, (len(x0),), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    if offset > 0:  # drawn only then, so the default draws what it always drew
        eps = eps + offset * torch.randn((*x0.shape[:2], 1, 1), generator=g)
    per_sample = ((predict(lm.forward(x0, eps, t), t - 1) - eps) ** 2).mean(dim=(1, 2, 3))
    snr = lm.alpha_bar(t) / (1 - lm.alpha_bar(t))
    return (per_sample * snr.clamp(max=min_snr) / snr).mean()


def train_unet(lat, ctx, pooled, cap_idx, cfg, work, init=None, desc="teacher unet"):
    """Epsilon prediction on SDXL's schedule (Eq. 1), t uniform in 1..1000, min-SNR weighted, 15% captions ->
    all-zero uncond. init: a UNet state dict to start from (a fine-tune of the base), else random.
    Checkpoints (model, EMA, optimizer, RNG, step) every 200 steps to work/unet.pt; resumes from it."""
    ucfg = unet_config(cfg)
    torch.manual_seed(cfg.seed)
    model = unet_mod.UNet(ucfg)
    if init is not None:
        model.load_state_dict(init, strict=True)
    ema = unet_mod.UNet(ucfg)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.unet_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed + 2)
    step, ck = 0, work / "unet.pt"
    if ck.exists():
        state = torch.load(ck, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["gen"])
        step = state["step"]
        print(f"toy.py: resuming the teacher at step {step}")
    ids = text_mod.time_ids(RES, RES).expand(cfg.unet_batch, 6)  # data.py's ids for a toy image, uncropped
    B, warm = cfg.unet_batch, max(1, min(200, cfg.unet_steps // 10))
    bar = tqdm(total=cfg.unet_steps, initial=step, desc=desc, mininterval=5)
    while step < cfg.unet_steps:
        lr = cosine_lr(cfg.unet_lr, step, cfg.unet_steps, warm)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(lat), (B,), generator=g)
        x0, c, p = lat[idx], ctx[cap_idx[idx]], pooled[cap_idx[idx]]
        keep = (torch.rand(B, generator=g) >= cfg.p_uncond).float()
        c, p = c * keep[:, None, None], p * keep[:, None]  # dropped captions: SDXL's all-zero uncond
        loss = eps_loss(lambda x_t, t: model(x_t, t, c, p, ids), x0, cfg.min_snr, g, cfg.offset_noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(cfg.ema, (1 + step) / (10 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)
        step += 1
        bar.update(1)
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.1e}")
        if step % 200 == 0 or step == cfg.unet_steps:
            files.save_torch({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                               "gen": g.get_state(), "step": step}, ck)
    bar.close()
    return ema.eval()

# ----------------------------------------------------------------------------------------------------
# The diffusers base folder


# SDXL base's scheduler and pipeline index (tools/convert.py writes the same for a converted folder), plus the
# keys diffusers 0.42 writes for a pipeline without a watermarker, feature extractor or image encoder
SCHEDULER = SDXL_SCHEDULER
MODEL_INDEX = {**PIPELINE_INDEX, "_diffusers_version": "0.42.1", "add_watermarker": None,
               "feature_extractor": [None, None], "image_encoder": [None, None]}


def write_json(path, obj):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    files.save_json(obj, path)


def write_model(folder, model):
    """config.json + diffusion_pytorch_model.safetensors: the diffusers layout (our keys are its keys)."""
    write_json(folder / "config.json", model.config.to_diffusers())
    save_tensors(model.state_dict(), folder / "diffusion_pytorch_model.safetensors")

# ----------------------------------------------------------------------------------------------------
# Building the whole base


def encode_captions(text, captions):
    """Each distinct caption once: (table context (C, 77, 96), pooled (C, 64), index per caption (N,))."""
    distinct = sorted(set(captions))
    ctx, pooled = [], []
    for i in range(0, len(distinct), 64):
        c, p = text.encode(distinct[i:i + 64])
        ctx.append(c)
        pooled.append(p)
    where = {c: i for i, c in enumerate(distinct)}
    return torch.cat(ctx), torch.cat(pooled), torch.tensor([where[c] for c in captions])


def build(out, cfg, quick):
    """toy/data, toy/base, toy/classifier; each part skipped when present. Returns wall times per part."""
    out = Path(out)
    work, base, data = out / "work", out / "base", out / "data"
    work.mkdir(parents=True, exist_ok=True)
    meta = {"quick": quick, **asdict(cfg)}
    meta["widths"] = list(meta["widths"])
    cfg_file = work / "config.json"
    # a folder built before the offset_noise field was built without it
    if cfg_file.exists() and {"offset_noise": 0.0, **json.loads(cfg_file.read_text())} != meta:
        raise ValueError(f"{out} holds a toy world built with other settings ({cfg_file}); use another --out "
                         f"or delete it")
    cfg_file.write_text(json.dumps(meta, indent=1))
    times = json.loads((work / "times.json").read_text()) if (work / "times.json").exists() else {}

    def timed(name, fn):
        t0 = time.time()
        r = fn()
        times[name] = times.get(name, 0.0) + time.time() - t0
        write_json(work / "times.json", times)
        return r

    timed("data", lambda: write_data(data, cfg.images, cfg.seed))
    pixels, captions = load_data(data, cfg.images)
    tmp = work / "base.tmp"  # parts land here over runs (resumable); the finished folder becomes base/
    if (base / "model_index.json").exists():
        return times
    if not (tmp / "text_encoder_2" / "model.safetensors").exists():
        timed("text", lambda: write_text(tmp, cfg.seed))
    if not (tmp / "vae" / "diffusion_pytorch_model.safetensors").exists():
        vae = timed("vae", lambda: train_vae(pixels, cfg, cfg.seed))
        write_model(tmp / "vae", vae)
    vae = vae_mod.VAE(vae_mod.VAEConfig.from_diffusers(json.loads((tmp / "vae" / "config.json").read_text())))
    vae.load_state_dict(load_file(str(tmp / "vae" / "diffusion_pytorch_model.safetensors")), strict=True)
    vae.eval().requires_grad_(False)
    clf_dir = out / "classifier"
    if not (clf_dir / "classifier.safetensors").exists():
        with torch.no_grad():
            recon = timed("encode", lambda: torch.cat([vae.decode_latents(vae.encode_latents(x, 64), 64)
                                                       for x in pixels.split(256)]).clamp(-1, 1))
        clf = timed("classifier", lambda: train_classifier(pixels, recon, captions, cfg, cfg.seed))
        clf_dir.mkdir(parents=True, exist_ok=True)
        save_tensors(clf.state_dict(), clf_dir / "classifier.safetensors")
    if not (tmp / "unet" / "diffusion_pytorch_model.safetensors").exists():
        text = weights.text_from_folder(tmp)
        with torch.no_grad():
            lat = timed("encode", lambda: torch.cat([vae.encode_latents(x, 64) for x in pixels.split(256)]))
            ctx, pooled, cap_idx = encode_captions(text, captions)
        unet = timed("unet", lambda: train_unet(lat, ctx, pooled, cap_idx, cfg, work))
        write_model(tmp / "unet", unet)
    write_json(tmp / "scheduler" / "scheduler_config.json", SCHEDULER)
    write_json(tmp / "model_index.json", MODEL_INDEX)

    def move_in(base_tmp):  # the finished parts become files.atomic_write's temp folder, then base/
        shutil.rmtree(base_tmp, ignore_errors=True)
        os.replace(tmp, base_tmp)
        shutil.rmtree(base, ignore_errors=True)
    files.atomic_write(base, move_in)
    (work / "unet.pt").unlink(missing_ok=True)
    return times

# ----------------------------------------------------------------------------------------------------
# The tiny preview VAE for the toy (sample.py --vae): what decoding with a TAESD-style decoder costs in
# quality. `python -m tools.toy tiny-vae --out toy` trains it for the toy VAE's latents and measures it.

# TAESD's layout less one stage, for the toy VAE's factor 4 (3 stages, 1/3/3 encoder and 3/3/1 decoder
# blocks), at a quarter of its width: 16 channels. TAESDXL's decoder is 0.054x SDXL's (tools/bench.py); this one
# is a larger share of the toy decoder, which is far narrower than SDXL's (toy.py tiny-vae prints both).
TINY_VAE_CONFIG = vae_mod.TinyVAEConfig(encoder_block_out_channels=(16, 16, 16), num_encoder_blocks=(1, 3, 3),
                                        decoder_block_out_channels=(16, 16, 16), num_decoder_blocks=(3, 3, 1))


def train_tiny_vae(vae, pixels, steps=1200, batch=16, lr=2e-3, seed=0, augment=True):
    """TAESD for the toy VAE: the decoder maps the full VAE's scaled latents back to the images (MSE + L1, the
    toy VAE's reconstruction loss), the encoder maps the images to those latents (MSE). Adam, cosine to 10%.
    augment: half of each batch's latents are scaled by 1..3 and noised, with the full decoder's image of
    them as the target: the toy teacher's samples have latents of std 1.8-2.1 against the encoder's 1.0,
    and a decoder that only saw the encoder's range decodes them badly (PSNR against the full decoder 11.5
    -> 14.3 dB at 300 steps). Returns the TinyVAE (eval mode)."""
    with torch.no_grad():
        lat = torch.cat([vae.encode_latents(x, 64) for x in pixels.split(256)])  # (N, 4, 8, 8), UNet scale
    torch.manual_seed(seed)
    tiny = vae_mod.TinyVAE(vae_mod.TinyVAEConfig(**asdict(TINY_VAE_CONFIG)))
    opt = torch.optim.Adam(tiny.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="tiny vae", mininterval=5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        idx = torch.randint(len(pixels), (batch,), generator=g)
        x, z = pixels[idx], lat[idx]
        z_in, target = z, x
        if augment:
            k = batch // 2
            wide = z[:k] * (1 + 2 * torch.rand(k, 1, 1, 1, generator=g)) + 0.3 * torch.randn(z[:k].shape,
                                                                                           generator=g)
            with torch.no_grad():
                z_in, target = torch.cat([wide, z[k:]]), torch.cat([vae.decode_latents(wide, k), x[k:]])
        rec = tiny.decode(z_in)
        loss = F.mse_loss(rec, target) + 0.1 * (rec - target).abs().mean() + F.mse_loss(tiny.encode(x), z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return tiny.eval()
