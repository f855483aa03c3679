"""Stacked projections for inference: wq|wk|wv and w1|w3 of each block as one product each.

The three attention projections (and the two feed-forward input projections) read the same input. One product
over the stacked weights reads the input once, quantizes it once (int8) and makes one kernel call instead of three,
which matters at decode where each call has a fixed cost. The stacking changes neither the checkpoint nor the
modules: ``wq.weight`` & co. (or their int8 buffers) become views into the stacked tensor, so the state_dict keeps
Meta's names and shapes, memory is not doubled, and an in-place change to them (an adapter merged, a state_dict
loaded) is seen by the stacked product.

Each row of the stacked product is computed exactly as the separate product computes it (llama.kernels works row
by row; int8 quantizes the shared input once either way), so outputs are unchanged. Anything that replaces a weight
instead of writing into it (``quantize_model``, an adapter module, ``.to()``) leaves the views behind: ``usable``
then says no and the block goes back to separate products until ``stack_projections`` runs again.

Column-parallel layers only (no output collective), so a tensor-parallel rank stacks its own shards, which is
its share of the stacked matrix.

The stacked tensors, and by ``to_huge_pages`` the other streamed weights (wo, w2, the classifier), live in memory
advised for transparent huge pages (``kernels.empty_huge``): a decode step streams all of them once per token.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn

from llama import kernels
from llama.parallel import ColumnParallelLinear, ParallelLinear
from llama.quantize import Int8Linear


def weight_tensors(module: nn.Module) -> Optional[List[torch.Tensor]]:
    """The tensors holding a local product's weight: [weight] dense, [weight_int8, scales] int8, else None (no
    weight, or another kind of product: an adapter, NF4, int4). ``module``: a ParallelLinear, its local module, or
    a stacked product."""
    if isinstance(module, ParallelLinear):
        if module.local_linear is None:
            return None if module.weight is None else [module.weight]
        module = module.local_linear
    if isinstance(module, Int8Linear):
        return [module.weight_int8, module.scales]
    if isinstance(module, _Dense):
        return [module.weight]
    return None


class StackedLinear(nn.Module):
    """The local products of several column-parallel layers of one input, as one product split back."""

    def __init__(self, layers: Sequence[ColumnParallelLinear]):
        super().__init__()
        parts = [weight_tensors(layer) for layer in layers]
        self.layers = list(layers)  # a plain list: not registered, so the parameters are not listed twice
        self.sizes = [p[0].shape[0] for p in parts]
        # In memory advised for huge pages (kernels.empty_huge): the stacked weights are streamed every token.
        stacked = [torch.cat(list(group), out=kernels.empty_huge((sum(t.shape[0] for t in group),
                                                                 *group[0].shape[1:]), group[0].dtype))
                   for group in zip(*parts)]
        if len(stacked) == 1:
            self.product: nn.Module = _Dense(stacked[0])
        else:
            self.product = Int8Linear(*stacked)
        # Point the layers at views of the stacked tensors, freeing their own copies.
        offset = 0
        for layer, size in zip(layers, self.sizes):
            views = [t[offset:offset + size] for t in stacked]
            if layer.local_linear is None:
                layer.weight.data = views[0]
            else:
                layer.local_linear.weight_int8, layer.local_linear.scales = views
            offset += size
        self._pointers = [[t.data_ptr() for t in weight_tensors(layer)] for layer in layers]

    def usable(self) -> bool:
        """Whether the layers still hold the views made here (nothing replaced or re-bound a weight since), no
        gradient is wanted for them, and torch.compile is not tracing."""
        if torch.compiler.is_compiling():  # pointers cannot be traced; inductor fuses the separate products itself
            return False
        grad = torch.is_grad_enabled()
        for layer, pointers in zip(self.layers, self._pointers):
            tensors = weight_tensors(layer)
            if tensors is None or [t.data_ptr() for t in tensors] != pointers:
                return False
            if grad and any(t.requires_grad for t in tensors):
                return False
        return True

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return list(self.product(x).split(self.sizes, dim=-1))


class _Dense(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight)


def to_huge_pages(model: nn.Module) -> None:
    """Copy the weights of the layers ``stack_projections`` leaves separate (wo, w2, the classifier; dense or
    int8) into memory advised for huge pages (``kernels.empty_huge``), CPU inference weights only."""
    layers = [m for block in getattr(model, "layers", []) for m in (block.attention.wo, block.feed_forward.w2)]
    for layer in layers + ([model.output] if hasattr(model, "output") else []):
        tensors = weight_tensors(layer)
        if tensors is None or tensors[0].device.type != "cpu" or tensors[0].requires_grad:
            continue
        moved = kernels.empty_huge(tensors[0].shape, tensors[0].dtype).copy_(tensors[0])
        if layer.local_linear is None:
            layer.weight.data = moved
        else:
            layer.local_linear.weight_int8 = moved


def stack_projections(model: nn.Module) -> int:
    """Stack wq|wk|wv and w1|w3 of every block whose layers are all dense or all int8 on the CPU (inference only:
    the stacked product records no gradient). Returns how many groups were stacked."""
    done = 0
    for block in getattr(model, "layers", []):
        for owner, names, attr in ((block.attention, ("wq", "wk", "wv"), "stacked_qkv"),
                                   (block.feed_forward, ("w1", "w3"), "stacked_w13")):
            layers = [getattr(owner, n) for n in names]
            parts = [weight_tensors(layer) for layer in layers]
            if any(p is None for p in parts) or len({len(p) for p in parts}) != 1:
                continue
            if any(t.device.type != "cpu" or t.requires_grad for p in parts for t in p):
                continue
            if len({t.dtype for p in parts for t in p[:1]}) != 1:
                continue
            # A plain attribute, not a registered submodule: it holds no state of its own (the state_dict, .to()
            # and parameter counts see only the original layers).
            object.__setattr__(owner, attr, StackedLinear(layers))
            done += 1
    return done
