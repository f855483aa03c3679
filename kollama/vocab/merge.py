"""Merge a Korean SentencePiece model into a Llama 2 tokenizer without changing how that tokenizer splits
non-Korean text: ``python -m kollama.vocab merge``.

Why `merge` cannot change non-Korean tokenization. SentencePiece BPE encodes a text by splitting it into characters
and then repeatedly merging the adjacent pair of symbols whose concatenation is a vocabulary piece with the highest
score (ties: leftmost first), until no adjacent pair forms a piece. `merge` adds only pieces that contain a Hangul
character, so
  1. on text without Hangul no new piece can ever be formed: every symbol is a substring of the text. The encoding
     is the base encoding, whatever the new scores are;
  2. on mixed text, every new score is below every base score, so all base merges happen first, in the same order
     as in the base model, and the base result is reached; after that only merges that involve a Hangul-containing
     symbol remain possible. Hence the merged output is the base output with some adjacent tokens joined, and every
     joined token contains Hangul: tokens of the non-Korean parts stay as they were.
Chinese-LLaMA appended its pieces with score 0, above Llama's negative scores, and included pieces without Chinese
characters; both changed English tokenization. New pieces keep the Korean model's relative order, so each is built
from its sub-pieces as in the Korean model; a piece none of whose binary splits is available is dropped.
"""
import math
from typing import List, Tuple

import numpy as np
import sentencepiece as spm

from kollama.vocab.common import PathLike, VocabError, has_hangul, load_model_proto, model_pb2
from llama.files import atomic_write_bytes, check_new_output


# ---------------------------------------------------------------------------------------------------- merge

def select_new_pieces(base, ko) -> Tuple[list, dict]:
    """The Korean model's pieces to add to `base`, in the Korean model's merge order (highest score first).

    Kept: NORMAL pieces that contain Hangul (see the module docstring for why only those), are not in the base
    vocabulary, and are reachable: a BPE piece is only ever built from two adjacent symbols, so at least one of its
    binary splits must consist of available pieces (base, already kept, or single characters, which are the
    starting symbols). Returns (kept ModelProto.SentencePiece list, counts of skipped pieces by reason).
    """
    kind = model_pb2().ModelProto.SentencePiece
    normal = kind.NORMAL
    merge_types = (normal, kind.USER_DEFINED, kind.UNUSED)  # pieces BPE merges can form
    in_base = {p.piece for p in base.pieces}
    available = {p.piece for p in base.pieces if p.type in merge_types}
    kept, skipped = [], {"not NORMAL": 0, "no Hangul": 0, "already in base": 0, "unreachable": 0}
    order = sorted(range(len(ko.pieces)), key=lambda i: (-ko.pieces[i].score, i))  # stable: ties keep id order
    for i in order:
        p = ko.pieces[i]
        reason = ("not NORMAL" if p.type != normal else "no Hangul" if not has_hangul(p.piece)
                  else "already in base" if p.piece in in_base else None)
        if reason is None and len(p.piece) > 1 and not any(
                _symbol(p.piece[:k], available) and _symbol(p.piece[k:], available) for k in range(1, len(p.piece))):
            reason = "unreachable"
        if reason:
            skipped[reason] += 1
            continue
        kept.append(p)
        available.add(p.piece)
    return kept, skipped


def _symbol(s: str, available: set) -> bool:
    return len(s) == 1 or s in available


def scores_below(floor: float, n: int) -> List[float]:
    """`n` strictly decreasing float32 scores, all strictly below `floor`.

    Scores are stored as float32: Llama's whitespace pieces sit at -1e9, where float32 steps are 64 apart, so
    `floor - 1 - i` alone would collapse into ties (and tie with -1e9 itself). Stepping to the next representable
    float32 whenever rounding fails to go down keeps the order strict; where precision allows the scores stay
    the readable floor-1, floor-2, ...
    """
    out, prev, down = [], np.float32(floor), np.float32(-np.inf)
    for i in range(n):
        s = np.float32(float(floor) - 1.0 - i)
        if not s < prev:
            s = np.nextafter(prev, down)
        out.append(float(s))
        prev = s
    return out


def padding_piece_names(start: int, count: int, taken: set) -> List[str]:
    """Names for padding pieces. They contain an ASCII space, which the normalizer always rewrites to '▁'
    (escape_whitespaces), so no symbol of any input ever equals or merges into them: they can never be produced
    and never change a merge, even though UNUSED pieces take part in BPE merging inside SentencePiece."""
    names = []
    for i in range(start, start + count):
        name = f"<unused {i}>"
        while name in taken:
            name += " "
        names.append(name)
    return names


def merge_protos(base, ko, pad_multiple: int = 64, model_parallel_size: int = 1,
                 names: Tuple[str, str] = ("the base model", "the Korean model")):
    """Return (merged ModelProto, info dict). The base proto is copied, not modified; base ids, pieces, scores and
    types are unchanged, Korean pieces are appended with scores below every base score, then UNUSED padding up to
    a multiple of lcm(pad_multiple, model_parallel_size). A Korean model that adds nothing is an error (the output
    would be a copy of the base, and resizing a checkpoint to it a no-op). `names`: (base, ko) for messages."""
    for name, v in (("--pad_multiple", pad_multiple), ("--model_parallel_size", model_parallel_size)):
        if not isinstance(v, int) or v < 1:
            raise VocabError(f"{name} must be a positive integer, got {v!r}")
    pb2 = model_pb2()
    bpe = pb2.TrainerSpec.BPE
    if base.trainer_spec.model_type != bpe:
        raise VocabError("the base model is not a BPE model; the merge guarantee only holds for BPE (like Llama 2)")
    if ko.trainer_spec.model_type != bpe:
        raise VocabError("the Korean model is not a BPE model; train it with `python -m kollama.vocab train`")
    if ko.trainer_spec.treat_whitespace_as_suffix != base.trainer_spec.treat_whitespace_as_suffix:
        raise VocabError("the Korean and base models put '▁' on different sides of words "
                         "(treat_whitespace_as_suffix differs); retrain the Korean model with the base's setting")
    if not base.normalizer_spec.escape_whitespaces:
        raise VocabError("the base model keeps raw spaces (escape_whitespaces=false); padding pieces could then be "
                         "formed from input text, so this merge is not supported for it")
    new_pieces, skipped = select_new_pieces(base, ko)
    if not new_pieces:
        why = ", ".join(f"{v} {k}" for k, v in skipped.items() if v)
        raise VocabError(f"{names[1]} adds no new piece to {names[0]} (of its {len(ko.pieces)} pieces: {why}); "
                         f"check that it was trained on Korean text with `python -m kollama.vocab train` and that "
                         f"BASE.model and KO.model are not swapped")
    merged = type(base)()
    merged.CopyFrom(base)
    scores = scores_below(min(p.score for p in base.pieces), len(new_pieces) + 1)
    for p, score in zip(new_pieces, scores):
        merged.pieces.add(piece=p.piece, score=score, type=pb2.ModelProto.SentencePiece.NORMAL)
    multiple = math.lcm(pad_multiple, model_parallel_size)
    n_pad = -len(merged.pieces) % multiple
    taken = {p.piece for p in merged.pieces}
    for name in padding_piece_names(len(merged.pieces), n_pad, taken):
        # Below every real score too, though it never matters: padding pieces are unreachable (see above).
        merged.pieces.add(piece=name, score=scores[-1], type=pb2.ModelProto.SentencePiece.UNUSED)
    merged.trainer_spec.vocab_size = len(merged.pieces)
    try:
        spm.SentencePieceProcessor(model_proto=merged.SerializeToString())
    except RuntimeError as e:  # pragma: no cover - would be a bug above
        raise VocabError(f"the merged model does not load in SentencePiece: {e}") from e
    info = {"base_size": len(base.pieces), "added": len(new_pieces), "padding": n_pad,
            "final_size": len(merged.pieces), "skipped": skipped}
    return merged, info


def merge(base: PathLike, ko: PathLike, out: PathLike, pad_multiple: int = 64, model_parallel_size: int = 1,
          overwrite: bool = False) -> dict:
    """Merge the Korean model `ko` into the base tokenizer `base` and write `out` atomically; returns merge info.
    An existing `out` is replaced only with `overwrite`, and never when it is `base` or `ko`."""
    check_new_output(out, "OUT", (base, ko), overwrite)
    merged, info = merge_protos(load_model_proto(base, "base model"), load_model_proto(ko, "Korean model"),
                                pad_multiple, model_parallel_size,
                                names=(f"base model {base}", f"Korean model {ko}"))
    atomic_write_bytes(out, merged.SerializeToString())
    return dict(info, out=str(out))
