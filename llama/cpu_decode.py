"""One C call per decode step on the CPU: llama/kernels/cpu.c's ``decode_layers`` (llama2.c's forward) over the
model's own tensors.

A batch-1 decode step of a small model is mostly overhead: ~20 Python-level calls per layer, each a few
microseconds, around products that take a few microseconds themselves. ``CpuDecoder`` hands the whole layer stack
to C instead: it reads the weights (fp32, or int8 with their scales) and the KV caches in place, so nothing is
copied and the module path and this one always see the same tensors. The kernels and their order are those of the
module path, so the hidden state is the same, bit for bit (tests/test_cpu_decode.py).

When it applies: one process (no tensor parallelism), fp32 activations on the CPU, every block's projections
stacked (llama.fusion) and all of them plain fp32 or all int8 (``Int8Linear``), batch 1, one new token, the
default causal mask. Anything else (an adapter module, NF4, another dtype, a weight replaced since) makes
``__call__`` return None and the model runs its modules as usual.
"""
from __future__ import annotations

import ctypes
from typing import List, Optional

import torch
from torch import nn

from llama import kernels
from llama.fusion import StackedLinear, stack_projections, to_huge_pages, weight_tensors
from llama.parallel import get_model_parallel_world_size
from llama.quantize import Int8Linear


class _Layer(ctypes.Structure):
    _fields_ = [(n, ctypes.c_void_p) for n in ("wqkv", "wo", "w13", "w2", "sqkv", "so", "s13", "s2", "attn_norm",
                                               "ffn_norm", "k_cache", "v_cache")]


class _Dims(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int64) for n in ("dim", "hidden", "n_heads", "n_kv_heads", "head_dim", "t_max")] + [
        ("eps", ctypes.c_float), ("int8", ctypes.c_int), ("threads", ctypes.c_int)]


def _product(module: nn.Module, int8: bool) -> Optional[List[torch.Tensor]]:
    """The weight tensors of a layer's (or stacked) product when it is of the kind ``int8`` says, else None."""
    tensors = weight_tensors(module.product if isinstance(module, StackedLinear) else module)
    return tensors if tensors is not None and (len(tensors) == 2) == int8 else None


class CpuDecoder:
    """The layer stack of ``model`` as one ``decode_layers`` call (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._watch = None  # what the cached table was built from (see _unchanged)
        self._table = self._dims = self._scratch = None

    def _tensors(self) -> Optional[list]:
        """Per layer, the tensors ``decode_layers`` reads, or None when a layer does not fit (see the docstring)."""
        layers = []
        int8 = None
        for block in self.model.layers:
            attn, ffn = block.attention, block.feed_forward
            if attn.stacked_qkv is None or ffn.stacked_w13 is None:
                return None
            if not (attn.stacked_qkv.usable() and ffn.stacked_w13.usable()):
                return None
            if int8 is None:
                int8 = isinstance(attn.stacked_qkv.product, Int8Linear)
            parts = [_product(m, int8) for m in (attn.stacked_qkv, attn.wo, ffn.stacked_w13, ffn.w2)]
            if any(p is None for p in parts):
                return None
            norms = [block.attention_norm.weight, block.ffn_norm.weight]
            cache = [attn.cache.k, attn.cache.v]
            if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in norms + cache) or \
                    any(not t.is_contiguous() for p in parts for t in p):
                return None
            layers.append((parts, norms, cache))
        return [int8, layers]

    def _unchanged(self) -> bool:
        """Whether everything the table was built from is still in place: the same linears' weights or local
        modules, the same stacked products, and every tensor at the same address (cheaper than ``_tensors``,
        which runs only when this says no)."""
        holders, pointers, threads = self._watch
        if threads != torch.get_num_threads() or torch.is_grad_enabled():
            return False
        for layer, weight, local in holders:
            if layer._parameters.get("weight") is not weight or getattr(layer, "local_linear", None) is not local:
                return False
        return all(t.data_ptr() == p for t, p in pointers)

    def __call__(self, h: torch.Tensor, start_pos: int) -> Optional[torch.Tensor]:
        """The hidden state (1, 1, dim) after every layer for the token at ``start_pos``, the caches updated; None
        when this model cannot take the C path now."""
        if get_model_parallel_world_size() != 1 or not kernels.fast(h):
            return None
        if self._watch is None or not self._unchanged():
            found = self._tensors()
            if found is None:
                self._watch = None
                return None
            self._build(*found)
        x = h.reshape(-1).clone()
        rope = self.model.rope[start_pos].contiguous()
        if kernels._LIB.decode_layers(ctypes.addressof(self._dims), ctypes.addressof(self._table),
                                      len(self.model.layers), x.data_ptr(), rope.data_ptr(), start_pos,
                                      self._scratch.data_ptr()):
            raise MemoryError("no memory for the attention scores of a decode step")
        return x.view(1, 1, -1)

    def _build(self, int8: bool, layers: list) -> None:
        p = self.model.params
        attn = self.model.layers[0].attention
        hidden = self.model.layers[0].feed_forward.w2.in_features
        self._dims = _Dims(dim=p.dim, hidden=hidden, n_heads=attn.n_local_heads, n_kv_heads=attn.n_local_kv_heads,
                           head_dim=attn.head_dim, t_max=attn.cache.k.shape[1],
                           eps=self.model.layers[0].attention_norm.eps, int8=int(int8),
                           threads=torch.get_num_threads())
        table = (_Layer * len(layers))()
        for entry, (parts, norms, cache) in zip(table, layers):
            (entry.wqkv, *s0), (entry.wo, *s1), (entry.w13, *s2), (entry.w2, *s3) = [
                [t.data_ptr() for t in part] for part in parts]
            entry.sqkv, entry.so, entry.s13, entry.s2 = [(s[0] if s else None) for s in (s0, s1, s2, s3)]
            entry.attn_norm, entry.ffn_norm = norms[0].data_ptr(), norms[1].data_ptr()
            entry.k_cache, entry.v_cache = cache[0].data_ptr(), cache[1].data_ptr()
        self._table = table
        kv_dim = attn.n_local_kv_heads * attn.head_dim
        self._scratch = torch.empty(4 * p.dim + 2 * kv_dim + 3 * hidden)
        # What _unchanged compares: every linear's weight / local module, and every tensor read (the stacked
        # products', the separate layers' views of them, norms, caches) with its address.
        holders, tensors = [], []
        for block, (parts, norms, cache) in zip(self.model.layers, layers):
            attn, ffn = block.attention, block.feed_forward
            for layer in (attn.wq, attn.wk, attn.wv, attn.wo, ffn.w1, ffn.w2, ffn.w3):
                local = getattr(layer, "local_linear", None)
                holders.append((layer, layer._parameters.get("weight"), local))
                tensors += weight_tensors(layer)
            tensors += [t for part in parts for t in part] + norms + cache
        self._watch = (holders, [(t, t.data_ptr()) for t in tensors], torch.get_num_threads())


def prepare_inference(model: nn.Module) -> nn.Module:
    """Stack the projections of an inference model (llama.fusion; CPU weights without gradients only), put the
    other streamed weights in huge pages, and attach the one-call decoder where anything was stacked. ``Llama`` does this for its models; call it again after replacing
    weights (quantizing, applying an adapter) so the stacked products are rebuilt."""
    if stack_projections(model):
        to_huge_pages(model)
        model.cpu_decoder = CpuDecoder(model)
    return model
