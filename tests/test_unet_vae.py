"""Our UNet and VAE against diffusers: same keys and shapes at full SDXL size (meta device), same
numbers on tiny random-weight configs in float32. The single-file renames are tested in test_convert.py."""
import pytest
import torch
from torch.testing import assert_close

import unet as unet_mod
import vae as vae_mod
from tools.tiny import TINY_UNET, TINY_VAE, diffusers_unet, diffusers_vae, report


def _kwargs(cfg):
    return {k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}


@pytest.mark.parametrize("part,n_keys,n_params", [("unet", 1680, 2_567_463_684), ("vae", 248, 83_653_863)])
def test_full_size_keys_and_shapes_equal_diffusers(part, n_keys, n_params):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    ref_cls, cls, cfg = {"unet": (UNet2DConditionModel, unet_mod.UNet, unet_mod.UNetConfig()),
                         "vae": (AutoencoderKL, vae_mod.VAE, vae_mod.VAEConfig())}[part]
    with torch.device("meta"):
        ref, ours = ref_cls(**_kwargs(cfg)), cls(cfg)
    a = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert len(b) == n_keys and sum(v.numel() for v in ours.state_dict().values()) == n_params
    assert a == b


def test_sdxl_base_config_json_reads_as_defaults():
    # The values of stabilityai/stable-diffusion-xl-base-1.0/unet/config.json that matter here.
    cfg = {"addition_embed_type": "text_time", "addition_time_embed_dim": 256,
           "attention_head_dim": [5, 10, 20],
           "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
           "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
           "in_channels": 4, "layers_per_block": 2, "out_channels": 4,
           "projection_class_embeddings_input_dim": 2816,
           "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True, "norm_num_groups": 32}
    assert unet_mod.UNetConfig.from_diffusers(cfg) == unet_mod.UNetConfig()


def test_sd15_config_is_refused():
    cfg = {"block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "attention_head_dim": 8,
           "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]}
    with pytest.raises(ValueError, match="not an SDXL-architecture UNet"):
        unet_mod.UNetConfig.from_diffusers(cfg, "sd15/unet/config.json")


def _unet_inputs(cfg, B=2, H=16, W=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 4, H, W, generator=g), torch.tensor([999, 250]),
            torch.randn(B, 7, cfg.cross_attention_dim, generator=g),
            torch.randn(B, cfg.pooled_dim, generator=g),
            torch.tensor([[64.0, 96, 0, 0, 64, 96], [80, 80, 8, 4, 64, 96]]))


def test_unet_forward_equals_diffusers():
    ref = diffusers_unet()
    ours = unet_mod.UNet(TINY_UNET).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, t, ctx, pooled, ids = _unet_inputs(TINY_UNET)
    with torch.no_grad():
        a = ref(x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        b = ours(x, t, ctx, pooled, ids)
        h, _, _ = ours.encode(x, t, ctx, pooled, ids)
    report("unet forward", b, a)
    assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert h.shape == (2, 128, 8, 12)  # the encoder path stops after the mid block


def test_unet_gradient_checkpointing_same_grads():
    torch.manual_seed(0)
    m = unet_mod.UNet(TINY_UNET)
    x, t, ctx, pooled, ids = _unet_inputs(TINY_UNET)
    m(x, t, ctx, pooled, ids).square().mean().backward()
    g1 = {k: p.grad.clone() for k, p in m.named_parameters()}
    m.zero_grad()
    m.gradient_checkpointing = True
    m(x, t, ctx, pooled, ids).square().mean().backward()
    for k, p in m.named_parameters():
        assert_close(p.grad, g1[k], atol=1e-6, rtol=1e-5)


def test_vae_encode_decode_equal_diffusers():
    ref = diffusers_vae()
    ours = vae_mod.VAE(TINY_VAE).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 48, generator=g) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        mean, logvar = ours.encode(x)
        z = torch.randn(2, 4, 8, 12, generator=g)
        a, b = ref.decode(z).sample, ours.decode(z)
        sliced = ours.encode_latents(x, slice_size=1)
    report("vae encode mean", mean, dist.mean)
    report("vae decode", b, a)
    assert_close(mean, dist.mean, atol=1e-5, rtol=1e-5)
    assert_close(logvar, dist.logvar, atol=1e-5, rtol=1e-5)
    assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert_close(sliced, dist.mean * TINY_VAE.scaling_factor, atol=1e-5, rtol=1e-5)


def test_bench_runs_and_compares_the_same_computation(tmp_path):
    """bench.py's smoke run: ours and diffusers computed the same UNet output (speed itself is not a test)."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "tools.bench", "--config", "tiny", "--what", "unet", "--runs",
                        "1", "--warmup", "0",
                        "--json", str(tmp_path / "b.json")], cwd=root, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "b.json").read_text())["results"][0]
    assert res["max_abs_diff"] < 1e-4 and res["ours_ms"] > 0 and res["diffusers_ms"] > 0


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool])
def test_non_float_unet_vae_text_tensors_are_one_line(tmp_path, dtype):
    """Issue 18: a UNet or VAE file (or a single file's UNet, VAE, text encoder part) with int8 / bool tensors
    is one line naming the file, the first such key and its dtype, not torch's hundreds of lines."""
    import json
    from safetensors.torch import save_file
    import weights
    from tools.tiny import tiny_text_models
    name = str(dtype).removeprefix("torch.")
    unet_sd = {k: v.contiguous() for k, v in diffusers_unet().state_dict().items()}
    vae_sd = {k: v.contiguous() for k, v in diffusers_vae().state_dict().items()}

    def refused(load, path, key):
        with pytest.raises(weights.CheckpointError) as e:
            load()
        msg = str(e.value)
        print(msg)
        assert "\n" not in msg and len(msg) < 300
        assert msg.startswith(f"{path}: ") and f" {key} is {name}, not a floating-point tensor" in msg, msg

    key = "down_blocks.1.attentions.0.proj_in.weight"
    save_file({**unet_sd, key: unet_sd[key].to(dtype)}, tmp_path / "u.safetensors")
    refused(lambda: weights.load_unet(str(tmp_path / "u.safetensors"), TINY_UNET), tmp_path / "u.safetensors",
            key)
    refused(lambda: weights.check_unet_file(tmp_path / "u.safetensors"), tmp_path / "u.safetensors", key)
    (tmp_path / "base" / "vae").mkdir(parents=True)
    (tmp_path / "base" / "vae" / "config.json").write_text(json.dumps(TINY_VAE.to_diffusers()))
    vkey = "decoder.up_blocks.0.resnets.0.conv1.weight"
    vae_file = tmp_path / "base" / "vae" / "diffusion_pytorch_model.safetensors"
    save_file({**vae_sd, vkey: vae_sd[vkey].to(dtype)}, vae_file)
    refused(lambda: weights.load_vae(str(tmp_path / "base")), vae_file, vkey)
    te, te2 = tiny_text_models()
    single = weights.to_single_file(unet_sd, TINY_UNET, vae_sd, TINY_VAE, weights.canonical_state_dict(te),
                                    weights.canonical_state_dict(te2))
    for part in ("model.diffusion_model.", "first_stage_model.", weights.SGM_CLIP_L):
        k = sorted(k for k in single if k.startswith(part) and k.endswith("weight"))[2]
        path = tmp_path / "single.safetensors"
        save_file({**single, k: single[k].to(dtype)}, path)
        load = {"model.diffusion_model.": lambda: weights.load_unet(str(path)),
                "first_stage_model.": lambda: weights.load_vae(str(path)),
                weights.SGM_CLIP_L: lambda: weights.load_text_encoders(str(path))}[part]
        shown = weights.unet_from_sgm({k: single[k]}, TINY_UNET) if part == "model.diffusion_model." else \
            weights.vae_from_sgm({k: single[k]}, TINY_VAE) if part == "first_stage_model." else {k: 0}
        refused(load, path, next(iter(shown)))
