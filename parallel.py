"""The distributed side of train.py: the plain torchrun set-up (Ranks), DDP with gradients as bucket views,
ZeroRedundancyOptimizer, FSDP2 for the whole-UNet models (`--shard fsdp`) with checkpoints in the plain
format, torch.compile of the UNet blocks, and the collectives of a step: the all-ranks NaN vote (finite),
the mean of the logs over ranks, and on_master (rank 0 works, every rank sees its error).

With DDP + ZeroRedundancyOptimizer (the default) every rank holds whole fp32 weights and gradients of the
student and the discriminator, and a whole bf16 teacher; only Adam's two moments are split. FSDP2
(`torch.distributed.fsdp.fully_shard`) splits the weights, the gradients and Adam's moments across the
ranks, and gathers one unit's weights (in bf16) just while that unit runs: the 16 bytes per trained
parameter become 16 / world, the 2 per frozen one 2 / world. README's memory table (bench.py --what
memory) shows what that buys per phase.

Units (UNITS): every ResnetBlock2D and BasicTransformerBlock (at most 49M parameters each at SDXL size; a
whole Transformer2DModel of depth 10 would be ~350M gathered at once), each conv of the discriminator's
head (up to 52M), then the model itself (conv_in, the embeddings, the samplers, the attention projections:
~2% of the UNet). The UNet's own block lists (down_blocks[i], ...) are never called as modules, so they
cannot be units. --grad-checkpointing recomputes whole blocks in backward, gathering their units again.

Checkpoints stay the plain format (checkpoint.pt, files.py): full tensors gathered onto rank 0's CPU,
Adam's state keyed by parameter index as torch.optim writes it. So a run resumes under either --shard,
on any number of ranks, and the next phase reads it the same way.

Read top to bottom: ranks and DDP, ZeRO and compile, the collectives, FSDP2 sharding, then gathering and
loading states (whatever the wrapping).
"""
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP

import lora
import unet as unet_lib

# ----------------------------------------------------------------------------------------------------
# Ranks: the plain torchrun pattern


@dataclass(frozen=True)
class Ranks:
    rank: int
    local: int  # the rank on this node: the GPU index
    world: int
    device: torch.device

    @property
    def master(self):
        return self.rank == 0

    @property
    def device_ids(self):  # what DDP wants: the one GPU, or None on the CPU
        return [self.local] if self.device.type == "cuda" else None


def init(device=None) -> Ranks:
    """RANK / LOCAL_RANK / WORLD_SIZE from the environment (torchrun), else one process. NCCL on GPUs,
    gloo on the CPU. device: "cuda" or "cpu"; default cuda when available."""
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, local, world = (int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]),
                          int(os.environ["WORLD_SIZE"])) if ddp else (0, 0, 1)
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if ddp:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    dev = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    return Ranks(rank, local, world, dev)


def close(ranks):
    if ranks.world > 1:
        dist.destroy_process_group()


def wrap_ddp(model, ranks):
    """DDP whose gradients are views into its all-reduce buckets: without that DDP keeps a second copy of
    them (4 bytes per trained parameter, 10 GB for the whole SDXL UNet)."""
    return DDP(model, device_ids=ranks.device_ids, gradient_as_bucket_view=True)


def make_adam(params, zero, **kw):
    """Adam, or with zero=True ZeroRedundancyOptimizer: each rank keeps 1/world of Adam's two moments."""
    if zero:
        return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.Adam, **kw)
    return torch.optim.Adam(params, **kw)


def no_sync_unless_last(model, i, n):
    """Accumulating micro-batches: DDP all-reduces the gradients on the last one only."""
    return model.no_sync() if isinstance(model, DDP) and i < n - 1 else nullcontext()


def compile_blocks(model):
    """--compile: torch.compile every ResnetBlock2D and BasicTransformerBlock (nearly all the FLOPs), not the
    whole model: Module.compile wraps nothing, so checkpoint names stay; the same blocks are FSDP2's units
    (UNITS), compiled before they are sharded; LoRA's on/off switch (the teacher of LoRA phases) is a guard,
    one graph each way. The glue between blocks (embeddings, samplers) stays eager. Each block shape
    (channels x resolution) x grad mode x batch is its own graph: more than dynamo's default 8 per block
    class (past that it runs the rest eager)."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for m in (model.modules() if model is not None else []):
        if isinstance(m, UNITS):
            m.compile()


def wrap_phase(ranks, student, teacher, disc, lora_student, shard="zero", compile=False, **adam):
    """A phase's models made ready for `ranks`, and its Adam optimizers (keyword arguments `adam`).
    One rank: as they are. Several, --shard zero: DDP on the student and the discriminator, ZeRO on the
    whole-UNet Adam states (a LoRA's Adam is small: plain). --shard fsdp: FSDP2 shards the teacher, the
    discriminator and a whole-UNet student in place; a LoRA student (small trainable part) stays under DDP.
    --compile: the blocks first, before FSDP2 makes them its units.
    -> the student and the discriminator as a step calls them, their optimizers, whether FSDP2 is on."""
    ddp = ranks.world > 1
    fsdp = ddp and shard == "fsdp"
    if compile:
        for m in (student, teacher, disc):
            compile_blocks(m)
    if fsdp:
        for m, trained in ((teacher, False), (disc, True), (None if lora_student else student, True)):
            if m is not None:
                shard_model(m, ranks.device, trained)
    params = [p for p in student.parameters() if p.requires_grad]
    g_model = wrap_ddp(student, ranks) if ddp and not is_sharded(student) else student
    opt_g = make_adam(params, zero=ddp and not lora_student and not fsdp, **adam)
    d_model = opt_d = None
    if disc is not None:
        d_model = disc if not ddp or fsdp else wrap_ddp(disc, ranks)
        opt_d = make_adam(list(disc.parameters()), zero=ddp and not fsdp, **adam)
    return g_model, d_model, opt_g, opt_d, fsdp


# ----------------------------------------------------------------------------------------------------
# The collectives of a step


def finite(value, ranks):
    """All ranks agree whether a loss is finite, so they skip a bad step together."""
    flag = torch.tensor([0.0 if math.isfinite(value) else 1.0], device=ranks.device)
    if ranks.world > 1:
        dist.all_reduce(flag)
    return flag.item() == 0


def mean_over_ranks(logs, ranks):
    """The mean of each number of `logs` over the ranks (float64 on the wire)."""
    if ranks.world > 1:
        v = torch.tensor(list(logs.values()), device=ranks.device, dtype=torch.float64)
        dist.all_reduce(v)
        logs = dict(zip(logs, (v / ranks.world).tolist()))
    return logs


class RankError(RuntimeError):
    """An error on rank 0 (on_master), raised on every rank with its message."""


def on_master(ranks, fn, expected=(ValueError, RuntimeError, OSError)):
    """Run fn on rank 0 while the others wait; an `expected` error there stops every rank with the same
    message (one rank: the error itself)."""
    msg = None
    if ranks.master:
        try:
            fn()
        except expected as e:
            msg = str(e)
            if ranks.world == 1:
                raise
    if ranks.world > 1:
        box = [msg]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise RankError(box[0])


# ----------------------------------------------------------------------------------------------------
# Sharding

UNITS = (unet_lib.ResnetBlock2D, unet_lib.BasicTransformerBlock)  # also what compile_blocks compiles


def mixed_precision(device, trained=True):
    """bf16 compute on the GPU with fp32 masters and fp32 gradient reduction; on the CPU all fp32 (bf16
    matmuls there are slow and the tests compare against an fp32 run). A frozen model is already stored in
    its compute dtype, so it gets no cast. Inputs are not cast (cast_forward_inputs=False): the 6 time ids
    must stay float32 (bf16 rounds 1365 to 1368); train.py calls these models under bf16 autocast, which
    casts the activations."""
    if device.type != "cuda" or not trained:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                cast_forward_inputs=False)


def shard_model(model: nn.Module, device, trained=True) -> nn.Module:
    """fully_shard every unit inside `model` (a UNet or a Discriminator), then `model` itself. In place: each
    rank keeps 1/world of every parameter (it must hold the same weights on every rank before: all ranks
    load the same checkpoint)."""
    mp, head = mixed_precision(device, trained), head_convs(model)
    for m in model.modules():
        if isinstance(m, UNITS) or any(m is h for h in head):
            fully_shard(m, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def head_convs(model):
    """The discriminator head's convs (called one by one by nn.Sequential, so each can be a unit)."""
    return [m for m in getattr(model, "head", []) if isinstance(m, nn.Conv2d)]


def is_sharded(model) -> bool:
    return isinstance(model, FSDPModule)


# ----------------------------------------------------------------------------------------------------
# States: gathered whole on rank 0 for checkpoint.pt, loaded from it on every rank

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0's CPU only


def full_state_dict(model) -> dict:
    """The model's state dict with whole tensors on rank 0's CPU ({} on the other ranks). Collective."""
    return get_model_state_dict(model, options=FULL)


def full_optim_state_dict(model, opt) -> dict:
    """Adam's state as torch.optim.Adam.state_dict() writes it (keyed 0, 1, ... in parameter order), whole
    tensors on rank 0's CPU (None on the other ranks). Collective."""
    sd = get_optimizer_state_dict(model, opt, options=FULL)  # keyed by parameter name
    if not sd:
        return None
    index = {name: i for i, name in enumerate(n for g in sd["param_groups"] for n in g["params"])}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in sd["param_groups"]]
    return {"state": {index[n]: s for n, s in sd["state"].items()}, "param_groups": groups}


def load_state_dict(model, sd):
    """Whole tensors (every rank passes the same) into the sharded model: each rank keeps its part. Strict."""
    sd = dict(sd)  # set_model_state_dict replaces the dict's tensors by this rank's shards: not the caller's
    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=True))


def load_optim_state_dict(model, opt, sd):
    """An Adam state dict in torch.optim's format (from any --shard, any world size) into the sharded Adam."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    if len(order) != sum(len(g["params"]) for g in sd["param_groups"]):
        n = sum(len(g["params"]) for g in sd["param_groups"])
        raise ValueError(f"optimizer state for {n} parameters, the model trains {len(order)}")
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in sd["param_groups"]]
    state = {order[i]: dict(s) for i, s in sd["state"].items()}  # copies: the caller's dict stays whole
    set_optimizer_state_dict(model, opt, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))


# ----------------------------------------------------------------------------------------------------
# Whatever the wrapping (plain, DDP + ZeRO, FSDP2): the states checkpoint.pt holds, gathered and loaded


def gather_state(model, master) -> dict:
    """The model's state dict, whole, on rank 0's CPU (None elsewhere). Collective under FSDP2."""
    if is_sharded(model):
        return full_state_dict(model)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()} if master else None


def gather_optim(opt, model, master) -> dict:
    """The optimizer's state in torch.optim's format on rank 0 (None elsewhere). Collective: ZeRO
    consolidates its shards on rank 0, FSDP2 gathers them there."""
    if isinstance(opt, ZeroRedundancyOptimizer):
        opt.consolidate_state_dict(to=0)
    if is_sharded(model):
        return full_optim_state_dict(model, opt)
    return opt.state_dict() if master else None


def gather_states(student, disc, opt_g, opt_d, master, lora_student):
    """What checkpoint.pt holds of a phase: the student (its LoRA alone when lora_student), the
    discriminator and both Adam states, whole, on rank 0 (None elsewhere). Collective: every rank calls it."""
    states = {"student": lora.lora_state_dict(student) if lora_student else gather_state(student, master),
              "disc": None if disc is None else gather_state(disc, master),
              "opt_g": gather_optim(opt_g, student, master),
              "opt_d": None if opt_d is None else gather_optim(opt_d, disc, master)}
    return states if master else None


def load(model, sd):
    """Whole tensors into the model (each rank keeps its shard under FSDP2). Strict."""
    load_state_dict(model, sd) if is_sharded(model) else model.load_state_dict(sd, strict=True)


def load_optim(opt, model, sd):
    """An Adam state in torch.optim's format (checkpoint.pt, whatever --shard or world size wrote it)."""
    load_optim_state_dict(model, opt, sd) if is_sharded(model) else opt.load_state_dict(sd)


def load_states(state, student_part, student, disc, opt_g, opt_d):
    """checkpoint.pt's states (gather_states) into a phase's models: the student's trained part (its LoRA,
    or the whole student), the discriminator, both Adam states."""
    load(student_part, state["student"])
    if disc is not None:
        load(disc, state["disc"])
        load_optim(opt_d, disc, state["opt_d"])
    load_optim(opt_g, student, state["opt_g"])
