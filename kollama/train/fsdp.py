"""Fully sharded full fine-tuning (``kollama.train --fsdp``): PyTorch FSDP2 (``fully_shard``) over the
data-parallel group, so each of N processes holds 1/N of the weights, gradients and AdamW state.

What is sharded: every ``TransformerBlock`` is one FSDP unit, and so are ``tok_embeddings``, ``norm`` and
``output``. The root ``Transformer`` then owns no parameter of its own, so every parameter is gathered by a hook of
the module that uses it, also when evaluation calls ``model.hidden_states`` / ``model.output`` directly rather than
``model(...)`` (kollama.eval.evaluate does, to score long vocabularies in chunks).

With model parallelism (``--model_parallel_size M``), FSDP shards each rank's *model-parallel slice* over the
processes that hold the same slice (the data-parallel group), on dim 0 of the local tensor: a 2-D layout (data x
model) with llama.parallel's collectives inside the forward and FSDP's around it.

Gradients are *summed* over the group, not averaged: the trainer's loss is already divided by the global batch's
target count, as in the unsharded data-parallel path, so both give the same update.

Loading never materialises the whole model on a device: the model is built on the meta device, sharded, given
storage for its local shards only (``to_empty``), and each shard is copied from the (memory-mapped) checkpoint.
The final ``model/`` folder is gathered one tensor at a time onto the CPU of data-parallel rank 0.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

try:
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
except ImportError as e:  # torch < 2.6 kept FSDP2 under a private name
    raise ImportError(f"--fsdp needs PyTorch >= 2.8 (FSDP2 with sum reductions); this is torch {torch.__version__}. "
                      f"Upgrade torch, or train without --fsdp") from e

from kollama.train.distributed import local
from llama.errors import UserError
from llama.parallel import get_data_parallel_group, get_data_parallel_rank, get_data_parallel_world_size


class FSDPError(UserError):
    """A setting that --fsdp cannot honour; the message says what to use instead."""


def check_supported(method: str, trainable: Optional[str], data_parallel_size: int, model_parallel_size: int) -> None:
    if not hasattr(FSDPModule, "set_force_sum_reduction_for_comms"):  # added in torch 2.8
        raise FSDPError(f"--fsdp needs PyTorch >= 2.8 (FSDP2 with sum reductions); this is torch "
                        f"{torch.__version__}. Upgrade torch, or train without --fsdp")
    if method != "full" or trainable not in (None, "full"):
        what = f"--trainable {trainable}" if trainable not in (None, "full") else f"--method {method}"
        raise FSDPError(
            f"--fsdp shards full fine-tuning only, not {what}. LoRA and QLoRA keep the base frozen (no gradient or "
            f"optimizer state to shard): split a base too large for one device with --model_parallel_size instead")
    if data_parallel_size < 2:
        raise FSDPError(
            f"--fsdp shards over data-parallel processes, but there is {data_parallel_size} "
            f"(world = data x model parallel = {data_parallel_size} x {model_parallel_size}); launch more processes "
            f"(torchrun --nproc_per_node N with N a multiple of {model_parallel_size} and > {model_parallel_size}), "
            f"or drop --fsdp")


def data_parallel_mesh(device: torch.device) -> DeviceMesh:
    """A 1-D DeviceMesh over llama.parallel's data-parallel group (no new process group is created)."""
    return DeviceMesh.from_group(get_data_parallel_group(), device.type)


def shard_model(model: torch.nn.Module, mesh: DeviceMesh, param_dtype: Optional[torch.dtype] = None) -> None:
    """Apply ``fully_shard`` to the blocks, the embedding, the final norm, the output layer and the root.

    ``param_dtype``: the dtype weights are all-gathered and computed in (e.g. bf16 on CUDA); the shards, the
    gradients' reduction and AdamW stay fp32."""
    # cast_forward_inputs=False: each block is handed the rope table, which must stay fp32 (a complex multiply);
    # the activations follow the weights' dtype without being cast.
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None,
                                  cast_forward_inputs=False)
    for layer in model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model.tok_embeddings, mesh=mesh, mp_policy=policy)
    # norm and output run last in forward and first in backward: keeping them gathered in between saves a gather.
    for module in (model.norm, model.output):
        fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):  # every unit, the root included
            module.set_gradient_divide_factor(1.0)  # sum, see the module docstring
            module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no pre-multiplied sum)


def local_chunk(full: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's dim-0 piece as FSDP2 cuts it: ``torch.chunk`` (so the last pieces may be shorter or empty)."""
    chunks = torch.chunk(full, world_size, dim=0)
    if rank < len(chunks):
        return chunks[rank]
    return full.new_empty((0, *full.shape[1:]))


def load_shards(model: torch.nn.Module, state: Dict[str, torch.Tensor], device: torch.device) -> None:
    """Give a sharded meta-device model storage for its local shards on ``device`` and fill them from ``state``
    (this model-parallel rank's full tensors, checked against the model, e.g. memory-mapped). Entries are dropped
    from ``state`` as they are copied, so no tensor outlives its copy."""
    model.to_empty(device=device)
    rank, world = get_data_parallel_rank(), get_data_parallel_world_size()
    with torch.no_grad():
        for name, param in model.named_parameters():
            piece = local_chunk(state.pop(name), rank, world)
            target = local(param)
            if target.shape != piece.shape:  # FSDP's sharding rule changed under us: refuse, don't misplace rows
                raise RuntimeError(f"{name}: FSDP's local shard has shape {tuple(target.shape)} but dim-0 chunk "
                                   f"{rank} of {world} has {tuple(piece.shape)}; this torch version shards "
                                   f"differently than kollama.train.fsdp expects")
            target.copy_(piece)


def lazy_init(model: torch.nn.Module, device: torch.device) -> None:
    """Run one 1-token forward through the root, on every rank of the group.

    FSDP2 decides which unit is the root (the one that coordinates the others) by which runs forward first; the
    trainer's held-out evaluation calls ``model.hidden_states`` directly, which would make the embedding a root of
    its own. One forward through ``model`` settles it before anything else runs. The base model has no dropout,
    so no random number is drawn (resume stays exact)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 1, dtype=torch.long, device=device), 0, use_cache=False)
    model.train(was_training)
    reshard(model)


def reshard(model: torch.nn.Module) -> None:
    """Free every gathered weight, so that the module's parameters are the sharded ones again. norm and output
    stay gathered after a forward (``reshard_after_forward=False``) until their backward; one without a backward
    (evaluation, or lazy_init's) would otherwise leave them so, and the optimizer must be built on, and a state
    dict read from, the shards."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def gather_full_state(model: torch.nn.Module, keep: bool) -> Dict[str, torch.Tensor]:
    """This model-parallel rank's whole state_dict on the CPU, one tensor all-gathered at a time. Every rank of
    the data-parallel group must call it (each gather is collective); only ``keep`` ranks store the result."""
    reshard(model)
    out = {}
    for name, t in model.state_dict().items():
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if keep:
            out[name] = full.detach().to("cpu", copy=True)
        del full
    return out


# ---- trainer checkpoints: each rank saves its shards as plain tensors and wraps them back on resume ----
def local_optimizer_state(state: dict) -> dict:
    """``optimizer.state_dict()`` with every DTensor replaced by its local shard (plain tensors load with
    ``torch.load(weights_only=True)``)."""
    return {**state, "state": {i: {k: local(v) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                               for i, s in state["state"].items()}}


def sharded_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """The inverse of ``local_optimizer_state`` for this optimizer's parameters: each per-element state
    (exp_avg, exp_avg_sq) becomes a DTensor laid out like its parameter; scalars (step) stay plain."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    out = {}
    for i, s in state["state"].items():
        p = params[int(i)]
        out[i] = {k: DTensor.from_local(v.to(local(p).device), p.device_mesh, p.placements, run_check=False,
                                        shape=p.shape, stride=p.stride())
                  if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and v.ndim > 0 else v
                  for k, v in s.items()}
    return {**state, "state": out}
