"""SentencePiece tokenizer with Meta's interface (n_words, bos_id, eos_id, pad_id, encode, decode)."""
from __future__ import annotations

import os
from typing import List

from sentencepiece import SentencePieceProcessor


class Tokenizer:
    def __init__(self, model_path: str):
        model_path = os.fspath(model_path)
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"tokenizer model not found: {model_path!r}; pass --tokenizer_path pointing at tokenizer.model"
            )
        self.sp_model = SentencePieceProcessor()
        try:
            self.sp_model.Load(model_path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{model_path!r} is not a SentencePiece model ({e}); pass the tokenizer.model file") from e
        self.model_path = model_path
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()

    def encode(self, s: str, bos: bool, eos: bool) -> List[int]:
        if not isinstance(s, str):
            raise TypeError(f"encode expects a str, got {type(s).__name__}")
        t = self.sp_model.encode(s)
        if bos:
            t = [self.bos_id] + t
        if eos:
            t = t + [self.eos_id]
        return t

    def decode(self, t: List[int]) -> str:
        return self.sp_model.decode(list(t))

    def id_to_piece(self, i: int) -> str:
        return self.sp_model.id_to_piece(i)
