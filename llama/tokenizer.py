"""SentencePiece tokenizer with Meta's interface (n_words, bos_id, eos_id, pad_id, encode, decode)."""
from __future__ import annotations

import os
from typing import List

from sentencepiece import SentencePieceProcessor

from llama.errors import UserError


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
            raise UserError(f"{model_path!r} is not a SentencePiece model ({e}); pass the tokenizer.model file") from e
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


class IncrementalDecoder:
    """Turn a growing list of token ids into text deltas that are always whole UTF-8 characters.

    Korean (and any text outside the vocabulary) comes out of the Llama 2 tokenizer as runs of ``<0xNN>`` byte
    pieces; decoding a partial run gives U+FFFD, so a delta is held back while the decoded text ends in U+FFFD.
    SentencePiece drops the leading space of the first piece it decodes, so deltas are taken between two decodes
    that start at the same token (``prefix``): ``decode(ids[prefix:])`` minus ``decode(ids[prefix:read])``. After
    each emitted delta the window moves up to the last emitted token, so each step decodes only a few tokens
    (O(new tokens) amortized) and the concatenated deltas equal ``decode(all ids)``.
    """

    def __init__(self, tokenizer: "Tokenizer"):
        self.tokenizer = tokenizer
        self.ids: List[int] = []
        self.prefix = 0  # window start: the first token of the last emitted delta's window
        self.read = 0  # tokens [prefix, read) were decoded into text already emitted

    def push(self, token_ids) -> str:
        """Add token ids and return the text they complete ('' while a character is still incomplete)."""
        self.ids.extend(token_ids)
        return self._delta(final=False)

    def flush(self) -> str:
        """The held-back remainder (e.g. a byte run that never completed, as U+FFFD), at the end of a stream."""
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        done = self.tokenizer.decode(self.ids[self.prefix : self.read]) if self.read > self.prefix else ""
        text = self.tokenizer.decode(self.ids[self.prefix :])
        if len(text) <= len(done) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done) :]
