"""Korean vocabulary tools: train a Korean SentencePiece BPE model, merge it into a Llama 2 tokenizer without
changing how that tokenizer splits non-Korean text, and measure tokenizer efficiency on Korean text.

    python -m kollama.vocab train CORPUS [CORPUS ...] --out ko.model [--vocab_size 16000] [--field text]
    python -m kollama.vocab merge BASE.model KO.model OUT.model [--pad_multiple 64] [--model_parallel_size 1]
    python -m kollama.vocab stats TOKENIZER [TOKENIZER ...] --text FILE [--field text]

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
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import sentencepiece as spm

from llama.errors import UserError, run_cli
from llama.files import atomic_write_bytes, check_new_output

PathLike = Union[str, os.PathLike]

# Hangul blocks: Jamo, Compatibility Jamo (ㅋㅋ, ㅠㅠ), Jamo Extended-A/B, syllables, halfwidth Jamo.
HANGUL_RANGES = ((0x1100, 0x11FF), (0x3130, 0x318F), (0xA960, 0xA97F), (0xAC00, 0xD7A3), (0xD7B0, 0xD7FF),
                 (0xFFA0, 0xFFDC))
SYLLABLE_FIRST, SYLLABLE_LAST = 0xAC00, 0xD7A3
JSONL_SUFFIXES = (".jsonl", ".ndjson")
MAX_REPORTED_PROBLEMS = 5  # per file: enough to see the pattern without flooding the terminal

# Trainer settings copied from the Llama 2 tokenizer.model trainer_spec/normalizer_spec, so the Korean pieces are
# cut from text normalized exactly as Llama sees it (identity normalization, dummy prefix, spaces kept as they are).
LLAMA2_TRAINER_SETTINGS = dict(
    model_type="bpe", byte_fallback=True, split_digits=True, split_by_unicode_script=True, split_by_number=True,
    split_by_whitespace=True, treat_whitespace_as_suffix=False, allow_whitespace_only_pieces=True,
    max_sentencepiece_length=16, max_sentence_length=4192, normalization_rule_name="identity",
    add_dummy_prefix=True, remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    vocabulary_output_piece_score=True, hard_vocab_limit=True, shuffle_input_sentence=True,
)
# 3 control pieces (unk, bos, eos) + 256 byte pieces are always in the vocabulary; the rest are learned.
MIN_VOCAB_SIZE = 3 + 256 + 1


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


def _existing_file(path: PathLike, what: str) -> Path:
    path = Path(str(path))  # fire turns a numeric-looking name into an int
    if not path.is_file():
        raise VocabError(f"{what} {path} does not exist (or is not a file); check the path")
    return path


def _model_pb2():
    """sentencepiece ships sentencepiece_model_pb2, but it needs the protobuf package, which is a separate install."""
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise VocabError(f"editing tokenizer models needs protobuf ({e}); run `pip install protobuf`") from e
    return sentencepiece_model_pb2


def load_model_proto(path: PathLike, what: str = "tokenizer model"):
    """Parse a SentencePiece .model file into a ModelProto, with a clear error for missing or non-model files."""
    path = _existing_file(path, what)
    proto = _model_pb2().ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:
        raise VocabError(f"{what} {path} is not a SentencePiece .model file ({e})") from e
    if len(proto.pieces) == 0:
        raise VocabError(f"{what} {path} is not a SentencePiece .model file (it has no pieces)")
    return proto


# ---------------------------------------------------------------------------------------------------- corpus

def iter_corpus_lines(path: PathLike, field: str = "text", max_lines: Optional[int] = None,
                      problems: Optional[list] = None, strict_utf8: bool = False) -> Iterator[str]:
    """Yield the non-blank text lines of one corpus file.

    `.jsonl`/`.ndjson` files are read as one JSON object per line, taking the string in `field`; any other file is
    plain text, one sentence per line. Lines that cannot be used (bad UTF-8, bad JSON, missing or non-string field)
    are skipped and recorded in `problems` as "file:line: reason". Multi-line values are split into lines, as
    SentencePiece trains on sentences. A NUL byte is a VocabError (text never holds one: the file is binary or
    UTF-16, and its "lines" would be garbage), and so is bad UTF-8 with `strict_utf8`.
    """
    path = _existing_file(path, "corpus file")
    jsonl = path.suffix.lower() in JSONL_SUFFIXES
    used = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if max_lines is not None and used >= max_lines:
                return
            if b"\0" in raw:
                raise _not_text(path, lineno, "holds a NUL byte")
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                if strict_utf8:
                    raise _not_text(path, lineno, f"not valid UTF-8 (byte 0x{raw[e.start]:02X})") from None
                _problem(problems, path, lineno, "not valid UTF-8")
                continue
            if not line.strip():
                continue
            if jsonl:
                line = _json_field(line, field, path, lineno, problems)
                if line is None:
                    continue
            for sentence in line.splitlines():
                if sentence.strip():
                    used += 1
                    yield sentence


def _not_text(path: Path, lineno: int, what: str) -> VocabError:
    """The error for a file that is not UTF-8 text, with the fix for what it seems to be (kollama.data's guess;
    a file with NUL bytes is binary unless it starts with a UTF-16 byte-order mark)."""
    from kollama.data import guess_encoding, iconv_command

    raw = path.read_bytes()
    guess = guess_encoding(raw, "utf-8")
    encoding = guess if guess == "utf-16" or (guess == "cp949" and b"\0" not in raw) else None
    if encoding is None and b"\0" in raw:
        fix = "it is a binary file, not text: pass a UTF-8 text file (one text per line) or a .jsonl file"
    else:
        fix = (f"{f'it looks like {encoding} text: ' if encoding else ''}convert it to UTF-8 once with: "
               f"{iconv_command(path, encoding or 'ENCODING')}")
    return VocabError(f"{path}:{lineno}: {what}; {fix}")


def _json_field(line: str, field: str, path: Path, lineno: int, problems: Optional[list]) -> Optional[str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return _problem(problems, path, lineno, f"not valid JSON ({e.msg})")
    if not isinstance(record, dict) or field not in record:
        return _problem(problems, path, lineno, f"no field {field!r}")
    if not isinstance(record[field], str):
        return _problem(problems, path, lineno, f"field {field!r} is {type(record[field]).__name__}, not a string")
    return record[field]


def _problem(problems: Optional[list], path: Path, lineno: int, reason: str) -> None:
    if problems is not None:
        problems.append(f"{path}:{lineno}: {reason}")
    return None


def read_corpus(paths: Sequence[PathLike], field: str = "text", max_lines: Optional[int] = None,
                log=None, strict_utf8: bool = False) -> List[str]:
    """All usable lines of the given files (at most `max_lines` from each). Skipped lines are reported with file:line
    (the first few per file) and counted. A file that yields no usable line is an error: it is almost always a wrong
    path or a wrong --field, and silently training without it would hide that. `strict_utf8`: see
    iter_corpus_lines."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise VocabError("no corpus files given; pass one or more text or .jsonl files")
    log = log or sys.stderr  # looked up at call time, so redirected stderr (tests, notebooks) is honoured
    lines: List[str] = []
    for path in paths:
        problems: List[str] = []
        got = list(iter_corpus_lines(path, field, max_lines, problems, strict_utf8))
        for p in problems[:MAX_REPORTED_PROBLEMS]:
            print(f"skipped {p}", file=log)
        if problems:
            print(f"{path}: {len(got)} lines used, {len(problems)} skipped", file=log)
        if not got:
            why = f"; {len(problems)} lines skipped, e.g. {problems[0]}" if problems else " (the file is empty)"
            hint = f" Check --field (now {field!r})." if Path(str(path)).suffix.lower() in JSONL_SUFFIXES else ""
            raise VocabError(f"no usable lines in corpus file {path}{why}.{hint}")
        lines.extend(got)
    return lines


# ---------------------------------------------------------------------------------------------------- train

def train(*inputs: PathLike, out: PathLike, vocab_size: int = 16000, field: str = "text",
          character_coverage: float = 0.9995, max_lines: Optional[int] = None,
          num_threads: Optional[int] = None, overwrite: bool = False) -> dict:
    """Train a Korean SentencePiece BPE model (byte_fallback, Llama 2 normalization) on the given corpus files and
    write it atomically to `out`. character_coverage 0.9995 keeps the common Hangul syllables as pieces and leaves
    the rare ones (of 11,172 possible) to byte fallback. Returns {"out", "vocab_size", "lines"}. An existing
    ``out`` is replaced only with ``overwrite``, and never when it is one of the inputs."""
    check_new_output(out, "--out", inputs, overwrite)
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise VocabError(f"--vocab_size {vocab_size} is too small: it must be an integer >= {MIN_VOCAB_SIZE} "
                         f"(3 control pieces + 256 byte pieces + learned pieces); use e.g. 16000")
    lines = read_corpus(inputs, field, max_lines)
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=writer, vocab_size=vocab_size,
            character_coverage=character_coverage, num_threads=num_threads or os.cpu_count() or 1,
            minloglevel=2, **LLAMA2_TRAINER_SETTINGS)
    except RuntimeError as e:
        raise VocabError(_explain_trainer_error(str(e), vocab_size)) from e
    data = writer.getvalue()
    spm.SentencePieceProcessor(model_proto=data)  # never write a model that does not load
    atomic_write_bytes(out, data)
    return {"out": str(out), "vocab_size": vocab_size, "lines": len(lines)}


def _explain_trainer_error(msg: str, vocab_size: int) -> str:
    """Turn SentencePiece's internal check messages into what the user should change."""
    if "smaller than required_chars" in msg:
        need = msg.rsplit(" vs ", 1)[-1].split(".")[0]
        return (f"--vocab_size {vocab_size} is too small: the corpus characters plus control and byte pieces need "
                f"{need} pieces; raise --vocab_size well above {need} or lower --character_coverage")
    if "Vocabulary size too high" in msg:
        limit = msg.rsplit("<=", 1)[-1].strip(" .")
        return (f"--vocab_size {vocab_size} is too large for this corpus: only {limit} pieces can be learned from it; "
                f"lower --vocab_size to at most {limit} or add more text")
    return f"SentencePiece training failed: {msg}"


# ---------------------------------------------------------------------------------------------------- merge

def select_new_pieces(base, ko) -> Tuple[list, dict]:
    """The Korean model's pieces to add to `base`, in the Korean model's merge order (highest score first).

    Kept: NORMAL pieces that contain Hangul (see the module docstring for why only those), are not in the base
    vocabulary, and are reachable: a BPE piece is only ever built from two adjacent symbols, so at least one of its
    binary splits must consist of available pieces (base, already kept, or single characters, which are the
    starting symbols). Returns (kept ModelProto.SentencePiece list, counts of skipped pieces by reason).
    """
    kind = _model_pb2().ModelProto.SentencePiece
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
    pb2 = _model_pb2()
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


# ---------------------------------------------------------------------------------------------------- stats

def tokenizer_stats(model_path: PathLike, texts: Union[str, Iterable[str]]) -> dict:
    """Efficiency numbers of one tokenizer on `texts` (a string or an iterable of lines, each encoded on its own,
    without BOS/EOS): tokens per character, tokens per Hangul syllable (None when there is none) and the share of
    tokens that are byte-fallback pieces <0xNN>."""
    path = _existing_file(model_path, "tokenizer model")
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


# ---------------------------------------------------------------------------------------------------- resize
# `resize` lives in kollama/resize.py (it needs llama's checkpoint I/O). It relies on what `merge` guarantees:
# ids 0..base_size-1 keep their pieces, Korean pieces are appended after them, padding pieces are UNUSED.


# ---------------------------------------------------------------------------------------------------- CLI

def _train_cli(*inputs, out, vocab_size: int = 16000, field: str = "text", character_coverage: float = 0.9995,
               max_lines: Optional[int] = None, num_threads: Optional[int] = None, overwrite: bool = False) -> None:
    """Train a Korean SentencePiece BPE model: train CORPUS... --out ko.model [--vocab_size N] [--field text]"""
    info = train(*inputs, out=out, vocab_size=vocab_size, field=field, character_coverage=character_coverage,
                 max_lines=max_lines, num_threads=num_threads, overwrite=overwrite)
    print(f"trained {info['out']}: {info['vocab_size']} pieces from {info['lines']} lines")


def _merge_cli(base, ko, out, pad_multiple: int = 64, model_parallel_size: int = 1, overwrite: bool = False) -> None:
    """Add the Korean pieces of KO.model to BASE.model: merge BASE.model KO.model OUT.model [--overwrite]"""
    info = merge(base, ko, out, pad_multiple, model_parallel_size, overwrite)
    skipped = ", ".join(f"{v} {k}" for k, v in info["skipped"].items() if v)
    print(f"added {info['added']} pieces to {info['base_size']} (+{info['padding']} padding): "
          f"final size {info['final_size']} -> {info['out']}" + (f" (skipped: {skipped})" if skipped else ""))


def _stats_cli(*tokenizers, text, field: str = "text", max_lines: Optional[int] = None) -> None:
    """Print a Markdown table of tokenizer efficiency: stats TOKENIZER... --text FILE [--field text]"""
    print(stats_table(stats(*tokenizers, text=text, field=field, max_lines=max_lines)))


def _resize_cli(ckpt_dir, new_tokenizer, out_dir, old_tokenizer=None, overwrite: bool = False) -> None:
    """Grow a checkpoint to an expanded tokenizer: resize CKPT_DIR NEW_TOKENIZER OUT_DIR [--old_tokenizer T]"""
    from kollama.resize import resize

    info = resize(ckpt_dir, new_tokenizer, out_dir, old_tokenizer=old_tokenizer, overwrite=overwrite)
    print(f"resized {info['old_vocab']} -> {info['new_vocab']} rows ({info['shards']} shard(s)): "
          f"{info['mean_of_pieces']} new rows from their old pieces, {info['global_mean']} from the global mean "
          f"-> {info['out']}")


def main(argv: Optional[List[str]] = None) -> None:
    run_cli({"train": _train_cli, "merge": _merge_cli, "stats": _stats_cli, "resize": _resize_cli}, argv,
            "python -m kollama.vocab")


if __name__ == "__main__":
    main()
