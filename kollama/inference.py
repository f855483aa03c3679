"""Build a ``llama.Llama`` with a LoRA adapter and/or NF4 weights: the kollama side of ``Llama.build``.

``llama`` never imports ``kollama``, so adapters are applied here, by ``kollama.adapters.adapter.apply_adapter``
(the same call ``kollama.evaluate --lora_path`` makes): the adapter's recorded base and tokenizer are checked against
``ckpt_dir`` / ``tokenizer_path``, a QLoRA adapter is folded onto dequant(NF4(W)) as it was trained, and the update
is folded into dense weights, so generation then costs exactly what the base model costs. Quantization, if asked
for, runs after that fold, so the quantized weights are those of the adapted model.
"""
from __future__ import annotations

from typing import Optional

from llama import Llama
from llama.cpu_decode import prepare_inference
from llama.quantize import quantize_model
from kollama.adapters import nf4
from kollama.adapters.adapter import apply_adapter


def build(ckpt_dir: str, tokenizer_path: str, max_seq_len: int, max_batch_size: int,
          model_parallel_size: Optional[int] = None, seed: int = 1, *, lora_path: Optional[str] = None,
          quantize: Optional[str] = None, allow_base_mismatch: bool = False, **build_kwargs) -> Llama:
    """``Llama.build`` plus ``lora_path`` (a folder written by ``kollama.adapters.lora.save_adapter`` or the trainer's
    ``adapter/``) and ``quantize`` in "int8", "int4" or "nf4". ``allow_base_mismatch`` turns an adapter recorded
    for another base model or tokenizer from an error into a warning. Other keywords go to ``Llama.build``."""
    if quantize == "nf4":
        nf4.register()
    llama = Llama.build(ckpt_dir, tokenizer_path, max_seq_len, max_batch_size, model_parallel_size, seed,
                        quantize=None if lora_path else quantize, **build_kwargs)
    if lora_path:
        apply_adapter(llama.model, lora_path, ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path,
                      allow_base_mismatch=allow_base_mismatch)
        if quantize:
            quantize_model(llama.model, quantize)
            prepare_inference(llama.model)  # the int8 weights replaced the dense ones Llama stacked
    return llama
