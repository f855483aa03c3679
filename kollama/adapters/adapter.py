"""Apply a saved LoRA / QLoRA adapter folder to a loaded base model, as it was trained: the one path that
``kollama.inference.build(lora_path=...)`` and ``kollama.evaluate --lora_path`` share.

``apply_adapter(model, adapter_dir, ckpt_dir=..., tokenizer_path=...)``:

1. checks the adapter's recorded base (``base`` fingerprint and ``tokenizer_sha256`` in adapter_config.json, see
   ``kollama.adapters.fingerprint``) against ``ckpt_dir`` / ``tokenizer_path``: another base or tokenizer is an error
   (``FingerprintMismatch``), or a warning with ``allow_base_mismatch=True``; an adapter from before these fields
   existed is loaded with a warning;
2. if the adapter says ``base_quantization: "nf4"`` (QLoRA), quantizes the base's block linears with the trainer's
   own call (``kollama.adapters.qlora.quantize_base_nf4``, default targets, this rank's shard), because the adapter was
   trained against dequant(NF4(W)), not W: merging it onto W would put back the NF4 rounding error it learned to
   compensate (kollama/adapters/qlora.py quantifies that error);
3. loads the factors and folds everything into dense weights: an adapted layer gets ``base + scale * B A`` computed
   in fp32 (``LoRALinear.merged_weight``: the dequantized NF4 weight for a quantized base) and cast once, an NF4
   layer without an adapter gets its dequantized weight. These are exactly the numbers of the trainer's
   ``merged/`` export (``kollama.adapters.qlora.merged_dense_state``); the model is then a plain ``Transformer``
   again, as fast as the base and quantizable.

Quantization is a pure function of the loaded base weights, so the NF4 base is rebuilt bit for bit when the base
is loaded as the trainer loaded it: the same checkpoint, the same dtype (the trainer's default is bf16 on CUDA,
fp32 on CPU, like ``Llama.build``'s) and the same model-parallel size (NF4 blocks are cut per shard).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from kollama.adapters.fingerprint import FingerprintMismatch, base_fingerprint, check_same_base, tokenizer_sha256
from kollama.adapters.lora import AdapterError, LoRALinear, load_adapter, read_adapter_config
from kollama.adapters.qlora import quantize_base_nf4
from llama.parallel import ParallelLinear

BASE_QUANTIZATIONS = (None, "nf4")
ALLOW_FLAG = "--allow_base_mismatch"


def check_adapter_base(adapter_dir, config: dict, ckpt_dir=None, tokenizer_path=None,
                       allow_base_mismatch: bool = False) -> None:
    """Compare the base an adapter records with ``ckpt_dir`` / ``tokenizer_path`` (whichever is given)."""
    if ckpt_dir is None and tokenizer_path is None:
        return
    actual = {}
    if ckpt_dir is not None:
        actual.update(base=base_fingerprint(ckpt_dir), ckpt_dir=str(ckpt_dir))
    if tokenizer_path is not None:
        actual.update(tokenizer_sha256=tokenizer_sha256(tokenizer_path), tokenizer_path=str(tokenizer_path))
    try:
        check_same_base(config, actual, f"adapter {adapter_dir}", ALLOW_FLAG)
    except FingerprintMismatch as e:
        if not allow_base_mismatch:
            raise
        warnings.warn(f"{e} (loading it anyway: allow_base_mismatch)", stacklevel=3)


@torch.no_grad()
def fold_into_dense(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its base holding ``base + scale * B A`` and every quantized (NF4) linear by its
    dequantized weight, one layer at a time (peak: the model plus one fp32 layer). A dense base keeps its dtype
    (the same rounding as ``LoRALinear.merge``); a quantized one gets the dtype of the model's dense weights."""
    dtype = model.tok_embeddings.weight.dtype
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            weight, layer = module.merged_weight(), module.base
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, layer)
        elif isinstance(module, ParallelLinear) and module.weight is None and hasattr(module.local_linear,
                                                                                      "dequantize"):
            weight, layer = module.local_linear.dequantize(torch.float32), module
        else:
            continue  # dense layers, and the base of a LoRALinear already folded above
        if layer.weight is not None:
            layer.weight.copy_(weight.to(layer.weight.dtype))
        else:
            # llama.parallel has replace_local_linear but no inverse: drop the quantized module and put the dense
            # weight back where ParallelLinear.local_forward looks for it.
            layer.local_linear = None
            layer.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
        del weight
    return model


def apply_adapter(model: nn.Module, adapter_dir, *, ckpt_dir=None, tokenizer_path=None,
                  allow_base_mismatch: bool = False) -> nn.Module:
    """Fold the adapter in ``adapter_dir`` into ``model`` (this rank's dense base, as loaded by ``Llama.build``)
    exactly as it was trained; see the module docstring. ``ckpt_dir`` / ``tokenizer_path``: where ``model`` and
    its tokenizer came from, checked against the adapter's record. Returns ``model``, changed in place, frozen."""
    config = read_adapter_config(adapter_dir)
    quantization = config.get("base_quantization")
    if quantization not in BASE_QUANTIZATIONS:
        raise AdapterError(f"adapter {adapter_dir} says base_quantization {quantization!r}; this version knows "
                           f"{[q for q in BASE_QUANTIZATIONS if q]} (or none)")
    check_adapter_base(adapter_dir, config, ckpt_dir, tokenizer_path, allow_base_mismatch)
    if quantization == "nf4":
        quantize_base_nf4(model, measure_error=False)
    load_adapter(model, adapter_dir)
    fold_into_dense(model)
    return model.requires_grad_(False)


__all__ = ["apply_adapter", "check_adapter_base", "fold_into_dense"]
