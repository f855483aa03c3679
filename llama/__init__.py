"""Llama 2 in native PyTorch: Meta's interface, without fairscale, on CPU or CUDA, with any shard count.

The public API (what ``kollama`` and users import): the names below, and the modules ``llama.parallel``,
``llama.chat_format``, ``llama.checkpoint``, ``llama.quantize`` (with ``register_quantizer``, the hook for other
formats), ``llama.fusion``, ``llama.cpu_decode`` (``prepare_inference``), ``llama.kernels``, ``llama.errors`` and
``llama.files``."""
from llama.chat_format import Dialog, Message
from llama.generation import ChatPrediction, CompletionPrediction, Llama, TokenBatch, generate_tokens
from llama.loading import load_model
from llama.model import KVCache, ModelArgs, Transformer
from llama.sampling import Sampler
from llama.tokenizer import Tokenizer

__all__ = ["Llama", "Dialog", "Message", "ChatPrediction", "CompletionPrediction", "ModelArgs", "Transformer",
           "KVCache", "Tokenizer", "Sampler", "TokenBatch", "generate_tokens", "load_model"]
