"""KoLlama2: a from-scratch Llama 2 in native PyTorch (`llama`) and a Korean adaptation toolkit (`kollama`)."""
from setuptools import find_packages, setup

setup(
    name="kollama2",
    version="0.1.0",
    description="Llama 2 in native PyTorch (no fairscale, CPU or CUDA, any shard count) and Korean adaptation tools",
    packages=find_packages(include=["llama", "llama.*", "kollama", "kollama.*"]),
    python_requires=">=3.9",
    # Runtime: only what inference needs. torch is not pinned so an existing CPU or CUDA build is kept.
    install_requires=["torch>=2.1", "sentencepiece", "fire", "numpy", "safetensors"],
    extras_require={
        # transformers and peft are numerical references in the tests only, never imported by llama/ or kollama/.
        # protobuf lets transformers read a SentencePiece model for LlamaTokenizer.
        "test": ["pytest", "transformers", "protobuf"],
    },
)
