"""FSDP2 for train.py's whole-UNet models (`--shard fsdp`): sharding, and checkpoints in the plain format.

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

Read top to bottom: the policy, sharding, then gathering and loading states.
"""
import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

import unet as unet_lib

# ----------------------------------------------------------------------------------------------------
# Sharding

UNITS = (unet_lib.ResnetBlock2D, unet_lib.BasicTransformerBlock)  # also what train.py --compile compiles


def mixed_precision(device, trained=True):
    """bf16 compute on the GPU with fp32 masters and fp32 gradient reduction; on the CPU all fp32 (bf16 matmuls
    there are slow and the tests compare against an fp32 run). A frozen model is already stored in its compute
    dtype, so it gets no cast. Inputs are not cast (cast_forward_inputs=False): the 6 time ids must stay float32
    (bf16 rounds 1365 to 1368); train.py calls these models under bf16 autocast, which casts the activations."""
    if device.type != "cuda" or not trained:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False)


def shard_model(model: nn.Module, device, trained=True) -> nn.Module:
    """fully_shard every unit inside `model` (a UNet or a Discriminator), then `model` itself. In place: each rank
    keeps 1/world of every parameter (it must hold the same weights on every rank before: all ranks load the
    same checkpoint)."""
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
        raise ValueError(f"optimizer state for {sum(len(g['params']) for g in sd['param_groups'])} parameters, "
                         f"the model trains {len(order)}")
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in sd["param_groups"]]
    state = {order[i]: dict(s) for i, s in sd["state"].items()}  # copies: the caller's dict stays whole
    set_optimizer_state_dict(model, opt, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))
