"""bench.py --what memory: the per-GPU memory table of every training phase at SDXL size, from parameter
counts built on the meta device (no weights, no GPU, a few seconds)."""
import json

from tools import bench


def test_memory_table_from_the_real_sdxl_shapes(tmp_path, capsys):
    bench.main(["--what", "memory", "--json", str(tmp_path / "m.json")])
    out = capsys.readouterr().out
    print(out)
    rows = {r["phase"]: r for r in json.loads((tmp_path / "m.json").read_text())}
    c = bench.sdxl_parameter_counts()
    # the counts of the released files (DESIGN.md): SDXL UNet, the rank-64 LoRA of 788 layers
    assert c["unet"] == 2_567_463_684 and c["lora"] == 196_751_360 and c["text"] == 817_720_320
    assert c["unet"] > c["disc_cond"] > c["disc_uncond"]
    # one GPU, `full`: 16 B per trained parameter (student and discriminator), 2 B per frozen one (teacher,
    # text, VAE)
    want = 16 * (c["unet"] + c["disc_cond"]) + 2 * (c["unet"] + c["text"] + c["vae"])
    assert abs(rows["full"]["1_zero"] * 1e9 - want) < 1
    # FSDP2 holds less than DDP + ZeRO, and less on more GPUs; ZeRO shrinks with N too
    for r in rows.values():
        assert r["2_fsdp"] < r["2_zero"] and r["8_fsdp"] < r["8_zero"] and r["8_fsdp"] < r["2_fsdp"]
        assert r["8_zero"] < r["2_zero"]
    # what FSDP2 gathers is small next to the models: the sharded part scales as 1/N
    g = c["unet_gathered"]
    assert g["unit"] < 0.03 * c["unet"] and g["root"] < 0.03 * c["unet"]
    assert "| full, 2to1 cond/uncond" in out and "8 GPUs FSDP2" in out


def test_report_tiny_on_cpu_writes_every_item(tmp_path, monkeypatch, capsys):
    """Issue 17.3: `bench.py --report OUT --tiny` on the CPU: the setup, the plain sampling rows (ours and
    diffusers), two training phases (zero and fsdp) with step time, memory and FLOPs, and an item whose worker
    dies (a hard crash) reported as an error while the next item runs in a fresh worker; every other item is
    listed as not selected. report.json and report.md hold them all."""
    monkeypatch.setenv("LIGHTNING_CRASH_AT", "report:train/2to1/convert/zero+compile")
    monkeypatch.setenv("LIGHTNING_CRASH_HARD", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "report"
    bench.main(["--report", str(out), "--tiny", "--device", "cpu", "--runs", "1", "--warmup", "1",
                "--report-train-steps", "1", "--report-items", "sample/plain", "train/2to1/convert/zero*",
                "train/2to1/convert/fsdp"])
    printed = capsys.readouterr().out
    print(printed)
    report = json.loads((out / "report.json").read_text())
    items = {d["name"]: d for d in report["items"]}
    assert list(items) == [i["name"] for i in bench.report_items(tiny=True)]  # every item, in order
    for d in items.values():
        assert d["ok"] or d["error"], d["name"]
        assert f"{d['name']}: " in printed  # progress, one line per item
    assert items["setup"]["ok"] and items["sample/plain"]["ok"]
    rows = {r["what"]: r for r in items["sample/plain"]["rows"]}
    assert set(rows) == {"unet forward"} | {f"sample {n} steps 16px" for n in (1, 2, 4, 8)}
    for r in rows.values():
        assert r["ours_ms"] > 0 and r["diffusers_ms"] > 0 and r["tflop"] > 0 and r["max_abs_diff"] < 1e-4
    assert rows["sample 8 steps 16px"]["tflop"] > rows["sample 1 steps 16px"]["tflop"]
    for name in ("train/2to1/convert/zero", "train/2to1/convert/fsdp"):
        assert items[name]["ok"], items[name]
        r = items[name]["rows"][0]
        assert r["step_ms"] > 0 and r["peak_gb"] > 0 and r["steps_timed"] == 1
        assert r["tflops"] > 0  # the plain run's FLOPs over this run's step time
    assert not items["train/2to1/convert/zero+compile"]["ok"]
    assert "worker process died" in items["train/2to1/convert/zero+compile"]["error"]
    assert items["train/2to1/convert/fsdp+compile"]["error"] == "skipped: not selected (--report-items)"
    assert items["train/8to4/cond/zero"]["error"].startswith("skipped: not selected")
    md = (out / "report.md").read_text()
    assert "| sample 4 steps 16px |" in md and "| 2to1/convert | fsdp | no |" in md
    assert "- train/2to1/convert/zero+compile: the worker process died" in md
    peak = bench.device_peak_tflops
    assert peak("NVIDIA H100 80GB HBM3") == peak("NVIDIA H200") == 989 and peak("NVIDIA L40S") == 362
    assert peak("NVIDIA A100-SXM4-40GB") == 312 and peak("x") is None and peak("x", 100) == 100
