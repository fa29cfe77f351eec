"""The whole sampler against diffusers' StableDiffusionXLPipeline with the SDXL-Lightning scheduler, on a
tiny random-weight SDXL; the `sample.py` command line through the default hub path with a pre-filled cache
and HF_HUB_OFFLINE=1; single-file checkpoints; bad input."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch.testing import assert_close

import sample
import unet as unet_mod
import weights
from tests.tiny import TINY_UNET, diffusers_unet, fill_hub_cache, lightning_scheduler, make_tiny_base, report

ROOT = Path(__file__).resolve().parents[1]
W, H = 48, 32  # a non-square size; the tiny VAE downsamples 2x


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_base")
    pipe = make_tiny_base(root)
    # a distilled UNet stand-in: other random weights, saved as the official files are (fp16, diffusers keys)
    student = diffusers_unet(seed=7)
    save_file({k: v.half().contiguous() for k, v in student.state_dict().items()}, root / "student_unet.safetensors")
    return root, pipe


def reference(pipe, root, steps, prediction="epsilon", guidance=0.0, seed=0, unet_file="student_unet.safetensors",
              prompt="a cat in a spacesuit", output_type="pt", num=1):
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
    return ref(prompt, num_inference_steps=steps, guidance_scale=guidance, width=W, height=H, num_images_per_prompt=num,
               generator=torch.Generator("cpu").manual_seed(seed), output_type=output_type).images


@pytest.mark.parametrize("steps,prediction", [(1, "sample"), (2, "epsilon"), (4, "epsilon"), (8, "epsilon")])
def test_sampler_equals_diffusers_pipeline(base, steps, prediction):
    root, pipe = base
    text, unet, vae = sample.load(str(root), str(root / "student_unet.safetensors"), None, steps, torch.device("cpu"), torch.float32)
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
    ours = (sample.generate(text, unet, vae, ["a dog"] * 2, 4, 3, W, H, "epsilon", guidance=6.0) / 2 + 0.5).clamp(0, 1)
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
    fill_hub_cache(cache, weights.LIGHTNING_REPO, {"sdxl_lightning_4step_unet.safetensors": root / "student_unet.safetensors"})
    r = _cli("a cat in a spacesuit", "--steps", "4", "--width", str(W), "--height", str(H), "--out", str(tmp_path / "cat.png"),
             env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}, cwd=tmp_path)
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
    import convert
    from tests.tiny import TINY_VAE
    te = weights.load_text(str(root))
    sd = convert.to_single_file(pipe.unet.state_dict(), TINY_UNET, pipe.vae.state_dict(), TINY_VAE,
                                convert.canonical_state_dict(te.text_encoder),
                                convert.canonical_state_dict(te.text_encoder_2))
    save_file({k: v.contiguous() for k, v in sd.items()}, path)


def test_single_file_base_equals_diffusers_folder(base, tmp_path):
    root, pipe = base
    path = tmp_path / "all_in_one.safetensors"
    _single_file(root, pipe, path)
    cache = tmp_path / "hub"  # tokenizers of a single file come from the SDXL base repo
    fill_hub_cache(cache, weights.SDXL_BASE, {str(p.relative_to(root)): p for p in root.rglob("*") if "tokenizer" in str(p) and p.is_file()})
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    r = _cli("a cat", "--steps", "2", "--base", str(path), "--unet", "base", "--width", str(W), "--height", str(H),
             "--out", str(tmp_path / "single.png"), env=env)
    assert r.returncode == 0, r.stderr
    ref = reference(pipe, root, 2, unet_file=None, prompt="a cat", output_type="pil")[0]
    ref.save(tmp_path / "ref.png")
    a, b = _png(tmp_path / "single.png"), _png(tmp_path / "ref.png")
    print(f"single-file PNG vs diffusers folder pipeline: max abs diff {np.abs(a - b).max()}")
    assert np.abs(a - b).max() <= 1 and (a == b).mean() > 0.99


@pytest.mark.parametrize("case", ["steps", "size", "missing_base", "missing_unet", "missing_keys", "misshaped", "sd15",
                                  "pickle", "lora_as_unet"])
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
    unet_arg = {"missing_unet": str(tmp_path / "nope.safetensors"), "pickle": str(tmp_path / "u.ckpt")}.get(
        case, str(tmp_path / "u.safetensors"))
    args = {"steps": ["--steps", "3"], "size": ["--width", "50", "--unet", "base"],
            "missing_base": ["--base", str(tmp_path / "nowhere")], "pickle": ["--unet", unet_arg]}.get(case, ["--unet", unet_arg])
    r = _cli("a cat", *common, *args, env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty")})
    expect = {"steps": "supported: 1, 2, 4, 8", "size": "multiples of 8", "missing_base": "nowhere",
              "missing_unet": "nope.safetensors: no such file", "missing_keys": "2 missing keys (conv_out.weight",
              "misshaped": "conv_in.weight (file (64, 4, 1, 1), model (64, 4, 3, 3))", "sd15": "not an SDXL-architecture",
              "pickle": "pickled checkpoints are not loaded", "lora_as_unet": "LoRA file"}[case]
    print(case, "->", r.stderr.strip())
    assert r.returncode != 0
    assert expect in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "x.png").exists()


def test_lora_on_base_equals_diffusers_fuse_lora(base, tmp_path):
    """`--unet base --lora FILE` (the README's LoRA recipe) gives diffusers' load_lora_weights + fuse_lora image."""
    import lora as lora_mod
    root, pipe = base
    g = torch.Generator().manual_seed(3)
    u = unet_mod.UNet(TINY_UNET)
    sd = {}
    for name in lora_mod.lora_targets(u):
        w = u.get_submodule(name).weight
        k = lora_mod.kohya_name(name)
        sd[f"{k}.lora_down.weight"] = torch.randn(4, *w.shape[1:], generator=g) * 0.1
        sd[f"{k}.lora_up.weight"] = torch.randn(w.shape[0], 4, *([1, 1] if w.ndim == 4 else []), generator=g) * 0.1
        sd[f"{k}.alpha"] = torch.tensor(8.0)
    path = tmp_path / "my_lora.safetensors"
    save_file(sd, path)
    r = _cli("a cat", "--steps", "4", "--base", str(root), "--unet", "base", "--lora", str(path), "--width", str(W),
             "--height", str(H), "--out", str(tmp_path / "lora.png"))
    assert r.returncode == 0, r.stderr
    from diffusers import StableDiffusionXLPipeline
    import copy
    ref = StableDiffusionXLPipeline(**{**pipe.components, "unet": copy.deepcopy(pipe.unet)})  # keep the fixture's clean
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
