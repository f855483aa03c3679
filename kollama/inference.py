"""Build a ``llama.Llama`` with a LoRA adapter and/or NF4 weights: the kollama side of ``Llama.build``.

``llama`` never imports ``kollama``, so adapters are applied here. For inference the adapter is folded into the
dense weights (``merge_and_unload``): generation then costs exactly what the base model costs. Quantization, if
asked for, runs after that fold, so the quantized weights are those of the adapted model.
"""
from __future__ import annotations

from typing import Optional

from llama import Llama
from llama.quantize import quantize_model
from kollama import nf4  # noqa: F401  registers quantize="nf4"
from kollama.lora import load_adapter, merge_and_unload


def build(ckpt_dir: str, tokenizer_path: str, max_seq_len: int, max_batch_size: int,
          model_parallel_size: Optional[int] = None, seed: int = 1, *, lora_path: Optional[str] = None,
          quantize: Optional[str] = None, **build_kwargs) -> Llama:
    """``Llama.build`` plus ``lora_path`` (a folder written by ``kollama.lora.save_adapter`` or the trainer's
    ``adapter/``) and ``quantize`` in "int8", "int4" or "nf4". Other keywords go to ``Llama.build``."""
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, model_parallel_size, seed,
                        quantize=None if lora_path else quantize, **build_kwargs)
    if lora_path:
        load_adapter(llama.model, lora_path)
        merge_and_unload(llama.model)
        llama.model.requires_grad_(False)
        if quantize:
            quantize_model(llama.model, quantize)
    return llama
