"""The toy world end to end: the --quick base (built once per session), diffusers loading it and sampling the
same images as sample.py, caption-dependent samples, one adversarial stage with train.py that beats the
teacher at the same step count on the toy Frechet distance, and bad input.

Every toy number here is for THREADS torch threads, pinned in the base build, train.py and the
evaluations (each in its own process; the diffusers comparison in this one): a float sum splits by the
thread count, so another count trains another base (1, 2 and 4 threads: three different bases, whose
teacher at 2 steps with CFG 6 scored toy FD 19.00, 18.27 and 13.67), and the same count gives the same
numbers on any core count and under any load."""
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data as data_mod
from tools import eval as eval_mod
import sample as sample_mod
from tools import toy, toy_world

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2  # the CI machine's core count; the numbers in the docstrings below are for this count
# the environment of every program these tests run: THREADS threads (MKL's variable too, should one be
# set outside), and idle OpenMP threads sleep instead of spinning, which on a loaded machine made a
# 2-thread run 5-10x slower (the sleeping changes no number, only the time)
PINNED_ENV = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS),
              "OMP_WAIT_POLICY": "PASSIVE"}


@contextlib.contextmanager
def pinned_threads():
    """THREADS torch threads in this process for the block; torch's own setting again after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def quick(tmp_path_factory):
    """`python -m tools.toy --out DIR --quick --threads 2`, once per test session (a few minutes on 2 CPU
    cores), in its own process with PINNED_ENV. TOY_QUICK_DIR names a folder to build it in and reuse across
    sessions (a base already there is used as it is: build it with THREADS threads, or the numbers below
    do not apply)."""
    keep = os.environ.get("TOY_QUICK_DIR")
    out = Path(keep) if keep else tmp_path_factory.mktemp("toy") / "toy"
    if not (os.environ.get("TOY_QUICK_DIR") and (out / "base" / "model_index.json").exists()):
        r = subprocess.run([sys.executable, "-m", "tools.toy", "--out", str(out), "--quick", "--seed", "0",
                            "--threads", str(THREADS)], cwd=ROOT, env=PINNED_ENV, capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    return out


def toy_eval(quick, out, *args):
    """`python -m tools.eval --toy QUICK --out OUT ARGS` in its own process with PINNED_ENV -> its rows."""
    r = subprocess.run([sys.executable, "-m", "tools.eval", "--toy", str(quick), "--out", str(out),
                        "--device", "cpu", *args], cwd=ROOT, env=PINNED_ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    print(r.stdout)
    return json.loads((Path(out) / "results.json").read_text())["rows"]


# ----------------------------------------------------------------------------------------------------
# data and text, no training


def test_data_is_deterministic_and_read_by_data_py(tmp_path):
    a, cap_a = toy_world.draw(3, 17)
    b, cap_b = toy_world.draw(3, 17)
    assert cap_a == cap_b and np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(toy_world.draw(4, 17)[0]))  # the seed matters
    toy_world.write_data(tmp_path / "d", 64, seed=3)
    ds = data_mod.ImageCaptionData(str(tmp_path / "d"), resolution=64, min_size=64)
    assert len(ds) == 64
    s = ds.get(0)
    assert s.pixels.shape == (3, 64, 64) and s.caption in toy_world.all_captions()
    assert s.time_ids.tolist() == [64, 64, 0, 0, 64, 64]
    caps = {(tmp_path / "d" / f"{i:05d}.txt").read_text() for i in range(64)}
    assert len(caps) > 30  # many different captions, not one


def test_captions_parse_and_tokenize_to_whole_words(tmp_path):
    caps = toy_world.all_captions()
    assert len(caps) == len(set(caps)) == 3 * 5 * 5 * 3
    for c in caps:
        p = toy_world.parse_caption(c)
        assert toy_world.caption(*(toy_world.ATTRIBUTES[k][p[k]]
                                   for k in ("shape", "colour", "position", "background"))) == c
    from transformers import CLIPTokenizer
    toy_world.write_tokenizer(tmp_path / "tok", pad_token="!")
    tok = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    ids = tok(caps[0]).input_ids
    assert len(ids) == len(caps[0].split()) + 2  # BOS, one token per word, EOS: the merges cover every word
    assert tok("!").input_ids[1] == 0 and tok.pad_token_id == 0


# ----------------------------------------------------------------------------------------------------
# the quick base


def test_quick_base_folder_loads_in_diffusers_and_samples_like_sample_py(quick, tmp_path):
    """StableDiffusionXLPipeline.from_pretrained(toy/base) with the trailing Euler scheduler and CFG 6
    (zero uncond: force_zeros_for_empty_prompt) gives the images of `sample.py --unet base --steps 32
    --guidance 6`."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    base = quick / "base"
    assert json.loads((base / "model_index.json").read_text())["force_zeros_for_empty_prompt"] is True
    pipe = StableDiffusionXLPipeline.from_pretrained(base)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    prompt = "a red circle at the top left on a gray background"
    with pinned_threads():  # as sample.py below runs
        ref = pipe([prompt] * 2, num_inference_steps=32, guidance_scale=6.0, height=64, width=64,
                   output_type="pt",
                   generator=torch.Generator("cpu").manual_seed(7)).images * 2 - 1  # (2, 3, 64, 64), [-1, 1]
        text, unet, vae = sample_mod.load(str(base), "base", None, 32, torch.device("cpu"), torch.float32)
        # as the pipeline's
        ours = sample_mod.generate(text, unet, vae, [prompt] * 2, 32, 7, 64, 64, "epsilon", 6.0).clamp(-1, 1)
    d = (ours - ref).abs()
    print(f"toy base, ours vs diffusers pipeline: max abs err {d.max():.3e}, mean {d.mean():.3e}")
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    out = tmp_path / "s.png"
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), prompt, "--base", str(base), "--unet",
                        "base",
                        "--steps", "32", "--guidance", "6", "--width", "64", "--height", "64", "--seed", "7",
                        "--out", str(out)], capture_output=True, text=True, env=PINNED_ENV)
    assert r.returncode == 0, r.stderr
    png = np.asarray(Image.open(out), dtype=np.int16)
    ref_png = np.asarray(pipe.image_processor.pt_to_numpy(((ref[:1] + 1) / 2).clamp(0, 1))[0] * 255)
    ref_png = ref_png.round().astype(np.int16)
    assert np.abs(png - ref_png).max() <= 1


def test_quick_base_samples_depend_on_the_caption(quick, tmp_path):
    """The teacher (32 steps, CFG 6) draws what the caption says often enough: the toy classifier reads the
    position at twice chance (1/5) and the background above chance (1/3; measured 0.56 and 0.47 on 75 images).
    The shape's colour is not asserted: the quick VAE loses it (see the README's toy section)."""
    results = toy_eval(quick, tmp_path / "e", "--num", "75", "--batch", "25", "--row", "teacher32:base:32:6")
    r = results[0]
    assert r["acc_position"] > 0.4 and r["acc_background"] > 0.4, r
    a = Image.open(tmp_path / "e" / "teacher32" / "00000.png")
    b = Image.open(tmp_path / "e" / "teacher32" / "00001.png")
    assert np.abs(np.asarray(a, float) - np.asarray(b, float)).mean() > 5


def test_rerun_skips_finished_parts(quick):
    stamp = (quick / "base" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    toy.main(["--out", str(quick), "--quick", "--seed", "0"])
    assert (quick / "base" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp


def test_adversarial_stage_beats_teacher_at_the_same_step_count(quick, tmp_path):
    """One adversarial phase of train.py (4to2/cond: LoRA, conditional discriminator, Eq. 20-22; the base as
    its 4-step teacher) makes a 2-step student whose samples are closer to the data (toy Frechet distance)
    than the teacher's own 2-step samples with CFG 6 from the same noise, by a clear margin, for each
    training seed. What this shows and what it does not: the student samples without CFG, and the
    teacher's 2-step CFG-6 samples overshoot (on this base their position accuracy drops to chance, 0.23);
    against the teacher at 2 steps without CFG the student is level, not better, so that is asserted as
    "no worse than 15%", and the student still draws the position the caption names. The experiment's
    controls (README) separate the two.
    Measured with THREADS = 2 (toy FD; the student's position accuracy, chance 0.2), every number the same
    on a rerun: seed 0: student 7.21, teacher CFG 6 18.27 (0.39x), teacher without CFG 7.11 (1.01x), 0.55;
    seed 1: 7.43 (0.41x; 1.04x), 0.57; seed 2: 7.25 (0.40x; 1.02x), 0.54. On the 1-thread base 0.42-0.43x
    and 1.01-1.04x; on the 4-thread one (teacher CFG 6 13.67) 0.53x and 0.99x."""
    teacher = quick / "base" / "unet" / "diffusion_pytorch_model.safetensors"
    rows = ["teacher2:base:2:6", "teacher2-nocfg:base:2"]
    for seed in SEEDS:
        cmd = toy.train_command(quick, "4to2", "cond", steps=TEST_STEPS, batch=8, seed=seed)
        runs = tmp_path / f"runs-seed{seed}"
        cmd[cmd.index("--out") + 1] = str(runs)
        r = subprocess.run(cmd + ["--teacher", str(teacher)], capture_output=True, text=True, env=PINNED_ENV)
        assert r.returncode == 0, r.stderr[-2000:]
        log = [json.loads(x) for x in (runs / "4to2" / "cond" / "log.jsonl").read_text().splitlines()]
        assert len(log) == TEST_STEPS
        assert all(np.isfinite(x["loss_d"]) and np.isfinite(x["loss_g"]) for x in log)
        student = runs / "4to2" / "cond" / "sdxl_lightning_2step_unet.safetensors"
        rows.append(f"student2-seed{seed}:{student}:2")
    res = {x["row"]: x for x in toy_eval(quick, tmp_path / "e", "--num", "150", "--batch", "25",
                                         *(a for row in rows for a in ("--row", row)))}
    cfg6, nocfg = res["teacher2"]["fd"], res["teacher2-nocfg"]["fd"]
    for seed in SEEDS:
        st = res[f"student2-seed{seed}"]
        print(f"toy FD at 2 steps, seed {seed}: student {st['fd']:.3f}, teacher CFG 6 {cfg6:.3f} "
              f"({st['fd'] / cfg6:.3f}x), teacher without CFG {nocfg:.3f} ({st['fd'] / nocfg:.3f}x); "
              f"student position accuracy {st['acc_position']:.3f}")
    for seed in SEEDS:
        st = res[f"student2-seed{seed}"]
        assert st["fd"] < 0.7 * cfg6, (seed, st["fd"], cfg6)
        assert st["fd"] < 1.15 * nocfg, (seed, st["fd"], nocfg)
        assert st["acc_position"] > 0.4, (seed, st)


TEST_STEPS = 40
SEEDS = (0, 1, 2)  # train.py --seed; a run: 40 steps of batch 8, 45-60 s on the loaded 2-core machine

# ----------------------------------------------------------------------------------------------------
# bad input


def test_experiment_chains_every_run_to_an_earlier_one_and_evaluates_each_ablation(tmp_path):
    """`toy.py all`: each run's --teacher / --init / --skip-level-teacher is a checkpoint an earlier run
    writes; every ablation's export becomes its eval row with the prediction it was trained for."""
    out = tmp_path / "toy"
    written = set()
    for folder, stage, phase, steps, extra in toy.full_plan(out, 120):
        for flag in ("--teacher", "--init", "--skip-level-teacher"):
            if flag in extra:
                assert extra[extra.index(flag) + 1] in written, (folder, stage, phase, flag)
        written.add(str(out / folder / stage / phase / "checkpoint.pt"))
        pred = extra[extra.index("--prediction") + 1] if "--prediction" in extra else None
        f = toy.unet_file(out, stage, phase, folder, pred)
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"")
    rows = {r.split(":")[0]: r.split(":") for r in toy.eval_rows(out)}
    for name, pred, steps in [("mse-pd4", "epsilon", "4"), ("mse-pd1", "sample", "1"),
                              ("lightning1-eps", "epsilon", "1"), ("lightning1-no-renoise", "sample", "1")]:
        assert rows[name][-1] == pred and rows[name][-3] == steps, rows[name]
    assert rows["lightning1-eps"][1].endswith("runs-eps/2to1/uncond/sdxl_lightning_1step_unet.safetensors")
    assert {"teacher32", "lightning4-lora", "lightning4-cond-only", "lightning1",
            "lightning1-long"} <= set(rows)


@pytest.mark.parametrize("argv,match", [
    (["--images", "10"], "--images must be >= 64"),
    (["--unet-steps", "0"], "--unet-steps"),
    (["--out", "FILE"], "is a file"),
    (["bogus"], None),
])
def test_bad_input_is_one_clear_line(tmp_path, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("x")
    with pytest.raises(SystemExit) as e:
        toy.main(argv if "--out" in argv else argv + ["--out", str(tmp_path / "o")])
    if match is None:
        assert e.value.code == 2  # argparse: an unknown command
    else:
        assert str(e.value).startswith("error: ") and match in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "o" / "base").exists()


def test_other_settings_in_the_same_folder_are_refused(tmp_path):
    (tmp_path / "o" / "work").mkdir(parents=True)
    (tmp_path / "o" / "work" / "config.json").write_text(json.dumps({"quick": True, "images": 1}))
    with pytest.raises(SystemExit, match="^error: .*built with other settings"):
        toy.main(["--out", str(tmp_path / "o"), "--quick"])


def test_eval_refuses_non_toy_prompts_and_missing_classifier(tmp_path):
    (tmp_path / "p.txt").write_text("a photo of a cat\n")
    (tmp_path / "t" / "base").mkdir(parents=True)
    (tmp_path / "t" / "base" / "model_index.json").write_text("{}")
    with pytest.raises(SystemExit, match="^error: 'a photo of a cat' is not a toy caption"):
        eval_mod.main(["--toy", str(tmp_path / "t"), "--prompts", str(tmp_path / "p.txt"), "--out",
                       str(tmp_path / "e"), "--row", "a:base:4"])
    with pytest.raises(SystemExit, match="^error: .*classifier.safetensors: no such file"):
        eval_mod.main(["--toy", str(tmp_path / "t"), "--out", str(tmp_path / "e"), "--row", "a:base:4"])
