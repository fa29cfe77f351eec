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
