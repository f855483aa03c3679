"""Tokenizer efficiency on Korean text (tokens per character and per Hangul syllable, byte-fallback share):
``python -m kollama.vocab stats``."""
from typing import Iterable, List, Optional, Sequence, Union

import sentencepiece as spm

from kollama.vocab.common import PathLike, VocabError, count_hangul_syllables, existing_file
from kollama.vocab.corpus import read_corpus


# ---------------------------------------------------------------------------------------------------- stats

def tokenizer_stats(model_path: PathLike, texts: Union[str, Iterable[str]]) -> dict:
    """Efficiency numbers of one tokenizer on `texts` (a string or an iterable of lines, each encoded on its own,
    without BOS/EOS): tokens per character, tokens per Hangul syllable (None when there is none) and the share of
    tokens that are byte-fallback pieces <0xNN>."""
    path = existing_file(model_path, "tokenizer model")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as e:
        raise VocabError(f"tokenizer model {path} is not a SentencePiece .model file ({e})") from e
    texts = [texts] if isinstance(texts, str) else list(texts)
    ids = sp.encode(texts)
    tokens = sum(len(x) for x in ids)
    byte_tokens = sum(sp.is_byte(i) for x in ids for i in x)
    chars = sum(len(t) for t in texts)
    syllables = sum(count_hangul_syllables(t) for t in texts)
    return {
        "tokenizer": str(model_path), "vocab_size": sp.vocab_size(), "texts": len(texts), "chars": chars,
        "hangul_syllables": syllables, "tokens": tokens, "byte_tokens": byte_tokens,
        "tokens_per_char": tokens / chars if chars else None,
        "tokens_per_hangul_syllable": tokens / syllables if syllables else None,
        "byte_fallback_share": byte_tokens / tokens if tokens else None,
    }


def stats_table(rows: Sequence[dict]) -> str:
    """Markdown table of tokenizer_stats results, one row per tokenizer."""
    def num(v):
        return "n/a" if v is None else f"{v:.4f}"
    out = ["| tokenizer | vocab size | tokens | tokens/char | tokens/Hangul syllable | byte-fallback share |",
           "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        out.append(f"| {r['tokenizer']} | {r['vocab_size']} | {r['tokens']} | {num(r['tokens_per_char'])} | "
                   f"{num(r['tokens_per_hangul_syllable'])} | {num(r['byte_fallback_share'])} |")
    return "\n".join(out)


def stats(*tokenizers: PathLike, text: PathLike, field: str = "text", max_lines: Optional[int] = None) -> List[dict]:
    """tokenizer_stats for each tokenizer on the lines of `text` (plain text, or .jsonl with `field`)."""
    if not tokenizers:
        raise VocabError("no tokenizer given; pass one or more .model files before --text")
    # Strict: numbers over the lines that happen to decode (the ASCII ones of a CP949 file) would mislead.
    lines = read_corpus([text], field, max_lines, strict_utf8=True)
    return [tokenizer_stats(t, lines) for t in tokenizers]
