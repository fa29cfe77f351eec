"""tools/toy_section5.py's parts without a trained toy world: the pixel reading its tables rest on (right on
the data at every size and in both palettes, wrong where the image is), the ControlNet it starts from the
UNet, the bucketed data set, and bad input. The experiment itself runs with the quick base in test_toy.py."""
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import data as data_mod
import unet as unet_mod
import weights
from tools import toy_section5 as s5
from tools import toy_world


@pytest.mark.parametrize("width,height", [(32, 32), (48, 32), (32, 48), (64, 32), (32, 64)])
@pytest.mark.parametrize("palette", [None, s5.FT_PALETTE])
def test_the_pixel_judge_reads_every_attribute_of_the_data(width, height, palette):
    images, captions = zip(*[toy_world.draw(3, i, width, height, palette) for i in range(150)])
    assert all(im.size == (width, height) for im in images)
    r = s5.pixel_judge(images, captions, palette, s5.COLOURS if palette else s5.FT_PALETTE)
    for k in ("one_shape", "px_colour", "px_position", "px_background", "px_all", "style"):
        assert r[k] == 1.0, (k, r)


def test_the_pixel_judge_sees_a_second_shape_the_other_palette_and_a_moved_shape():
    text = "a red circle at the top left on a gray background"
    one = toy_world.draw_caption(text, 0, 0)
    two = one.copy()
    ImageDraw.Draw(two).ellipse([22, 22, 28, 28], fill=s5.COLOURS["red"])  # a ghost at the bottom right
    ft = toy_world.render(np.random.default_rng([0, 0]), text, palette=s5.FT_PALETTE)
    moved = toy_world.render(np.random.default_rng([0, 0]), text.replace("top left", "bottom right"))
    r = s5.pixel_judge([one, two], [text] * 2)
    assert r["one_shape"] == 0.5 and r["px_all"] == 0.5
    assert s5.pixel_judge([ft], [text], s5.COLOURS, s5.FT_PALETTE)["style"] == 0.0  # not the base's palette
    assert s5.pixel_judge([ft], [text], s5.FT_PALETTE, s5.COLOURS)["style"] == 1.0
    r = s5.pixel_judge([moved], [text], masks=s5.masks_of([one]))
    assert r["px_position"] == 0.0 and r["iou"] == 0.0 and r["centre_px"] > 10
    blank = Image.new("RGB", (32, 32), (128, 128, 128))
    r = s5.pixel_judge([blank], [text.replace("gray", "white")], masks=s5.masks_of([one]))
    assert r["one_shape"] == 0.0 and r["px_background"] == 0.0 and r["iou"] == 0.0
    assert np.isnan(r["centre_px"])  # no shape: no centre


def test_the_controlnet_starts_as_the_unet_and_loads_as_sample_py_loads_it(tmp_path):
    cfg = toy_world.unet_config(toy_world.ToyConfig())
    torch.manual_seed(0)
    unet = unet_mod.UNet(cfg).eval()
    net = s5.controlnet_from(unet).eval()
    theirs = unet.state_dict()
    shared = [k for k in net.state_dict() if k in theirs]
    assert len(shared) > 50 and all(torch.equal(net.state_dict()[k], theirs[k]) for k in shared)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 500])
    ctx, pooled, ids = torch.randn(2, 77, cfg.cross_attention_dim), torch.randn(2, cfg.pooled_dim), \
        torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)
    mask = torch.zeros(2, 3, 32, 32)
    mask[:, :, 4:12, 4:12] = 1
    with torch.no_grad():
        plain = unet(x, t, ctx, pooled, ids)
        steered = unet_mod.ControlledUNet(unet, [(net, mask, 1.0)])(x, t, ctx, pooled, ids)
    torch.testing.assert_close(steered, plain, rtol=0, atol=0)  # zero convolutions: no change at the start
    toy_world.write_model(tmp_path / "cn", net)
    loaded = weights.load_controlnet(str(tmp_path / "cn"))
    weights.check_controlnet_fits(loaded, unet.config, "toy controlnet")
    assert loaded.config.conditioning_embedding_out_channels == (16, 32, 64)
    with torch.no_grad():
        down, _ = loaded(x, t, ctx, pooled, ids, mask)
    assert down[0].shape == (2, 32, 8, 8)  # the hint encoder's factor 4 is the toy VAE's


def test_the_bucketed_data_fills_three_buckets_and_keeps_its_images_whole(tmp_path):
    toy_world.write_data(tmp_path / "d", 9, 1, sizes=s5.BUCKET_SIZES)
    multiple = toy_world.FACTOR * 2 ** (len(toy_world.ToyConfig().widths) - 1)  # as train.py computes it: 16
    ds = data_mod.open_data(str(tmp_path / "d"), 32, min_size=32, sharpness=0, buckets=True,
                            multiple=multiple, global_batch=3)
    assert sorted(ds.buckets[b] for b in set(ds.item_bucket.tolist())) == [(32, 32), (32, 48), (48, 32)]
    for i in range(9):  # every image lies in a bucket of its own size: nothing is cropped away
        w, h = s5.BUCKET_SIZES[i % 3]
        sample = ds.load(i)
        assert sample.pixels.shape == (3, h, w) and sample.time_ids.tolist() == [h, w, 0, 0, h, w]
        img = np.array(Image.open(tmp_path / "d" / f"{i:05d}.png").convert("RGB"))
        torch.testing.assert_close(sample.pixels, torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1)


def test_it_refuses_an_out_without_the_experiment_or_with_other_settings(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="run `python -m tools.toy all --out .* --seeds 3` first"):
        s5.main(["--out", str(tmp_path)])
    monkeypatch.setattr(s5, "unet_file", lambda *a, **k: tmp_path)  # every input "exists"
    monkeypatch.setattr(s5, "checkpoint", lambda *a, **k: str(tmp_path))
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model_index.json").write_text("{}")
    (tmp_path / "runs" / "8to4" / "uncond").mkdir(parents=True)
    (tmp_path / "runs" / "8to4" / "uncond" / "sdxl_lightning_4step_lora.safetensors").write_text("")
    s5.check_inputs(tmp_path, s5.parse_args(["--out", str(tmp_path)]))  # writes section5/settings.json
    s5.check_inputs(tmp_path, s5.parse_args(["--out", str(tmp_path)]))  # the same settings: accepted
    with pytest.raises(ValueError, match="made with other settings"):
        s5.check_inputs(tmp_path, s5.parse_args(["--out", str(tmp_path), "--controlnet-steps", "5"]))
    with pytest.raises(SystemExit):
        s5.parse_args(["--images", "0"])
