"""Reading Korean text corpora for the vocabulary tools (and for ``kollama.eval`` and held-out text in training):
plain text, one sentence per line, or ``.jsonl`` with a text field; unusable lines are skipped and reported."""
import json
import os
import sys
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

from kollama.vocab.common import PathLike, VocabError, existing_file

JSONL_SUFFIXES = (".jsonl", ".ndjson")
MAX_REPORTED_PROBLEMS = 5  # per file: enough to see the pattern without flooding the terminal


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
    path = existing_file(path, "corpus file")
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
    """The error for a file that is not UTF-8 text, with the fix for what it seems to be (kollama.data.rows' guess;
    a file with NUL bytes is binary unless it starts with a UTF-16 byte-order mark)."""
    from kollama.data.rows import guess_encoding, iconv_command

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
