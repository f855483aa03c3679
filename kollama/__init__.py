"""KoLlama2's Korean adaptation toolkit on top of ``llama``: LoRA / QLoRA / full fine-tuning, Korean data,
vocabulary expansion, continued pretraining, curriculum learning and evaluation."""
