"""ControlNet (Sec. 5.3): our SDXL ControlNet and `sample.py --controlnet` against diffusers' ControlNetModel
and StableDiffusionXLControlNet(Img2Img)Pipeline with the Lightning scheduler, on tiny random weights; the
official config's keys and shapes on the meta device; bad input named in one line."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch.testing import assert_close

import sample
import unet as unet_mod
import weights
from tools.tiny import diffusers_unet, lightning_scheduler, make_tiny_base, randomize, report

W, H = 48, 32  # non-square; the tiny VAE downsamples 2x, so the tiny hint encoder has one strided conv
PROMPT = "a red car in the snow"

# diffusers/controlnet-canny-sdxl-1.0's config.json (the depth one has the same architecture)
OFFICIAL = {"_class_name": "ControlNetModel", "act_fn": "silu", "addition_embed_type": "text_time",
            "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
            "attention_head_dim": [5, 10, 20],
            "block_out_channels": [320, 640, 1280], "class_embed_type": None, "conditioning_channels": 3,
            "conditioning_embedding_out_channels": [16, 32, 96, 256],
            "controlnet_conditioning_channel_order": "rgb", "cross_attention_dim": 2048,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "downsample_padding": 1, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
            "flip_sin_to_cos": True, "freq_shift": 0, "global_pool_conditions": False, "in_channels": 4,
            "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
            "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
            "projection_class_embeddings_input_dim": 2816, "resnet_time_scale_shift": "default",
            "transformer_layers_per_block": [1, 2, 10], "upcast_attention": None,
            "use_linear_projection": True}
# the same at tools/tiny.py's TINY_UNET size (written out, not derived from our config)
TINY = {**OFFICIAL, "attention_head_dim": [1, 2], "block_out_channels": [64, 128],
        "conditioning_embedding_out_channels": [8, 16], "cross_attention_dim": 80,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"], "layers_per_block": 1,
        "projection_class_embeddings_input_dim": 48 + 6 * 256, "transformer_layers_per_block": [1, 2]}


def diffusers_controlnet(config=TINY, seed=1):
    from diffusers import ControlNetModel
    m = ControlNetModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    return randomize(m, seed).eval()  # random zero convs too, so the residuals matter


def _photo(path, size, seed):
    """A smooth random picture of another size than W x H (the control image is resized)."""
    small = np.random.default_rng(seed).integers(0, 256, (4, 5, 3)).astype(np.uint8)
    Image.fromarray(small).resize(size, Image.BICUBIC).save(path)
    return path


def close_latents(name, ours, theirs):
    """Latents of the tiny random base reach ~50-130, and the sampler alone (no ControlNet, test_sample)
    differs from diffusers' Euler steps by ~3e-7 of that in float32; so the tolerance is relative to their
    scale."""
    report(name, ours, theirs)
    scale = theirs.abs().max().item()
    print(f"  max |latent| {scale:.1f}: max err / scale {(ours - theirs).abs().max().item() / scale:.2e}")
    assert_close(ours, theirs, atol=5e-6 * scale, rtol=1e-5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny base folder, ControlNet 1 as a diffusers folder, ControlNet 2 as a lone .safetensors file (its
    config derived from shapes), two control images of other sizes."""
    root = tmp_path_factory.mktemp("cn")
    pipe = make_tiny_base(root / "base")
    nets = [diffusers_controlnet(seed=1), diffusers_controlnet(seed=2)]
    nets[0].save_pretrained(root / "cn1")
    save_file({k: v.contiguous() for k, v in nets[1].state_dict().items()}, root / "cn2.safetensors")
    images = [_photo(root / "edges.png", (61, 45), 0), _photo(root / "depth.png", (40, 64), 1)]
    text, unet, vae = sample.load(str(root / "base"), "base", None, 4, torch.device("cpu"), torch.float32)
    return dict(root=root, pipe=pipe, nets=nets, sources=[str(root / "cn1"), str(root / "cn2.safetensors")],
                images=images, models=(text, unet, vae))


def _controls(setup, scales, k=None):
    """What sample.py builds from --controlnet/--control-image/--control-scale."""
    out = []
    for source, path, scale in list(zip(setup["sources"], setup["images"], scales))[:k]:
        net = weights.load_controlnet(source)
        weights.check_controlnet_fits(net, setup["models"][1].config, source)
        out.append((net, sample.load_image(path, W, H, normalize=False)[0], scale))
    return out


def _reference(setup, scales, steps, prediction="epsilon", guidance=0.0, num=1, seed=0, output_type="pt",
               image=None, strength=None):
    from diffusers import StableDiffusionXLControlNetImg2ImgPipeline, StableDiffusionXLControlNetPipeline
    nets = setup["nets"][:len(scales)]
    cls = StableDiffusionXLControlNetPipeline if image is None else StableDiffusionXLControlNetImg2ImgPipeline
    ref = cls(**setup["pipe"].components, controlnet=nets[0] if len(nets) == 1 else nets)
    ref.scheduler = lightning_scheduler(setup["pipe"], prediction)
    ref.set_progress_bar_config(disable=True)
    controls = [Image.open(p) for p in setup["images"][:len(scales)]]
    kw = dict(image=controls[0] if len(nets) == 1 else controls) if image is None else \
        dict(control_image=controls[0] if len(nets) == 1 else controls, strength=strength,
             image=ref.image_processor.resize(Image.open(image), H, W))
    return ref(PROMPT, num_inference_steps=steps, guidance_scale=guidance, width=W, height=H,
               controlnet_conditioning_scale=scales[0] if len(nets) == 1 else scales,
               num_images_per_prompt=num,
               generator=torch.Generator("cpu").manual_seed(seed), output_type=output_type, **kw).images


@pytest.mark.parametrize("steps,prediction", [(1, "sample"), (2, "epsilon"), (4, "epsilon"), (8, "epsilon")])
def test_controlnet_sampling_equals_diffusers_pipeline(setup, steps, prediction):
    text, unet, vae = setup["models"]
    controls = _controls(setup, [0.7], k=1)
    lat = sample.generate(text, unet, vae, [PROMPT], steps, 0, W, H, prediction, decode=False,
                          controls=controls)
    lat_ref = _reference(setup, [0.7], steps, prediction, output_type="latent")
    close_latents(f"controlnet latents {steps} steps {prediction}", lat, lat_ref)
    plain = sample.generate(text, unet, vae, [PROMPT], steps, 0, W, H, prediction, decode=False)
    assert (plain - lat).abs().max() > 0.05  # the ControlNet mattered
    if steps == 4:
        img = (sample.generate(text, unet, vae, [PROMPT], steps, 0, W, H, prediction, controls=controls) / 2
               + 0.5).clamp(0, 1)
        ref = _reference(setup, [0.7], steps, prediction)
        report("controlnet image 4 steps", img, ref)
        assert_close(img, ref, atol=1e-5, rtol=1e-5)


def test_two_controlnets_cfg_batch_and_img2img_equal_diffusers(setup):
    """MultiControlNet at two scales, with CFG over a batch of 2 (control images repeated and doubled), and
    with img2img (StableDiffusionXLControlNetImg2ImgPipeline, 4 steps at strength 0.5)."""
    text, unet, vae = setup["models"]
    controls = _controls(setup, [0.5, 1.3])
    lat = sample.generate(text, unet, vae, [PROMPT] * 2, 4, 3, W, H, guidance=5.0, decode=False,
                          controls=controls)
    ref = _reference(setup, [0.5, 1.3], 4, guidance=5.0, num=2, seed=3, output_type="latent")
    close_latents("2 controlnets (0.5, 1.3), cfg 5, batch 2", lat, ref)
    one = sample.generate(text, unet, vae, [PROMPT] * 2, 4, 3, W, H, guidance=5.0, decode=False,
                          controls=controls[:1])
    assert (one - lat).abs().max() > 0.05  # the second ControlNet mattered
    image, _ = sample.load_image(setup["images"][1], W, H)
    lat = sample.generate(text, unet, vae, [PROMPT], 4, 5, W, H, decode=False, controls=controls,
                          image=image, strength=0.5)
    ref = _reference(setup, [0.5, 1.3], 4, seed=5, output_type="latent", image=setup["images"][1],
                     strength=0.5)
    close_latents("2 controlnets, img2img strength 0.5", lat, ref)


def test_controlnet_forward_and_controlled_unet_equal_diffusers(setup):
    """The residuals alone vs ControlNetModel (scale 0.6), and the UNet with them vs UNet2DConditionModel's
    down_block_additional_residuals / mid_block_additional_residual."""
    ref, ref_unet = setup["nets"][0], diffusers_unet(seed=3)
    ours = weights.load_controlnet(setup["sources"][0])
    unet = unet_mod.UNet(setup["models"][1].config)
    unet.load_state_dict(ref_unet.state_dict(), strict=True)
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 4, H // 2, W // 2, generator=g), torch.rand(2, 3, H, W, generator=g)
    ctx, pooled = torch.randn(2, 77, 80, generator=g), torch.randn(2, 48, generator=g)
    ids, t = torch.tensor([[H, W, 0, 0, H, W]] * 2, dtype=torch.float32), torch.tensor([999, 249])
    with torch.no_grad():
        added = {"text_embeds": pooled, "time_ids": ids}
        down_ref, mid_ref = ref(x, t, ctx, cond, 0.6, added_cond_kwargs=added, return_dict=False)
        down, mid = ours(x, t, ctx, pooled, ids, cond, 0.6)
        assert len(down) == len(down_ref) == 4
        for i, (a, b) in enumerate(zip(down + [mid], list(down_ref) + [mid_ref])):
            report(f"residual {i} {tuple(a.shape)}", a, b)
            assert_close(a, b, atol=1e-5, rtol=1e-5)
        out_ref = ref_unet(x, t, ctx, added_cond_kwargs=added, down_block_additional_residuals=down_ref,
                           mid_block_additional_residual=mid_ref).sample
        out = unet_mod.ControlledUNet(unet, [(ours, cond, 0.6)])(x, t, ctx, pooled, ids)
    report("UNet + residuals", out, out_ref)
    assert_close(out, out_ref, atol=1e-5, rtol=1e-5)


def test_official_config_keys_and_shapes_on_meta():
    """diffusers' ControlNetModel(**the official config) and ours from the same config.json (and from our
    defaults, which are the official values): the same keys and shapes, 1,251,014,160 parameters."""
    from diffusers import ControlNetModel
    cfg = unet_mod.ControlNetConfig.from_diffusers(OFFICIAL)
    assert cfg == unet_mod.ControlNetConfig()
    with torch.device("meta"):
        theirs = ControlNetModel(**{k: v for k, v in OFFICIAL.items() if not k.startswith("_")}).state_dict()
        ours = unet_mod.ControlNet(cfg).state_dict()
    assert sorted(ours) == sorted(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert sum(v.numel() for v in ours.values()) == 1_251_014_160
    assert weights.controlnet_config_from_shapes(theirs) == cfg  # a lone file's config, from its shapes
    assert unet_mod.ControlNetConfig.from_diffusers(cfg.to_diffusers()) == cfg


def test_cli_equals_diffusers_png(setup, tmp_path, monkeypatch):
    """The documented command: two ControlNets at their scales, paired in order; the first by its hub id from a
    pre-filled offline cache (the same fetch as every other weight), the second a lone .safetensors file."""
    import huggingface_hub.constants
    from tools.tiny import fill_hub_cache
    root, repo = setup["root"], "diffusers/controlnet-canny-sdxl-1.0"
    fill_hub_cache(tmp_path / "hub", repo, {p.name: p for p in (root / "cn1").iterdir()})
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    out = tmp_path / "out.png"
    sample.main(["a red car in the snow", "--base", str(root / "base"), "--unet", "base", "--steps", "4",
                 "--width", str(W), "--height", str(H), "--out", str(out),
                 "--controlnet", repo, "--control-image", str(setup["images"][0]),
                 "--control-scale", "0.5", "--controlnet", setup["sources"][1],
                 "--control-image", str(setup["images"][1]), "--control-scale", "1.3"])
    ref = _reference(setup, [0.5, 1.3], 4, output_type="pil")[0]
    a, b = np.asarray(Image.open(out)).astype(int), np.asarray(ref).astype(int)
    print(f"PNG: max abs diff {np.abs(a - b).max()}, identical pixels {(a == b).mean():.4%}")
    assert a.shape == (H, W, 3) and np.abs(a - b).max() <= 1


def _error(*args):
    with pytest.raises(SystemExit) as e:
        sample.main([str(a) for a in args])
    msg = str(e.value.code)
    print("->", msg)
    assert msg.startswith("error: ") and "\n" not in msg
    return msg


def _sd15_controlnet(root):
    """A tiny SD1.5-style ControlNet: no add embedding, cross_attention_dim 768."""
    cfg = {k: v for k, v in TINY.items() if k not in ("addition_embed_type", "addition_time_embed_dim",
                                                      "projection_class_embeddings_input_dim")}
    net = diffusers_controlnet({**cfg, "cross_attention_dim": 768, "use_linear_projection": False})
    net.save_pretrained(root / "sd15")
    save_file(dict(net.state_dict()), root / "sd15.safetensors")


@pytest.mark.parametrize("case", ["sd15-folder", "sd15-file", "other-class", "other-base", "unet-file",
                                  "lora-file", "counts", "scales", "bad-image", "inf-scale", "missing"])
def test_bad_controlnet_input_is_one_clear_line(setup, tmp_path, case):
    root, (cn1, cn2), (img1, img2) = setup["root"], setup["sources"], setup["images"]
    base = ["a car", "--base", str(root / "base"), "--unet", "base", "--width", str(W), "--height", str(H),
            "--out", str(tmp_path / "o.png")]
    if case.startswith("sd15"):
        _sd15_controlnet(tmp_path)
        src = tmp_path / ("sd15" if case == "sd15-folder" else "sd15.safetensors")
        assert "SD1.x/2.x ControlNet" in _error(*base, "--controlnet", src, "--control-image", img1)
    elif case == "other-class":
        (tmp_path / "xs").mkdir()
        (tmp_path / "xs" / "config.json").write_text(json.dumps({**TINY,
                                                                 "_class_name": "ControlNetXSAdapter"}))
        assert "ControlNetXSAdapter, not a ControlNetModel" in \
            _error(*base, "--controlnet", tmp_path / "xs", "--control-image", img1)
    elif case == "other-base":  # an SDXL-architecture ControlNet of other widths than this UNet
        diffusers_controlnet({**TINY, "block_out_channels": [32, 64]}).save_pretrained(tmp_path / "narrow")
        msg = _error(*base, "--controlnet", tmp_path / "narrow", "--control-image", img1)
        assert "another base" in msg and "block_out_channels" in msg
    elif case == "unet-file":
        save_file(diffusers_unet().state_dict(), tmp_path / "unet.safetensors")
        assert "a UNet, not a ControlNet" in _error(*base, "--controlnet", tmp_path / "unet.safetensors",
                                                    "--control-image", img1)
    elif case == "lora-file":
        save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, tmp_path / "l.safetensors")
        assert "LoRA" in _error(*base, "--controlnet", tmp_path / "l.safetensors", "--control-image", img1)
    elif case == "counts":
        assert "1 --control-image" in _error(*base, "--controlnet", cn1, "--controlnet", cn2,
                                             "--control-image", img1)
    elif case == "scales":
        assert "1 --control-scale" in _error(*base, "--controlnet", cn1, "--controlnet", cn2,
                                             "--control-image", img1, "--control-image", img2,
                                             "--control-scale", "0.5")
    elif case == "bad-image":
        (tmp_path / "x.png").write_text("not an image")
        assert "--control-image" in _error(*base, "--controlnet", cn1, "--control-image", tmp_path / "x.png")
    elif case == "inf-scale":
        assert "finite" in _error(*base, "--controlnet", cn1, "--control-image", img1,
                                  "--control-scale", "inf")
    elif case == "missing":
        assert "no such file" in _error(*base, "--controlnet", tmp_path / "none.safetensors",
                                        "--control-image", img1)


def test_control_image_size(setup, tmp_path):
    """A control image of another size than the image is resized to it (diffusers' control image processor,
    exactly); generate() refuses a tensor of the wrong size; without --width/--height the first control image
    sets the size, rounded down to a multiple of 8, as diffusers' pipeline."""
    from diffusers.image_processor import VaeImageProcessor
    proc = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    ours, size = sample.load_image(setup["images"][0], W, H, normalize=False)
    assert_close(ours, proc.preprocess(Image.open(setup["images"][0]), height=H, width=W), atol=0, rtol=0)
    text, unet, vae = setup["models"]
    net = weights.load_controlnet(setup["sources"][0])
    with pytest.raises(ValueError, match="control image is 40x64, not 48x32"):
        sample.generate(text, unet, vae, [PROMPT], 1, 0, W, H, "sample",
                        controls=[(net, torch.zeros(1, 3, 64, 40), 1.0)])
    sample.main(["a car", "--base", str(setup["root"] / "base"), "--unet", "base", "--steps", "1",
                 "--controlnet", setup["sources"][0], "--control-image", str(setup["images"][0]),
                 "--out", str(tmp_path / "o.png")])
    assert Image.open(tmp_path / "o.png").size == (56, 40)  # 61x45 rounded down
