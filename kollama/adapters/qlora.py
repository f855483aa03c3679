"""QLoRA (Dettmers et al. 2023): a frozen NF4 base under trainable LoRA factors, plus the memory accounting.

``quantize_base_nf4(model)`` replaces the local weight of every transformer-block linear (wq, wk, wv, wo, w1,
w2, w3) by an ``NF4Linear`` (``kollama.adapters.nf4``) through ``ParallelLinear.replace_local_linear``; ``apply_lora``
then wraps those layers as usual. Kept dense, as in the QLoRA paper and torchtune: the token embedding (a
lookup, not a matmul; on 7B it is 2% of the weights, and Korean vocabulary growth trains it), the
RMSNorm weights (a few thousand values) and ``output`` (the classifier sees every logit's error directly, and
resized vocabularies train it).

Model parallelism: the quantization runs on this rank's local shard, after the checkpoint has been sliced, so
no rank ever holds a full weight. NF4 blocks (64 values, row-major) and the double-quantization statistics are
therefore computed per shard: an MP=2 base is NF4(W_shard0) ++ NF4(W_shard1), which for row-parallel layers
(and the mean of the scales everywhere) is a different rounding of W than an MP=1 NF4(W). Both are equally
good approximations; the LoRA adapter moves between them like between any two NF4 copies of one model.

Exactness for resume: NF4 quantization is a pure function of the base weight (no randomness, fp32 arithmetic),
so the trainer rebuilds identical NF4 buffers on resume and its checkpoint holds only the adapter and optimizer.

Merging into a quantized base (``--merge``): the exported dense weight is ``dequant(NF4(W)) + scale * B A``, not
``W + scale * B A``: the adapter was trained against the NF4 base, so this is the weight that reproduces the
trained model's logits; adding the update to the original W instead would reintroduce the NF4 rounding error
the adapter partly learned to compensate. The merged checkpoint therefore differs from the original base, in
every quantized weight, by the NF4 error ``dequant(NF4(W)) - W`` (|.| <= about half the widest code gap times
the block absmax: measured <= 0.154 x absmax; RMS ~0.092 x the weights' RMS for Gaussian weights); ``quantize_base_nf4``
reports that error per run (``max_abs_error``, ``rel_rms_error``), and tests/test_qlora.py quantifies it on
the tiny model (weights and logits).
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch
from torch import nn

from kollama.adapters.lora import check_targets, merged_state_dict
from kollama.adapters.nf4 import BLOCK_SIZE, SCALE_BLOCK_SIZE, NF4Linear, bits_per_parameter, check_nf4_shape
from llama.parallel import ParallelLinear

# Every linear of the transformer blocks; ``output`` stays dense by default (see the module docstring).
BLOCK_LINEARS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
QUANTIZABLE = BLOCK_LINEARS + ("output",)


def nf4_storage_bits(numel: int) -> int:
    """Bits that ``kollama.adapters.nf4`` stores for one bias-free weight of ``numel`` values: 4-bit codes, one int8
    scale per 64-block, one fp32 factor per 256 scales (the last group may be short) and one fp32 mean."""
    n_blocks = numel // BLOCK_SIZE
    return 4 * numel + 8 * n_blocks + 32 * math.ceil(n_blocks / SCALE_BLOCK_SIZE) + 32


def expected_bits_per_parameter(shapes: Iterable[Tuple[int, int]]) -> float:
    """Bits per base parameter of NF4 weights of these (out, in) shapes, from the storage formula alone."""
    numels = [o * i for o, i in shapes]
    if not numels:
        raise ValueError("no weight shapes given")
    return sum(nf4_storage_bits(n) for n in numels) / sum(numels)


@torch.no_grad()
def quantize_base_nf4(model: nn.Module, targets: Sequence[str] = BLOCK_LINEARS, device=None,
                      measure_error: bool = True) -> Dict[str, object]:
    """Replace the local (this rank's) dense weight of every ParallelLinear named in ``targets`` by an
    NF4Linear, in place, one layer at a time, and return a report of what was stored.

    Call it before ``apply_lora`` (after works too: LoRA reads the base through ``local_forward``). ``device``:
    where the NF4 buffers go (default: where the weight is); passing a CUDA device while the model sits on the
    CPU (e.g. memory-mapped from the checkpoint) quantizes each weight on the GPU and never puts the dense model
    there, so the GPU peak is the NF4 model plus one dense layer. Other parameters are not moved.

    Report (local to this rank): ``layers``, ``quantized_params``, ``stored_bytes`` (all NF4 buffers),
    ``dense_bytes`` (the replaced weights at their dtype), ``bits_per_parameter`` (measured from the buffers),
    ``expected_bits_per_parameter`` (the storage formula) and, with ``measure_error``, ``max_abs_error`` and
    ``rel_rms_error`` of dequant(NF4(W)) against W over all quantized weights (the merge difference).
    """
    targets = check_targets(targets, QUANTIZABLE, "NF4")
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, ParallelLinear) and name.rsplit(".", 1)[-1] in targets]
    found = [(n, m) for n, m in found if m.weight is not None]  # already replaced (quantized) layers are skipped
    if not found:
        raise ValueError(f"{type(model).__name__} has no dense ParallelLinear named {list(targets)} to quantize "
                         f"(already quantized, or LoRA applied to a non-parallel model?)")
    for name, layer in found:  # check every layer first: an error leaves the model untouched
        if layer.weight.device.type == "meta":
            raise ValueError(f"{name} is on the meta device; load the weights before quantizing")
        try:
            check_nf4_shape(tuple(layer.weight.shape))
        except ValueError as e:
            raise ValueError(f"cannot quantize {name} (local shard {tuple(layer.weight.shape)}): {e}") from None
    shapes, dense_bytes, max_err, err_sq, w_sq = [], 0, 0.0, 0.0, 0.0
    for name, layer in found:
        weight = layer.weight.detach()
        if device is not None:
            weight = weight.to(device)
        nf4 = NF4Linear.from_weight(weight)
        if measure_error:
            w = weight.float()
            diff = nf4.dequantize(torch.float32) - w
            max_err = max(max_err, diff.abs().max().item())
            err_sq += diff.double().square().sum().item()
            w_sq += w.double().square().sum().item()
            del w, diff
        shapes.append(tuple(weight.shape))
        dense_bytes += layer.weight.numel() * layer.weight.element_size()
        layer.replace_local_linear(nf4)  # drops the dense parameter: the last reference to it goes with `weight`
        del weight
    nf4_layers = [m.local_linear for _, m in found]
    report = {
        "format": "nf4", "block_size": BLOCK_SIZE, "scale_block_size": SCALE_BLOCK_SIZE,
        "targets": [t for t in QUANTIZABLE if t in targets], "layers": len(found),
        "quantized_params": sum(o * i for o, i in shapes),
        "stored_bytes": sum(b.numel() * b.element_size() for m in nf4_layers for b in m.buffers()),
        "dense_bytes": dense_bytes,
        "bits_per_parameter": _bits_of(nf4_layers),
        "expected_bits_per_parameter": expected_bits_per_parameter(shapes),
    }
    if measure_error:
        report.update(max_abs_error=max_err, rel_rms_error=math.sqrt(err_sq / max(w_sq, 1e-300)))
    return report


def _bits_of(layers) -> float:
    holder = nn.ModuleList(layers)  # bits_per_parameter walks .modules(); a temporary list does not re-parent
    return bits_per_parameter(holder)


def model_bits_per_parameter(model: nn.Module) -> float:
    """Measured stored bits per quantized base parameter of every NF4Linear in ``model`` (this rank)."""
    return bits_per_parameter(model)


def memory_accounting(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> Dict[str, int]:
    """Bytes this rank holds for the model, counted from the tensors (not measured from the allocator):
    ``frozen_dense`` (non-trainable parameters), ``nf4`` (NF4 buffers), ``trainable`` (parameters with
    requires_grad), ``gradients`` (same size as trainable, fp32 once allocated) and ``optimizer`` (the
    optimizer's state tensors if given, else AdamW's 2 fp32 moments per trainable parameter, as an estimate).
    Activations are not included: they depend on batch, sequence length and activation checkpointing."""
    out = dict(frozen_dense=0, nf4=0, trainable=0, other_buffers=0)
    for p in model.parameters():
        out["trainable" if p.requires_grad else "frozen_dense"] += p.numel() * p.element_size()
    nf4_ids = set()
    for m in model.modules():
        if isinstance(m, NF4Linear):
            for b in m.buffers(recurse=False):
                nf4_ids.add(id(b))
                out["nf4"] += b.numel() * b.element_size()
    for b in model.buffers():
        if id(b) not in nf4_ids:
            out["other_buffers"] += b.numel() * b.element_size()  # rope table, KV cache
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out["gradients"] = 4 * n_trainable
    if optimizer is not None and optimizer.state:
        out["optimizer"] = sum(t.numel() * t.element_size() for s in optimizer.state.values()
                               for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    else:
        out["optimizer"] = 8 * n_trainable
    out["total"] = sum(v for k, v in out.items())
    return out


__all__ = ["BLOCK_LINEARS", "QUANTIZABLE", "nf4_storage_bits", "expected_bits_per_parameter", "quantize_base_nf4",
           "model_bits_per_parameter", "memory_accounting"]


def nf4_summary(r: dict) -> str:
    """One line for the log from quantize_base_nf4's report."""
    return (f"NF4 base: {r['layers']} linears, {r['quantized_params']:,} params in {r['stored_bytes'] / 2**20:.1f} "
            f"MiB (dense {r['dense_bytes'] / 2**20:.1f} MiB): {r['bits_per_parameter']:.4f} bits/param "
            f"(formula {r['expected_bits_per_parameter']:.4f}); NF4 error max {r['max_abs_error']:.3g}, "
            f"relative RMS {r['rel_rms_error']:.3g}")


def merged_dense_state(model) -> dict:
    """Meta-named dense state of this rank with the adapter folded into the dequantized NF4 weights
    (dequant(NF4(W)) + scale * B A; kollama/adapters/qlora.py explains why not W + B A), all in the dense parts'
    dtype."""
    dtype = model.tok_embeddings.weight.dtype
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in merged_state_dict(model).items()}
