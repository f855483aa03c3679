"""KoLlama2: a from-scratch Llama 2 in native PyTorch (`llama`) and a Korean adaptation toolkit (`kollama`)."""
from setuptools import find_packages, setup

setup(
    name="kollama2",
    version="0.1.0",
    description="Llama 2 in native PyTorch (no fairscale, CPU or CUDA, any shard count) and Korean adaptation tools",
    packages=find_packages(include=["llama", "llama.*", "kollama", "kollama.*"]),
    package_data={"llama.kernels": ["cpu.c"]},  # compiled on first use (llama/kernels/__init__.py)
    python_requires=">=3.9",
    # Runtime: only what inference needs. torch is not pinned so an existing CPU or CUDA build is kept; 2.5 is the
    # first with grouped-query attention in scaled_dot_product_attention (enable_gqa). `kollama.train --fsdp` needs
    # 2.8 (FSDP2 with sum reductions) and says so.
    install_requires=["torch>=2.5", "sentencepiece", "fire", "numpy", "safetensors"],
    extras_require={
        # protobuf: `kollama.vocab merge` edits SentencePiece's ModelProto, which needs the protobuf runtime
        # (sentencepiece ships the generated module but not the runtime); only that command imports it.
        "vocab": ["protobuf"],
        # tqdm draws progress bars for conversion, training and evaluation; without it they print plain counters.
        "progress": ["tqdm"],
        # kollama.evaluate scores translations with sacrebleu (the standard chrF++/BLEU implementation, so numbers
        # compare with published ones); kollama.report draws charts with matplotlib (Markdown only without it).
        "eval": ["sacrebleu>=2.4", "matplotlib>=3.7"],
        # kollama.train --config run.yaml (JSON config files need nothing).
        "yaml": ["pyyaml"],
        # `python -m llama.convert to_gguf` writes GGUF files for llama.cpp with the gguf package (pure Python).
        "gguf": ["gguf>=0.10"],
        # Running those files: llama-cpp-python compiles llama.cpp on install (minutes), so it is in no other extra.
        "bench": ["llama-cpp-python", "gguf>=0.10"],
        # Test references, never imported by llama/ or kollama/ at run time: transformers (LlamaForCausalLM logits),
        # torchao (NF4 codes), peft (LoRA training and adapter export). torch is installed first (README), so
        # their torch requirement is already met and no other torch build is pulled. gguf reads exported files back;
        # the llama.cpp comparisons of tests/test_gguf.py run only where llama-cpp-python is installed ([bench]).
        "test": ["pytest", "pyyaml", "transformers", "protobuf", "torchao", "peft", "tqdm", "sacrebleu>=2.4", "matplotlib>=3.7",
                 "gguf>=0.10"],
    },
)
