"""text.py against diffusers' StableDiffusionXLPipeline.encode_prompt and its single-file conversion,
offline."""
import re
import warnings
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import weights
import text
from tools.tiny import CONTEXT_DIM, MAX_LENGTH, POOLED_DIM, make_tiny_text_folder

# different lengths: EOS at different positions
PROMPTS = ["a photo of a cat", "a red car in the snow at night"]


def report(name, a, b):
    d = (a.double() - b.double()).abs()
    print(f"{name}: max abs err {d.max().item():.3e}, mean {d.mean().item():.3e}")
    torch.testing.assert_close(a, b)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl_text")
    make_tiny_text_folder(root)
    return root


@pytest.fixture(scope="module")
def te(root):
    return weights.text_from_folder(root)


@pytest.fixture(scope="module")
def pipe(te):
    from diffusers import StableDiffusionXLPipeline
    return StableDiffusionXLPipeline(vae=None, unet=None, scheduler=None, text_encoder=te.text_encoder,
                                     text_encoder_2=te.text_encoder_2, tokenizer=te.tokenizer,
                                     tokenizer_2=te.tokenizer_2, add_watermarker=False)


def _to_sgm(te):
    """The text encoders' part of a single file (CLIP-L in transformers' layout, bigG in OpenCLIP's)."""
    return weights.text_to_sgm(weights.canonical_state_dict(te.text_encoder),
                               weights.canonical_state_dict(te.text_encoder_2))


@pytest.fixture(scope="module")
def single_file(te, tmp_path_factory):
    """A written-and-read SGM file, with the unused tensors real files carry and a UNet key to ignore."""
    sd = _to_sgm(te)
    sd[weights.SGM_CLIP_L + "text_model.embeddings.position_ids"] = torch.arange(MAX_LENGTH)[None]
    sd[weights.SGM_BIGG + "logit_scale"] = torch.tensor(4.6052)
    sd["model.diffusion_model.conv_in.weight"] = torch.zeros(4, 4, 3, 3)
    path = tmp_path_factory.mktemp("sgm") / "tiny_sdxl.safetensors"
    save_file(sd, path)  # also proves the export has no shared or non-contiguous tensors
    return load_file(path)

# -----------------------------------------------------------------------------
# encode


def test_encode_matches_diffusers(te, pipe):
    context, pooled = te.encode(PROMPTS)
    assert context.shape == (2, MAX_LENGTH, CONTEXT_DIM) and pooled.shape == (2, POOLED_DIM)
    ref, neg, ref_pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device=torch.device("cpu"),
                                                          do_classifier_free_guidance=True)
    report("context vs encode_prompt", context, ref)
    report("pooled vs encode_prompt", pooled, ref_pooled)
    # force_zeros_for_empty_prompt: diffusers' negatives are zeros of the same shapes, which is what
    # lightning_min.unet_model uses for CFG when no negative prompt is given (torch.zeros_like)
    assert pipe.config.force_zeros_for_empty_prompt
    torch.testing.assert_close(neg, torch.zeros_like(context))
    torch.testing.assert_close(neg_pooled, torch.zeros_like(pooled))


def test_pooled_is_first_eos_token(te, root):
    """The pooled vector is text_projection(final-normed hidden state at the first EOS), for both pooling
    rules."""
    from transformers import CLIPTextModelWithProjection
    ids = te.tokenizer_2(PROMPTS, padding="max_length", max_length=MAX_LENGTH, return_tensors="pt").input_ids
    eos = (ids == te.tokenizer_2.eos_token_id).int().argmax(-1)
    assert eos.tolist() == [len(te.tokenizer_2(p).input_ids) - 1 for p in PROMPTS]
    out = te.text_encoder_2(ids)
    want = te.text_encoder_2.text_projection(out.last_hidden_state[torch.arange(2), eos])  # (B, proj)
    report("pooled vs manual EOS pooling", te.encode(PROMPTS)[1], want)
    # transformers' newer rule (eos_token_id = the tokenizer's EOS) must pick the same token
    new_rule = CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2",
                                                           eos_token_id=te.tokenizer_2.eos_token_id)
    assert new_rule.config.eos_token_id != te.text_encoder_2.config.eos_token_id
    torch.testing.assert_close(text.TextEncoders(te.tokenizer, te.tokenizer_2, te.text_encoder, new_rule)
                               .encode(PROMPTS)[1], want)


def test_long_prompt_warns_and_truncates(te, pipe):
    short = "a photo of a cat " * 15  # 75 tokens: exactly what fits between BOS and EOS
    long = short + "a red dog in the snow " * 4
    n_tokens = len(te.tokenizer(long).input_ids)
    with pytest.warns(UserWarning, match=f"{n_tokens - MAX_LENGTH} tokens were dropped"):
        context, pooled = te.encode([long, "a dog"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for prompts that fit
        cut, cut_pooled = te.encode([short, "a dog"])
    report("long prompt vs its first 75 tokens", context, cut)
    torch.testing.assert_close(pooled, cut_pooled)
    ref, _, ref_pooled, _ = pipe.encode_prompt([long, "a dog"], device=torch.device("cpu"),
                                               do_classifier_free_guidance=False)
    report("long prompt vs encode_prompt", context, ref)
    torch.testing.assert_close(pooled, ref_pooled)


def test_time_ids_match_diffusers():
    from diffusers import StableDiffusionXLPipeline
    # _get_add_time_ids only reads the UNet's embedding sizes to check them
    linear_1 = SimpleNamespace(in_features=6 * 8 + 48)
    stub = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(addition_time_embed_dim=8),
                                                add_embedding=SimpleNamespace(linear_1=linear_1)))
    ref = StableDiffusionXLPipeline._get_add_time_ids(stub, (832, 1216), (0, 0), (832, 1216),
                                                      torch.float32, 48)
    got = text.time_ids(832, 1216)
    assert got.shape == (6,) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref[0])
    ref = StableDiffusionXLPipeline._get_add_time_ids(stub, (1000, 1500), (16, 32), (768, 1344),
                                                      torch.float32, 48)
    torch.testing.assert_close(text.time_ids(768, 1344, 16, 32, orig_height=1000, orig_width=1500), ref[0])
    with pytest.raises(ValueError, match="positive sizes"):
        text.time_ids(0, 1024)

# -----------------------------------------------------------------------------
# loading


def test_single_file_matches_diffusers_conversion(te, root, single_file):
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint,
                                                     convert_open_clip_checkpoint,
                                                     create_diffusers_clip_model_from_ldm)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection
    ours = weights.text_from_single_file(single_file, te.tokenizer, te.tokenizer_2)
    for a, b in ((ours.text_encoder, te.text_encoder), (ours.text_encoder_2, te.text_encoder_2)):
        for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "vocab_size",
                      "max_position_embeddings", "projection_dim", "hidden_act", "layer_norm_eps"):
            if isinstance(a, CLIPTextModel) and field == "projection_dim":
                continue  # CLIPTextModel has no projection
            assert getattr(a.config, field) == getattr(b.config, field), field
    # diffusers' own conversion of the same file gives the same tensors under the same (canonical) names
    want = convert_ldm_clip_checkpoint(single_file)
    want.pop("text_model.embeddings.position_ids")
    got = weights.canonical_state_dict(ours.text_encoder)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    want = convert_open_clip_checkpoint(te.text_encoder_2, single_file, prefix=weights.SGM_BIGG)
    got = weights.canonical_state_dict(ours.text_encoder_2)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    # and diffusers' whole single-file CLIP path (config from our folder, detection by width) encodes the same
    parts = ((CLIPTextModel, "text_encoder"), (CLIPTextModelWithProjection, "text_encoder_2"))
    ref = [create_diffusers_clip_model_from_ldm(cls, single_file, config=str(root), subfolder=sub,
                                                local_files_only=True) for cls, sub in parts]
    context, pooled = ours.encode(PROMPTS)
    ref_context, ref_pooled = text.TextEncoders(te.tokenizer, te.tokenizer_2, *ref).encode(PROMPTS)
    report("single file context vs diffusers single file", context, ref_context)
    report("single file pooled vs diffusers single file", pooled, ref_pooled)
    # round trip against the folder we exported from
    want_context, want_pooled = te.encode(PROMPTS)
    report("single file round trip context", context, want_context)
    report("single file round trip pooled", pooled, want_pooled)
    torch.testing.assert_close(_to_sgm(ours),
                               {k: v for k, v in single_file.items() if k in _to_sgm(te)})


def test_single_file_errors(te, single_file):
    def load(sd, **kw):
        return weights.text_from_single_file(sd, te.tokenizer, te.tokenizer_2, **kw)

    for key in (weights.SGM_BIGG + "transformer.resblocks.0.attn.extra", weights.SGM_BIGG + "attn_mask",
                weights.SGM_CLIP_L + "text_model.extra.weight"):
        with pytest.raises(ValueError, match=re.escape(key)):
            load({**single_file, key: torch.zeros(3)})
    missing = weights.SGM_BIGG + "transformer.resblocks.1.ln_2.bias"
    with pytest.raises(ValueError, match="resblocks.1.ln_2.bias|layers.1.layer_norm2.bias"):
        load({k: v for k, v in single_file.items() if k != missing})
    with pytest.raises(ValueError, match="no OpenCLIP bigG"):
        load({k: v for k, v in single_file.items() if not k.startswith(weights.SGM_BIGG)})
    with pytest.raises(ValueError, match="head_dim"):
        load(single_file, head_dim=7)
    with pytest.raises(ValueError, match="token_embedding"):
        load({k: v for k, v in single_file.items() if "token_embedding" not in k})


def test_full_size_single_file_config(te):
    """SDXL's real shapes, on the meta device: the configs derived from them equal the hub's config.json
    values."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    # stabilityai/stable-diffusion-xl-base-1.0 text_encoder/ and text_encoder_2/config.json
    hub = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=0,
               eos_token_id=2, pad_token_id=1)
    want = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu", **hub)
    want_2 = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                            num_attention_heads=20, projection_dim=1280, hidden_act="gelu", **hub)
    with torch.device("meta"):
        full = SimpleNamespace(text_encoder=CLIPTextModel(want),
                               text_encoder_2=CLIPTextModelWithProjection(want_2))
    sd = _to_sgm(full)
    assert sd[weights.SGM_BIGG + "text_projection"].shape == (1280, 1280)
    assert sd[weights.SGM_BIGG + "transformer.resblocks.31.attn.in_proj_weight"].shape == (3 * 1280, 1280)
    got = weights.text_from_single_file(sd, te.tokenizer, te.tokenizer_2, device="meta")
    for a, b in ((got.text_encoder.config, want), (got.text_encoder_2.config, want_2)):
        for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "vocab_size",
                      "max_position_embeddings", "projection_dim", "hidden_act",
                      "layer_norm_eps", "eos_token_id"):
            assert getattr(a, field) == getattr(b, field), field
    assert sum(p.numel() for p in got.text_encoder.parameters()) == 123_060_480  # CLIP-L
    assert sum(p.numel() for p in got.text_encoder_2.parameters()) == 694_659_840  # bigG with projection


def test_from_diffusers_hub_layout_dtype_and_errors(te, root, tmp_path):
    """Hub files name every tensor text_model.* (and old ones carry position_ids); a bad file is refused."""
    import shutil
    hub = tmp_path / "hub"
    shutil.copytree(root, hub)
    path = hub / "text_encoder" / "model.safetensors"
    sd = {"text_model." + k.removeprefix("text_model."): v for k, v in load_file(path).items()}
    sd["text_model.embeddings.position_ids"] = torch.arange(MAX_LENGTH)[None]
    save_file(sd, path, metadata={"format": "pt"})
    loaded = weights.text_from_folder(hub)
    report("hub-layout folder context", loaded.encode(PROMPTS)[0], te.encode(PROMPTS)[0])
    half = weights.text_from_folder(hub, dtype=torch.bfloat16)
    context, pooled = half.encode(PROMPTS)
    assert context.dtype == pooled.dtype == torch.bfloat16
    del sd["text_model.final_layer_norm.bias"]
    save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="final_layer_norm.bias"):
        weights.text_from_folder(hub)
    shutil.rmtree(hub / "tokenizer_2")
    with pytest.raises(ValueError, match="tokenizer_2"):
        weights.text_from_folder(hub)


class _Payload:
    """Unpickling this runs code: it would write a file named by the test."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_folder_text_encoders_are_safetensors_only(te, root, tmp_path):
    """Issue 19.4: a text encoder with only pytorch_model.bin went through transformers' torch.load (a payload
    stopped by weights_only alone, with a traceback). Now the folder's encoders are built from config.json on
    the meta device and load model.safetensors strictly; a .bin-only part is refused by name, never opened."""
    import pickle
    import shutil
    hub = tmp_path / "hub"
    shutil.copytree(root, hub)
    (hub / "text_encoder_2" / "model.safetensors").unlink()
    marker = tmp_path / "unpickled"
    (hub / "text_encoder_2" / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(weights.CheckpointError) as e:
        weights.text_from_folder(hub)
    print(e.value)
    assert str(e.value).startswith(f"{hub / 'text_encoder_2' / 'pytorch_model.bin'}: pickled weights are "
                                   "not loaded") and "\n" not in str(e.value)
    assert not marker.exists()
    # a non-float tensor in a folder's encoder: one line naming the file and the key
    path = hub / "text_encoder" / "model.safetensors"
    sd = load_file(path)
    k = sorted(sd)[4]
    save_file({**sd, k: sd[k].to(torch.int8)}, path)
    shutil.copy(root / "text_encoder_2" / "model.safetensors", hub / "text_encoder_2")
    with pytest.raises(weights.CheckpointError, match=re.escape(f"{path}: ") + ".*" +
                       re.escape(f"{k.removeprefix('text_model.')} is int8, not a floating-point tensor")):
        weights.text_from_folder(hub)
