"""What the vocabulary tools share: their error class, Hangul, and reading SentencePiece ``.model`` files.

``corpus``, ``train``, ``merge``, ``stats`` and ``resize`` import this module; it imports none of them.
"""
import os
from pathlib import Path
from typing import Union

from llama.errors import UserError

PathLike = Union[str, os.PathLike]

# Hangul blocks: Jamo, Compatibility Jamo (ㅋㅋ, ㅠㅠ), Jamo Extended-A/B, syllables, halfwidth Jamo.
HANGUL_RANGES = ((0x1100, 0x11FF), (0x3130, 0x318F), (0xA960, 0xA97F), (0xAC00, 0xD7A3), (0xD7B0, 0xD7FF),
                 (0xFFA0, 0xFFDC))
SYLLABLE_FIRST, SYLLABLE_LAST = 0xAC00, 0xD7A3


class VocabError(UserError):
    """A problem with the user's input; the message names the problem and how to fix it."""


# ---------------------------------------------------------------------------------------------------- helpers

def is_hangul(ch: str) -> bool:
    """True for a Hangul syllable or Jamo character."""
    o = ord(ch)
    return any(lo <= o <= hi for lo, hi in HANGUL_RANGES)


def has_hangul(s: str) -> bool:
    return any(is_hangul(c) for c in s)


def count_hangul_syllables(text: str) -> int:
    """Number of precomposed Hangul syllables (U+AC00-U+D7A3), the unit of 'tokens per Hangul syllable'."""
    return sum(SYLLABLE_FIRST <= ord(c) <= SYLLABLE_LAST for c in text)


def existing_file(path: PathLike, what: str) -> Path:
    path = Path(str(path))  # fire turns a numeric-looking name into an int
    if not path.is_file():
        raise VocabError(f"{what} {path} does not exist (or is not a file); check the path")
    return path


def model_pb2():
    """sentencepiece ships sentencepiece_model_pb2, but it needs the protobuf package, which is a separate install."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise VocabError(f"editing tokenizer models needs protobuf ({e}); run `pip install protobuf`") from e
    return sentencepiece_model_pb2


def load_model_proto(path: PathLike, what: str = "tokenizer model"):
    """Parse a SentencePiece .model file into a ModelProto, with a clear error for missing or non-model files."""
    path = existing_file(path, what)
    proto = model_pb2().ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:
        raise VocabError(f"{what} {path} is not a SentencePiece .model file ({e})") from e
    if len(proto.pieces) == 0:
        raise VocabError(f"{what} {path} is not a SentencePiece .model file (it has no pieces)")
    return proto
