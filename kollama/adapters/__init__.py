"""Adaptation methods and applying their results: LoRA, NF4 and QLoRA, and adapters applied to the base they were
trained on.

  lora.py         LoRALinear (also over model-parallel linears), adapter files, merge/unmerge, PEFT export
  nf4.py          hand-written NF4 weights (double quantization) and NF4Linear; ``register()`` adds "nf4" to llama
  qlora.py        an NF4 base under LoRA factors, the merged dense export, memory accounting
  adapter.py      apply a saved LoRA / QLoRA adapter folder to a loaded base, as it was trained
  fingerprint.py  which base model and tokenizer a checkpoint or adapter belongs to
"""
