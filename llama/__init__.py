"""Llama 2 in native PyTorch: Meta's interface, without fairscale, on CPU or CUDA, with any shard count."""
from llama.chat_format import Dialog, Message
from llama.generation import ChatPrediction, CompletionPrediction, Llama
from llama.model import ModelArgs, Transformer
from llama.tokenizer import Tokenizer

__all__ = ["Llama", "Dialog", "Message", "ChatPrediction", "CompletionPrediction", "ModelArgs", "Transformer",
           "Tokenizer"]
