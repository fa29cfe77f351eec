"""The whole sampler against diffusers' StableDiffusionXLPipeline with the SDXL-Lightning scheduler, on a
tiny random-weight SDXL; the `sample.py` command line through the default hub path with a pre-filled cache
and HF_HUB_OFFLINE=1; single-file checkpoints; bad input."""
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
from safetensors.torch import save_file
from torch.testing import assert_close

import files
import lightning_min as lm
import sample
import unet as unet_mod
import weights
from text import time_ids
from tools.tiny import TINY_UNET, diffusers_unet, fill_hub_cache, lightning_scheduler, make_tiny_base, report

ROOT = Path(__file__).resolve().parents[1]
W, H = 48, 32  # a non-square size; the tiny VAE downsamples 2x


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_base")
    pipe = make_tiny_base(root)
    # a distilled UNet stand-in: other random weights, saved as the official files are (fp16, diffusers keys)
    student = diffusers_unet(seed=7)
    save_file({k: v.half().contiguous() for k, v in student.state_dict().items()},
              root / "student_unet.safetensors")
    return root, pipe


def reference(pipe, root, steps, prediction="epsilon", guidance=0.0, seed=0,
              unet_file="student_unet.safetensors", prompt="a cat in a spacesuit", output_type="pt", num=1):
    """The SDXL-Lightning model card's recipe, run by diffusers on the tiny weights."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file
    ref = StableDiffusionXLPipeline(**pipe.components)
    if unet_file:
        u = diffusers_unet()
        u.load_state_dict(load_file(root / unet_file))
        ref.unet = u
    ref.scheduler = lightning_scheduler(pipe, prediction)
    ref.set_progress_bar_config(disable=True)
    return ref(prompt, num_inference_steps=steps, guidance_scale=guidance, width=W, height=H,
               num_images_per_prompt=num,
               generator=torch.Generator("cpu").manual_seed(seed), output_type=output_type).images


@pytest.mark.parametrize("steps,prediction", [(1, "sample"), (2, "epsilon"), (4, "epsilon"), (8, "epsilon")])
def test_sampler_equals_diffusers_pipeline(base, steps, prediction):
    root, pipe = base
    text, unet, vae = sample.load(str(root), str(root / "student_unet.safetensors"), None, steps,
                                  torch.device("cpu"), torch.float32)
    ours = sample.generate(text, unet, vae, ["a cat in a spacesuit"], steps, 0, W, H, prediction)
    theirs = reference(pipe, root, steps, prediction)
    ours = (ours / 2 + 0.5).clamp(0, 1)
    report(f"image {steps} steps {prediction}", ours, theirs)
    assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    lat = sample.generate(text, unet, vae, ["a cat in a spacesuit"], steps, 0, W, H, prediction, decode=False)
    lat_ref = reference(pipe, root, steps, prediction, output_type="latent")
    report(f"latents {steps} steps {prediction}", lat, lat_ref)
    assert_close(lat, lat_ref, atol=5e-5, rtol=1e-5)


def test_cfg_and_batch_equal_diffusers(base):
    root, pipe = base
    text, unet, vae = sample.load(str(root), "base", None, 4, torch.device("cpu"), torch.float32)
    ours = (sample.generate(text, unet, vae, ["a dog"] * 2, 4, 3, W, H,
                            "epsilon", guidance=6.0) / 2 + 0.5).clamp(0, 1)
    theirs = reference(pipe, root, 4, guidance=6.0, seed=3, unet_file=None, prompt="a dog", num=2)
    report("cfg 6, batch 2", ours, theirs)
    assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert not torch.equal(ours[0], ours[1])  # one noise draw for the batch, as diffusers


def _cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=300)


def _png(path):
    return np.asarray(Image.open(path)).astype(np.int16)


def test_default_hub_path_offline_equals_pipeline_png(base, tmp_path):
    """The README's command, as a new user runs it, with a pre-filled cache standing in for the network."""
    root, pipe = base
    cache = tmp_path / "hub"
    fill_hub_cache(cache, weights.SDXL_BASE, {str(p.relative_to(root)): p for p in root.rglob("*")
                                               if p.is_file() and p.parent != root})
    fill_hub_cache(cache, weights.LIGHTNING_REPO,
                   {"sdxl_lightning_4step_unet.safetensors": root / "student_unet.safetensors"})
    r = _cli("a cat in a spacesuit", "--steps", "4", "--width", str(W), "--height", str(H), "--out",
             str(tmp_path / "cat.png"), env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "saved" in r.stdout
    ref = reference(pipe, root, 4, output_type="pil")[0]
    ref.save(tmp_path / "ref.png")
    a, b = _png(tmp_path / "cat.png"), _png(tmp_path / "ref.png")
    print(f"PNG: max abs diff {np.abs(a - b).max()}, identical pixels {(a == b).mean():.4%}")
    assert a.shape == (H, W, 3)
    assert np.abs(a - b).max() <= 1 and (a == b).mean() > 0.99


def _single_file(root, pipe, path):
    """A tiny all-in-one checkpoint in the original (SGM) layout, written from the diffusers weights."""
    from tools.tiny import TINY_VAE
    te = weights.load_text(str(root))
    sd = weights.to_single_file(pipe.unet.state_dict(), TINY_UNET, pipe.vae.state_dict(), TINY_VAE,
                                weights.canonical_state_dict(te.text_encoder),
                                weights.canonical_state_dict(te.text_encoder_2))
    save_file({k: v.contiguous() for k, v in sd.items()}, path)


def test_single_file_base_equals_diffusers_folder(base, tmp_path):
    root, pipe = base
    path = tmp_path / "all_in_one.safetensors"
    _single_file(root, pipe, path)
    cache = tmp_path / "hub"  # tokenizers of a single file come from the SDXL base repo
    fill_hub_cache(cache, weights.SDXL_BASE,
                   {str(p.relative_to(root)): p for p in root.rglob("*")
                    if "tokenizer" in str(p) and p.is_file()})
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    r = _cli("a cat", "--steps", "2", "--base", str(path), "--unet", "base", "--width", str(W), "--height",
             str(H), "--out", str(tmp_path / "single.png"), env=env)
    assert r.returncode == 0, r.stderr
    ref = reference(pipe, root, 2, unet_file=None, prompt="a cat", output_type="pil")[0]
    ref.save(tmp_path / "ref.png")
    a, b = _png(tmp_path / "single.png"), _png(tmp_path / "ref.png")
    print(f"single-file PNG vs diffusers folder pipeline: max abs diff {np.abs(a - b).max()}")
    assert np.abs(a - b).max() <= 1 and (a == b).mean() > 0.99


@pytest.mark.parametrize("case",
                         ["steps", "size", "missing_base", "missing_unet", "missing_keys", "misshaped",
                          "sd15", "pickle", "lora_as_unet", "int8_unet", "bool_unet", "unet_folder"])
def test_bad_input_is_one_clear_line(base, tmp_path, case):
    root, pipe = base
    common = ["--base", str(root), "--width", str(W), "--height", str(H), "--out", str(tmp_path / "x.png")]
    good = {k: v for k, v in pipe.unet.state_dict().items()}
    if case == "missing_keys":
        save_file({k: v for k, v in good.items() if "conv_out" not in k}, tmp_path / "u.safetensors")
    if case == "misshaped":
        save_file({**good, "conv_in.weight": torch.zeros(64, 4, 1, 1)}, tmp_path / "u.safetensors")
    if case == "sd15":
        save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1),
                   "cond_stage_model.transformer.x": torch.zeros(1)}, tmp_path / "u.safetensors")
    if case == "lora_as_unet":
        save_file({"lora_unet_conv.lora_down.weight": torch.zeros(1)}, tmp_path / "u.safetensors")
    if case in ("int8_unet", "bool_unet"):  # issue 18: was hundreds of lines of load_state_dict errors
        dtype = torch.int8 if case == "int8_unet" else torch.bool
        save_file({k: v.to(dtype) if "conv" in k else v for k, v in good.items()}, tmp_path / "u.safetensors")
    if case == "unet_folder":  # issue 18: was "no such file"
        (tmp_path / "runs").mkdir()
    unet_arg = {"missing_unet": str(tmp_path / "nope.safetensors"), "pickle": str(tmp_path / "u.ckpt"),
                "unet_folder": str(tmp_path / "runs")}.get(case, str(tmp_path / "u.safetensors"))
    args = {"steps": ["--steps", "3"], "size": ["--width", "50", "--unet", "base"],
            "missing_base": ["--base", str(tmp_path / "nowhere")], "pickle": ["--unet", unet_arg]}.get(
        case, ["--unet", unet_arg])
    r = _cli("a cat", *common, *args, env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty")})
    expect = {"steps": "supported: 1, 2, 4, 8", "size": "multiples of 8", "missing_base": "nowhere",
              "missing_unet": "nope.safetensors: no such file",
              "missing_keys": "2 missing keys (conv_out.weight",
              "misshaped": "conv_in.weight (file (64, 4, 1, 1), model (64, 4, 3, 3))",
              "sd15": "not an SDXL-architecture",
              "pickle": "pickled checkpoints are not loaded", "lora_as_unet": "LoRA file",
              "int8_unet": "u.safetensors: conv_in.bias is int8, not a floating-point tensor",
              "bool_unet": "u.safetensors: conv_in.bias is bool, not a floating-point tensor",
              "unet_folder": "runs: is a folder; expected a UNet .safetensors file"}[case]
    print(case, "->", r.stderr.strip())
    assert r.returncode != 0
    assert expect in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "x.png").exists()


def test_lora_on_base_equals_diffusers_fuse_lora(base, tmp_path):
    """`--unet base --lora FILE` (the README's LoRA recipe) gives diffusers' load_lora_weights + fuse_lora
    image."""
    import lora as lora_mod
    root, pipe = base
    g = torch.Generator().manual_seed(3)
    u = unet_mod.UNet(TINY_UNET)
    sd = {}
    for name in lora_mod.lora_targets(u):
        w = u.get_submodule(name).weight
        k = lora_mod.kohya_name(name)
        sd[f"{k}.lora_down.weight"] = torch.randn(4, *w.shape[1:], generator=g) * 0.1
        sd[f"{k}.lora_up.weight"] = torch.randn(w.shape[0], 4,
                                                *([1, 1] if w.ndim == 4 else []), generator=g) * 0.1
        sd[f"{k}.alpha"] = torch.tensor(8.0)
    path = tmp_path / "my_lora.safetensors"
    save_file(sd, path)
    r = _cli("a cat", "--steps", "4", "--base", str(root), "--unet", "base", "--lora", str(path), "--width",
             str(W), "--height", str(H), "--out", str(tmp_path / "lora.png"))
    assert r.returncode == 0, r.stderr
    from diffusers import StableDiffusionXLPipeline
    import copy
    # keep the fixture's clean
    ref = StableDiffusionXLPipeline(**{**pipe.components, "unet": copy.deepcopy(pipe.unet)})
    ref.scheduler = lightning_scheduler(pipe)
    ref.load_lora_weights(str(path))
    ref.fuse_lora()
    img = ref("a cat", num_inference_steps=4, guidance_scale=0, width=W, height=H, output_type="pil",
              generator=torch.Generator("cpu").manual_seed(0)).images[0]
    img.save(tmp_path / "ref.png")
    a, b = _png(tmp_path / "lora.png"), _png(tmp_path / "ref.png")
    plain = reference(pipe, root, 4, unet_file=None, prompt="a cat", output_type="pil")[0]
    print(f"LoRA PNG vs diffusers fuse_lora: max abs diff {np.abs(a - b).max()}, vs no LoRA "
          f"{np.abs(a - np.asarray(plain).astype(np.int16)).max()}")
    assert np.abs(a - b).max() <= 1 and (a == b).mean() > 0.99
    assert np.abs(a - np.asarray(plain).astype(np.int16)).max() > 10  # the LoRA changed the image


# ----------------------------------------------------------------------------------------------------
# Issue 9: img2img, stacked LoRAs, prompt files, negative prompts; issue 6: bad input; issue 7.6; --compile

def _main(*args):
    """sample.py's main(argv) in this process (what the command runs, without the interpreter start)."""
    sample.main([str(a) for a in args])


def _main_error(*args):
    """Run main, expect a one-line 'error: ...' exit; return the line."""
    with pytest.raises(SystemExit) as e:
        _main(*args)
    msg = str(e.value.code)
    print("->", msg)
    assert msg.startswith("error: ") and "\n" not in msg
    return msg


def _photo(path, size=(61, 45), seed=0):
    """A smooth random test picture of another size than W x H (so resizing is exercised)."""
    g = np.random.default_rng(seed)
    small = g.integers(0, 256, (4, 5, 3)).astype(np.uint8)
    Image.fromarray(small).resize(size, Image.BICUBIC).save(path)
    return path


def _img2img_pipe(pipe, root, prediction, unet_file="student_unet.safetensors"):
    from diffusers import StableDiffusionXLImg2ImgPipeline
    from safetensors.torch import load_file
    ref = StableDiffusionXLImg2ImgPipeline(**{k: v for k, v in pipe.components.items()})
    u = diffusers_unet()
    u.load_state_dict(load_file(root / unet_file))
    ref.unet = u
    ref.scheduler = lightning_scheduler(pipe, prediction)
    ref.set_progress_bar_config(disable=True)
    return ref


def test_timesteps_trailing_and_diffusers_img2img_selection():
    """Strength 1 is the trailing grid; img2img starts where diffusers' get_timesteps does whenever the
    strength is k/N on the N-step grid; the 1- and 2-step models' other training times (Sec. 3.7.1) are where
    it differs."""
    from types import SimpleNamespace
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline
    for n in range(1, 11):
        assert lm.timesteps(n) == lm.trailing_timesteps(n)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   steps_offset=1, timestep_spacing="trailing")

    def diffusers_ts(n, strength):
        sched.set_timesteps(n)
        ts, _ = StableDiffusionXLImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=sched),
                                                               n, strength, "cpu")
        return [int(t) + 1 for t in ts] + [0]  # UNet index -> paper time

    differ = []
    for n in (1, 2, 4, 8):
        for s in lm.trained_strengths(n):
            ours = lm.timesteps(n, s)
            try:
                same = diffusers_ts(n, s) == ours
            except Exception:
                same = False
            if not same:
                differ.append((n, s, ours))
            else:
                assert ours[0] == round(s * 1000) and len(ours) - 1 == round(s * n)
    print("diffusers' strength selection differs (ours shown):", differ)
    # the 1- and 2-step models' extra training times; every other (N, k/N) agrees with diffusers
    assert [(n, s) for n, s, _ in differ] == [(1, 0.25), (1, 0.5), (1, 0.75), (2, 0.25), (2, 0.75)]
    assert dict(((n, s), ts) for n, s, ts in differ) == {
        (1, 0.25): [250, 0], (1, 0.5): [500, 0], (1, 0.75): [750, 0], (2, 0.25): [250, 0],
        (2, 0.75): [750, 250, 0]}
    # the 1-step model at 0.25 / 0.5 is diffusers' 4- / 2-step grid cut to one step
    assert diffusers_ts(4, 0.25) == lm.timesteps(1, 0.25) and diffusers_ts(2, 0.5) == lm.timesteps(1, 0.5)


def test_load_image_equals_diffusers_image_processor(tmp_path):
    from diffusers.image_processor import VaeImageProcessor
    proc = VaeImageProcessor(vae_scale_factor=8)
    for size in ((61, 45), (40, 80)):
        path = _photo(tmp_path / f"in{size[0]}.png", size)
        for mode, theirs_mode in (("stretch", "default"), ("crop", "crop")):
            ours, (w, h) = sample.load_image(path, W, H, mode)
            theirs = proc.preprocess(Image.open(path), height=H, width=W, resize_mode=theirs_mode)
            assert (w, h) == (W, H)
            assert_close(ours, theirs, atol=0, rtol=0)
        ours, (w, h) = sample.load_image(path)  # default: its own size, rounded down to a multiple of 8
        assert (w, h) == (size[0] - size[0] % 8, size[1] - size[1] % 8)
        assert_close(ours, proc.preprocess(Image.open(path)), atol=0, rtol=0)


@pytest.mark.parametrize("steps,strength,prediction,diffusers_steps",
                         [(4, 0.5, "epsilon", 4), (2, 0.5, "epsilon", 2), (8, 0.375, "epsilon", 8),
                          (1, 1.0, "sample", 1), (1, 0.5, "sample", 2)])
def test_img2img_equals_diffusers(base, tmp_path, steps, strength, prediction, diffusers_steps):
    """SDXL img2img with the Lightning scheduler where diffusers' strength picks our times (for the 1-step
    model at 0.5 that takes num_inference_steps=2: its grid [999, 499] cut at 0.5 is our [500, 0])."""
    root, pipe = base
    text, unet, vae = sample.load(str(root), str(root / "student_unet.safetensors"), None, steps,
                                  torch.device("cpu"), torch.float32)
    path = _photo(tmp_path / "in.png")
    image, _ = sample.load_image(path, W, H)
    ours = sample.generate(text, unet, vae, ["a red car"], steps, 5, W, H, prediction, image=image,
                           strength=strength)
    ref = _img2img_pipe(pipe, root, prediction)
    resized = ref.image_processor.resize(Image.open(path), H, W)  # what --width/--height do to the input
    theirs = ref("a red car", image=resized, strength=strength, num_inference_steps=diffusers_steps,
                 guidance_scale=0, generator=torch.Generator("cpu").manual_seed(5), output_type="pt").images
    ours = (ours / 2 + 0.5).clamp(0, 1)
    report(f"img2img {steps} steps strength {strength}", ours, theirs)
    assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    plain = (sample.generate(text, unet, vae, ["a red car"], steps, 5,
                             W, H, prediction) / 2 + 0.5).clamp(0, 1)
    if strength < 1:
        assert (plain - ours).abs().max() > 0.05  # the image mattered


def _handwritten_img2img(pipe, unet, prompt, image, ts, prediction, seed):
    """SDEdit by hand on diffusers' own modules: the posterior draw and a fresh noise from one generator, Eq.
    (1) to ts[0], then Eq. (3)-(5) moves along ts. No scheduler, no code of ours."""
    emb, _, pooled, _ = pipe.encode_prompt(prompt, device=torch.device("cpu"),
                                           do_classifier_free_guidance=False)
    g = torch.Generator("cpu").manual_seed(seed)
    sf = pipe.vae.config.scaling_factor
    z = pipe.vae.encode(image).latent_dist.sample(g) * sf
    noise = torch.randn(z.shape, generator=g)
    abar = torch.cat([torch.ones(1), pipe.scheduler.alphas_cumprod]).double()  # abar[t], t = 0..1000
    a = abar[ts[0]]
    x = (a.sqrt() * z + (1 - a).sqrt() * noise).float()
    ids = torch.tensor([[H, W, 0, 0, H, W]], dtype=torch.float32)
    for t, t_next in zip(ts[:-1], ts[1:]):
        u = unet(x, t - 1, encoder_hidden_states=emb,
                 added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        a, a_next = abar[t], abar[t_next]
        x0 = (x - (1 - a).sqrt() * u) / a.sqrt() if prediction == "epsilon" else u.double()
        eps = u.double() if prediction == "epsilon" else (x - a.sqrt() * x0) / (1 - a).sqrt()
        x = (a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps).float()
    return (pipe.vae.decode(x / sf).sample / 2 + 0.5).clamp(0, 1)


@pytest.mark.parametrize("steps,prediction", [(2, "epsilon"), (1, "sample")])
def test_img2img_where_diffusers_strength_differs(base, tmp_path, steps, prediction):
    """Strength 0.75, a training time of the 1- and 2-step models that diffusers' strength cannot select: ours
    (750 -> 250 -> 0 for 2 steps, 750 -> 0 for 1) equals a hand-written SDEdit and diffusers given those
    timesteps explicitly (timesteps=[749, 249], strength=1)."""
    root, pipe = base
    text, unet, vae = sample.load(str(root), str(root / "student_unet.safetensors"), None, steps,
                                  torch.device("cpu"), torch.float32)
    path = _photo(tmp_path / "in.png", size=(W, H))
    image, _ = sample.load_image(path)
    ts = lm.timesteps(steps, 0.75)
    assert ts == {2: [750, 250, 0], 1: [750, 0]}[steps]
    ours = (sample.generate(text, unet, vae, ["a dog"], steps, 2, W, H, prediction, image=image,
                            strength=0.75) / 2 + 0.5).clamp(0, 1)
    ref = _img2img_pipe(pipe, root, prediction)
    with torch.no_grad():
        hand = _handwritten_img2img(pipe, ref.unet, "a dog", image, ts, prediction, seed=2)
    report(f"img2img {steps} steps strength 0.75 vs hand-written", ours, hand)
    assert_close(ours, hand, atol=1e-4, rtol=1e-4)
    theirs = ref("a dog", image=Image.open(path), strength=1.0, timesteps=[t - 1 for t in ts[:-1]],
                 guidance_scale=0, generator=torch.Generator("cpu").manual_seed(2), output_type="pt").images
    report(f"img2img {steps} steps strength 0.75 vs diffusers "
           f"timesteps={[t - 1 for t in ts[:-1]]}", ours, theirs)
    assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_img2img_cli_and_bad_strengths(base, tmp_path):
    root, pipe = base
    photo = _photo(tmp_path / "in.png")
    common = ["a red car", "--base", root, "--unet", root / "student_unet.safetensors", "--width",
              W, "--height", H]
    _main(*common, "--steps", 4, "--image", photo, "--strength", 0.5, "--seed", 5, "--out",
          tmp_path / "cli.png")
    text, unet, vae = sample.load(str(root), str(root / "student_unet.safetensors"), None, 4,
                                  torch.device("cpu"), torch.float32)
    want = files.to_pil(sample.generate(text, unet, vae, ["a red car"], 4, [5], W, H,
                                         image=sample.load_image(
        photo, W, H)[0], strength=0.5))[0]
    assert np.array_equal(_png(tmp_path / "cli.png"), np.asarray(want).astype(np.int16))
    out = tmp_path / "bad.png"
    msg = _main_error(*common, "--steps", 4, "--image", photo, "--strength", 0.6, "--out", out)
    assert "valid: 0.25, 0.5, 0.75, 1" in msg and "--force" in msg
    assert "valid: 0.25, 0.5, 0.75, 1" in _main_error(*common, "--steps", 2, "--image", photo, "--strength",
                                                      0.3, "--out", out)
    assert "valid: 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1" in _main_error(
        *common, "--steps", 8, "--image", photo, "--strength", 0.3, "--out", out)
    assert "needs --strength" in _main_error(*common, "--image", photo, "--out", out)
    assert "need --image" in _main_error(*common, "--strength", 0.5, "--out", out)
    assert "(0, 1]" in _main_error(*common, "--image", photo, "--strength", 1.5, "--force", "--out", out)
    assert "not a readable image" in _main_error(*common, "--image", root / "model_index.json", "--strength",
                                                 0.5, "--out", out)
    assert not out.exists()
    # 600, 350, 100, 0
    _main(*common, "--steps", 4, "--image", photo, "--strength", 0.6, "--force", "--out", out)
    assert Image.open(out).size == (W, H)


def _write_lora(path, seed, rank=4, scale=0.1):
    import lora as lora_mod
    g = torch.Generator().manual_seed(seed)
    u = unet_mod.UNet(TINY_UNET)
    sd = {}
    for name in lora_mod.lora_targets(u):
        w = u.get_submodule(name).weight
        k = lora_mod.kohya_name(name)
        sd[f"{k}.lora_down.weight"] = torch.randn(rank, *w.shape[1:], generator=g) * scale
        sd[f"{k}.lora_up.weight"] = torch.randn(w.shape[0], rank,
                                                *([1, 1] if w.ndim == 4 else []), generator=g) * scale
        sd[f"{k}.alpha"] = torch.tensor(8.0)
    save_file(sd, path)
    return sd


def test_stacked_loras_equal_diffusers_set_adapters(base, tmp_path):
    """--lora A:0.7 --lora B:-0.4 equals diffusers' load_lora_weights x2 + set_adapters([0.7, -0.4]) +
    fuse_lora."""
    import copy
    from diffusers import StableDiffusionXLPipeline
    root, pipe = base
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    _write_lora(a, 1), _write_lora(b, 2, rank=8)
    text, unet, vae = sample.load(str(root), "base", [(str(a), 0.7), (str(b), -0.4)], 4, torch.device("cpu"),
                                  torch.float32)
    ref = StableDiffusionXLPipeline(**{**pipe.components, "unet": copy.deepcopy(pipe.unet)})
    ref.scheduler = lightning_scheduler(pipe)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(str(a), adapter_name="a")
    ref.load_lora_weights(str(b), adapter_name="b")
    ref.set_adapters(["a", "b"], adapter_weights=[0.7, -0.4])
    ref.fuse_lora()
    ref.unload_lora_weights()  # keeps the fused weights
    theirs_w, ours_w = ref.unet.state_dict(), unet.state_dict()
    d = torch.stack([(ours_w[k].double() - v.double()).abs().max() for k, v in theirs_w.items()])
    print(f"fused UNet weights vs diffusers: max abs err {d.max():.3e}, mean of per-tensor max "
          f"{d.mean():.3e}")
    for k, v in theirs_w.items():
        assert_close(ours_w[k], v, atol=1e-6, rtol=1e-5)
    ours = (sample.generate(text, unet, vae, ["a cat"], 4, 0, W, H) / 2 + 0.5).clamp(0, 1)
    theirs = ref("a cat", num_inference_steps=4, guidance_scale=0, width=W, height=H, output_type="pt",
                 generator=torch.Generator("cpu").manual_seed(0)).images
    report("image, 2 LoRAs at 0.7 and -0.4", ours, theirs)
    assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # the command line: same image; order of fusing does not matter beyond float rounding
    common = ["a cat", "--base", root, "--unet", "base", "--width", W, "--height", H]
    _main(*common, "--lora", f"{a}:0.7", "--lora", f"{b}:-0.4", "--out", tmp_path / "ab.png")
    _main(*common, "--lora", f"{b}:-0.4", "--lora", f"{a}:0.7", "--out", tmp_path / "ba.png")
    png = np.asarray(files.to_pil(ours * 2 - 1)[0]).astype(np.int16)
    for f in ("ab.png", "ba.png"):
        assert np.abs(_png(tmp_path / f) - png).max() <= 1
    _main(*common, "--lora", f"{a}:0", "--out", tmp_path / "zero.png")  # scale 0 is the base model
    plain = reference(pipe, root, 4, unet_file=None, prompt="a cat", output_type="pil")[0]
    assert np.abs(_png(tmp_path / "zero.png") - np.asarray(plain).astype(np.int16)).max() <= 1


@pytest.mark.parametrize("case", ["rank0", "sd15", "nan", "scale_inf", "missing", "int8", "bool"])
def test_bad_lora_is_one_clear_line(base, tmp_path, case):
    root, _ = base
    path = tmp_path / "l.safetensors"
    sd = _write_lora(path, 3)
    if case == "rank0":
        empty = {k: v if "alpha" in k else v[:0] if "lora_down" in k else v[:, :0] for k, v in sd.items()}
        save_file(empty, path)
    if case == "sd15":
        save_file({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 320),
                   "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(320, 4)}, path)
    if case == "nan":
        k = sorted(sd)[5]
        sd[k] = sd[k].clone().fill_(float("nan"))
        save_file(sd, path)
    if case in ("int8", "bool"):  # issue 18: was fused, then a misleading NaN message
        k = sorted(sd)[5]
        sd[k] = sd[k].to(getattr(torch, case))
        save_file(sd, path)
    spec = {"scale_inf": f"{path}:inf",
            "missing": str(tmp_path / "nope.safetensors")}.get(case, f"{path}:0.5")
    msg = _main_error("a cat", "--base", root, "--unet", "base", "--lora", spec, "--width", W, "--height", H,
                      "--out", tmp_path / "x.png")
    expect = {"rank0": "rank 0", "sd15": "unknown LoRA keys", "nan": "NaN or Inf values in " + sorted(sd)[5],
              "scale_inf": "finite", "missing": "nope.safetensors: no such file",
              "int8": f"not floating point: {sorted(sd)[5]} (int8)",
              "bool": f"not floating point: {sorted(sd)[5]} (bool)"}[case]
    assert expect in msg
    if case in ("rank0", "sd15", "nan", "int8", "bool"):
        assert str(path) in msg
    if case == "sd15":
        assert "lora_unet_input_blocks_1_1_proj_in" in msg
    assert not (tmp_path / "x.png").exists()


def test_prompts_file_batches_manifest_and_regeneration(base, tmp_path):
    """--prompts with --batch-size: OUT_00000.png ... and prompts.jsonl; image i = seed + i, the same alone,
    whatever the batch size, and equal to diffusers with one generator per image."""
    root, pipe = base
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red car\n\n   \na dog in the snow\ncafé au lait, ünïcode ✓\r\n", encoding="utf-8")
    common = ["--base", root, "--unet", root / "student_unet.safetensors", "--width", W,
              "--height", H, "--steps", 2]
    _main("--prompts", prompts, *common, "--batch-size", 2, "--seed", 10, "--out",
          tmp_path / "b2" / "img.png")
    lines = [{k: v for k, v in json.loads(s).items() if k != "settings"}  # settings: test_resume_...
             for s in (tmp_path / "b2" / "prompts.jsonl").read_text(encoding="utf-8").splitlines()]
    assert lines == [{"prompt": "a red car", "seed": 10, "file": "img_00000.png"},
                     {"prompt": "a dog in the snow", "seed": 11, "file": "img_00001.png"},
                     {"prompt": "café au lait, ünïcode ✓", "seed": 12, "file": "img_00002.png"}]
    assert sorted(p.name for p in (tmp_path / "b2").iterdir()) == ["img_00000.png", "img_00001.png",
                                                                   "img_00002.png", "prompts.jsonl"]
    _main("--prompts", prompts, *common, "--batch-size", 1, "--seed", 10, "--out",
          tmp_path / "b1" / "img.png")
    _main(lines[1]["prompt"], *common, "--seed", lines[1]["seed"], "--out", tmp_path / "alone.png")
    ref = StableDiffusionXLPipeline_from(pipe, root)
    theirs = ref([m["prompt"] for m in lines], num_inference_steps=2, guidance_scale=0, width=W, height=H,
                 generator=[torch.Generator("cpu").manual_seed(m["seed"]) for m in lines],
                 output_type="pil").images
    for m, im in zip(lines, theirs):
        a, b = _png(tmp_path / "b2" / m["file"]), _png(tmp_path / "b1" / m["file"])
        ref_png = np.asarray(im).astype(np.int16)
        print(f"{m['file']}: batch 2 vs 1 max diff {np.abs(a - b).max()}, vs diffusers "
              f"{np.abs(a - ref_png).max()}")
        assert np.abs(a - b).max() <= 1 and np.abs(a - ref_png).max() <= 1
    assert np.abs(_png(tmp_path / "alone.png") - _png(tmp_path / "b2" / "img_00001.png")).max() <= 1
    # --num copies of each prompt continue the index and seeds; a single image keeps its own name
    _main("a cat", *common, "--num", 2, "--seed", 7, "--out", tmp_path / "n" / "cat.png")
    assert [json.loads(s)["seed"]
            for s in (tmp_path / "n" / "prompts.jsonl").read_text().splitlines()] == [7, 8]
    _main("a cat", *common, "--seed", 8, "--out", tmp_path / "n8.png")
    assert np.abs(_png(tmp_path / "n8.png") - _png(tmp_path / "n" / "cat_00001.png")).max() <= 1


def StableDiffusionXLPipeline_from(pipe, root, unet_file="student_unet.safetensors"):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file
    ref = StableDiffusionXLPipeline(**pipe.components)
    if unet_file:
        u = diffusers_unet()
        u.load_state_dict(load_file(root / unet_file))
        ref.unet = u
    ref.scheduler = lightning_scheduler(pipe)
    ref.set_progress_bar_config(disable=True)
    return ref


def test_bad_prompts_files(base, tmp_path):
    root, _ = base
    common = ["--base", root, "--width", W, "--height", H, "--out", tmp_path / "x.png"]
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("a cat\ncaf\xe9\n".encode("latin-1"))
    assert "line 2 is not UTF-8" in _main_error("--prompts", bad, *common)
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert "no prompts" in _main_error("--prompts", tmp_path / "blank.txt", *common)
    assert "one of them" in _main_error("a cat", "--prompts", tmp_path / "blank.txt", *common)
    assert "one of them" in _main_error(*common)
    assert "cannot read" in _main_error("--prompts", tmp_path / "nope.txt", *common)
    (tmp_path / "prompts.jsonl").write_text("a cat\n")
    assert "overwritten" in _main_error("--prompts", tmp_path / "prompts.jsonl", *common)
    assert "--batch-size" in _main_error("a cat", "--batch-size", 0, *common)
    assert not list(tmp_path.glob("x*.png"))


def test_negative_prompt_equals_diffusers(base, tmp_path):
    """--negative with CFG encodes the negative prompt as the uncond (diffusers' negative_prompt), per-image
    seeds equal diffusers' list of generators; without guidance > 1 it is refused."""
    root, pipe = base
    text, unet, vae = sample.load(str(root), "base", None, 4, torch.device("cpu"), torch.float32)
    ours = (sample.generate(text, unet, vae, ["a dog", "a red car"], 4, [3, 4], W, H, "epsilon", guidance=5.0,
                            negative="snow") / 2 + 0.5).clamp(0, 1)
    ref = StableDiffusionXLPipeline_from(pipe, root, unet_file=None)
    theirs = ref(["a dog", "a red car"], negative_prompt="snow", num_inference_steps=4, guidance_scale=5.0,
                 width=W,
                 height=H, generator=[torch.Generator("cpu").manual_seed(s) for s in (3, 4)],
                 output_type="pt").images
    report("negative prompt, cfg 5, 2 prompts", ours, theirs)
    assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    zero = (sample.generate(text, unet, vae, ["a dog", "a red car"], 4, [3, 4], W, H, "epsilon", guidance=5.0)
            / 2 + 0.5).clamp(0, 1)
    assert (zero - ours).abs().max() > 0.05  # the negative prompt mattered
    common = ["a dog", "--base", root, "--unet", "base", "--width", W, "--height", H, "--seed", 3]
    _main(*common, "--guidance", 5, "--negative", "snow", "--out", tmp_path / "neg.png")
    want = np.asarray(files.to_pil(ours[:1] * 2 - 1)[0]).astype(np.int16)
    assert np.abs(_png(tmp_path / "neg.png") - want).max() <= 1
    for g in ("0", "1"):
        assert "--negative needs --guidance > 1" in _main_error(*common, "--negative", "snow", "--guidance",
                                                                g, "--out", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_unet_model_adapter(base):
    """unet_model(unet, cond, guidance, uncond): CFG in one batched call equals the two calls it stands
    for."""
    root, _ = base
    text, unet, _ = sample.load(str(root), "base", None, 4, torch.device("cpu"), torch.float32)
    ctx, pooled = text.encode(["a dog", "a cat"])
    neg_ctx, neg_pooled = text.encode(["snow", "snow"])
    ids = time_ids(H, W).expand(2, 6)
    x, t = torch.randn(2, 4, H // 2, W // 2,
                       generator=torch.Generator().manual_seed(0)), torch.tensor([1000, 250])
    cond = lm.unet_model(unet, (ctx, pooled, ids))(x, t)
    assert_close(cond, unet(x, t - 1, ctx, pooled, ids))
    assert torch.equal(lm.unet_model(unet, (ctx, pooled, ids), guidance=1.0)(x, t), cond)  # <= 1: CFG off
    other_ids = time_ids(2 * H, 2 * W).expand(2, 6)  # the uncond's time ids are not used: cond's are
    for uncond in (None, (neg_ctx, neg_pooled, other_ids), (neg_ctx[:1], neg_pooled[:1], other_ids[:1])):
        u_ctx, u_pooled = (torch.zeros_like(ctx),
                           torch.zeros_like(pooled)) if uncond is None else (neg_ctx, neg_pooled)
        u = unet(x, t - 1, u_ctx, u_pooled, ids)
        assert_close(lm.unet_model(unet, (ctx, pooled, ids), 4.0, uncond)(x, t), u + 4.0 * (cond - u),
                     atol=5e-5, rtol=1e-5)  # CFG 4 scales batch-size float noise by 4
    assert_close(lm.unet_model(unet, (ctx, pooled, ids))(x, torch.tensor([0, 1])),
                 unet(x, torch.tensor([0, 0]), ctx, pooled, ids))  # t = 0 (clean data) -> embedding index 0


def _chattr(path, flag):
    return shutil.which("chattr") and subprocess.run(["chattr", flag, str(path)],
                                                     capture_output=True).returncode == 0


@pytest.mark.parametrize("case",
                         ["txt", "folder", "parent_is_file", "read_only", "seed", "seed_neg", "guidance_inf",
                                  "guidance_nan", "device", "size"])
def test_bad_arguments_refused_before_work(base, tmp_path, case):
    root, _ = base
    out = tmp_path / "x.png"
    ro = tmp_path / "ro"
    if case == "parent_is_file":
        (tmp_path / "f").write_text("")
        out = tmp_path / "f" / "sub" / "x.png"
    if case == "read_only":
        ro.mkdir()
        out = ro / "x.png"
        if os.geteuid() == 0:  # root writes through mode bits: make it immutable instead
            if not _chattr(ro, "+i"):
                pytest.skip("running as root without chattr +i: no way to make a read-only folder")
        else:
            ro.chmod(0o555)
    if case == "txt":
        out = tmp_path / "x.txt"
    if case == "folder":
        out = tmp_path
    if case == "device" and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    args = {"seed": ["--seed", 2**64 - 1, "--num", 2], "seed_neg": ["--seed", -1],
            "guidance_inf": ["--guidance", "inf"], "guidance_nan": ["--guidance", "nan"],
            "device": ["--device", "cuda"], "size": ["--width", 12]}.get(case, [])
    try:
        msg = _main_error("a cat", "--base", root, "--unet", "base", "--width", W, "--height", H,
                          "--out", out, *args)
    finally:
        if case == "read_only":
            _chattr(ro, "-i") if os.geteuid() == 0 else ro.chmod(0o755)
    expect = {"txt": "unknown image extension '.txt'", "folder": "is a folder",
              "parent_is_file": "is a file, not a folder",
              "read_only": "is not writable", "seed": "0..2**64-1", "seed_neg": "0..2**64-1",
              "guidance_inf": "finite", "guidance_nan": "finite", "device": "no CUDA GPU",
              "size": "multiples of 8"}[case]
    assert expect in msg
    assert not list(tmp_path.rglob("*.png")) and not list(tmp_path.rglob("*.tmp*"))


def test_full_disk_leaves_no_partial_png(base, tmp_path, monkeypatch):
    root, _ = base
    import errno

    def full_disk(self, fp, *a, **k):
        Path(fp).write_bytes(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Image.Image, "save", full_disk)
    msg = _main_error("a cat", "--base", root, "--unet", "base", "--width", W, "--height", H,
                      "--out", tmp_path / "x.png")
    assert "x.png: the disk is full" in msg
    assert list(tmp_path.iterdir()) == []  # neither the PNG nor its temp file


@pytest.mark.parametrize("case", ["nan_unet", "huge_guidance"])
def test_nonfinite_output_is_an_error(base, tmp_path, case):
    """NaN weights or a guidance scale that overflows: an error that says so, no (black) PNG."""
    root, pipe = base
    unet_file = root / "student_unet.safetensors"
    args = ["--guidance", "1e39"] if case == "huge_guidance" else []
    if case == "nan_unet":
        sd = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
        sd["mid_block.resnets.0.conv1.weight"][0, 0, 0, 0] = float("nan")
        unet_file = tmp_path / "nan_unet.safetensors"
        save_file(sd, unet_file)
    msg = _main_error("a cat", "--base", root, "--unet", unet_file, "--width", W, "--height", H,
                      "--out", tmp_path / "x.png", *args)
    assert "the UNet at t=1000 (step 1 of 4) produced NaN or Inf" in msg
    assert {"nan_unet": "mid_block.resnets.0.conv1.weight", "huge_guidance": "--guidance 1e+39"}[case] in msg
    assert not (tmp_path / "x.png").exists()


def test_long_prompt_warning_counts_tokens(base, tmp_path, capsys):
    root, _ = base
    tail = "the red snow car"
    long = "a photo of a cat " * 19 + tail  # 95 tokens + BOS/EOS
    n_drop = len(weights.load_text(str(root)).tokenizer(long, verbose=False).input_ids) - 77
    _main(long, "--base", root, "--unet", "base", "--width", W, "--height", H, "--out", tmp_path / "x.png")
    err = capsys.readouterr().err
    print(err)
    assert (f"warning: text.py: the prompt (x.png) is longer than CLIP's 77 tokens; {n_drop} tokens were "
            "dropped") in err
    assert tail not in err and n_drop > 0


def test_exported_1step_unet_samples_as_x0(base, tmp_path):
    """Issue 7.6: our 1-step export (named *_x0 by train.py, or with a config.json saying so) samples as x0
    with no flag; --prediction still overrides."""
    import shutil as sh
    root, _ = base
    run = tmp_path / "2to1" / "uncond"
    run.mkdir(parents=True)
    x0_file = run / "sdxl_lightning_1step_unet_x0.safetensors"
    sh.copy(root / "student_unet.safetensors", x0_file)
    assert sample.default_prediction(str(x0_file), str(root), 1) == "sample"
    assert sample.default_prediction("base", "x/sdxl_lightning_1step_x0.safetensors", 1) == "sample"
    assert sample.default_prediction(str(root / "student_unet.safetensors"), str(root), 1) == "epsilon"
    assert sample.default_prediction(None, str(root), 1) == "sample"
    assert sample.default_prediction(None, str(root), 4) == "epsilon"
    other = tmp_path / "other"
    other.mkdir()
    sh.copy(root / "student_unet.safetensors", other / "student.safetensors")
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel",
                                                   "prediction_type": "sample"}))
    assert sample.default_prediction(str(other / "student.safetensors"), str(root), 1) == "sample"
    (other / "config.json").write_text(json.dumps({"prediction_type": "v_prediction"}))
    assert "v_prediction" in _main_error("a cat", "--base", root, "--unet", other / "student.safetensors",
                                         "--steps", 1,
                                         "--width", W, "--height", H, "--out", tmp_path / "bad.png")
    common = ["a cat", "--base", root, "--steps", 1, "--width", W, "--height", H]
    _main(*common, "--unet", x0_file, "--out", tmp_path / "auto.png")
    _main(*common, "--unet", x0_file, "--prediction", "sample", "--out", tmp_path / "x0.png")
    _main(*common, "--unet", x0_file, "--prediction", "epsilon", "--out", tmp_path / "eps.png")
    assert np.array_equal(_png(tmp_path / "auto.png"), _png(tmp_path / "x0.png"))
    assert np.abs(_png(tmp_path / "auto.png") - _png(tmp_path / "eps.png")).max() > 10


def _inductor_works():
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(3))
        return None
    except Exception as e:  # no C++ compiler, no Python headers, ...
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def test_compile_matches_eager(base, tmp_path):
    """--compile (torch.compile of the UNet) gives the eager latents to float tolerance: tiny UNet, one
    step."""
    why = _inductor_works()
    if why:
        pytest.skip(f"torch.compile's inductor toolchain is unusable here ({why})")
    import copy
    root, _ = base
    text, unet, vae = sample.load(str(root), str(root / "student_unet.safetensors"), None, 1,
                                  torch.device("cpu"), torch.float32)
    eager = sample.generate(text, unet, vae, ["a cat"], 1, 0, W, H, "sample", decode=False)
    compiled = copy.deepcopy(unet)
    compiled.compile()
    ours = sample.generate(text, compiled, vae, ["a cat"], 1, 0, W, H, "sample", decode=False)
    report("compiled vs eager latents, 1 step", ours, eager)
    assert_close(ours, eager, atol=1e-5, rtol=1e-5)
    common = ["a cat", "--base", root, "--unet", root / "student_unet.safetensors", "--steps", 1, "--width",
              W, "--height", H]
    _main(*common, "--compile", "--out", tmp_path / "compiled.png")  # the flag, as a user runs it
    _main(*common, "--out", tmp_path / "eager.png")
    assert np.abs(_png(tmp_path / "compiled.png") - _png(tmp_path / "eager.png")).max() <= 1


def test_help_explains_every_flag():
    parser_help = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--help"],
                                 capture_output=True, text=True)
    assert parser_help.returncode == 0
    for action in sample.build_parser()._actions:
        assert action.help and len(action.help) > 10, action.dest
        for flag in action.option_strings:
            assert flag in parser_help.stdout


# ----------------------------------------------------------------------------------------------------
# Issues 18, 19: inputs checked before loading, decompression bombs, resuming --prompts, a real full disk


@pytest.mark.parametrize("case", ["missing_unet", "junk_unet", "unet_folder", "junk_lora", "unet_as_lora",
                                  "lora_folder"])
def test_unet_and_lora_files_checked_before_anything_is_loaded(base, tmp_path, monkeypatch, case):
    """Issue 19.8: a missing or foreign --unet / --lora was refused only after the text encoders and VAE had
    loaded; now by its header (no tensor read) before anything is loaded."""
    root, _ = base

    def no_loading(*a, **k):
        raise AssertionError("loaded the text encoders before checking --unet / --lora")
    monkeypatch.setattr(weights, "load_text", no_loading)
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    (tmp_path / "dir").mkdir()
    unet, lora = {"missing_unet": (tmp_path / "nope.safetensors", None),
                  "junk_unet": (tmp_path / "junk.safetensors", None),
                  "unet_folder": (tmp_path / "dir", None),
                  "junk_lora": ("base", tmp_path / "junk.safetensors"),
                  "unet_as_lora": ("base", root / "student_unet.safetensors"),
                  "lora_folder": ("base", tmp_path / "dir")}[case]
    msg = _main_error("a cat", "--base", root, "--unet", unet, *(["--lora", lora] if lora else []),
                      "--width", W, "--height", H, "--out", tmp_path / "x.png")
    assert {"missing_unet": "nope.safetensors: no such file", "junk_unet": "not a readable .safetensors",
            "unet_folder": "is a folder", "junk_lora": "not a readable .safetensors",
            "unet_as_lora": "not a kohya LoRA", "lora_folder": "dir: is a folder"}[case] in msg
    assert not (tmp_path / "x.png").exists()


def test_decompression_bomb_image_is_one_line(base, tmp_path, monkeypatch):
    """Issue 19.6: Pillow's DecompressionBombError for --image was a traceback."""
    root, _ = base
    photo = _photo(tmp_path / "bomb.png")  # 61 x 45 = 2745 pixels, over twice the limit below
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    msg = _main_error("a cat", "--base", root, "--unet", "base", "--image", photo, "--strength", 0.5,
                      "--out", tmp_path / "x.png")
    assert f"--image {photo}: too many pixels, refused as a possible decompression bomb" in msg
    assert not (tmp_path / "x.png").exists()


class _Killed(BaseException):
    """A kill -9 stand-in: nothing catches it, nothing cleans up."""


def test_resume_prompts_run_and_manifest_stays_true(base, tmp_path, monkeypatch):
    """Issue 19.7: an interrupted --prompts run restarted from image 0, and after a second kill the manifest
    listed fewer images than were on disk. Now: an image on disk listed with the same prompt, seed and
    settings is kept; the manifest lists exactly this job list's images on disk after every kill."""
    root, _ = base
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\na red car\nthe snow\n")
    folder = tmp_path / "o"

    def run(out=folder / "img.png", steps=2):
        _main("--prompts", prompts, "--base", root, "--unet", root / "student_unet.safetensors", "--width", W,
              "--height", H, "--steps", steps, "--seed", 5, "--out", out)
    run(tmp_path / "ref" / "img.png")  # uninterrupted
    generated, real_generate, real_save = [], sample.generate, sample.save_image

    def counting(*a, **k):
        generated.extend(a[3])
        return real_generate(*a, **k)
    monkeypatch.setattr(sample, "generate", counting)

    def killed_at(n):  # the n-th save (0-based) is killed before its file is written
        saved = []

        def save(img, path):
            if len(saved) == n:
                raise _Killed
            saved.append(path)
            real_save(img, path)
        return save

    def listed():
        files_listed = [json.loads(s)["file"] for s in (folder / "prompts.jsonl").read_text().splitlines()]
        assert files_listed == sorted(p.name for p in folder.glob("*.png"))  # exactly the images on disk
        return files_listed
    monkeypatch.setattr(sample, "save_image", killed_at(2))
    with pytest.raises(_Killed):
        run()
    assert listed() == ["img_00000.png", "img_00001.png"]
    generated.clear()
    monkeypatch.setattr(sample, "save_image", killed_at(1))
    with pytest.raises(_Killed):
        run()  # a second kill
    assert generated == ["a red car", "the snow"]  # resumed at image 2, not 0
    assert listed() == ["img_00000.png", "img_00001.png", "img_00002.png"]
    generated.clear()
    monkeypatch.setattr(sample, "save_image", real_save)
    run()
    assert generated == ["the snow"]
    assert listed() == [f"img_{i:05d}.png" for i in range(4)]
    for i in range(4):  # the same images as the uninterrupted run
        assert np.array_equal(_png(folder / f"img_{i:05d}.png"), _png(tmp_path / "ref" / f"img_{i:05d}.png"))
    # everything done: nothing is loaded
    monkeypatch.setattr(weights, "load_text", lambda *a, **k: (_ for _ in ()).throw(AssertionError("load")))
    run()
    monkeypatch.undo()
    monkeypatch.setattr(sample, "generate", counting)
    # an image whose manifest line has another prompt, or whose file is gone, is redone; other settings
    # (here --steps) redo every image instead of keeping stale ones
    lines = (folder / "prompts.jsonl").read_text().splitlines()
    lines[1] = lines[1].replace("a dog", "a doge")
    (folder / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "img_00003.png").unlink()
    generated.clear()
    run()
    assert generated == ["a dog", "the snow"]
    generated.clear()
    run(steps=4)
    assert generated == ["a cat", "a dog", "a red car", "the snow"]
    assert listed() == [f"img_{i:05d}.png" for i in range(4)]


def test_full_disk_for_real_is_one_line_and_keeps_the_old_file(base, small_disk):
    """Issue 18: a real full disk (a tiny tmpfs): one line naming the file, the previous file untouched, no
    temp file."""
    root, _ = base
    disk = small_disk.path
    (disk / "x.png").write_bytes(b"the previous image")
    small_disk(free=0)
    msg = _main_error("a cat", "--base", root, "--unet", "base", "--width", W, "--height", H,
                      "--out", disk / "x.png")
    assert f"{disk / 'x.png'}: the disk is full" in msg
    assert (disk / "x.png").read_bytes() == b"the previous image"
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "x.png"]


# ----------------------------------------------------------------------------------------------------
# --vae: the tiny preview VAE (TAESDXL layout) in place of the base's


@pytest.fixture(scope="module")
def taesd(base):
    """A tiny random AutoencoderTiny saved by diffusers as madebyollin/taesdxl is (config.json + weights)."""
    from tools.tiny import diffusers_tiny_vae
    root, _ = base
    tiny = diffusers_tiny_vae(seed=4)
    tiny.save_pretrained(root / "taesd")
    return root / "taesd", tiny


def test_tiny_vae_equals_diffusers_pipeline_with_autoencoder_tiny(base, taesd, tmp_path):
    """`--vae PATH` with a tiny TAESD: text-to-image and img2img equal diffusers' pipelines given
    vae=AutoencoderTiny and the Lightning scheduler."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    root, pipe = base
    folder, tiny = taesd
    text, unet, vae = sample.load(str(root), str(root / "student_unet.safetensors"), None, 4,
                                  torch.device("cpu"), torch.float32, vae=str(folder))
    assert type(vae).__name__ == "TinyVAE"
    student = StableDiffusionXLPipeline_from(pipe, root)
    ref = StableDiffusionXLPipeline(**{**student.components, "vae": tiny})
    ref.scheduler = lightning_scheduler(pipe)
    ref.set_progress_bar_config(disable=True)
    ours = (sample.generate(text, unet, vae, ["a cat"], 4, 0, W, H) / 2 + 0.5).clamp(0, 1)
    theirs = ref("a cat", num_inference_steps=4, guidance_scale=0, width=W, height=H,
                 generator=torch.Generator("cpu").manual_seed(0), output_type="pt").images
    report("tiny VAE image 4 steps", ours, theirs)
    assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    full = (sample.generate(text, unet, sample.load(str(root), "base", None, 4, torch.device("cpu"),
                                                    torch.float32)[2], ["a cat"], 4, 0, W, H) / 2 + 0.5)
    assert (full.clamp(0, 1) - ours).abs().max() > 0.05  # the other decoder was used
    # img2img: the tiny encoder's latent, no posterior draw, then the same noise as diffusers
    image, _ = sample.load_image(_photo(tmp_path / "in.png"), W, H)
    ours = (sample.generate(text, unet, vae, ["a red car"], 4, 5, W, H, image=image, strength=0.5) / 2
            + 0.5).clamp(0, 1)
    ref2 = StableDiffusionXLImg2ImgPipeline(**{**student.components, "vae": tiny})
    ref2.scheduler = lightning_scheduler(pipe)
    ref2.set_progress_bar_config(disable=True)
    theirs = ref2("a red car", image=ref2.image_processor.resize(Image.open(tmp_path / "in.png"), H, W),
                  strength=0.5, num_inference_steps=4, guidance_scale=0,
                  generator=torch.Generator("cpu").manual_seed(5), output_type="pt").images
    report("tiny VAE img2img 4 steps strength 0.5", ours, theirs)
    assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_vae_tiny_cli_through_hub_cache_and_bad_vae(base, taesd, tmp_path, monkeypatch):
    """`--vae tiny` fetches madebyollin/taesdxl through the hub cache (pre-filled, offline) and writes the
    same PNG as `--vae PATH`; a bad --vae is one line before anything is loaded."""
    import huggingface_hub.constants
    root, _ = base
    folder, _ = taesd
    cache = tmp_path / "hub"
    fill_hub_cache(cache, weights.TINY_VAE_REPO, {p.name: p for p in folder.iterdir()})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    common = ["a cat", "--steps", "2", "--base", root, "--unet", "base", "--width", W, "--height", H]
    _main(*common, "--vae", "tiny", "--out", tmp_path / "hub.png")
    _main(*common, "--vae", folder / "diffusion_pytorch_model.safetensors", "--out", tmp_path / "file.png")
    assert (_png(tmp_path / "hub.png") == _png(tmp_path / "file.png")).all()
    _main(*common, "--out", tmp_path / "full.png")
    assert np.abs(_png(tmp_path / "hub.png") - _png(tmp_path / "full.png")).max() > 10
    save_file({"conv_in.weight": torch.zeros(1)}, tmp_path / "unet.safetensors")
    monkeypatch.setattr(weights, "load_text", lambda *a, **k: pytest.fail("loaded before checking --vae"))
    assert "expected AutoencoderTiny keys" in _main_error(*common, "--vae", tmp_path / "unet.safetensors",
                                                          "--out", tmp_path / "x.png")
    assert "no such file" in _main_error(*common, "--vae", tmp_path / "no.safetensors", "--out",
                                         tmp_path / "x.png")

# Issue 17: the fast path. Each speed option gives the plain path's image to float tolerance (CPU, tiny)

def _fast_copy(unet, vae, **opts):
    import copy
    return sample.make_fast(copy.deepcopy(unet), copy.deepcopy(vae), torch.device("cpu"), **opts)


def test_speed_options_keep_the_image(base, tmp_path):
    """--channels-last, --fuse-qkv and both together (what --fast turns on on the CPU) against the plain
    path: 4 steps, decoded; the command line with --fast against the plain PNG; --compile's mode reaches the
    UNet and the VAE decoder (its numbers: test_compile_matches_eager)."""
    root, _ = base
    text, unet, vae = sample.load(str(root), str(root / "student_unet.safetensors"), None, 4,
                                  torch.device("cpu"), torch.float32)
    plain = sample.generate(text, unet, vae, ["a red car"], 4, 0, W, H)
    for opts in [{"channels_last": True}, {"fuse_qkv": True}, {"channels_last": True, "fuse_qkv": True}]:
        fast_unet, fast_vae = _fast_copy(unet, vae, **opts)
        ours = sample.generate(text, fast_unet, fast_vae, ["a red car"], 4, 0, W, H)
        report(f"{opts} vs plain, 4 steps", ours, plain)
        assert_close(ours, plain, atol=2e-5, rtol=1e-5)
    args = sample.parse_args(["a", "--fast"])
    assert sample.speed_options(args, torch.device("cpu")) == \
        {"channels_last": True, "fuse_qkv": True, "compile": None, "cuda_graphs": False}
    assert sample.speed_options(args, torch.device("cuda")) == \
        {"channels_last": True, "fuse_qkv": True, "compile": "default", "cuda_graphs": True}
    assert sample.parse_args(["a", "--compile"]).compile == "default"  # the old flag still works
    steered = sample.parse_args(["a", "--fast", "--controlnet", "c", "--control-image", "i.png"])
    assert sample.speed_options(steered, torch.device("cuda"))["cuda_graphs"] is False  # residual lists
    with pytest.raises(ValueError, match="--cuda-graphs does not take --controlnet"):
        sample.speed_options(sample.parse_args(["a", "--cuda-graphs", "--controlnet", "c", "--control-image",
                                                "i.png"]), torch.device("cuda"))
    compiled_unet, compiled_vae = _fast_copy(unet, vae, compile="max-autotune-no-cudagraphs")  # not run here
    assert compiled_unet._compiled_call_impl is not None
    assert compiled_vae.decoder._compiled_call_impl is not None
    assert set(compiled_unet.state_dict()) == set(unet.state_dict())  # checkpoint names unchanged
    common = ["a red car", "--base", root, "--unet", root / "student_unet.safetensors", "--width", W,
              "--height", H]
    _main(*common, "--fast", "--out", tmp_path / "fast.png")
    _main(*common, "--out", tmp_path / "plain.png")
    assert np.abs(_png(tmp_path / "fast.png") - _png(tmp_path / "plain.png")).max() <= 1
    assert "--cuda-graphs needs a CUDA device" in _main_error(*common, "--cuda-graphs", "--device", "cpu",
                                                             "--out", tmp_path / "x.png")


def test_fused_qkv_keeps_the_checkpoint_keys():
    """fuse_qkv is one matmul over views of the original weights: the same state_dict keys and values, a
    strict load into a fused UNet reaches its fused matmul, a dtype move re-fuses, and the output equals the
    unfused UNet's."""
    torch.manual_seed(0)
    ref = diffusers_unet(seed=3)
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    plain = unet_mod.UNet(TINY_UNET).eval()
    plain.load_state_dict(sd, strict=True)
    fused = unet_mod.UNet(TINY_UNET).eval().fuse_qkv()  # fused first, loaded after: writes through
    fused.load_state_dict(sd, strict=True)
    attn = fused.down_blocks[1].attentions[0].transformer_blocks[0]
    assert attn.attn1.fused == 3 and attn.attn2.fused == 2
    width = TINY_UNET.block_out_channels[1]
    assert attn.attn1.to_k.weight.data_ptr() == attn.attn1._fused_weight[width:].data_ptr()  # a view
    assert list(fused.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(v, sd[k]) for k, v in fused.state_dict().items())
    g = torch.Generator().manual_seed(0)
    x, ctx, pooled = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 77, 80, generator=g), \
        torch.randn(2, 48, generator=g)
    ids, t = torch.tensor([[16.0, 24, 0, 0, 16, 24]] * 2), torch.tensor([999, 500])
    with torch.no_grad():
        want = plain(x, t, ctx, pooled, ids)
        got = fused(x, t, ctx, pooled, ids)
        report("fused q/k/v vs plain UNet", got, want)
        assert_close(got, want, atol=1e-5, rtol=1e-5)
        fused = fused.double()  # _apply re-fuses the moved weights
        assert_close(fused(x.double(), t, ctx.double(), pooled.double(), ids.double()).float(), want,
                     atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graphs_equal_eager_on_gpu():
    """GraphedUNet replays the captured UNet call: the eager output, at each of 4 steps' inputs."""
    unet = unet_mod.UNet(TINY_UNET).cuda().eval()
    unet.load_state_dict(diffusers_unet(seed=3).state_dict(), strict=True)
    graphed = sample.GraphedUNet(unet)
    g = torch.Generator().manual_seed(0)
    ctx, pooled = torch.randn(1, 77, 80, generator=g).cuda(), torch.randn(1, 48, generator=g).cuda()
    ids = torch.tensor([[32.0, 48, 0, 0, 32, 48]]).cuda()
    with torch.no_grad():
        for t in (999, 749, 499, 249):
            x = torch.randn(1, 4, 16, 24, generator=g).cuda()
            tt = torch.tensor([t]).cuda()
            want = unet(x, tt, ctx, pooled, ids)
            assert_close(graphed(x, tt, ctx, pooled, ids), want, atol=1e-5, rtol=1e-5)
    assert len(graphed.graphs) == 1
