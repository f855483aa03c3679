"""Text out of generated tokens: UTF-8-safe deltas and stop strings (for streaming and for ``stop=``)."""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

from llama.errors import UserError
from llama.tokenizer import IncrementalDecoder, Tokenizer


def normalize_stop(stop: Union[None, str, Sequence[str]]) -> List[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    stop = list(stop)
    if any(not isinstance(s, str) or not s for s in stop):
        raise UserError(f"stop strings must be non-empty strings, got {stop!r}")
    return stop


def first_stop(text: str, stop: Sequence[str]) -> Optional[int]:
    """Start of the stop string that completes first in ``text`` (earliest end; on a tie, the longer one)."""
    best = None
    for s in stop:
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < (best[0], best[1])):
            best = (i + len(s), i)
    return None if best is None else best[1]


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) its first stop string; the whole text when there is none."""
    i = first_stop(text, stop)
    return text if i is None else text[:i]


class TextStream:
    """Token ids in, text deltas out: UTF-8-safe (``IncrementalDecoder``) and cut before the first stop string.

    Text that might be the start of a stop string is held back until it is known not to be, so the deltas never
    contain any part of a stop string and their concatenation is ``cut_at_stop(decode(ids), stop)``. Only the held
    text and the new delta are searched, so each step costs O(new text + stop lengths), not O(text so far).
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop = list(stop)
        self.held = ""
        self.stopped = False  # a stop string was found: nothing more will be emitted
        self.finished = False  # EOS was generated (set by the caller)

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        return self._emit(self.decoder.push([token_id]), final=False)

    def flush(self) -> str:
        if self.stopped:
            return ""
        return self._emit(self.decoder.flush(), final=True)

    def _emit(self, delta: str, final: bool) -> str:
        if not self.stop:
            return delta
        # A stop string cannot start in text already emitted: any suffix of it that begins a stop string is held.
        buf = self.held + delta
        i = first_stop(buf, self.stop)
        if i is not None:
            self.stopped, self.held = True, ""
            return buf[:i]
        keep = 0 if final else max((k for s in self.stop for k in range(1, len(s)) if buf.endswith(s[:k])),
                                   default=0)
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep]
