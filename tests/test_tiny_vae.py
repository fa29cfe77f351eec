"""The tiny preview VAE (TAESDXL, vae.TinyVAE) against diffusers' AutoencoderTiny: the same keys and shapes at
full size (meta device), the same numbers on a small random-weight config in float32; loading it from a
folder, a file or the hub cache, strictly, and the one-line refusals."""
import json

import pytest
import torch
from safetensors.torch import save_file
from torch.testing import assert_close

import vae as vae_mod
import weights
from tools.tiny import TINY_TAESD, TINY_VAE, diffusers_tiny_vae, diffusers_vae, fill_hub_cache, report


def test_full_size_keys_shapes_and_config_equal_diffusers():
    from diffusers import AutoencoderTiny
    with torch.device("meta"):
        ref, ours = AutoencoderTiny(), vae_mod.TinyVAE()
    a = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert a == b and len(b) == 134
    print(f"TAESDXL: {len(b)} keys, {sum(v.numel() for v in ours.state_dict().values()):,} parameters")
    # the hub's madebyollin/taesdxl config.json is diffusers' defaults: it reads back as our defaults
    theirs = {k: v for k, v in ref.config.items() if not k.startswith("_")}
    assert vae_mod.TinyVAEConfig.from_diffusers(theirs) == vae_mod.TinyVAEConfig()
    assert ours.config.downscale == 8 and ours.config.scaling_factor == 1.0


def _pair(seed=0):
    ref = diffusers_tiny_vae(seed=seed)
    ours = vae_mod.TinyVAE(TINY_TAESD).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def test_decode_and_encode_equal_diffusers():
    ref, ours = _pair()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 4, 12, 10, generator=g) * 2  # beyond the soft clamp's knee too
    x = torch.rand(2, 3, 24, 20, generator=g) * 2 - 1
    with torch.no_grad():
        a, b = ref.decode(z).sample, ours.decode(z)
        report("tiny decode", b, a)
        assert_close(b, a, atol=1e-5, rtol=1e-5)
        a, b = ref.encode(x).latents, ours.encode(x)
        report("tiny encode", b, a)
        assert_close(b, a, atol=1e-5, rtol=1e-5)
        assert b.shape == (2, 4, 12, 10)
        # the scaled helpers: scaling_factor 1.0, so the UNet's latents are the encoder's output
        assert_close(ours.encode_latents(x, slice_size=1), a, atol=1e-5, rtol=1e-5)
        assert_close(ours.decode_latents(z), ref.decode(z).sample, atol=1e-5, rtol=1e-5)
    assert (a - ref.encode(x * 0.5).latents).abs().max() > 1e-3  # the input matters


def _save_folder(model, folder):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(model.config.to_diffusers()
                                                   if isinstance(model, vae_mod.TinyVAE) else model))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              folder / "diffusion_pytorch_model.safetensors")


def test_load_from_diffusers_folder_file_and_hub_cache(tmp_path, monkeypatch):
    ref = diffusers_tiny_vae(seed=3)
    ref.save_pretrained(tmp_path / "taesd")  # diffusers writes the folder itself
    z = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref.decode(z).sample
        by_folder = weights.load_tiny_vae(str(tmp_path / "taesd"))
        assert by_folder.config == TINY_TAESD
        assert_close(by_folder.decode(z), want, atol=1e-5, rtol=1e-5)
        # a lone file carries no config: the architecture comes from its key names and shapes
        file = tmp_path / "taesd" / "diffusion_pytorch_model.safetensors"
        by_file = weights.load_vae_choice(str(file), "unused-base")
        assert isinstance(by_file, vae_mod.TinyVAE) and by_file.config == TINY_TAESD
        assert_close(by_file.decode(z), want, atol=1e-5, rtol=1e-5)
        # --vae tiny: madebyollin/taesdxl through the hub cache, as every other weight
        cache = tmp_path / "hub"
        fill_hub_cache(cache, weights.TINY_VAE_REPO, {p.name: p for p in (tmp_path / "taesd").iterdir()})
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        import huggingface_hub.constants
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
        by_hub = weights.load_vae_choice("tiny", "unused-base")
        assert_close(by_hub.decode(z), want, atol=1e-5, rtol=1e-5)
        # a full AutoencoderKL given as PATH: a folder (its class from config.json) or a lone file
        full = diffusers_vae(seed=2)
        full.save_pretrained(tmp_path / "full")
        for src in (tmp_path / "full", tmp_path / "full" / "diffusion_pytorch_model.safetensors"):
            m = weights.load_vae_choice(str(src), "unused-base")
            assert isinstance(m, vae_mod.VAE) and m.config.block_out_channels == TINY_VAE.block_out_channels
            assert_close(m.decode(z), full.decode(z).sample, atol=1e-5, rtol=1e-5)


def _one_line(fn, *args, match):
    with pytest.raises(weights.CheckpointError) as e:
        fn(*args)
    msg = str(e.value)
    print("->", msg)
    assert "\n" not in msg and match in msg
    return msg


def test_bad_inputs_are_refused_in_one_line(tmp_path):
    tiny, full = diffusers_tiny_vae(), diffusers_vae()
    tiny.save_pretrained(tmp_path / "tiny")
    full.save_pretrained(tmp_path / "full")
    full_file = tmp_path / "full" / "diffusion_pytorch_model.safetensors"
    tiny_file = tmp_path / "tiny" / "diffusion_pytorch_model.safetensors"
    # a full VAE given as the tiny one, a file and a folder, and the tiny one where a full one is wanted
    msg = _one_line(weights.load_tiny_vae, str(full_file), match="a full-size VAE (AutoencoderKL)")
    assert str(full_file) in msg
    _one_line(weights.load_tiny_vae, str(tmp_path / "full"), match="not the tiny VAE")
    _one_line(weights.load_vae_file, str(tiny_file), "cpu", torch.float32, "full",
              match="holds the tiny VAE (AutoencoderTiny), not a full-size VAE")
    # a folder whose config.json and weights disagree
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "config.json").write_text((tmp_path / "tiny" / "config.json").read_text())
    (mixed / "diffusion_pytorch_model.safetensors").write_bytes(full_file.read_bytes())
    _one_line(weights.load_vae_choice, str(mixed), "b", match="its config.json says AutoencoderTiny")
    # a missing, a renamed and a mis-shaped tensor: the file and the keys named
    sd = {k: v.contiguous() for k, v in tiny.state_dict().items()}
    bad = dict(sd)
    bad["decoder.layers.3.conv.2.b"] = bad.pop("decoder.layers.3.conv.2.bias")
    bad["encoder.layers.0.bias"] = torch.zeros(3)
    save_file(bad, tmp_path / "bad.safetensors")
    msg = _one_line(weights.load_vae_choice, str(tmp_path / "bad.safetensors"), "b",
                    match="does not fit TinyVAE")
    assert "1 missing keys (decoder.layers.3.conv.2.bias)" in msg
    assert "1 unexpected keys (decoder.layers.3.conv.2.b)" in msg
    assert "encoder.layers.0.bias (file (3,), model (16,))" in msg
    # not a VAE at all, a pickled file, a missing path, another activation
    save_file({"conv_in.weight": torch.zeros(1)}, tmp_path / "unet.safetensors")
    _one_line(weights.load_vae_choice, str(tmp_path / "unet.safetensors"), "b",
              match="expected AutoencoderTiny")
    (tmp_path / "taesd.pth").write_bytes(b"x")
    _one_line(weights.load_vae_choice, str(tmp_path / "taesd.pth"), "b", match="pickled")
    _one_line(weights.load_vae_choice, str(tmp_path / "nowhere"), "b", match="no such file")
    cfg = json.loads((tmp_path / "tiny" / "config.json").read_text())
    (tmp_path / "tiny" / "config.json").write_text(json.dumps({**cfg, "act_fn": "silu"}))
    _one_line(weights.load_tiny_vae, str(tmp_path / "tiny"), match="act_fn='silu' is not supported")


def test_bench_vae_rows(tmp_path, monkeypatch):
    """tools/bench.py --what vae at the tiny config: both rows, the same output as diffusers, and FLOPs that
    agree with diffusers' AutoencoderTiny and are below the full decoder's (no time is asserted)."""
    from tools import bench
    monkeypatch.setattr(bench, "_trim_heap", lambda: None)  # its gc.collect is seconds in a big test process
    bench.main(["--config", "tiny", "--what", "vae", "--runs", "1", "--warmup", "0", "--threads", "1",
                "--json", str(tmp_path / "b.json")])
    tiny_row, full_row = json.loads((tmp_path / "b.json").read_text())["results"]
    assert tiny_row["max_abs_diff"] == 0 and tiny_row["ratio"] > 0
    assert tiny_row["ours_gflop_1024px"] == tiny_row["diffusers_gflop_1024px"] > 0
    assert 0 < full_row["flop_ratio"] < 1 and full_row["full_gflop_1024px"] > full_row["ours_gflop_1024px"]
