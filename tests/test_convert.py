"""convert.py: every layout conversion against diffusers' own converters (tiny random weights and the full
SDXL key sets on the meta device), and the command that writes single files and diffusers folders,
checked by loading what it writes with diffusers (`from_single_file`, `from_pretrained`) and sampling."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from tools import convert
import lora
import unet as unet_mod
import vae as vae_mod
import weights
from tools.tiny import (TINY_UNET, TINY_VAE, diffusers_unet, diffusers_vae, lightning_scheduler,
                        make_tiny_base, report, write_noise_images)

ROOT = Path(__file__).resolve().parents[1]
W, H = 48, 32  # a non-square size; the tiny VAE downsamples 2x
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _kwargs(cfg):
    return {k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}


def _random_lora(seed, rank=4):
    """A kohya LoRA (diffusers spelling) with random nonzero down and up on every target of the tiny UNet."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        m = unet_mod.UNet(TINY_UNET)
    sd = {}
    for name in lora.lora_targets(m):
        w = m.get_submodule(name).weight
        k = lora.kohya_name(name)
        sd[f"{k}.lora_down.weight"] = torch.randn(rank, *w.shape[1:], generator=g) * 0.1
        sd[f"{k}.lora_up.weight"] = torch.randn(w.shape[0], rank,
                                                *([1, 1] if w.ndim == 4 else []), generator=g) * 0.1
        sd[f"{k}.alpha"] = torch.tensor(8.0)
    return sd


# ----------------------------------------------------------------------------------------------------
# Layouts

def test_unet_sgm_renames_equal_diffusers_converter():
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    ref = diffusers_unet()
    sgm = weights.unet_to_sgm(ref.state_dict(), TINY_UNET)
    assert all(k.startswith("model.diffusion_model.") for k in sgm)
    assert weights.unet_config_from_sgm(sgm) == TINY_UNET
    ours = weights.unet_from_sgm(sgm, TINY_UNET)
    theirs = convert_ldm_unet_checkpoint(sgm, _kwargs(TINY_UNET))
    assert set(ours) == set(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


def test_full_size_sgm_key_sets():
    """SDXL's real UNet and VAE (meta device): every key maps to SGM and back, the counts stay those of
    SDXL."""
    full_unet, full_vae = unet_mod.UNetConfig(), vae_mod.VAEConfig()
    with torch.device("meta"):
        names, vae_names = unet_mod.UNet(full_unet).state_dict(), vae_mod.VAE(full_vae).state_dict()
    assert len(names) == 1680 and sum(v.numel() for v in names.values()) == 2_567_463_684
    assert len(vae_names) == 248 and sum(v.numel() for v in vae_names.values()) == 83_653_863
    sgm = weights.unet_to_sgm(names, full_unet)
    assert len(sgm) == 1680 and weights.unet_config_from_sgm(sgm) == full_unet
    back = weights.unet_from_sgm(sgm, full_unet)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in names.items()}
    assert "model.diffusion_model.output_blocks.2.2.conv.weight" in sgm  # DESIGN's block map
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in sgm
    assert "model.diffusion_model.middle_block.2.emb_layers.1.weight" in sgm
    vae_sgm = weights.vae_to_sgm(vae_names, full_vae)
    assert len(vae_sgm) == 248 and weights.vae_config_from_sgm(vae_sgm) == full_vae
    assert vae_sgm["first_stage_model.decoder.mid.attn_1.proj_out.weight"].shape == (512, 512, 1, 1)
    # top decoder level, numbered bottom-up
    assert "first_stage_model.decoder.up.3.block.2.conv1.weight" in vae_sgm
    back = weights.vae_from_sgm(vae_sgm, full_vae)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in vae_names.items()}


def test_full_size_single_file_is_recognised_as_sdxl():
    """All of SDXL at full size (meta device) as one single file: diffusers' model-type detection (what it and
    other tools key on) calls it SDXL base, our key check passes, the text configs come back from the
    shapes."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    hub = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=0,
               eos_token_id=2,
               pad_token_id=1)  # stabilityai/stable-diffusion-xl-base-1.0 text_encoder*/config.json
    cfg_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, hidden_act="quick_gelu", **hub)
    cfg_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                           num_attention_heads=20, projection_dim=1280, hidden_act="gelu", **hub)
    with torch.device("meta"):
        unet, vae = unet_mod.UNet(), vae_mod.VAE()
        clip_l, bigg = CLIPTextModel(cfg_l), CLIPTextModelWithProjection(cfg_g)
    sd = weights.to_single_file(unet.state_dict(), unet.config, vae.state_dict(), vae.config,
                                weights.canonical_state_dict(clip_l), weights.canonical_state_dict(bigg))
    assert len(sd) == 1680 + 248 + 196 + 389  # CLIP-L 2 + 12 x 16 + 2; bigG 5 + 32 x 12 (q, k, v fused)
    assert infer_diffusers_model_type(sd) == "xl_base"
    weights.check_single_file(sd)
    (got_l, config_l), (got_g, config_g) = weights.text_from_sgm(sd)
    assert got_l.keys() == weights.canonical_state_dict(clip_l).keys()
    assert got_g.keys() == weights.canonical_state_dict(bigg).keys()
    for got, want in ((config_l, cfg_l), (config_g, cfg_g)):
        for f in ("hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "hidden_act"):
            assert getattr(got, f) == getattr(want, f), f


def test_vae_sgm_renames_equal_diffusers_converter():
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    ref = diffusers_vae()
    sgm = weights.vae_to_sgm(ref.state_dict(), TINY_VAE)
    assert sgm["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4
    assert weights.vae_config_from_sgm(sgm) == TINY_VAE
    ours = weights.vae_from_sgm(sgm, TINY_VAE)
    theirs = convert_ldm_vae_checkpoint(sgm, _kwargs(TINY_VAE))
    assert set(ours) == set(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k].reshape(ours[k].shape)), k


def test_unknown_keys_refused_tolerated_ones_named():
    sgm = weights.unet_to_sgm(diffusers_unet().state_dict(), TINY_UNET)
    with pytest.raises(ValueError,
                       match=r"1 unexpected UNet keys \(model.diffusion_model.input_blocks.1.9.x\)"):
        weights.unet_from_sgm({**sgm,
                               "model.diffusion_model.input_blocks.1.9.x": torch.zeros(1)}, TINY_UNET, "f")
    vae_sgm = weights.vae_to_sgm(diffusers_vae().state_dict(), TINY_VAE)
    with pytest.raises(ValueError, match="first_stage_model.encoder.mid.attn_1.extra"):
        weights.vae_from_sgm({**vae_sgm,
                              "first_stage_model.encoder.mid.attn_1.extra": torch.zeros(1)}, TINY_VAE)
    weights.check_single_file({**sgm, **vae_sgm, **{k: torch.zeros(1) for k in weights.SGM_UNUSED}})
    with pytest.raises(ValueError, match="f.safetensors: 1 keys belong to no SDXL part.*: model_ema.decay"):
        weights.check_single_file({**sgm, "model_ema.decay": torch.zeros(1)}, "f.safetensors")


def test_kohya_table_both_spellings():
    with torch.device("meta"):
        m = unet_mod.UNet()
    names = [n for n, x in m.named_modules() if isinstance(x, (torch.nn.Linear, torch.nn.Conv2d))]
    table = weights.kohya_table(names, m.config)
    assert len(table) == 2 * len(names) == 2 * 794
    assert table["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"] == \
        table["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert table["lora_unet_output_blocks_8_0_skip_connection"] == "up_blocks.2.resnets.2.conv_shortcut"
    # no config: diffusers spelling
    assert weights.kohya_table(names) == {lora.kohya_name(n): n for n in names}


def test_kohya_respell_both_ways_equals_diffusers_reading():
    """diffusers' kohya reader (it renames SGM block numbers itself) gives the same peft tensors for both
    spellings."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
    sd = _random_lora(1)
    sgm = weights.kohya_respell(sd, TINY_UNET, to="sgm")
    assert sgm.keys() != sd.keys() and any(k.startswith("lora_unet_input_blocks_") for k in sgm)
    assert any("_in_layers_2." in k for k in sgm) and any("_skip_connection." in k for k in sgm)
    back = weights.kohya_respell(sgm, TINY_UNET, to="diffusers")
    assert back.keys() == sd.keys() and all(back[k] is sd[k] for k in sd)
    config = diffusers_unet().config
    a, alphas_a = StableDiffusionXLLoraLoaderMixin.lora_state_dict(dict(sd), unet_config=config)
    b, alphas_b = StableDiffusionXLLoraLoaderMixin.lora_state_dict(dict(sgm), unet_config=config)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) and alphas_a == alphas_b
    with pytest.raises(ValueError, match="lora_unet_nowhere"):
        weights.kohya_respell({**sd, "lora_unet_nowhere.alpha": torch.tensor(1.0)}, TINY_UNET)


def test_parse_lora_spec():
    """weights.parse_lora_spec, the one FILE[:SCALE] parser of convert.py and sample.py: a drive letter or any
    other non-number after the colon belongs to the path; a scale that is not finite is refused."""
    parse = weights.parse_lora_spec
    assert parse("a.safetensors") == ("a.safetensors", 1.0)
    assert parse("dir/a.safetensors:0.7") == ("dir/a.safetensors", 0.7)
    assert parse("a.safetensors:-1e-1") == ("a.safetensors", -0.1)
    assert parse(r"C:\loras\a.safetensors") == (r"C:\loras\a.safetensors", 1.0)
    assert parse(r"C:\loras\a.safetensors:0.5") == (r"C:\loras\a.safetensors", 0.5)
    assert parse("odd:name.safetensors") == ("odd:name.safetensors", 1.0)
    for bad in ("inf", "-inf", "nan"):
        with pytest.raises(ValueError,
                           match=f"--lora a.safetensors:{bad}: the scale must be a finite number"):
            parse(f"a.safetensors:{bad}")


# ----------------------------------------------------------------------------------------------------
# The command

@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_base")
    return root, make_tiny_base(root)


@pytest.fixture(scope="module")
def single(base, tmp_path_factory):
    """The tiny base folder written as one single file by the command."""
    root, _ = base
    out = tmp_path_factory.mktemp("single") / "tiny_sdxl.safetensors"
    convert.main([str(root), str(out), "--to", "single-file"])
    return out


def _image(pipe, steps=2, seed=0):
    from diffusers import StableDiffusionXLPipeline
    p = StableDiffusionXLPipeline(**pipe.components)
    p.scheduler = lightning_scheduler(pipe)
    p.set_progress_bar_config(disable=True)
    return p("a red car in the snow", num_inference_steps=steps, guidance_scale=0, width=W, height=H,
             generator=torch.Generator("cpu").manual_seed(seed), output_type="pt").images


def _same_weights(a, b, parts=PARTS):
    """Every tensor of every part equal, bit for bit (VAE attention may be stored as 1x1 convs)."""
    for part in parts:
        x, y = a[part], b[part]
        assert set(x) == set(y), part
        for k in x:
            assert torch.equal(x[k], y[k].reshape(x[k].shape)), f"{part}: {k}"


def _diffusers_weights(pipe):
    return {part: getattr(pipe, part).state_dict() for part in PARTS}


def _our_weights(path):
    """What our own loaders read from a single file, named as diffusers' models name their tensors."""
    text_encoder, text_encoder_2 = weights.load_text_encoders(str(path), dtype=None)
    return {"unet": weights.load_unet(str(path), dtype=None).state_dict(),
            "vae": weights.load_vae(str(path), dtype=None).state_dict(),
            "text_encoder": text_encoder.state_dict(), "text_encoder_2": text_encoder_2.state_dict()}


def test_single_file_loads_in_diffusers_and_samples_the_same(base, single):
    from diffusers import StableDiffusionXLPipeline
    root, pipe = base
    sd = load_file(single)
    counts = {part: sum(k.startswith(prefix) for k in sd) for part, prefix in weights.SGM_PARTS.items()}
    n = {part: len(getattr(pipe, part).state_dict()) for part in PARTS}
    # q, k, v weights and biases -> in_proj weight, bias
    fused = 4 * pipe.text_encoder_2.config.num_hidden_layers
    assert counts == {"unet": n["unet"], "vae": n["vae"], "clip_l": n["text_encoder"],
                      "bigg": n["text_encoder_2"] - fused}
    assert sum(counts.values()) == len(sd)
    theirs = StableDiffusionXLPipeline.from_single_file(str(single), config=str(root), local_files_only=True)
    _same_weights(_diffusers_weights(pipe), _diffusers_weights(theirs))
    a, b = _image(theirs), _image(pipe)
    report("from_single_file image vs source folder", a, b)
    assert_close(a, b, atol=1e-5, rtol=1e-5)
    # our own loader reads it back bitwise
    _same_weights(_diffusers_weights(pipe), _our_weights(single))


def test_single_file_to_diffusers_folder_samples_the_same(base, single, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    root, pipe = base
    out = tmp_path / "folder"
    convert.main([str(single), str(out), "--to", "diffusers", "--tokenizers", str(root)])
    back = StableDiffusionXLPipeline.from_pretrained(str(out), local_files_only=True)
    _same_weights(_diffusers_weights(pipe), _diffusers_weights(back))
    a, b = _image(back), _image(pipe)
    report("diffusers folder (from our single file) image vs source folder", a, b)
    assert_close(a, b, atol=1e-5, rtol=1e-5)
    # and back again: the same single file, tensor for tensor
    again = tmp_path / "again.safetensors"
    convert.main([str(out), str(again), "--to", "single-file"])
    first, second = load_file(single), load_file(again)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_training_export_with_lora_equals_diffusers_fuse_lora(base, tmp_path):
    """Our training export (a diffusers-layout UNet file + config.json) + --lora FILE:0.7 with --base: the
    single file diffusers loads samples as diffusers' load_lora_weights + fuse_lora(lora_scale=0.7) on that
    UNet."""
    import copy

    from diffusers import StableDiffusionXLPipeline
    root, pipe = base
    export = tmp_path / "run" / "8to4" / "full"
    export.mkdir(parents=True)
    student = diffusers_unet(seed=7)
    unet_file = export / "sdxl_lightning_4step_unet.safetensors"
    save_file({k: v.contiguous() for k, v in student.state_dict().items()}, unet_file)
    (export / "config.json").write_text(json.dumps(TINY_UNET.to_diffusers()))
    lora_path = tmp_path / "style.safetensors"
    save_file(_random_lora(3), lora_path)
    out = tmp_path / "mine.safetensors"
    convert.main([str(unet_file), str(out), "--to", "single-file",
                  "--base", str(root), "--lora", f"{lora_path}:0.7"])
    ours = StableDiffusionXLPipeline.from_single_file(str(out), config=str(root), local_files_only=True)
    ref = StableDiffusionXLPipeline(**{**pipe.components, "unet": copy.deepcopy(student)})
    ref.load_lora_weights(str(lora_path))
    ref.fuse_lora(lora_scale=0.7)
    ref.unload_lora_weights()  # keeps the fused weights
    a, b = _image(ours, steps=4), _image(ref, steps=4)
    report("export + LoRA 0.7 single file vs diffusers fuse_lora image", a, b)
    assert_close(a, b, atol=1e-5, rtol=1e-5)
    w = {k: (ours.unet.state_dict()[k] - ref.unet.state_dict()[k]).abs().max().item()
         for k in ref.unet.state_dict()}
    print(f"fused UNet weights vs diffusers: max abs err {max(w.values()):.3e}")
    assert max(w.values()) < 1e-5
    assert (_image(pipe, steps=4) - a).abs().max() > 1e-2  # the student and the LoRA changed the image
    _same_weights(_diffusers_weights(pipe), _our_weights(out),
                  parts=("vae", "text_encoder", "text_encoder_2"))


def test_stacked_loras_and_fp16(base, single, tmp_path):
    """Two LoRAs (both spellings, two ranks) fused in order at their scales into an all-in-one file, as
    merge_lora twice (itself equal to diffusers' fuse_lora in test_lora.py); --fp16 stores exactly the
    cast."""
    root, pipe = base
    a_path, b_path = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(_random_lora(1), a_path)
    # the other spelling
    save_file(weights.kohya_respell(_random_lora(2, rank=8), TINY_UNET, to="sgm"), b_path)
    out32, out16 = tmp_path / "fp32.safetensors", tmp_path / "fp16.safetensors"
    spec = ["--lora", f"{a_path}:0.5", "--lora", str(b_path)]
    convert.main([str(single), str(out32), "--to", "single-file", *spec])
    convert.main([str(single), str(out16), "--to", "single-file", *spec, "--fp16"])
    want = unet_mod.UNet(TINY_UNET)
    want.load_state_dict(pipe.unet.state_dict())
    lora.merge_lora(want, weights.read_lora(a_path, TINY_UNET), scale=0.5)
    lora.merge_lora(want, weights.read_lora(b_path, TINY_UNET), scale=1.0)
    got = weights.load_unet(str(out32), dtype=None).state_dict()
    err = max((got[k] - v).abs().max().item() for k, v in want.state_dict().items())
    print(f"two stacked LoRAs vs merge_lora twice: max abs err {err:.3e}")
    assert err == 0
    sd32, sd16 = load_file(out32), load_file(out16)
    assert sd32.keys() == sd16.keys()
    assert all(v.dtype == torch.float16 for v in sd16.values() if v.is_floating_point())
    assert all(torch.equal(sd16[k], v.half()) for k, v in sd32.items())


def _assert_refused(argv, match, out):
    with pytest.raises(SystemExit) as e:
        convert.main(argv)
    msg = str(e.value.code)
    print(msg)
    assert msg.startswith("error: ") and "\n" not in msg and match in msg, msg
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".tmp" in p.name]  # no temp file left


@pytest.mark.parametrize("case",
                         ["missing_in", "suffix", "exists", "lora_missing", "lora_misshaped", "lora_as_in",
                                  "unknown_key", "base_with_whole", "no_out_dir"])
def test_bad_input_is_one_clear_line(base, single, tmp_path, case):
    root, pipe = base
    out = tmp_path / "out.safetensors"
    argv = [str(single), str(out), "--to", "single-file"]
    if case == "missing_in":
        argv[0] = str(tmp_path / "nope.safetensors")
    if case == "suffix":
        out = tmp_path / "out.ckpt"
        argv[1] = str(out)
    if case == "exists":
        out = tmp_path / "taken.safetensors"
        out.write_bytes(b"keep me")
        argv[1] = str(out)
        with pytest.raises(SystemExit, match="exists"):
            convert.main(argv)
        assert out.read_bytes() == b"keep me"
        return
    if case == "lora_missing":
        argv += ["--lora", str(tmp_path / "gone.safetensors:0.5")]
    if case == "lora_misshaped":
        sd = _random_lora(1)
        k = next(k for k in sd if k.endswith("lora_down.weight") and sd[k].ndim == 2)
        sd[k] = torch.zeros(4, 7)
        save_file(sd, tmp_path / "bad.safetensors")
        argv += ["--lora", str(tmp_path / "bad.safetensors")]
    if case == "lora_as_in":
        save_file(_random_lora(1), tmp_path / "l.safetensors")
        argv[0] = str(tmp_path / "l.safetensors")
    if case == "unknown_key":
        save_file({**load_file(single), "model_ema.num_updates": torch.zeros(1)},
                  tmp_path / "odd.safetensors")
        argv[0] = str(tmp_path / "odd.safetensors")
    if case == "base_with_whole":
        argv += ["--base", str(root)]
    if case == "no_out_dir":
        out = tmp_path / "no" / "such" / "dir.safetensors"
        argv[1] = str(out)
        with pytest.raises(SystemExit, match="does not exist"):
            convert.main(argv)
        return
    expect = {"missing_in": "nope.safetensors: no such file", "suffix": "must end in .safetensors",
              "lora_missing": "gone.safetensors", "lora_misshaped": "do not fit this UNet",
              "lora_as_in": "LoRA file", "unknown_key": "model_ema.num_updates",
              "base_with_whole": "--base is for UNet-only inputs"}[case]
    _assert_refused(argv, expect, out)


def test_failed_write_leaves_nothing(base, single, tmp_path, monkeypatch):
    """A crash while writing (disk full) leaves neither OUT nor a temp file."""
    def half_then_fail(path, *a, **kw):
        Path(path).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(convert, "write_single_file", half_then_fail)
    out = tmp_path / "o.safetensors"
    _assert_refused([str(single), str(out), "--to", "single-file"], f"{out}: the disk is full", out)


def test_command_line_help_and_exit_code(single, tmp_path):
    """The user's command: every flag explained; a bad call exits non-zero with one line and no traceback."""
    parser = convert.build_parser()
    for action in parser._actions:
        assert action.help, action.dest
    r = subprocess.run([sys.executable, "-m", "tools.convert", "--help"], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 0 and "--to" in r.stdout and "--fp16" in r.stdout and "--lora" in r.stdout
    r = subprocess.run([sys.executable, "-m", "tools.convert", str(single), str(tmp_path / "x"),
                        "--to", "single-file"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [f"error: OUT {tmp_path / 'x'} must end in "
                                                                    ".safetensors for --to single-file"]


def test_readme_recipe_finetune_to_lightning(base, single, tmp_path):
    """The README's "Make your own SDXL fine-tune Lightning", as users run it, on tiny models: a fine-tune as
    one file, + the 8-step LoRA as the teacher, train.py 8to4 (every phase, one step each), convert.py to one
    file."""
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image

    from tools.tiny import fill_hub_cache
    root, pipe = base
    cache = tmp_path / "hub"  # a single file carries no tokenizers: they come from the SDXL base repo's cache
    fill_hub_cache(cache, weights.SDXL_BASE, {str(p.relative_to(root)): p for p in root.rglob("*")
                                               if p.is_file() and "tokenizer" in str(p.parent)})
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    data = write_noise_images(tmp_path / "data", 4, "a red car number {}")
    lora_8step = tmp_path / "sdxl_lightning_8step_lora.safetensors"  # stand-in for the official LoRA
    save_file(_random_lora(4), lora_8step)
    my_8step = tmp_path / "my_8step.safetensors"
    convert.main([str(single), str(my_8step), "--to", "single-file", "--lora", str(lora_8step)])
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--stage", "8to4", "--base", str(single),
                        "--teacher", str(my_8step), "--data", str(data), "--out", str(tmp_path / "runs"),
                        "--resolution", "32", "--min-size", "32", "--batch-size", "2", "--max-steps", "1"],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    export = tmp_path / "runs" / "8to4" / "full" / "sdxl_lightning_4step_unet.safetensors"
    final = tmp_path / "my_model_4step.safetensors"
    convert.main([str(export), str(final), "--to", "single-file", "--base", str(single), "--fp16"])
    ours = StableDiffusionXLPipeline.from_single_file(str(final), config=str(root), local_files_only=True)
    trained = load_file(export)
    assert all(torch.equal(ours.unet.state_dict()[k], v.half()) for k, v in trained.items())
    _same_weights({p: {k: v.half() for k, v in sd.items()} for p, sd in _diffusers_weights(pipe).items()},
                  _diffusers_weights(ours), parts=("vae", "text_encoder", "text_encoder_2"))
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "a red car", "--steps", "4", "--base",
                        str(final),
                        "--unet", "base", "--width", str(W), "--height", str(H), "--out",
                        str(tmp_path / "car.png")],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert Image.open(tmp_path / "car.png").size == (W, H)


# ----------------------------------------------------------------------------------------------------
# Issues 18, 19.8: non-float LoRAs, a real full disk, stale temp files, OUT that is an input


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool])
def test_non_float_lora_refused_before_writing(single, tmp_path, dtype):
    """Issue 18: an int8 LoRA was fused (Inf tensors in OUT, exit 0)."""
    sd = _random_lora(1)
    k = sorted(k for k in sd if k.endswith("lora_down.weight"))[0]
    save_file({**sd, k: sd[k].to(dtype)}, tmp_path / "q.safetensors")
    out = tmp_path / "o.safetensors"
    _assert_refused([str(single), str(out), "--to", "single-file", "--lora", str(tmp_path / "q.safetensors")],
                    f"not floating point: {k} ({str(dtype).removeprefix('torch.')})", out)


def test_full_disk_for_real_keeps_the_previous_file(single, small_disk):
    """Issue 18: safetensors' SafetensorError on a full disk (a real 256 KiB tmpfs) is the one line, the
    previous OUT untouched, no temp file."""
    disk = small_disk.path
    out = disk / "o.safetensors"
    out.write_bytes(b"the previous file")
    with pytest.raises(SystemExit) as e:
        convert.main([str(single), str(out), "--to", "single-file", "--overwrite"])
    msg = str(e.value.code)
    print(msg)
    assert msg.startswith(f"error: {out}: the disk is full") and "\n" not in msg
    assert out.read_bytes() == b"the previous file" and sorted(p.name for p in disk.iterdir()) == [out.name]


@pytest.mark.parametrize("kind", ["single-file", "diffusers"])
def test_stale_temp_of_a_killed_run_is_removed(base, single, tmp_path, kind):
    """Issue 19.8: kill -9 left OUT.tmp (~177 MB on SDXL) that nothing removed; a stale OUT.tmp folder
    even made the next --to diffusers run fail."""
    root, _ = base
    out = tmp_path / ("o.safetensors" if kind == "single-file" else "o")
    tmp = out.with_name(out.name + ".tmp")
    if kind == "diffusers":
        (tmp / "unet").mkdir(parents=True)
        (tmp / "unet" / "half.safetensors").write_bytes(b"half")
    else:
        tmp.write_bytes(b"half a file")
    src = single if kind == "single-file" else root
    convert.main([str(src), str(out), "--to", kind])
    assert out.exists() and not tmp.exists()
    # a refused run (a bad LoRA found at load time) also leaves no stale temp file behind
    tmp.mkdir() if kind == "diffusers" else tmp.write_bytes(b"half")
    sd = _random_lora(1)
    k = next(k for k in sd if k.endswith("lora_down.weight") and sd[k].ndim == 2)
    save_file({**sd, k: torch.zeros(4, 7)}, tmp_path / "bad.safetensors")
    with pytest.raises(SystemExit, match="do not fit this UNet"):
        convert.main([str(src), str(out), "--to", kind, "--overwrite", "--lora",
                      str(tmp_path / "bad.safetensors")])
    assert not tmp.exists()


@pytest.mark.parametrize("case", ["dot", "out_is_base", "out_is_lora", "out_holds_in", "junk_lora"])
def test_out_that_is_an_input_is_refused(base, single, tmp_path, monkeypatch, case):
    """Issue 19.8: `convert IN .` was a traceback; OUT equal to --base or a --lora file (with --overwrite)
    replaced its own input (only OUT == IN was refused). Refused before anything is loaded."""
    root, _ = base
    monkeypatch.chdir(tmp_path)
    unet_file = tmp_path / "u.safetensors"
    save_file({k: v.contiguous() for k, v in diffusers_unet(seed=3).state_dict().items()}, unet_file)
    (tmp_path / "config.json").write_text(json.dumps(TINY_UNET.to_diffusers()))
    lora_file = tmp_path / "l.safetensors"
    save_file(_random_lora(1), lora_file)
    base_copy = tmp_path / "base"
    import shutil
    shutil.copytree(root, base_copy)
    argv = {"dot": [str(single), ".", "--to", "diffusers", "--overwrite"],
            "out_is_base": [str(unet_file), str(base_copy), "--to", "diffusers", "--base", str(base_copy),
                            "--overwrite"],
            "out_is_lora": [str(unet_file), str(lora_file), "--to", "single-file", "--base", str(base_copy),
                            "--lora", str(lora_file), "--overwrite"],
            "out_holds_in": [str(base_copy / "unet" / "diffusion_pytorch_model.safetensors"), str(base_copy),
                             "--to", "diffusers", "--overwrite"],
            "junk_lora": [str(unet_file), str(tmp_path / "o.safetensors"), "--to", "single-file", "--base",
                          str(base_copy), "--lora", str(tmp_path / "junk.safetensors")]}[case]
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def no_loading(*a, **k):
        raise AssertionError("loaded before checking the inputs")
    monkeypatch.setattr(weights, "load_vae", no_loading)
    monkeypatch.setattr(weights, "load_unet", no_loading)
    with pytest.raises(SystemExit) as e:
        convert.main(argv)
    msg = str(e.value.code)
    print(msg)
    assert msg.startswith("error: ") and "\n" not in msg
    assert {"dot": "is the current folder", "out_is_base": "is --base", "out_is_lora": "is --lora",
            "out_holds_in": "holds IN",
            "junk_lora": "junk.safetensors: not a readable .safetensors"}[case] in msg
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


# ----------------------------------------------------------------------------------------------------
# Issue 16.1: convert --extract-lora A B, from any two UNets of one architecture, either layout


def test_extract_lora_from_two_unets_in_either_layout(base, single, tmp_path, capsys):
    """B = the base UNet plus a rank-4 LoRA, written as train.py exports (diffusers layout + config.json) and
    as an SGM UNet file; A = the base as a single file or as a diffusers folder. The extracted rank-8 LoRA is
    the same from every pair of layouts, and fused into the base (our merge, and diffusers' load_lora_weights
    + fuse_lora) gives B to fp16 tolerance. Another architecture is refused in one line."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
    root, _ = base
    tuned = weights.load_unet(str(root))
    lora.merge_lora(tuned, _random_lora(3), source="rank-4 LoRA")
    (tmp_path / "b").mkdir()
    save_file({k: v.contiguous() for k, v in tuned.state_dict().items()}, tmp_path / "b" / "unet.safetensors")
    (tmp_path / "b" / "config.json").write_text(json.dumps(tuned.config.to_diffusers()))
    sgm = tmp_path / "b_sgm.safetensors"
    save_file({k: v.contiguous() for k, v in weights.unet_to_sgm(tuned.state_dict(), tuned.config).items()},
              sgm)
    outs = []
    for a, b in [(single, tmp_path / "b" / "unet.safetensors"), (root, sgm)]:
        outs.append(tmp_path / f"lora{len(outs)}.safetensors")
        convert.main(["--extract-lora", str(a), str(b), "--rank", "8", "--out", str(outs[-1])])
        line = capsys.readouterr().out.strip().splitlines()[-1]
        print(line)
        assert line.startswith(f"wrote {outs[-1]}") and "worst" in line
    first, second = load_file(outs[0]), load_file(outs[1])
    assert first.keys() == second.keys() and all(torch.equal(v, second[k]) for k, v in first.items())
    assert all(v.dtype == torch.float16 for v in first.values())
    want = tuned.state_dict()
    ours = weights.load_unet(str(single))
    lora.merge_lora(ours, weights.read_lora(outs[0]), source=str(outs[0]))
    from diffusers import UNet2DConditionModel
    ref = UNet2DConditionModel(**_kwargs(TINY_UNET))
    ref.load_state_dict(weights.load_unet(str(root)).state_dict(), strict=True)
    sd, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(str(outs[0]), unet_config=ref.config)
    ref.load_lora_adapter(sd, prefix="unet", network_alphas=alphas)
    ref.fuse_lora()
    ref.unload_lora()
    for name, got in (("our merge", ours.state_dict()), ("diffusers fuse_lora", ref.state_dict())):
        err = max((got[k] - v).abs().max().item() for k, v in want.items())
        print(f"extracted LoRA fused into the base ({name}) vs B: max abs err {err:.2e}")
        for k, v in want.items():
            assert_close(got[k], v, atol=2e-3, rtol=2e-3)
    other = tmp_path / "other.safetensors"  # a UNet of another architecture
    wide = unet_mod.UNet(unet_mod.UNetConfig(**{**TINY_UNET.__dict__, "block_out_channels": (32, 64)}))
    save_file({k: v.contiguous() for k, v in weights.unet_to_sgm(wide.state_dict(), wide.config).items()},
              other)
    with pytest.raises(SystemExit) as e:
        convert.main(["--extract-lora", str(single), str(other), "--out", str(tmp_path / "x.safetensors")])
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "different architectures" in msg and "\n" not in msg, msg
    assert not (tmp_path / "x.safetensors").exists()
