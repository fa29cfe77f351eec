"""Section 5 of the paper on the toy world (issue 16): what Lightning keeps working besides text-to-image.
Run after `python -m tools.toy all --out toy --seeds 3` (it uses that run's base, students and LoRA):

    python -m tools.toy_section5 --out toy     # ~20 minutes on 2 CPUs; OUT/section5/results.md, grid.png

1. Our LoRA on another base (Sec. 3.6, 5.1): a toy "fine-tune" (the base trained further on a palette of its
   own, FT_PALETTE) with the 4-step LoRA that train.py writes relative to --base fused in, sampled at 4 steps:
   does it keep the fine-tune's palette? Against it: the LoRA written relative to the phase's init (the
   previous stage's student), which is not meant for another base.
2. ControlNet (Sec. 5.3): a toy ControlNet trained for a few minutes on the teacher with the shapes' masks
   as control images, then used unchanged with the 4-, 2- and 1-step students: does the shape land on the
   mask (IoU, centre error)?
3. Aspect-ratio buckets (Sec. 5.2's future work): 4to2 distilled again with train.py --buckets on a data set
   of square, 3:2 and 2:3 images (SDXL's bucket table at 32 px, sides multiples of 16, has no 1:2), for each
   of `all`'s seeds from that seed's 4-step model, against the square-only 4to2 students of `all`; all
   sampled at 3:2, 2:3, 2:1, 1:2 and square. The toy's failure away from the square is SDXL's: the shape
   drawn twice.

Non-square images and a fine-tune's palette are outside what the toy classifier was trained on, so these
rows are read from the pixels (read_image: the background from the corners, the shapes as connected
foreground regions, their colour, the main one's centre); on the data it reads every attribute right
(tests/test_toy_section5.py).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import files
import sample as sample_mod
import text as text_mod
import unet as unet_mod
import weights
from tools.eval import ToyJudge, to_pil
from tools.toy import ROOT, checkpoint, runs_folder, spread, train_command, unet_file, verdict
from tools.toy_world import (BACKGROUNDS, COLOURS, POSITIONS, RES, ToyConfig, all_captions, cosine_lr,
                             draw_caption, encode_captions, eps_loss, load_data, parse_caption, train_unet,
                             write_data, write_json, write_model)

# the fine-tune's style: every colour word drawn in the next word's colour. A permutation, not new hues: the
# toy VAE, trained on five colours, returns a new hue as the nearest of them (a teal as green or blue)
FT_PALETTE = {word: COLOURS[nxt] for word, nxt in zip(COLOURS, list(COLOURS)[1:] + list(COLOURS)[:1])}
EVAL_SEED = 99  # held-out images (draw_caption(text, 99, i)): their masks are the ControlNet's test inputs

# ----------------------------------------------------------------------------------------------------
# Reading an image from its pixels

FOREGROUND = 60  # |pixel - background|, summed over RGB (0..765), above which a pixel belongs to a shape
MIN_OBJECT = 8  # pixels of a connected region to count as a shape (the smallest triangle has ~19)
CENTER_BOX = 3.7  # px: "center" centres lie within 3.0 px of the middle, quadrant centres 4.3 px or more away


def components(mask):
    """4-connected regions of a boolean (H, W) mask -> their sizes, largest first, and the largest's mask."""
    seen, sizes, best = np.zeros_like(mask), [], None
    H, W = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, region = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            region.append((y, x))
            for v, u in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= v < H and 0 <= u < W and mask[v, u] and not seen[v, u]:
                    seen[v, u] = True
                    stack.append((v, u))
        if best is None or len(region) > len(best):
            best = region
        sizes.append(len(region))
    main = np.zeros_like(mask)
    if best:
        main[tuple(np.array(best).T)] = True
    return sorted(sizes, reverse=True), main


def read_image(img):
    """What a toy image shows, from its pixels: {"background": index into BACKGROUNDS, "objects": shapes
    (regions of >= MIN_OBJECT px), "colour": RGB of the largest one's core, "position": index into POSITIONS
    of its centre, "mask": (H, W) bool foreground, "centre": (x, y) px}."""
    x = np.asarray(img.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    H, W = x.shape[:2]
    # a data image's shape covers one corner at most; a sample with shapes in two corners may be misread
    bg = np.median(np.stack([x[0, 0], x[0, -1], x[-1, 0], x[-1, -1]]), 0)
    background = int(np.argmin([np.abs(bg - c).sum() for c in BACKGROUNDS.values()]))
    diff = np.abs(x - bg).sum(-1)
    mask = diff > FOREGROUND
    sizes, main = components(mask)
    out = {"background": background, "objects": sum(s >= MIN_OBJECT for s in sizes), "mask": mask,
           "colour": None, "position": None, "centre": None}
    if not main.any():
        return out
    core = main & (diff >= 0.5 * diff[main].max())  # the anti-aliased rim mixes in the background
    out["colour"] = x[core].mean(0)
    ys, xs = np.nonzero(main)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    out["centre"] = (cx, cy)
    dx, dy = cx - W / 2, cy - H / 2
    if max(abs(dx), abs(dy)) < CENTER_BOX:
        out["position"] = POSITIONS.index("center")
    else:
        out["position"] = POSITIONS.index(f"{'bottom' if dy > 0 else 'top'} {'right' if dx > 0 else 'left'}")
    return out


def pixel_judge(images, prompts, palette=None, other=None, masks=None):
    """Caption accuracy read from the pixels: one_shape (exactly one shape), px_colour (the nearest of the
    palette's colours is the caption's), px_position, px_background, px_all (all four). other: a second
    palette; style = how often the shape is nearer palette[word] than other[word]. masks: control masks
    (N, H, W) bool; iou and centre_px (distance of the main shape's centre to the mask's) against them."""
    palette = palette or COLOURS
    words = list(palette)
    rec = {k: [] for k in ("one_shape", "px_colour", "px_position", "px_background", "px_all", "style", "iou",
                           "centre_px")}
    for i, (img, p) in enumerate(zip(images, prompts)):
        r, lab = read_image(img), parse_caption(p)
        word = list(COLOURS)[lab["colour"]]
        c = r["colour"]
        ok = {"one_shape": r["objects"] == 1,
              "px_colour": c is not None and words[int(np.argmin([np.abs(c - np.array(v)).sum()
                                                                   for v in palette.values()]))] == word,
              "px_position": r["position"] == lab["position"],
              "px_background": r["background"] == lab["background"]}
        for k, v in ok.items():
            rec[k].append(float(v))
        rec["px_all"].append(float(all(ok.values())))
        if other is not None:
            rec["style"].append(float(c is not None and np.abs(c - np.array(palette[word])).sum()
                                      < np.abs(c - np.array(other[word])).sum()))
        if masks is not None:
            m = masks[i]
            rec["iou"].append(float((r["mask"] & m).sum() / max(1, (r["mask"] | m).sum())))
            ys, xs = np.nonzero(m)
            cx, cy = xs.mean() + 0.5, ys.mean() + 0.5  # the mask's centre, px
            rec["centre_px"].append(float(np.hypot(r["centre"][0] - cx, r["centre"][1] - cy))
                                    if r["centre"] is not None else float("nan"))
    # centre_px: over the images that show a shape (nan if none does)
    return {k: float(np.mean([x for x in v if not np.isnan(x)] or [np.nan])) for k, v in rec.items() if v}


def masks_of(images):
    """The foreground masks read_image sees: (N, H, W) bool."""
    return np.stack([read_image(im)["mask"] for im in images])

# ----------------------------------------------------------------------------------------------------
# Sampling a row of the tables


def generate(base, unet_source, prompts, steps, guidance=0.0, prediction="epsilon", width=RES, height=RES,
             loras=None, controls=None, batch=50):
    """PIL images of every prompt, image i from noise seed i (the same noise in every row of one size).
    controls: [(ControlNet, masks (N, H, W) bool, scale)]."""
    text, unet, vae = sample_mod.load(str(base), unet_source, loras, steps, torch.device("cpu"),
                                      torch.float32)
    out = []
    with torch.no_grad():
        for b in range(0, len(prompts), batch):
            ctl = None if not controls else [
                (net, torch.from_numpy(m[b:b + batch]).float()[:, None].expand(-1, 3, -1, -1), s)
                for net, m, s in controls]
            x = sample_mod.generate(text, unet, vae, prompts[b:b + batch], steps,
                                    list(range(b, min(b + batch, len(prompts)))), width, height, prediction,
                                    guidance, controls=ctl)
            out += to_pil(x)
    return out


def eval_prompts(n):
    caps = all_captions()
    return [caps[i % len(caps)] for i in range(n)]

# ----------------------------------------------------------------------------------------------------
# 1. Our LoRA on a fine-tune


def finetune(out, sec, steps, seed):
    """OUT/section5/finetune: the base's folder with its UNet trained `steps` more on OUT/section5/ft_data
    (the data set in FT_PALETTE), toy_world.train_unet from the base's weights at half the base's rate."""
    folder = sec / "finetune"
    if (folder / "model_index.json").exists():
        return folder
    data = sec / "ft_data"
    write_data(data, 3000, seed + 1, palette=FT_PALETTE)
    pixels, captions = load_data(data, 3000)
    text = weights.text_from_folder(str(out / "base"))
    vae = weights.load_vae(str(out / "base")).eval()
    base_unet = weights.load_unet(str(out / "base"), weights.unet_config(str(out / "base")))
    with torch.no_grad():
        lat = torch.cat([vae.encode_latents(x, 64) for x in pixels.split(256)])
        ctx, pooled, cap_idx = encode_captions(text, captions)
    cfg = ToyConfig(images=3000, unet_steps=steps, unet_lr=5e-4, ema=0.99, seed=seed)
    work = sec / "work_finetune"
    work.mkdir(parents=True, exist_ok=True)
    unet = train_unet(lat, ctx, pooled, cap_idx, cfg, work, init=base_unet.state_dict(), desc="fine-tune")
    tmp = sec / "finetune.parts"  # staged here, then files.atomic_write renames it to finetune/
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(out / "base", tmp)
    write_model(tmp / "unet", unet)

    def move_in(t):
        shutil.rmtree(t, ignore_errors=True)
        tmp.rename(t)
    files.atomic_write(folder, move_in)
    return folder


def lora_rows(out, sec):
    """(name, base folder, steps, CFG, LoRAs): the fine-tune at 32 steps with CFG 6 (its style) and at 4 steps
    with and without CFG; at 4 steps without CFG (as the students sample) with our LoRA (relative to --base)
    and with the one relative to the phase's init fused at 1.0; the base at 32 steps and with our LoRA."""
    ft, base = sec / "finetune", out / "base"
    lora_dir = out / "runs" / "8to4" / "uncond"
    rel_base = lora_dir / "sdxl_lightning_4step_lora.safetensors"  # relative to --base: for any fine-tune
    rel_init = lora_dir / "sdxl_lightning_4step_lora_on_init.safetensors"  # relative to 32to8's student
    return [("finetune 32 steps CFG 6", ft, 32, 6.0, None), ("finetune 4 steps CFG 6", ft, 4, 6.0, None),
            ("finetune 4 steps", ft, 4, 0.0, None),
            ("finetune + our 4-step LoRA", ft, 4, 0.0, [(rel_base, 1.0)]),
            ("finetune + the LoRA on the init", ft, 4, 0.0, [(rel_init, 1.0)]),
            ("base 32 steps CFG 6", base, 32, 6.0, None),
            ("base + our 4-step LoRA", base, 4, 0.0, [(rel_base, 1.0)])]


def measure_lora(out, sec, n, judge):
    prompts, rows, pics = eval_prompts(n), [], {}
    for name, base, steps, cfg, loras in tqdm(lora_rows(out, sec), desc="LoRA rows"):
        imgs = generate(base, "base", prompts, steps, cfg, loras=loras)
        # FD to the base's data: the permuted palette leaves the images' distribution as it was (FD cannot
        # see the style; `style` does), and the fine-tune's FD to its own data was within 0.1 of it
        rows.append({"row": name, "steps": steps, "guidance": cfg, **judge.measure(imgs, prompts),
                     **pixel_judge(imgs, prompts, FT_PALETTE, COLOURS)})
        pics[name] = imgs
    return rows, pics

# ----------------------------------------------------------------------------------------------------
# 2. A toy ControlNet: the shapes' masks as control images


def controlnet_from(unet):
    """A ControlNet on the UNet's config, its encoder copied from the UNet (the ControlNet recipe), zero
    convolutions at zero; the hint encoder downsamples by the toy VAE's factor 4 (three widths)."""
    cfg = unet_mod.ControlNetConfig(**{**unet.config.__dict__,
                                       "conditioning_embedding_out_channels": (16, 32, 64)})
    net = unet_mod.ControlNet(cfg)
    own, theirs = net.state_dict(), unet.state_dict()
    copied = {k: theirs[k] for k in own if k in theirs}
    new = [k for k in own if k not in theirs]
    assert all(k.startswith("controlnet_") for k in new), new[:3]  # only the ControlNet's own parts are new
    net.load_state_dict({**own, **copied}, strict=True)
    return net


def train_controlnet(out, sec, steps, batch, seed, lr=5e-4, p_uncond=0.5):
    """OUT/section5/controlnet (a diffusers ControlNetModel folder): the frozen base teacher's epsilon loss
    (min-SNR 5, as the base was trained) through the ControlNet's residuals, the data's foreground masks as
    control images, half the captions dropped (as the ControlNet paper: it must read the image)."""
    folder = sec / "controlnet"
    if (folder / "diffusion_pytorch_model.safetensors").exists():
        return weights.load_controlnet(str(folder)).eval()
    base = str(out / "base")
    n = json.loads((out / "data" / "done.json").read_text())["images"]
    pixels, captions = load_data(out / "data", n)
    text, unet, vae = sample_mod.load(base, "base", None, 32, torch.device("cpu"), torch.float32)
    unet.requires_grad_(False)
    masks = torch.from_numpy(masks_of(to_pil(pixels))).float()[:, None].expand(-1, 3, -1, -1)  # (N, 3, H, W)
    with torch.no_grad():
        lat = torch.cat([vae.encode_latents(x, 64) for x in pixels.split(256)])
        ctx, pooled, cap_idx = encode_captions(text, captions)
    torch.manual_seed(seed)
    net = controlnet_from(unet).train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    ids = text_mod.time_ids(RES, RES).expand(batch, 6)
    bar = tqdm(range(steps), desc="controlnet", mininterval=5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(lr, step, steps, 50)
        idx = torch.randint(len(lat), (batch,), generator=g)
        keep = (torch.rand(batch, generator=g) >= p_uncond).float()
        c, p = ctx[cap_idx[idx]] * keep[:, None, None], pooled[cap_idx[idx]] * keep[:, None]
        hint = masks[idx]  # the ControlNet's residuals into the frozen UNet; min-SNR 5 as the base's
        loss = eps_loss(lambda x_t, t: unet(x_t, t, c, p, ids, *net(x_t, t, c, p, ids, hint)), lat[idx], 5.0,
                        g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    write_model(folder, net.eval())
    return weights.load_controlnet(str(folder)).eval()  # as sample.py --controlnet loads it


def student_rows(out):
    """(name, UNet source, steps, CFG, prediction): the teacher and seed 0's students of `all`."""
    f = lambda stage, phase: str(unet_file(out, stage, phase))
    return [("teacher 32 steps CFG 6", "base", 32, 6.0, "epsilon"),
            ("lightning 4 steps", f("8to4", "full"), 4, 0.0, "epsilon"),
            ("lightning 2 steps", f("4to2", "full"), 2, 0.0, "epsilon"),
            ("lightning 1 step", f("2to1", "uncond"), 1, 0.0, "sample")]


def measure_controlnet(out, sec, n, judge, net):
    """Every student with and without the ControlNet, on held-out images' masks and captions."""
    prompts = eval_prompts(n)
    refs = [draw_caption(p, EVAL_SEED, i) for i, p in enumerate(prompts)]
    masks = masks_of(refs)
    rows, pics = [], {"control masks": [Image.fromarray((m * 255).astype(np.uint8)).convert("RGB")
                                        for m in masks]}
    for name, src, steps, cfg, pred in tqdm(student_rows(out), desc="ControlNet rows"):
        for ctl in (False, True):
            imgs = generate(out / "base", src, prompts, steps, cfg, pred,
                            controls=[(net, masks, 1.0)] if ctl else None)
            label = name + (" + ControlNet" if ctl else "")
            rows.append({"row": label, "steps": steps, "guidance": cfg, **judge.measure(imgs, prompts),
                         **pixel_judge(imgs, prompts, masks=masks)})
            pics[label] = imgs
    return rows, pics

# ----------------------------------------------------------------------------------------------------
# 3. Distillation with aspect-ratio buckets


BUCKET_SIZES = ((RES, RES), (3 * RES // 2, RES), (RES, 3 * RES // 2))  # (width, height): 1:1, 3:2, 2:3
SAMPLE_SIZES = ((3 * RES // 2, RES), (RES, 3 * RES // 2), (2 * RES, RES), (RES, 2 * RES), (RES, RES))


def bucket_runs(out, sec, phase_steps, batch, seeds, env):
    """OUT/section5/bucket_data (square, 3:2 and 2:3 images in turn), its prepare.py --buckets cache, and for
    every training seed s train.py 4to2 (cond, uncond, full) on it with --buckets from seed s's 4-step model
    of `all` (the teacher of its square 4to2), seed s. -> the bucketed 2-step UNets, one per seed"""
    data, cache = sec / "bucket_data", sec / "bucket_cache"
    write_data(data, 3000, 2, sizes=BUCKET_SIZES)  # data seed 2: other images than toy/data's and ft_data's
    if not (cache / "cache_index.json").exists():
        cmd = [sys.executable, "-m", "tools.prepare", "--data", str(data), "--base", str(out / "base"),
               "--out", str(cache), "--resolution", str(RES), "--buckets", "--min-size", str(RES),
               "--sharpness", "0", "--dtype", "fp16", "--compute-dtype", "fp32", "--device", "cpu"]
        print("toy_section5:", " ".join(cmd[1:]), flush=True)
        if subprocess.run(cmd, env=env).returncode:
            raise ValueError("tools/prepare.py failed")
    exports = []
    for seed in range(seeds):
        runs = f"section5/{runs_folder(seed, 'buckets')}"
        for phase in ("cond", "uncond", "full"):
            if unet_file(out, "4to2", phase, runs).exists():
                continue
            extra = ["--teacher", checkpoint(out, runs_folder(seed), "8to4", "full"), "--buckets"]
            if phase != "cond":  # as `all`: the skip-level teacher is seed 0's 8-step model
                extra += ["--skip-level-teacher", checkpoint(out, "runs", "32to8", "full")]
            cmd = train_command(out, "4to2", phase, phase_steps, batch, seed, runs, extra)
            cmd[cmd.index("--data") + 1] = str(cache)
            for flag in ("--min-size", "--sharpness"):  # the cache was filtered when it was made
                i = cmd.index(flag)
                del cmd[i:i + 2]
            print("toy_section5:", " ".join(cmd[1:]), flush=True)
            if subprocess.run(cmd, env=env).returncode:
                raise ValueError(f"train.py failed on {runs}/4to2/{phase}; re-run to resume")
        exports.append(unet_file(out, "4to2", "full", runs))
    return exports


def measure_buckets(out, sec, n, judge, bucketed):
    """At every size of SAMPLE_SIZES: the 4-step teacher of 4to2 (seed 0's), and for every seed the
    square-only 2-step student of `all` and the bucketed one."""
    prompts = eval_prompts(n)
    models = [("lightning 4 steps (the teacher)", 0, unet_file(out, "8to4", "full"), 4)]
    for s, b in enumerate(bucketed):
        models += [("lightning 2 steps, square", s, unet_file(out, "4to2", "full", runs_folder(s)), 2),
                   ("lightning 2 steps, buckets", s, b, 2)]
    rows, pics = [], {}
    for w, h in tqdm(SAMPLE_SIZES, desc="bucket rows"):
        for name, seed, src, steps in models:
            imgs = generate(out / "base", str(src), prompts, steps, 0.0, width=w, height=h)
            r = {"row": name, "seed": seed, "size": f"{w}x{h}", "steps": steps, **pixel_judge(imgs, prompts)}
            if (w, h) == (RES, RES):
                r.update(judge.measure(imgs, prompts))
            rows.append(r)
            if seed == 0:
                pics[f"{name} {w}x{h}"] = imgs
    return rows, pics


def bucket_table(rows, cols=("one_shape", "px_all", "acc_all", "fd")):
    """The bucket rows with the seeds folded (mean +- sd) and, per size, the verdict on "buckets beat square"
    for each column (toy.verdict: the seeds' ranges apart)."""
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    names = list(dict.fromkeys(r["row"] for r in rows))
    vals = lambda name, size, c: [r[c] for r in rows if r["row"] == name and r["size"] == size and c in r]
    lines = ["| size | row | seeds | " + " | ".join(cols) + " |", "|" + "---|" * (3 + len(cols))]
    for size in sizes:
        for name in names:
            v = {c: vals(name, size, c) for c in cols}
            lines.append(f"| {size} | {name} | {len(v[cols[0]])} | " + " | ".join(
                spread(v[c], c) if v[c] else "-" for c in cols) + " |")
        verdicts = [verdict(vals("lightning 2 steps, buckets", size, c),
                            vals("lightning 2 steps, square", size, c), -1 if c == "fd" else 1) for c in cols]
        lines.append(f"| {size} | buckets beat square? | | " + " | ".join(verdicts) + " |")
    return "\n".join(lines) + "\n"

# ----------------------------------------------------------------------------------------------------
# Tables, grid, command


def table(rows, cols):
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("-" if r.get(c) is None else f"{r[c]:.3f}" if isinstance(r[c], float)
                                       else str(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def grid(pics, names, path, columns=8, every=56, scale=3):
    """One PNG: a labelled row per name, its images 0, every, 2 every, ... (the same prompts and noise in a
    column; 56 steps through the caption list's shapes, colours, positions and backgrounds)."""
    names = [k for k in names if k in pics]
    pics = {k: [pics[k][(i * every) % len(pics[k])] for i in range(columns)] for k in names}
    cw = max(im.width for k in names for im in pics[k]) * scale + 4
    rh = [max(im.height for im in pics[k]) * scale + 4 for k in names]
    label_w = 6 * max(len(k) for k in names) + 8
    img = Image.new("RGB", (label_w + cw * columns, sum(rh)), (255, 255, 255))
    d, y = ImageDraw.Draw(img), 0
    for k, hgt in zip(names, rh):
        d.text((4, y + hgt // 2 - 5), k, fill=(0, 0, 0), font=ImageFont.load_default())
        for x, im in enumerate(pics[k]):
            img.paste(im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST),
                      (label_w + x * cw, y))
        y += hgt
    files.atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="toy", help="the folder of `python -m tools.toy all` (its base, runs/); "
                   "results go to OUT/section5")
    p.add_argument("--images", type=int, default=450, help="images per row of the tables (450: every "
                   "caption twice)")
    g = p.add_argument_group("what is trained (a re-run with other values is refused: use another --out)")
    g.add_argument("--finetune-steps", type=int, default=1500, help="1: the toy fine-tune's steps (batch 64)")
    g.add_argument("--controlnet-steps", type=int, default=800, help="2: ControlNet training steps")
    g.add_argument("--controlnet-batch", type=int, default=32, help="2: ControlNet batch")
    g.add_argument("--phase-steps", type=int, default=120, help="3: the bucketed 4to2's --phase-steps (as "
                   "`all`'s, so that it is comparable)")
    g.add_argument("--batch", type=int, default=16, help="3: train.py --batch-size (as `all`'s)")
    g.add_argument("--seeds", type=int, default=3, help="3: training seeds of the bucketed 4to2 (as `all "
                   "--seeds`: seed s starts from seed s's 4-step model and is compared with its square 4to2)")
    g.add_argument("--seed", type=int, default=0, help="training seed of the fine-tune and the ControlNet")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if min(args.images, args.finetune_steps, args.controlnet_steps, args.controlnet_batch, args.phase_steps,
           args.batch, args.seeds) < 1:
        p.error("--images, --finetune-steps, --controlnet-steps, --controlnet-batch, --phase-steps, --batch "
                "and --seeds must be >= 1")
    return args


TRAINED = ("finetune_steps", "controlnet_steps", "controlnet_batch", "phase_steps", "batch", "seeds", "seed")


def check_inputs(out, args):
    """Refuse, in one line, an OUT without the `all` run this needs, or an OUT/section5 made with other
    training settings (its parts would be skipped as done)."""
    needed = [out / "base" / "model_index.json", unet_file(out, "8to4", "full"),
              unet_file(out, "2to1", "uncond"),
              out / "runs" / "8to4" / "uncond" / "sdxl_lightning_4step_lora.safetensors"]
    needed += [Path(checkpoint(out, runs_folder(s), "8to4", "full")) for s in range(args.seeds)]
    needed += [unet_file(out, "4to2", "full", runs_folder(s)) for s in range(args.seeds)]
    missing = [str(f) for f in needed if not f.exists()]
    if missing:
        raise ValueError(f"run `python -m tools.toy all --out {out} --seeds {args.seeds}` first (or lower "
                         f"--seeds); missing {', '.join(missing)}")
    settings, f = {k: getattr(args, k) for k in TRAINED}, out / "section5" / "settings.json"
    if f.exists() and json.loads(f.read_text()) != settings:
        raise ValueError(f"{out / 'section5'} was made with other settings ({f}: "
                         f"{f.read_text().strip()}); use another --out or delete it")
    write_json(f, settings)


def main(argv=None):
    args = parse_args(argv)
    out, sec = Path(args.out), Path(args.out) / "section5"
    if args.threads:
        torch.set_num_threads(args.threads)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    tfile = sec / "times.json"

    def timed(name, fn):  # training parts: their time added over re-runs (resumed); evaluations: this run's
        t0 = time.time()
        r = fn()
        times[name] = (0.0 if name.startswith("eval") else times.get(name, 0.0)) + time.time() - t0
        write_json(tfile, times)
        return r
    try:
        check_inputs(out, args)
        times = json.loads(tfile.read_text()) if tfile.exists() else {}
        timed("finetune", lambda: finetune(out, sec, args.finetune_steps, args.seed))
        net = timed("controlnet", lambda: train_controlnet(out, sec, args.controlnet_steps,
                                                           args.controlnet_batch, args.seed))
        bucketed = timed("buckets", lambda: bucket_runs(out, sec, args.phase_steps, args.batch, args.seeds,
                                                        env))
        judge = ToyJudge(out)
        lrows, lpics = timed("eval lora", lambda: measure_lora(out, sec, args.images, judge))
        crows, cpics = timed("eval controlnet", lambda: measure_controlnet(out, sec, args.images, judge, net))
        brows, bpics = timed("eval buckets", lambda: measure_buckets(out, sec, args.images, judge, bucketed))
    except (ValueError, files.RunError) as e:
        raise SystemExit(f"error: {e}")
    write_json(sec / "results.json", {"lora": lrows, "controlnet": crows, "buckets": brows, "times": times})
    md = ("## 1. Our 4-step LoRA on a fine-tune\n\n" +
          table(lrows, ["row", "steps", "guidance", "style", "fd", "acc_shape", "acc_position",
                        "acc_background", "one_shape", "sharpness"]) +
          "\n## 2. A ControlNet with the Lightning students\n\n" +
          table(crows, ["row", "steps", "guidance", "iou", "centre_px", "px_position", "one_shape", "acc_all",
                        "fd"]) +
          "\n## 3. 4to2 with and without aspect-ratio buckets\n\n" + bucket_table(brows) +
          "\nwall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()) + "\n")
    files.atomic_write(sec / "results.md", lambda tmp: tmp.write_text(md))
    pics = {**lpics, **cpics, **bpics}
    names = ["finetune 32 steps CFG 6", "finetune + our 4-step LoRA", "finetune + the LoRA on the init",
             "base + our 4-step LoRA", "control masks", "lightning 4 steps", "lightning 4 steps + ControlNet",
             "lightning 2 steps + ControlNet", "lightning 1 step + ControlNet", "lightning 1 step",
             f"lightning 4 steps (the teacher) {2 * RES}x{RES}", f"lightning 2 steps, square {2 * RES}x{RES}",
             f"lightning 2 steps, buckets {2 * RES}x{RES}"]
    grid(pics, names, sec / "grid.png")
    print(md)
    print(f"toy_section5: {sec / 'results.md'}, {sec / 'grid.png'}")


if __name__ == "__main__":
    main()
