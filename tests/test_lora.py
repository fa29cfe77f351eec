"""lora.py against diffusers + peft: the same fused weights from kohya files in both spellings (diffusers
and SGM module paths), the full-size SDXL LoRA layout on the meta device, the training hooks (init,
enable/disable, merge, gradients, checkpointing, autocast, DDP), saving, and clear errors."""
import copy
import functools
import os

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

import files
import lora
import weights
import unet as unet_mod
from tools.tiny import TINY_UNET, diffusers_unet, report

RANK, ALPHA = 4, 8.0


@functools.lru_cache
def _reference_weights(seed=0):
    return diffusers_unet(seed=seed).state_dict()


def _ours(seed=0):
    """Our tiny UNet holding the same random weights as diffusers_unet(seed)."""
    m = unet_mod.UNet(TINY_UNET).eval()
    m.load_state_dict(_reference_weights(seed), strict=True)
    return m


def _random_lora(m, seed=1, spelling="diffusers"):
    """A kohya state dict with random nonzero down AND up on every target (up is zero only at init)."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(m.named_modules())
    table = weights.kohya_table([n for n, _ in lora._base_modules(m)], m.config)
    to_sgm = {v: k for k, v in table.items() if k != lora.kohya_name(v)}
    sd = {}
    for name in lora.lora_targets(m):
        down_shape, up_shape = lora._expected_shapes(modules[name], RANK)
        key = lora.kohya_name(name) if spelling == "diffusers" else to_sgm[name]
        sd[f"{key}.lora_down.weight"] = torch.randn(down_shape, generator=g) / down_shape[1] ** 0.5
        sd[f"{key}.lora_up.weight"] = torch.randn(up_shape, generator=g) * 0.1
        sd[f"{key}.alpha"] = torch.tensor(ALPHA)
    return sd


def _diffusers_fused(lora_sd_or_path, scale=1.0, seed=0):
    """The reference: what SDXL's `load_lora_weights` + `fuse_lora` do to the UNet, minus the pipeline
    (lora_state_dict converts kohya -> diffusers/peft keys using the UNet config for SGM block numbers)."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
    ref = diffusers_unet(seed=seed)
    src = dict(lora_sd_or_path) if isinstance(lora_sd_or_path, dict) else str(lora_sd_or_path)
    sd, alphas = StableDiffusionXLLoraLoaderMixin.lora_state_dict(src, unet_config=ref.config)
    ref.load_lora_adapter(sd, prefix="unet", network_alphas=alphas, adapter_name="test")
    ref.fuse_lora(lora_scale=scale)
    ref.unload_lora()  # keeps the fused weights, drops the peft layers: plain diffusers keys again
    return ref.state_dict()


def _compare_weights(name, ours, ref, atol=1e-6):
    assert set(ours) == set(ref)
    keys = sorted(ref)
    a, b = torch.cat([ours[k].flatten() for k in keys]), torch.cat([ref[k].flatten() for k in keys])
    report(name, a, b)
    worst = max(keys, key=lambda k: (ours[k] - ref[k]).abs().max().item())
    assert_close(a, b, atol=atol, rtol=1e-5, msg=lambda s: f"{name}, worst tensor {worst}: {s}")


def _inputs(B=2, H=16, W=16, seed=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 4, H, W, generator=g), torch.tensor([999, 250]),
            torch.randn(B, 7, TINY_UNET.cross_attention_dim, generator=g),
            torch.randn(B, TINY_UNET.pooled_dim, generator=g),
            torch.tensor([[64.0, 64, 0, 0, 64, 64], [80, 80, 8, 4, 64, 64]]))


def _randomize_lora(m, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in m.lora.values():
            layer.lora_up.weight.copy_(torch.randn(layer.lora_up.weight.shape, generator=g) * 0.1)


# ----------------------------------------------------------------------------------------------------
# Merging kohya files

@pytest.mark.parametrize("spelling,scale", [("diffusers", 1.0), ("sgm", 1.0), ("sgm", 0.7)])
def test_merge_equals_diffusers(spelling, scale):
    m = _ours()
    base = {k: v.clone() for k, v in m.state_dict().items()}
    sd = _random_lora(m, spelling=spelling)
    if spelling == "sgm":  # really the other spelling, resnet inner names included
        assert not any(k.startswith(("lora_unet_down_blocks", "lora_unet_mid_block",
                                     "lora_unet_up_blocks")) for k in sd)
        assert any("_in_layers_2." in k for k in sd) and any("_skip_connection." in k for k in sd)
    n = lora.merge_lora(m, weights.lora_diffusers_spelling(sd, m.config, "lora"), scale=scale)
    assert n == len(lora.lora_targets(m)) == len(sd) // 3
    ours = m.state_dict()
    moved = max((ours[k] - base[k]).abs().max().item() for k in base)
    assert moved > 1e-2  # the merge did something a no-op would not pass
    _compare_weights(f"merge ({spelling}, scale {scale}) vs diffusers fuse_lora", ours,
                     _diffusers_fused(sd, scale))


def test_missing_alpha_means_scale_one():
    sd = _random_lora(_ours())
    no_alpha = {k: v for k, v in sd.items() if not k.endswith(".alpha")}
    as_rank = {k: (torch.tensor(float(RANK)) if k.endswith(".alpha") else v) for k, v in sd.items()}
    a, b = _ours(), _ours()
    lora.merge_lora(a, no_alpha)
    lora.merge_lora(b, as_rank)
    _compare_weights("no alpha vs alpha = rank", a.state_dict(), b.state_dict(), atol=0)


# ----------------------------------------------------------------------------------------------------
# Full-size SDXL layout (meta device: no memory, no time)

def test_full_sdxl_lora_layout():
    with torch.device("meta"):
        m = unet_mod.UNet()
    targets = lora.lora_targets(m)
    layers = lora.add_lora(m, rank=64, alpha=8.0)
    assert len(targets) == len(layers) == 788
    assert sum(p.numel() for p in layers.parameters()) == 196_751_360
    assert not any(t.startswith(lora.TARGET_EXCLUDE) for t in targets)
    assert len(lora.base_state_dict(m)) == 1680  # the diffusers keys, LoRA entries left out
    sd = lora.lora_state_dict(m)
    assert len(sd) == 3 * 788 and all(k.endswith(lora.SUFFIXES) for k in sd)
    assert sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (64, 320, 3, 3)
    assert sd["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"].shape == (320, 64, 1, 1)
    k = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    assert sd[k].shape == (64, 2048)
    # every Linear/Conv2d (794 with conv_in/out and the embeddings) has both spellings, no collisions
    table = weights.kohya_table([n for n, _ in lora._base_modules(m)], m.config)
    assert len(table) == 2 * 794
    assert table["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"] == \
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert table["lora_unet_output_blocks_2_2_conv"] == "up_blocks.0.upsamplers.0.conv"
    assert table["lora_unet_middle_block_2_emb_layers_1"] == "mid_block.resnets.1.time_emb_proj"
    assert table["lora_unet_input_blocks_3_0_op"] == "down_blocks.0.downsamplers.0.conv"


# ----------------------------------------------------------------------------------------------------
# Training layers

def test_add_lora_hooks_enable_merge():
    m = _ours()
    x = _inputs()
    with torch.no_grad():
        base_out = m(*x)
        lora.add_lora(m, RANK, ALPHA)
        assert_close(m(*x), base_out, atol=0, rtol=0)  # up is zero at init: exactly the base model
        _randomize_lora(m)
        lora_out = m(*x)
        assert (lora_out - base_out).abs().max() > 1e-2
        lora.set_lora_enabled(m, False)
        assert_close(m(*x), base_out, atol=0, rtol=0)  # the teacher: LoRA off, no second copy
        lora.set_lora_enabled(m, True)

        merged = copy.deepcopy(m)  # the copy gets its own LoRA layers and hooks
        lora.merge_and_remove_lora(merged)
        merged_out = merged(*x)
        assert_close(m(*x), lora_out, atol=0, rtol=0)  # the original is untouched by merging the copy
    report("hooked vs merged forward", lora_out, merged_out)
    assert_close(merged_out, lora_out, atol=1e-5, rtol=1e-5)
    assert set(merged.state_dict()) == set(_reference_weights())  # a plain UNet again
    assert not hasattr(merged, "lora") and not any(mod._forward_hooks for mod in merged.modules())


def _lora_grads(m, x):
    m.zero_grad(set_to_none=True)
    m(*x).square().mean().backward()
    return {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}


def test_lora_gradients_checkpointing_autocast():
    m = _ours().train()
    lora.add_lora(m, RANK, ALPHA)
    _randomize_lora(m)
    for k, p in m.named_parameters():
        p.requires_grad_(k.startswith("lora."))
    x = _inputs(H=8, W=8)  # small: bf16 autocast is slow on CPU
    g1 = _lora_grads(m, x)
    assert set(g1) == {"lora." + k for k, _ in m.lora.named_parameters()}  # only LoRA params get grads
    assert all(g.abs().max() > 0 for g in g1.values())
    m.gradient_checkpointing = True
    g2 = _lora_grads(m, x)
    err = max((g1[k] - g2[k]).abs().max().item() for k in g1)
    print(f"grads with vs without checkpointing: max abs err {err:.3e}")
    for k in g1:
        assert_close(g2[k], g1[k], atol=1e-6, rtol=1e-5)
    m.gradient_checkpointing = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(*x)
    with torch.no_grad():
        ref = m(*x)
    report("bf16 autocast vs fp32 forward", out.float(), ref)
    assert_close(out.float(), ref, atol=0.1, rtol=0.1)
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.lora.parameters())

    # a frozen bf16 base with float32 LoRA layers added afterwards, no autocast: the hook casts
    m16 = _ours().to(torch.bfloat16)
    lora.add_lora(m16, RANK, ALPHA)
    assert all(p.dtype == torch.float32 for p in m16.lora.parameters())
    m16.lora.load_state_dict(m.lora.state_dict())
    with torch.no_grad():
        out16 = m16(*[v.to(torch.bfloat16) if v.is_floating_point() else v for v in x])
    assert out16.dtype == torch.bfloat16
    report("bf16 base + fp32 LoRA vs fp32 forward", out16.float(), ref)
    assert_close(out16.float(), ref, atol=0.2, rtol=0.1)


def test_ddp_syncs_lora_params(tmp_path):
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        m = _ours().train()
        lora.add_lora(m, RANK, ALPHA)
        _randomize_lora(m)
        for k, p in m.named_parameters():
            p.requires_grad_(k.startswith("lora."))
        ddp = DDP(m)
        x = _inputs(H=8, W=8)
        with torch.no_grad():
            lora.set_lora_enabled(ddp, False)  # teacher pass through the DDP wrapper
            teacher = ddp(*x)
            lora.set_lora_enabled(ddp, True)
        ddp(*x).sub(teacher).square().mean().backward()
        assert all(p.grad is not None and p.grad.abs().max() > 0 for p in m.lora.parameters())
        assert len(lora.lora_state_dict(ddp)) == 3 * len(m.lora)
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# Saving

def test_save_lora_read_by_diffusers_and_round_trip(tmp_path):
    """lora.kohya_file's tensors and metadata, written with files.save_safetensors (as train.py does)."""
    m = _ours()
    lora.add_lora(m, RANK, ALPHA)
    _randomize_lora(m)
    path = tmp_path / "out" / "lightning_lora.safetensors"
    path.parent.mkdir()
    tensors, metadata = lora.kohya_file(m)  # fp16, as released
    assert metadata["ss_network_dim"] == str(RANK) and float(metadata["ss_network_alpha"]) == ALPHA
    files.save_safetensors(tensors, path, metadata)
    assert os.listdir(path.parent) == [path.name]  # no temp file left behind
    raw = load_file(path)
    assert len(raw) == 3 * len(lora.lora_targets(m)) and all(v.dtype == torch.float16 for v in raw.values())
    assert raw["lora_unet_down_blocks_1_attentions_0_proj_in.alpha"].item() == ALPHA

    fused = _ours()
    lora.merge_lora(fused, weights.read_lora(path), source=str(path))
    _compare_weights("saved fp16 LoRA: our merge vs diffusers", fused.state_dict(), _diffusers_fused(path))

    path32 = tmp_path / "lora32.safetensors"
    tensors32, metadata32 = lora.kohya_file(m, dtype=torch.float32)
    files.save_safetensors(tensors32, path32, metadata32)
    round_trip = _ours()
    lora.merge_lora(round_trip, weights.read_lora(path32))
    merged = copy.deepcopy(m)
    lora.merge_and_remove_lora(merged)
    _compare_weights("save -> read -> merge vs merge_and_remove_lora", round_trip.state_dict(),
                     merged.state_dict(), atol=0)


# ----------------------------------------------------------------------------------------------------
# Bad input: clear errors, and a failed merge changes nothing

def _merge_fails(sd, match, source="bad.safetensors"):
    m = _ours()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=match) as e:
        lora.merge_lora(m, sd, source=source)
    print(e.value)
    assert source in str(e.value)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bad_lora_files(tmp_path):
    good = _random_lora(_ours())
    _merge_fails({**good, "lora_unet_down_blocks_1_resnets_0_conv9.lora_down.weight": torch.zeros(4, 64)},
                 "unknown LoRA keys.*lora_unet_down_blocks_1_resnets_0_conv9.*1 in all")
    _merge_fails({**good, "lora_unet_up_blocks_0_resnets_0_conv1.dora_scale": torch.zeros(1)},
                 "unknown LoRA keys")
    _merge_fails({**good, "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32),
                  "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32)},
                 "text-encoder LoRA keys.*lora_te1_text_model_encoder_layers_0_mlp_fc1")
    k = "lora_unet_up_blocks_1_resnets_1_conv2.lora_up.weight"
    _merge_fails({**good, k: torch.zeros(63, RANK, 1, 1)},
                 "do not fit this UNet.*up_blocks_1_resnets_1_conv2")
    _merge_fails({k_: v for k_, v in good.items() if k_ != k}, "without both lora_down and lora_up")
    _merge_fails({}, "no LoRA layers")

    with pytest.raises(ValueError, match="nope.safetensors: no such file"):
        weights.read_lora(tmp_path / "nope.safetensors")
    save_file({"conv_in.weight": torch.zeros(2, 2)}, tmp_path / "unet.safetensors")
    with pytest.raises(ValueError, match="not a kohya LoRA"):
        weights.read_lora(tmp_path / "unet.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        weights.read_lora(tmp_path / "junk.safetensors")

    m = _ours()
    with pytest.raises(ValueError, match="no LoRA layers"):
        lora.set_lora_enabled(m, False)
    lora.add_lora(m, RANK, ALPHA)
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.add_lora(m)


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.int64])
def test_non_float_lora_tensors_refused_by_name(dtype):
    """Issue 18: an int8 or bool LoRA is refused naming its tensors (it fused as garbage, then NaN)."""
    good = _random_lora(_ours())
    k = sorted(k for k in good if k.endswith("lora_up.weight"))[3]
    _merge_fails({**good, k: good[k].to(dtype)},
                 f"not floating point: {k} \\({str(dtype).removeprefix('torch.')}\\) \\(1 in all\\)")
    a = sorted(k for k in good if k.endswith(".alpha"))[0]
    _merge_fails({**good, a: good[a].to(dtype)}, f"not floating point: {a} ")


# ----------------------------------------------------------------------------------------------------
# Issue 16.1: extracting a LoRA from two UNets (truncated SVD of the difference)

def _relative_fused_error(fused, want, base, names):
    """{module: ||fused - want||_F / ||want - base||_F} per LoRA target: the error of a LoRA fused into the
    base against the UNet it should give, relative to the difference it should add."""
    out = {}
    for n in names:
        f, w, b = (sd[n + ".weight"].double() for sd in (fused, want, base))
        out[n] = ((f - w).norm() / (w - b).norm()).item()
    return out


def test_extracted_lora_at_covering_rank_fuses_to_the_student_in_diffusers(tmp_path):
    """Where the rank covers every layer's difference (the student is the base plus a rank-4 LoRA, extracted
    at rank 8), diffusers' load_lora_weights + fuse_lora of the extracted fp16 file on the base gives the
    student's weights to fp16 tolerance, on every target, the convs included."""
    base, student = _ours(), _ours()
    lora.merge_lora(student, _random_lora(student), source="rank-4 LoRA")
    names = lora.lora_targets(base)
    assert any(student.get_submodule(n).weight.ndim == 4 for n in names)  # the LoRA adapts convs too
    tensors, errors = lora.extract_lora(base.state_dict(), student.state_dict(), names, rank=8, alpha=ALPHA)
    worst = max(errors.values())
    print(f"rank 8 over a rank-4 difference: relative error worst {worst:.2e}, mean "
          f"{sum(errors.values()) / len(errors):.2e} over {len(errors)} layers")
    assert len(errors) == len(names) and worst < 1e-5
    path = tmp_path / "extracted.safetensors"
    files.save_safetensors({k: v.half().contiguous() for k, v in tensors.items()}, path,
                           lora.kohya_metadata(8, ALPHA))
    fused, want = _diffusers_fused(path), student.state_dict()
    rel = _relative_fused_error(fused, want, _reference_weights(), names)
    print(f"diffusers fuse of the fp16 file vs the student: relative error worst {max(rel.values()):.2e}")
    _compare_weights("extracted LoRA fused by diffusers vs the student", fused, want, atol=2e-3)
    assert max(rel.values()) < 2e-3  # fp16 storage of up and down


def test_extraction_error_below_rank_is_the_eckart_young_bound():
    """At a rank below the layers' rank (two independent random UNets), every layer's reported relative error
    equals sqrt(sum of the squared discarded singular values) / ||D||_F from numpy's SVD, and merging the
    fp32 LoRA into the base really leaves that error."""
    import numpy as np
    a, b = _ours(0), _ours(7)
    names = lora.lora_targets(a)
    rank = 16
    tensors, errors = lora.extract_lora(a.state_dict(), b.state_dict(), names, rank=rank, alpha=ALPHA)
    bound = {}
    for n in names:
        d = (b.get_submodule(n).weight - a.get_submodule(n).weight).detach().double().flatten(1).numpy()
        s = np.linalg.svd(d, compute_uv=False)
        bound[n] = float(np.sqrt((s[rank:] ** 2).sum()) / np.sqrt((s ** 2).sum()))
    merged = _ours(0)
    lora.merge_lora(merged, tensors, source="extracted")
    real = _relative_fused_error(merged.state_dict(), b.state_dict(), a.state_dict(), names)
    diff = max(abs(errors[n] - bound[n]) for n in names)
    diff_real = max(abs(real[n] - bound[n]) for n in names)
    print(f"rank {rank}: Eckart-Young bound worst {max(bound.values()):.4f} mean "
          f"{sum(bound.values()) / len(bound):.4f}; |reported - bound| max {diff:.2e}; |fused - bound| max "
          f"{diff_real:.2e}; {sum(bound[n] > 0 for n in names)} of {len(names)} layers above 0")
    assert min(bound.values()) >= 0 and max(bound.values()) > 0.1  # the rank really truncates
    assert diff < 1e-5 and diff_real < 1e-4
