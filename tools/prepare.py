"""Encode a data set once for training: VAE latents and both CLIP embeddings, so that train.py runs without
the VAE and the text encoders (frozen in every stage, and about three quarters of a UNet forward per image).

    python -m tools.prepare --data shards/ --base stabilityai/stable-diffusion-xl-base-1.0 --out cache/
    torchrun --nproc_per_node 8 -m tools.prepare --data shards/ --out cache/ --resolution 1024 --dtype bf16
    python train.py --stage 8to4 --data cache/ ...

The data set is indexed exactly as train.py indexes it (data.ImageCaptionData with the same filters), then
cut into shards of --shard-size dataset indices; rank r encodes shards r, r + W, ... . Per usable image a
shard stores the VAE latent mean and std (times the VAE scaling factor, the UNet's scale), the (77, 2048)
context and (1280,) pooled output of text.TextEncoders.encode, and the 6 time ids (float32); images
that fail a load-time filter (corrupt, caption not UTF-8, blurry) are left out and counted. The index
OUT/cache_index.json (format version, base, resolution, dtype, filters, the counts) is written last, by
rank 0, when every shard exists. Re-running the same command resumes: finished shards are checked and kept.
The seed plays no part here: data.CachedData applies the training seed's order when it reads.
"""
import argparse
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import data
import files
import weights

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------
# what the cache is made from: the header every shard carries


def cache_header(ds, args, vae, text):
    """Everything the cache depends on, and its fingerprint: a shard with another fingerprint is foreign."""
    h = {"format": data.CACHE_FORMAT, "version": data.CACHE_VERSION,
         "base": os.path.realpath(args.base) if os.path.exists(args.base) else args.base,
         "resolution": args.resolution, "dtype": args.dtype, "compute_dtype": args.compute_dtype,
         "data": os.path.abspath(args.data), "shard_size": args.shard_size, "items": len(ds),
         "filters": {"min_size": args.min_size, "sharpness": args.sharpness,
                     "min_aesthetic": args.min_aesthetic,
                     "aesthetic_key": args.aesthetic_key, "clean_captions": args.clean_captions},
         "latent_shape": [vae.config.latent_channels, args.resolution // vae.config.downscale,
                          args.resolution // vae.config.downscale],
         "context_shape": [text.seq_len, text.context_dim], "pooled_dim": text.pooled_dim,
         "scaling_factor": vae.config.scaling_factor}
    if ds.buckets is not None:  # only then: a square cache keeps the fingerprint it always had
        f = vae.config.downscale
        h["buckets"] = [list(b) for b in ds.buckets]
        h["bucket_of"] = ds.item_bucket.tolist()
        h["packed_latent"] = max((bh // f) * (bw // f) for bh, bw in ds.buckets)
    items = [(os.path.abspath(it[0]), *it[1:3], os.path.abspath(it[3]), *it[4:]) for it in ds.items]
    h["fingerprint"] = hashlib.sha256(json.dumps([h, items], sort_keys=True).encode()).hexdigest()
    return h


def shard_range(k, header):
    S = header["shard_size"]
    return range(k * S, min(header["items"], (k + 1) * S))


# ----------------------------------------------------------------------------------------------------
# one shard


def encode_shard(k, ds, vae, text, header, args, device):
    """The tensors and load-time counts of shard k. Batches are cut inside the shard, so the result does not
    depend on the number of ranks; decoding runs in threads, one chunk ahead of the encoder."""
    counts = dict(corrupt=0, bad_caption=0, blurry=0, cleaned=0, long_caption=0, cached=0)
    out = {name: [] for name in data.CACHE_TENSORS}
    idx = list(shard_range(k, header))
    chunks = [idx[i:i + args.batch_size] for i in range(0, len(idx), args.batch_size)]
    cdt, sdt = COMPUTE_DTYPES[args.compute_dtype], data.CACHE_DTYPES[args.dtype]
    with ThreadPoolExecutor(args.workers) as pool:
        pending = pool.map(ds.read, chunks[0]) if chunks else None
        for j in range(len(chunks)):
            results = list(pending)
            if j + 1 < len(chunks):
                pending = pool.map(ds.read, chunks[j + 1])  # decode the next chunk while this one encodes
            samples = []
            for sample, status in results:
                if status != "ok":
                    counts[status] += 1
                if sample is not None:
                    samples.append(sample)
            if not samples:
                continue
            # one encoder call per image size (a single one with square crops); rows stay in index order
            groups, enc = {}, [None] * len(samples)
            for r, smp in enumerate(samples):
                groups.setdefault(tuple(smp.pixels.shape), []).append(r)
            for rs in groups.values():
                pixels = torch.stack([samples[r].pixels for r in rs]).to(device, cdt)  # (B, 3, H, W)
                outs = data.encode(vae, text, pixels, [samples[r].caption for r in rs], args.vae_slice)
                for n, r in enumerate(rs):
                    enc[r] = [v[n] for v in outs]  # latent, std (C, h, w); context (77, C); pooled (P,)
            if "buckets" in header:  # each (C, h, w) of its bucket -> (C, packed), zero-padded
                for e in enc:
                    e[:2] = [torch.nn.functional.pad(v.flatten(1), (0, header["packed_latent"] -
                                                                    v[0].numel())) for v in e[:2]]
            latent, std, context, pooled = (torch.stack([e[k] for e in enc]) for k in range(4))
            for name, v in (("latent", latent), ("latent_std", std), ("context", context),
                            ("pooled", pooled)):
                out[name].append(v.float().to(sdt).cpu())
            out["time_ids"].append(torch.stack([s.time_ids for s in samples]))  # (B, 6) float32
            out["index"].append(torch.tensor([s.index for s in samples], dtype=torch.int64))
    counts["cached"] = sum(len(t) for t in out["index"])
    lat = (0, header["latent_shape"][0], header["packed_latent"]) if "buckets" in header else \
        (0, *header["latent_shape"])
    empty = {"index": (torch.int64, (0,)), "latent": (sdt, lat), "latent_std": (sdt, lat),
             "context": (sdt, (0, *header["context_shape"])),
             "pooled": (sdt, (0, header["pooled_dim"])), "time_ids": (torch.float32, (0, 6))}
    tensors = {name: torch.cat(v).contiguous() if v else torch.zeros(empty[name][1], dtype=empty[name][0])
               for name, v in out.items()}
    return tensors, counts


def save_shard(tensors, counts, k, header, out):
    """Atomically (files.atomic_write: temp file, then rename): a shard file that exists is complete."""
    path = os.path.join(out, data.shard_name(k))
    core = {key: v for key, v in header.items() if key != "fingerprint"}
    meta = {"format": data.CACHE_FORMAT, "version": str(data.CACHE_VERSION),
            "fingerprint": header["fingerprint"],
            "shard": str(k), "stats": json.dumps(counts), "header": json.dumps(core)}
    files.save_safetensors(tensors, path, metadata=meta)


def write_index(ds, header, out):
    """cache_index.json from every shard's counts, checked against the header; written atomically, last."""
    shards = [data.shard_name(k) for k in range(-(-header["items"] // header["shard_size"]))]
    stats = {k: v for k, v in ds.stats.items() if k != "skipped"}
    for name in shards:
        meta, _ = data.read_shard_header(os.path.join(out, name), header)
        for key, v in json.loads(meta["stats"]).items():
            stats[key] = stats.get(key, 0) + v
    index = {**header, "shards": shards, "stats": stats}
    files.save_json(index, os.path.join(out, data.CACHE_INDEX))
    return index


# ----------------------------------------------------------------------------------------------------
# main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True,
                   help="a folder of images with same-stem .txt captions, or .tar shards")
    p.add_argument("--base", default=weights.SDXL_BASE, help="SDXL base whose VAE and text encoders encode "
                   "(hub id, diffusers folder or single file); train with the same --base")
    p.add_argument("--out", required=True, help="cache folder (shards + cache_index.json); re-run to resume")
    p.add_argument("--resolution", type=int, default=1024, help="square training resolution in pixels")
    p.add_argument("--buckets", action="store_true", help="SDXL's aspect-ratio buckets of about "
                   "--resolution squared pixels (data.SDXL_BUCKETS): each image cropped in the nearest; train "
                   "with --buckets")
    p.add_argument("--dtype", choices=list(data.CACHE_DTYPES), default="fp16",
                   help="storage dtype of latents and embeddings (fp16: 3 more mantissa bits than bf16)")
    p.add_argument("--compute-dtype", choices=list(COMPUTE_DTYPES), default="fp32",
                   help="dtype the VAE and text encoders run in (the SDXL VAE overflows in fp16, hence no "
                        "fp16)")
    p.add_argument("--min-size", type=int, default=1024,
                   help="skip images whose shorter side is below this (Sec. 3.6)")
    p.add_argument("--sharpness", type=float, default=data.DEFAULT_SHARPNESS,
                   help="skip images whose Laplacian variance at the training crop is below this (Sec. 3.6); "
                        "0 off")
    p.add_argument("--min-aesthetic", type=float, default=0.0,
                   help="skip samples whose metadata .json aesthetic "
                   f"score ({', '.join(data.AESTHETIC_KEYS)}) is below this, or missing; 0 off")
    p.add_argument("--aesthetic-key", default=None, help="read the aesthetic score from this .json key only")
    p.add_argument("--clean-captions", action="store_true",
                   help="remove URLs and HTML entities, collapse whitespace")
    p.add_argument("--shard-size", type=int, default=256,
                   help="dataset indices per shard (~150 MB at 1024 px fp16)")
    p.add_argument("--batch-size", type=int, default=16, help="images per encoder call")
    p.add_argument("--vae-slice", type=int, default=4,
                   help="images per VAE encode call inside a batch (memory)")
    p.add_argument("--workers", type=int, default=4, help="threads decoding images")
    p.add_argument("--device", default=None, help="cuda or cpu; default cuda when available")
    return p.parse_args(argv)


def check_args(args):
    """Every argument and the output folder, before any work."""
    for name in ("resolution", "shard_size", "batch_size", "vae_slice", "workers"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    # on every rank: an error on one rank only would leave the others waiting in a barrier
    files.check_writable_folder(args.out)
    if data.is_cache(args.data):
        raise ValueError(f"--data {args.data}: is a cache already; give the images")
    if args.device is not None and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device here")


def main(argv=None):
    args = parse_args(argv)
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    if ddp:  # gloo: the only collective is a barrier; ranks finish their shards at different times
        dist.init_process_group("gloo", timeout=timedelta(hours=24))
    try:
        check_args(args)
        use_cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if use_cuda else "cpu")
        os.makedirs(args.out, exist_ok=True)
        cdt = COMPUTE_DTYPES[args.compute_dtype]
        single = weights.is_file(args.base)
        sd = weights.read_safetensors(args.base) if single else None
        vae = weights.load_vae(args.base, device, cdt, sd=sd).eval().requires_grad_(False)
        text = weights.load_text(args.base, device, cdt, sd=sd).eval().requires_grad_(False)
        # bucket sides: multiples of what the VAE and the UNet's downsamplings divide (as train.py's)
        levels = len(weights.unet_config(args.base, sd).block_out_channels)
        del sd
        sizes = data.bucket_sizes(args.resolution, vae.config.downscale * 2 ** (levels - 1)) \
            if args.buckets else None
        ds = data.ImageCaptionData(args.data, args.resolution, args.min_size, args.sharpness, 0,
                                   args.min_aesthetic, args.clean_captions, args.aesthetic_key, sizes)
        if args.resolution % vae.config.downscale:
            raise ValueError(f"--resolution {args.resolution}: must be a multiple of the VAE's downscale "
                             f"factor {vae.config.downscale}")
        header = cache_header(ds, args, vae, text)
        index_file = os.path.join(args.out, data.CACHE_INDEX)
        if os.path.exists(index_file):
            try:
                with open(index_file) as f:
                    old = json.load(f).get("fingerprint")
            except (OSError, ValueError, AttributeError):
                old = None
            if old != header["fingerprint"]:
                raise ValueError(f"{index_file}: --out holds another cache (other data, base, resolution, "
                                 f"dtype or filters); choose another --out or delete it")
        K = -(-len(ds) // args.shard_size)
        mine = list(range(rank, K, world))
        if rank == 0:  # a killed run's temp files (files.temp_path): only the names this program writes
            out = Path(args.out)
            shards = out.glob(files.temp_path("shard_*.safetensors").name)
            for tmp in [*shards, files.temp_path(out / data.CACHE_INDEX)]:
                if tmp.is_file():
                    tmp.unlink()
        if ddp:
            dist.barrier()  # no rank writes a temp file before they are gone
        if rank == 0:
            print(f"data: {len(ds)} indexed {ds.stats}; {K} shards of {args.shard_size} on {world} rank(s); "
                  f"{device}")
        kept, done, t0, n_done = 0, 0, time.time(), 0
        for k in mine:
            path = os.path.join(args.out, data.shard_name(k))
            if os.path.exists(path):
                try:
                    data.read_shard_header(path, header)
                except ValueError as e:
                    raise ValueError(f"{e} (delete it to re-encode it)") from None
                kept += 1
                continue
            tensors, counts = encode_shard(k, ds, vae, text, header, args, device)
            save_shard(tensors, counts, k, header, args.out)
            done, n_done = done + 1, n_done + len(shard_range(k, header))
            if rank == 0:
                dt = time.time() - t0
                print(f"shard {k + 1}/{K}: {counts['cached']} cached {counts}; rank 0: {n_done / dt:.2f} "
                      "images/s")
        if ddp:
            dist.barrier()
        if rank == 0:
            index = write_index(ds, header, args.out)
            print(f"cache: {index['stats']['cached']} samples in {K} shards ({kept} kept from an earlier run "
                  f"on rank 0); {index['stats']} -> {index_file}")
            if index["stats"]["cached"] == 0:
                raise ValueError(f"{args.data}: no image passed the load-time filters (corrupt, caption not "
                                 f"UTF-8, sharpness < {args.sharpness}): {index['stats']}")
    except (weights.CheckpointError, files.RunError, ValueError, RuntimeError) as e:
        if ddp:
            dist.destroy_process_group()
        raise SystemExit(f"error: {e}")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
