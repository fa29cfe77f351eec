"""eval.py's pieces offline: the Frechet distance against scipy's sqrtm formula, the FID-Whole / FID-Patch
image rules against independent code, CLIP score on a tiny random CLIP model against a direct computation, the
real-SDXL command end to end on a tiny base, and bad input."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tools import eval as eval_mod


def scipy_fd(mu1, s1, mu2, s2):
    """pytorch-fid's formula, written directly: scipy.linalg.sqrtm of the product, real part."""
    from scipy import linalg
    covmean = linalg.sqrtm(s1.dot(s2))
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("n,d", [(200, 16), (50, 8), (30, 40)])  # the last: rank-deficient covariances
def test_frechet_distance_equals_scipy_formula(n, d):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    b = rng.normal(size=(n, d)) * 1.5 + 0.3
    ours = eval_mod.fd_of(a, b)
    mu1, s1 = np.mean(a, 0), np.cov(a, rowvar=False)
    mu2, s2 = np.mean(b, 0), np.cov(b, rowvar=False)
    ref = scipy_fd(mu1, s1, mu2, s2)
    print(f"FD ours {ours:.10f} scipy {ref:.10f} abs err {abs(ours - ref):.3e}")
    assert ours == pytest.approx(ref, rel=1e-6, abs=1e-6)
    assert eval_mod.fd_of(a, a) == pytest.approx(0.0, abs=1e-6 * np.trace(s1))
    assert eval_mod.fd_of(a[::-1], b) == pytest.approx(ours, rel=1e-9)  # order of samples does not matter


def test_frechet_distance_of_known_gaussians():
    """Closed form for diagonal covariances: |mu1-mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2."""
    s1, s2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 4.0, 1.0])
    fd = eval_mod.frechet_distance(np.zeros(3), s1, np.array([1.0, 0, 0]), s2)
    assert fd == pytest.approx(1 + (1 - 2) ** 2 + 0 + (3 - 1) ** 2, rel=1e-12)


def test_fid_whole_resize_matches_torch_antialiased_bicubic():
    """PIL's float bicubic (clean-fid's 'clean' resize) against torch's antialiased bicubic, an independent
    implementation of the same filter: within a fraction of a grey level away from the border."""
    rng = np.random.default_rng(0)
    arr = (rng.random((96, 128, 3)) * 40 + np.linspace(0, 200, 128)[None, :, None]).astype(np.uint8)
    ours = eval_mod.resize_whole(Image.fromarray(arr), 299)  # upscale
    ref = torch.nn.functional.interpolate(torch.from_numpy(arr).permute(2, 0, 1)[None].double(),
                                          size=(299, 299),
                                          mode="bicubic", antialias=True,
                                          align_corners=False)[0].permute(1, 2, 0).numpy()
    d = np.abs(ours - ref.clip(0, 255))[4:-4, 4:-4]
    print(f"resize up: max abs err {d.max():.3f}, mean {d.mean():.4f} (0..255)")
    assert ours.shape == (299, 299, 3) and ours.dtype == np.float32
    assert d.max() < 1.0
    big = np.kron(arr, np.ones((8, 8, 1), dtype=np.uint8))  # 768x1024 -> 299: a downscale with antialiasing
    ours = eval_mod.resize_whole(Image.fromarray(big), 299)
    ref = torch.nn.functional.interpolate(torch.from_numpy(big).permute(2, 0, 1)[None].double(),
                                          size=(299, 299),
                                          mode="bicubic", antialias=True,
                                          align_corners=False)[0].permute(1, 2, 0).numpy()
    d = np.abs(ours - ref.clip(0, 255))[4:-4, 4:-4]
    print(f"resize down: max abs err {d.max():.3f}, mean {d.mean():.4f}")
    assert d.max() < 1.0


@pytest.mark.parametrize("w,h,top,left", [(1024, 1024, 362, 362), (1216, 832, 266, 458), (299, 400, 50, 0)])
def test_fid_patch_is_the_centre_crop_at_full_resolution(w, h, top, left):
    """round((size - 299) / 2) as torchvision's CenterCrop: 1024 -> 362 (round half to even), 832 -> 266."""
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([yy % 256, xx % 256, (yy // 256) * 16 + xx // 256], -1).astype(np.uint8)
    patch = eval_mod.center_patch(Image.fromarray(arr))
    assert patch.shape == (299, 299, 3)
    np.testing.assert_array_equal(patch, arr[top:top + 299, left:left + 299].astype(np.float32))
    with pytest.raises(ValueError, match="at least 299"):
        eval_mod.center_patch(Image.fromarray(arr[:298]))


def tiny_clip(folder):
    """A random tiny CLIPModel with its tokenizer (toy.py's local vocabulary) and image processor, saved."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    from tools import toy_world as toy
    toy.write_tokenizer(folder, pad_token="<|endoftext|>")
    vocab = len(toy.vocab_and_merges()[0])
    cfg = CLIPConfig(text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=77, bos_token_id=0,
                                      eos_token_id=2, pad_token_id=1),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2,
                                        image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(folder)
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}),
                         tokenizer=CLIPTokenizer.from_pretrained(folder))
    proc.save_pretrained(folder)
    return model


def test_clip_score_equals_direct_computation(tmp_path):
    """Our CLIP score = 100 max(cos, 0) of the towers' embeddings, preprocessing written out here by hand
    (bicubic shortest side -> 32 with the long side floored, centre crop, CLIP mean/std), text padded to
    77."""
    model = tiny_clip(tmp_path / "clip")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)) for _ in range(3)]
    prompts = ["a red circle at the center on a gray background",
               "a blue square at the top left on a black background",
               "a yellow triangle at the bottom right on a white background"]
    scorer = eval_mod.ClipScore(str(tmp_path / "clip"))
    ours_cos, ours = scorer.cosine(images, prompts), scorer(images, prompts)
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    px = []
    for im in images:
        # shortest side (height 48) -> 32, floor
        r = im.resize((int(64 * 32 / 48), 32), Image.Resampling.BICUBIC)
        left = (r.size[0] - 32) // 2
        a = np.asarray(r.crop((left, 0, left + 32, 32)), dtype=np.float64) / 255
        px.append(((a - mean) / std).transpose(2, 0, 1))
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(tmp_path / "clip")
    ids = tok(prompts, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        img = eval_mod._tensor(model.get_image_features(pixel_values=torch.tensor(np.stack(px),
                                                                                  dtype=torch.float32)))
        txt = eval_mod._tensor(model.get_text_features(input_ids=ids.input_ids,
                                                       attention_mask=ids.attention_mask))
    cos = (img / img.norm(dim=-1, keepdim=True) * (txt / txt.norm(dim=-1, keepdim=True))).sum(-1).numpy()
    print(f"cosine ours {ours_cos} direct {cos}, max abs err {np.abs(ours_cos - cos).max():.3e}")
    assert np.abs(cos).min() > 1e-3  # a test of something: non-trivial similarities
    np.testing.assert_allclose(ours_cos, cos, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(ours, 100 * np.maximum(cos, 0), atol=1e-3)


class _TinyInception(torch.nn.Module):
    """A TorchScript stand-in with the interface of clean-fid's inception-2015-12-05.pt."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=4)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        h = torch.relu(self.conv(x / 255.0))  # (B, 8, h, w)
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)  # (B, 16)


def test_real_protocol_end_to_end_on_a_tiny_base(tmp_path):
    """eval.py as a user runs it: tiny random SDXL base, a TorchScript 'Inception', a tiny CLIP; two rows.
    Generated at 64 px (below 299: FID-Patch is left out, '-'; the patch path runs on the 320 px references).
    The features of the reference set against themselves give 0; every number lands in both tables."""
    from tools.tiny import make_tiny_base
    make_tiny_base(tmp_path / "base")
    torch.manual_seed(0)
    torch.jit.script(_TinyInception()).save(str(tmp_path / "inception.pt"))
    tiny_clip(tmp_path / "clip")
    ref = tmp_path / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (320, 320, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    (tmp_path / "prompts.txt").write_text("a photo of a cat\na dog in the snow\na red car\na cat\n")
    args = ["--prompts", tmp_path / "prompts.txt", "--ref-images", ref, "--out", tmp_path / "out", "--base",
            tmp_path / "base", "--fid-model", tmp_path / "inception.pt", "--clip-model", tmp_path / "clip",
            "--width", 64, "--height", 64, "--batch", 2, "--row", "base2:base:2", "--row",
            "base1cfg:base:1:3"]
    results = eval_mod.main([str(a) for a in args])
    assert [r["row"] for r in results] == ["base2", "base1cfg"]
    for r in results:
        assert r["images"] == 4 and r["fid_whole"] > 0 and r["fid_patch"] is None
        assert 0 <= r["clip_score"] <= 100
    assert len(list((tmp_path / "out" / "base2").glob("*.png"))) == 4
    table = json.loads((tmp_path / "out" / "results.json").read_text())
    assert table["rows"][0]["fid_whole"] == results[0]["fid_whole"]
    assert "FID-Patch: 299 px centre crop" in (tmp_path / "out" / "results.md").read_text()
    fe = eval_mod.feature_extractor(str(tmp_path / "inception.pt"))
    imgs = [Image.open(p) for p in sorted(ref.iterdir())]
    whole, patch = eval_mod.image_features(fe, imgs)
    assert eval_mod.fd_of(whole, whole) == pytest.approx(0, abs=1e-8) and patch.shape == (6, 16)


@pytest.mark.parametrize("case,match", [
    (["--row", "a:base"], "NAME:UNET:STEPS"),
    (["--row", "a/b:base:4"], "NAME names an output folder"),
    (["--row", "a:base:4:0:v"], "PREDICTION must be"),
    (["--row", "a:base:4", "--row", "a:base:2"], "names must differ"),
    (["--row", "a:base:4", "--prompts", "missing.txt"], "no such file"),
    (["--row", "a:base:4"], "--prompts is required"),
    (["--row", "a:base:4", "--prompts", "PROMPTS", "--fid-model", "x.pt"], "needs --ref-images"),
    (["--row", "a:base:4", "--prompts", "PROMPTS", "--ref-images", "REF",
      "--fid-model", "nope.pt"], "no such file"),
    (["--row", "a:base:4", "--prompts", "EMPTY"], "no prompts"),
    (["--row", "a:base:4", "--toy", "missing_toy"], "no toy base"),
    (["--row", "a:base:4", "--batch", "0"], "at least 1"),
    (["--row", "a:base:4", "--prompts", "PROMPTS", "--reference"], "needs --toy"),
    (["--row", "data:base:4", "--toy", "missing_toy", "--reference"], "name the --row otherwise"),
])
def test_bad_input_is_one_clear_line(tmp_path, monkeypatch, case, match):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "PROMPTS").write_text("a cat\n")
    (tmp_path / "EMPTY").write_text("\n\n")
    (tmp_path / "REF").mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8)).save(tmp_path / "REF" / f"{i}.png")
    with pytest.raises(SystemExit) as e:
        eval_mod.main(case + ["--out", str(tmp_path / "out")])
    msg = str(e.value)
    print(msg)
    assert msg.startswith("error: ") and match in msg and "\n" not in msg
    assert not (tmp_path / "out" / "results.json").exists()


# ----------------------------------------------------------------------------------------------------
# Issues 18, 19.2, 19.6: stale rows, many references, decompression bombs, a real full disk


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tools.tiny import make_tiny_base
    root = tmp_path_factory.mktemp("eval_tiny")
    make_tiny_base(root / "base")
    torch.manual_seed(0)
    torch.jit.script(_TinyInception()).save(str(root / "inception.pt"))
    (root / "prompts.txt").write_text("a photo of a cat\na dog in the snow\na red car\n")
    return root


def _eval(tiny, out, *extra):
    argv = ["--prompts", tiny / "prompts.txt", "--out", out, "--base", tiny / "base", "--width", 32,
            "--height", 32, "--batch", 2, *extra]
    return eval_mod.main([str(a) for a in argv])


def _eval_error(tiny, out, *extra):
    with pytest.raises(SystemExit) as e:
        _eval(tiny, out, *extra)
    msg = str(e.value.code)
    print(msg)
    assert msg.startswith("error: ") and "\n" not in msg
    return msg


def test_rerun_with_other_settings_is_refused_same_settings_kept(tiny, tmp_path):
    """Issue 19.2: a re-run with the same --out and row name but another UNet, steps, guidance, prediction,
    size or seed reported the old images as the new row's numbers. Each row folder records its settings
    (settings.json, with a hash of the prompts); the same settings keep the images, other ones are refused,
    naming what differs, before anything is generated."""
    out = tmp_path / "out"
    _eval(tiny, out, "--row", "a:base:2")
    row = out / "a"
    assert json.loads((row / "settings.json").read_text())["steps"] == 2
    stamps = {p.name: p.stat().st_mtime_ns for p in row.glob("*.png")}
    _eval(tiny, out, "--row", "a:base:2")  # the same settings: kept, not generated again
    assert {p.name: p.stat().st_mtime_ns for p in row.glob("*.png")} == stamps
    unet = tmp_path / "u.safetensors"
    from safetensors.torch import save_file
    from tools.tiny import diffusers_unet
    save_file({k: v.contiguous() for k, v in diffusers_unet(seed=4).state_dict().items()}, unet)
    for extra, what in [(["--row", "a:base:4"], "steps"), (["--row", "a:base:2:3"], "guidance"),
                        (["--row", "a:base:2:0:sample"], "prediction"), (["--row", f"a:{unet}:2"], "unet"),
                        (["--row", "a:base:2", "--seed", 1], "seed"),
                        (["--row", "a:base:2", "--width", 48], "width")]:
        msg = _eval_error(tiny, out, *extra)
        assert f"{row}: holds images made with other settings (other {what}" in msg
    (tiny / "p2.txt").write_text("a photo of a cat\na dog in the snow\nthe snow\n")
    msg = _eval_error(tiny, out, "--row", "a:base:2", "--prompts", tiny / "p2.txt")
    assert "prompts_sha256" in msg
    assert {p.name: p.stat().st_mtime_ns for p in row.glob("*.png")} == stamps  # nothing was touched
    (row / "settings.json").unlink()  # images of an older eval.py: no record, refused too
    assert "no settings.json" in _eval_error(tiny, out, "--row", "a:base:2")


def test_many_reference_images_within_the_open_file_limit(tiny, tmp_path):
    """Issue 19.6: every reference image was opened at once ('Too many open files' from ~1,020 images). With
    the open-file limit lowered to 64 more than are open now, 200 references are read in bounded batches."""
    import os
    import resource
    ref = tmp_path / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(200):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(ref / f"{i:03d}.png")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 64, hard))
    try:
        results = _eval(tiny, tmp_path / "out", "--row", "a:base:1", "--ref-images", ref, "--fid-model",
                        tiny / "inception.pt")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert results[0]["fid_whole"] > 0


@pytest.mark.parametrize("case", ["bomb", "corrupt"])
def test_unreadable_reference_refused_by_name(tiny, tmp_path, monkeypatch, case):
    """Issue 19.6: a decompression-bomb PNG among the references was a traceback; it (or a corrupt file) is
    refused naming the file (not skipped: FID against a silently smaller reference set is another number)."""
    ref = tmp_path / "ref"
    ref.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(ref / f"{i}.png")
    if case == "bomb":
        Image.new("RGB", (64, 64)).save(ref / "1.png")
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels: over twice the limit
    else:
        (ref / "1.png").write_bytes(b"\x89PNG not really")
    msg = _eval_error(tiny, tmp_path / "out", "--row", "a:base:1", "--ref-images", ref, "--fid-model",
                      tiny / "inception.pt")
    assert f"--ref-images {ref / '1.png'}: " + {"bomb": "too many pixels, refused as a possible "
                                                        "decompression bomb",
                                                "corrupt": "not a readable image"}[case] in msg


def test_full_disk_for_real_is_one_line(tiny, small_disk):
    """Issue 18: eval.py on a full disk (a real 256 KiB tmpfs): the one line naming the file, no temp file."""
    out = small_disk.path / "out"
    small_disk(free=0)
    msg = _eval_error(tiny, out, "--row", "a:base:1")
    assert "the disk is full" in msg and str(out) in msg
    assert not [p for p in small_disk.path.rglob("*") if ".tmp" in p.name]


def test_diversity_is_the_median_over_captions_of_the_unbiased_within_caption_variance():
    """Per caption, the unbiased variance of its features (summed over features) equals the mean squared
    distance over its pairs / 2; captions with one image are left out; the median over the rest; none
    repeated: None."""
    rng = np.random.default_rng(0)
    f = rng.normal(size=(9, 3))
    f[7:] *= 100  # one caption far more spread: the median ignores it
    caps = ["a", "a", "b", "b", "b", "c", "d", "e", "e"]
    pair = lambda i, j: ((f[i] - f[j]) ** 2).sum()
    a, b, e = pair(0, 1) / 2, (pair(2, 3) + pair(2, 4) + pair(3, 4)) / 3 / 2, pair(7, 8) / 2
    assert e > 100 * max(a, b)
    assert eval_mod.within_caption_spread(f, caps) == pytest.approx(max(a, b))  # the median of 3: the middle
    assert eval_mod.within_caption_spread(f[5:7], caps[5:7]) is None
