"""Training data: readers, prompt templates, label masking, cutoff, packing, batching.

Readers (``read_rows``) accept
* ``.jsonl`` (one JSON object per line) and ``.json`` (a top-level array of objects; a ``.json`` file that does not
  start with ``[`` is read as JSONL, as many "json" instruction sets are);
* ``.txt`` (one document per line, blank lines skipped).
Files are decoded with ``encoding`` (default UTF-8; a leading UTF-8 BOM is accepted); a file that does not decode is
a DataError naming ``file:line`` of the first bad byte, and a CP949/EUC-KR file (common in Korean data) is recognised
and named, with ``--encoding cp949`` or ``iconv`` as the fix.
A row is an *instruction* (``instruction`` [+ ``input``] + ``output``: kullm-v2 / KoAlpaca / Alpaca; KULLM's eval
layout with ``instances: [{input, output}]`` expands to one row per instance), a *chat* (``messages: [{role,
content}]`` or ShareGPT ``conversations: [{from, value}]`` with human->user, gpt->assistant, system->system) or
*text* (``text_field`` of a JSON row, or a line of a .txt file). Malformed rows are reported as ``file:line: why``,
skipped and counted; no usable row at all is an error that gives the counts, the first reason and the fix.

Templates (``encode_row``): ``kullm`` and ``alpaca`` are the exact prompt strings of KULLM and Stanford Alpaca;
``llama2-chat`` goes through ``llama.chat_format.encode_dialog_turns``, so training formats a dialog exactly as
``chat_completion`` does at inference; ``text`` trains on every token (continued pretraining). Every example starts
with BOS and its response ends with EOS. Labels are aligned with ``input_ids`` (the loss shifts them) and are -100
(ignored) on prompt tokens unless ``train_on_inputs``; the leading BOS is always -100 (nothing predicts it).

Packing (``pack``) concatenates examples into rows of at most ``block_size`` tokens and records a segment id per
token; ``collate`` turns the segments into a block-diagonal causal mask, so no token attends across an example
boundary. Positions are *not* restarted per example: the model applies rotary embeddings by absolute position
0..S-1 of the packed row. Because RoPE makes q.k depend only on the position *difference*, and attention never
crosses a boundary, the logits equal those of the example alone at positions 0..n-1 up to float rounding
(tests/test_data.py checks this), so no per-token position input is needed.
"""
from __future__ import annotations

import codecs
import json
import logging
import random
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from llama.chat_format import encode_dialog_turns
from llama.errors import UserError

log = logging.getLogger("kollama.data")

IGNORE_INDEX = -100
PAD_ID = 0  # input pad id (Llama's tokenizer has no pad piece); padded positions always carry label -100

# KULLM (nlpai-lab/KULLM templates/kullm.json), verbatim.
KULLM_PROMPT_NO_INPUT = (
    "아래는 작업을 설명하는 명령어입니다. 요청을 적절히 완료하는 응답을 작성하세요.\n\n"
    "### 명령어:\n{instruction}\n\n### 응답:\n"
)
KULLM_PROMPT_INPUT = (
    "아래는 작업을 설명하는 명령어와 추가 컨텍스트를 제공하는 입력이 짝을 이루는 예제입니다. "
    "요청을 적절히 완료하는 응답을 작성하세요.\n\n"
    "### 명령어:\n{instruction}\n\n### 입력:\n{input}\n\n### 응답:\n"
)
# Stanford Alpaca (train.py PROMPT_DICT), verbatim.
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPTS = {"kullm": (KULLM_PROMPT_NO_INPUT, KULLM_PROMPT_INPUT),
           "alpaca": (ALPACA_PROMPT_NO_INPUT, ALPACA_PROMPT_INPUT)}
TEMPLATES = ("kullm", "alpaca", "llama2-chat", "text")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "system": "system"}
MAX_LOGGED = 20  # skipped rows logged one by one; the rest only counted
HANGUL = re.compile("[\uac00-\ud7a3]")
# json.loads turns an escaped half of a surrogate pair ("\ud83d" alone: an emoji cut in two) into a lone surrogate,
# which is not text: sentencepiece cannot encode it.
SURROGATE = re.compile("[\ud800-\udfff]")


class DataError(UserError):
    """Training data that cannot be used; the message names the file and what to change."""


class BadRow(ValueError):
    """One malformed row (caught, reported with file:line, skipped)."""


@dataclass
class Row:
    source: str  # "path:line", for messages
    kind: str  # "instruction" | "chat" | "text"
    value: object  # dict(instruction, input, output) | list of {role, content} | str


@dataclass
class Example:
    input_ids: List[int]
    labels: List[int]
    segments: Optional[List[int]] = None  # per-token example index within a packed row; None = one example

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class DataStats:
    rows: int = 0  # non-blank records read, malformed ones included
    skipped: List[str] = field(default_factory=list)  # "file:line: reason"
    truncated: int = 0
    no_target: int = 0  # dropped: nothing left to learn after truncation

    def note_skip(self, message: str) -> None:
        if len(self.skipped) < MAX_LOGGED:
            log.warning("skipped %s", message)
        self.skipped.append(message)

    def add(self, other: "DataStats") -> None:
        """Fold another file's counts into these (a total over several files)."""
        self.rows += other.rows
        self.skipped += other.skipped
        self.truncated += other.truncated
        self.no_target += other.no_target

    def summary(self) -> str:
        return (f"{self.rows} rows read, {len(self.skipped)} malformed rows skipped, {self.truncated} truncated "
                f"to the cutoff length, {self.no_target} dropped with no target token left")


# ---------------------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------------------
def _universal_newlines(text: str) -> str:
    """\r\n and \r as \n, as open() in text mode reads them."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _sibling(path: Path, suffix: str) -> Path:
    """Where a converted copy of ``path`` goes: same folder, ``suffix`` (never ``path`` itself)."""
    out = path.with_suffix(suffix)
    return out if out != path else path.with_name(path.stem + ".converted" + suffix)


def iconv_command(path: Path, encoding: str) -> str:
    """The shell command that converts ``path`` from ``encoding`` to a UTF-8 copy beside it."""
    return (f"iconv -f {encoding} -t utf-8 {shlex.quote(str(path))} > "
            f"{shlex.quote(str(_sibling(path, '.utf8' + path.suffix)))}")


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """The text of a data file decoded with ``encoding``, newlines as open() in text mode gives them. A UTF-8 file
    may start with a BOM (Windows editors write one; utf-8-sig). Every failure is one DataError line: an unreadable
    file, an unknown codec, or bytes that do not decode (``file:line`` of the first bad byte, the encoding the file
    seems to be in, and the fix)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror or e}; check its permissions") from None
    try:
        codec = codecs.lookup(encoding).name
        if codec in ("utf-8", "utf-8-sig"):  # the BOM goes by hand, not by utf-8-sig, so error offsets index raw
            codec = "utf-8"
            if raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
        return _universal_newlines(raw.decode(codec))
    except (LookupError, TypeError):  # unknown name, a bytes-to-bytes codec (base64), not a string at all
        raise DataError(f"unknown text encoding {encoding!r} (--encoding); use a Python codec name such as utf-8, "
                        f"cp949 or euc-kr") from None
    except UnicodeDecodeError as e:
        bad = e
    line = _universal_newlines(raw[:bad.start].decode(codec, errors="replace")).count("\n") + 1
    where = f"{path}:{line}: not valid {encoding} (byte 0x{raw[bad.start]:02X})"
    guess = guess_encoding(raw, codec)
    if guess == "utf-8":
        raise DataError(f"{where}; the file is valid UTF-8: drop --encoding {encoding} (utf-8 is the default)")
    why, name = {"utf-16": ("it starts with a UTF-16 byte-order mark (Windows 'Unicode' text)", "utf-16"),
                 "cp949": ("it looks like CP949/EUC-KR (Korean Windows encoding)", "cp949"),
                 None: ("", "ENCODING")}[guess]
    option = f"pass --encoding {name}" if guess else "pass the file's encoding with --encoding (e.g. --encoding cp949)"
    raise DataError(f"{where}; {why + ': ' if why else ''}{option}, or convert it to UTF-8 once with: "
                    f"{iconv_command(path, name)}")


def guess_encoding(raw: bytes, failed: str) -> Optional[str]:
    """What a file that did not decode as ``failed`` probably is: utf-8 if it decodes as UTF-8, utf-16 if it starts
    with a UTF-16 BOM, cp949 (a superset of EUC-KR) if it decodes to Hangul (a few stray high bytes of another
    encoding can decode as CP949 by chance, Hangul rarely), else None."""
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    for guess in ("utf-8", "cp949"):
        if guess == failed:
            continue
        try:
            decoded = raw.decode(guess)
        except UnicodeDecodeError:
            continue
        if guess == "utf-8" or HANGUL.search(decoded):
            return guess
    return None


def _reject_one_document(text: str, path: Path, line: int) -> None:
    """Raise DataError if ``text`` (read as JSONL, its first record broken) is one JSON value over several lines,
    e.g. AI Hub's or KorQuAD's ``{"data": [...]}``: reported row by row it would read as every line malformed."""
    try:
        whole = json.loads(text)
    except ValueError:
        return  # not one document either: report the broken lines one by one
    # Only an object gets here: a text starting with "[" is read as an array, and a string or number fits one line.
    hint = ""
    lists = [k for k, v in whole.items() if isinstance(v, list)]
    if lists:
        key = lists[0]
        hint = f"; its rows seem to be the list under {key!r}"
        if key.isidentifier():
            out = shlex.quote(str(_sibling(path, ".jsonl")))
            hint += f": extract them with: jq -c '.{key}[]' {shlex.quote(str(path))} > {out}"
    raise DataError(f"{path}:{line}: one JSON object spread over several lines, not rows; write one row per line "
                    f"(JSONL) or a .json array of rows{hint}")


def _iter_json_array(text: str, path: Path) -> Iterator[Tuple[int, object]]:
    """(line, item) for each item of a top-level JSON array, with the line each item starts on."""
    dec = json.JSONDecoder()
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); fix the file or convert it to JSONL") from e
    if not isinstance(items, list):
        raise DataError(f"{path}: a .json data file must hold an array of rows, got {type(items).__name__}")
    # Walk the array again with raw_decode to learn where each item starts (json.loads keeps no positions).
    pos, line, counted = text.index("[") + 1, 1, 0
    for _ in items:
        while text[pos] in " \t\r\n,":
            pos += 1
        line += text.count("\n", counted, pos)
        counted = pos
        item, pos = dec.raw_decode(text, pos)
        yield line, item


def _iter_records(path: Path, text_field: str, encoding: str = "utf-8") -> Iterator[Tuple[int, object]]:
    """(line number, parsed JSON value or str) of every non-blank record; a JSON syntax error yields BadRow."""
    text = read_text(path, encoding)
    if path.suffix == ".txt":
        for i, line in enumerate(text.split("\n"), 1):
            if line.strip():
                yield i, {text_field: line}
        return
    if text.lstrip().startswith("["):
        yield from _iter_json_array(text, path)
        return
    first = True
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if first:
                _reject_one_document(text, path, i)
            record = BadRow(f"not valid JSON ({e.msg} at column {e.colno})")
        first = False
        yield i, record


def _string(row: dict, key: str, required: bool = True) -> str:
    value = row.get(key, None)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        what = "missing" if value is None else f"of type {type(value).__name__}, not a string"
        raise BadRow(f"field {key!r} is {what}")
    bad = SURROGATE.search(value)
    if bad:
        raise BadRow(f"field {key!r} holds an unpaired surrogate {bad.group()!r} (half of an escaped emoji); "
                     f"fix or drop the row")
    return value


def _chat_messages(turns, source_key: str) -> List[dict]:
    if not isinstance(turns, list) or not turns:
        raise BadRow(f"{source_key!r} must be a non-empty list of turns")
    out = []
    for t in turns:
        if not isinstance(t, dict):
            raise BadRow(f"a turn of {source_key!r} is a {type(t).__name__}, not an object")
        if source_key == "conversations":
            speaker = t.get("from")
            role = SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None  # a list is unhashable
            if role is None:
                raise BadRow(f"unknown ShareGPT speaker {speaker!r}; expected one of {sorted(SHAREGPT_ROLES)}")
            content = _string(t, "value")
        else:
            role, content = t.get("role"), _string(t, "content")
            if role not in ("system", "user", "assistant"):
                raise BadRow(f"unknown role {role!r}; expected system, user or assistant")
        out.append({"role": role, "content": content})
    return out


def parse_record(record, text_field: str = "text") -> List[Tuple[str, object]]:
    """(kind, value) items of one JSON record (several for KULLM's ``instances``); raises BadRow."""
    if isinstance(record, BadRow):
        raise record
    if not isinstance(record, dict):
        raise BadRow(f"a row must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return [("chat", _chat_messages(record["messages"], "messages"))]
    if "conversations" in record:
        return [("chat", _chat_messages(record["conversations"], "conversations"))]
    if "instruction" in record:
        instruction = _string(record, "instruction")
        if "instances" in record:  # KULLM user-oriented eval layout
            instances = record["instances"]
            if not isinstance(instances, list) or not instances:
                raise BadRow("'instances' must be a non-empty list of {input, output}")
            rows = []
            for inst in instances:
                if not isinstance(inst, dict):
                    raise BadRow("an item of 'instances' is not an object")
                rows.append(("instruction", {"instruction": instruction, "input": _string(inst, "input", False),
                                             "output": _string(inst, "output")}))
            return rows
        return [("instruction", {"instruction": instruction, "input": _string(record, "input", False),
                                 "output": _string(record, "output")})]
    if text_field in record:
        return [("text", _string(record, text_field))]
    texts = [k for k, v in record.items() if isinstance(v, str)]
    fix = f"; to train on {texts[0]!r} as plain text use --text_field {texts[0]} --template text" if texts else ""
    raise BadRow(f"no known fields: expected 'instruction'+'output', 'messages', 'conversations' or {text_field!r}; "
                 f"found {sorted(record)[:8]}{fix}")


def read_rows(paths, text_field: str = "text", stats: Optional[DataStats] = None,
              encoding: str = "utf-8") -> List[Row]:
    """Every usable row of the given files (decoded with ``encoding``), in file order; malformed ones go to
    ``stats.skipped``."""
    stats = stats if stats is not None else DataStats()
    if isinstance(paths, (str, Path)):
        paths = [paths]
    rows: List[Row] = []
    for path in map(Path, paths):
        if path.is_dir():
            raise DataError(f"data path {str(path)!r} is a directory; pass the .jsonl/.json/.txt files in it to "
                            f"--data (comma-separated)")
        if not path.is_file():
            raise DataError(f"data file {str(path)!r} not found; pass existing .jsonl/.json/.txt files to --data")
        for line, record in _iter_records(path, text_field, encoding):
            stats.rows += 1
            try:
                items = parse_record(record, text_field)
            except BadRow as e:
                stats.note_skip(f"{path}:{line}: {e}")
                continue
            rows += [Row(f"{path}:{line}", kind, value) for kind, value in items]
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Templates and labels
# ---------------------------------------------------------------------------------------------------------------
def format_prompt(template: str, instruction: str, input: str = "") -> str:
    no_input, with_input = PROMPTS[template]
    if input:
        return with_input.format(instruction=instruction, input=input)
    return no_input.format(instruction=instruction)


def _split_encode(tokenizer, prompt: str, response: str) -> Tuple[List[int], List[int]]:
    """(prompt_ids with BOS, response_ids with EOS), encoding prompt+response as one string (as the model will see
    it after generating) and cutting where the prompt's own encoding ends. If the tokenizer merges across the
    boundary, the first len(prompt_ids) tokens count as prompt (alpaca-lora's rule)."""
    full = tokenizer.encode(prompt + response, bos=True, eos=True)
    head = tokenizer.encode(prompt, bos=True, eos=False)
    return full[: len(head)], full[len(head):]


def encode_row(row: Row, tokenizer, template: str, train_on_inputs: bool = False) -> Example:
    """Token ids and labels of one row under ``template``; raises BadRow when the row does not fit the template."""
    if template not in TEMPLATES:
        raise DataError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    if template == "text":
        if row.kind != "text":
            raise BadRow(f"template 'text' needs plain-text rows, got a {row.kind} row; use kullm, alpaca or "
                         f"llama2-chat for it")
        ids = tokenizer.encode(row.value, bos=True, eos=True)
        return Example(ids, [IGNORE_INDEX] + ids[1:])  # BOS is never a target (see below)
    if row.kind == "text":
        raise BadRow(f"a plain-text row cannot fill template {template!r}; use --template text")
    if template in PROMPTS:
        if row.kind != "instruction":
            raise BadRow(f"template {template!r} needs instruction/output rows, got a chat row; "
                         f"use --template llama2-chat")
        v = row.value
        pieces = [_split_encode(tokenizer, format_prompt(template, v["instruction"], v["input"]), v["output"])]
    else:  # llama2-chat
        if row.kind == "instruction":
            v = row.value
            user = v["instruction"] + ("\n\n" + v["input"] if v["input"] else "")
            dialog = [{"role": "user", "content": user}, {"role": "assistant", "content": v["output"]}]
        else:
            dialog = row.value
        try:
            pieces = encode_dialog_turns(tokenizer, dialog)
        except ValueError as e:
            raise BadRow(f"not a usable dialog ({e})") from None
    ids, labels = [], []
    for head, answer in pieces:
        ids += head + answer
        labels += (head if train_on_inputs else [IGNORE_INDEX] * len(head)) + answer
    labels[0] = IGNORE_INDEX  # BOS is never predicted; in a packed row this keeps the previous example from
    return Example(ids, labels)  # being trained to predict the next one's BOS across the boundary


def load_examples(paths, tokenizer, template: str, cutoff_len: int, *, train_on_inputs: bool = False,
                  text_field: str = "text", stats: Optional[DataStats] = None,
                  split_long: bool = False, encoding: str = "utf-8") -> List[Example]:
    """Read (files decoded with ``encoding``), template, truncate to ``cutoff_len`` (or, with ``split_long``, cut
    into pieces of at most ``cutoff_len``: continued pretraining keeps all of a long document); logs a summary.
    Raises DataError when nothing is usable."""
    if cutoff_len < 2:
        raise DataError(f"--cutoff_len must be >= 2 (a token and its target), got {cutoff_len}")
    stats = stats if stats is not None else DataStats()
    examples = []
    # Examples whose prompt alone fills the cutoff: the first one's source, and the --cutoff_len that keeps the
    # first answer token / all of every one of them, so the messages can name the length needed.
    first_dropped, n_dropped, keep_first, keep_whole = None, 0, 0, 0
    for row in read_rows(paths, text_field, stats, encoding):
        try:
            ex = encode_row(row, tokenizer, template, train_on_inputs)
        except BadRow as e:
            stats.note_skip(f"{row.source}: {e}")
            continue
        if split_long and len(ex) > cutoff_len:
            examples += [piece for piece in split_example(ex, cutoff_len) if count_targets([piece])]
            continue
        full = ex
        if len(ex) > cutoff_len:
            ex = Example(ex.input_ids[:cutoff_len], ex.labels[:cutoff_len])
            stats.truncated += 1
        if all(t == IGNORE_INDEX for t in ex.labels):
            stats.no_target += 1
            first_dropped, n_dropped = first_dropped or row.source, n_dropped + 1
            keep_first = max(keep_first, next((i + 1 for i, t in enumerate(full.labels) if t != IGNORE_INDEX),
                                              len(full)))
            keep_whole = max(keep_whole, len(full))
            continue
        examples.append(ex)
    where = ", ".join(map(str, [paths] if isinstance(paths, (str, Path)) else paths))
    log.info("%s: %s", where, stats.summary())
    if len(stats.skipped) > MAX_LOGGED:
        log.warning("... and %d more malformed rows", len(stats.skipped) - MAX_LOGGED)
    dropped = _dropped_at_cutoff(first_dropped, cutoff_len, keep_first, keep_whole) if first_dropped else None
    if not examples:
        raise _nothing_to_train(where, template, cutoff_len, stats, dropped)
    if dropped:
        log.warning("%s: %d examples dropped at --cutoff_len %d; %s", where, n_dropped, cutoff_len, dropped)
    return examples


def _dropped_at_cutoff(first: str, cutoff_len: int, keep_first: int, keep_whole: int) -> str:
    """The first example dropped at the cutoff and the --cutoff_len that keeps them all: the fix, in one line."""
    return (f"first dropped: {first}: its prompt fills --cutoff_len {cutoff_len} and leaves no answer token to train "
            f"on; use --cutoff_len {keep_whole} or more to keep the dropped examples whole ({keep_first} keeps their "
            f"first answer token), or shorter prompts")


def _nothing_to_train(where: str, template: str, cutoff_len: int, stats: DataStats,
                      dropped: Optional[str]) -> DataError:
    """The one-line error for data that gave no example: counts, the first reason with its file:line, the fix."""
    if not where:
        return DataError("no data files given; pass .jsonl/.json/.txt files to --data")
    if stats.rows == 0:
        return DataError(f"no training rows in {where}: the files are empty (or only blank lines); pass the files "
                         f"that hold the data to --data")
    parts = [f"no usable training examples in {where} with --template {template}: {stats.rows} rows read, "
             f"{len(stats.skipped)} skipped, {stats.no_target} dropped at --cutoff_len {cutoff_len}"]
    if stats.skipped:  # the reason itself names the --template or --text_field that fits, when one does
        parts.append(f"first skipped: {stats.skipped[0]}")
        parts.append("fix those rows, or use the --template/--text_field that fits them")
    if dropped:
        parts.append(dropped)
    return DataError("; ".join(parts))


# ---------------------------------------------------------------------------------------------------------------
# Splitting, shuffling, packing, batching
# ---------------------------------------------------------------------------------------------------------------
def shuffled(items: Sequence, seed: int) -> list:
    """A deterministic permutation (Python's Mersenne Twister, independent of torch's global RNG)."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return [items[i] for i in order]


def split_dev(examples: List[Example], dev_fraction: float, seed: int) -> Tuple[List[Example], List[Example]]:
    """(train, dev): a ``dev_fraction`` of the examples, at least one when the fraction is > 0, chosen by seed."""
    if not 0 <= dev_fraction < 1:
        raise DataError(f"dev_fraction must be in [0, 1), got {dev_fraction}")
    if dev_fraction == 0:
        return list(examples), []
    n_dev = max(1, round(len(examples) * dev_fraction))
    if n_dev >= len(examples):
        raise DataError(f"{len(examples)} examples cannot give a dev split of {dev_fraction} and leave training "
                        f"data; use more data, a smaller --dev_fraction or a separate --dev_data file")
    mixed = shuffled(examples, seed)
    return mixed[n_dev:], mixed[:n_dev]


def split_example(ex: Example, size: int) -> List[Example]:
    """Pieces of at most ``size`` tokens covering ``ex``; each piece after the first starts one token before the
    previous one ended. Its first token is context only (label -100, as a packed row never predicts across a
    boundary), so every target of ``ex`` is still trained exactly once."""
    if size < 2:
        raise DataError(f"cannot split an example into pieces of {size} token(s); need >= 2")
    pieces, start = [Example(ex.input_ids[:size], ex.labels[:size])], size
    while start < len(ex):
        a, b = start - 1, min(len(ex), start - 1 + size)
        pieces.append(Example(ex.input_ids[a:b], [IGNORE_INDEX] + ex.labels[a + 1:b]))
        start = b
    return pieces


def pack(examples: Sequence[Example], block_size: int) -> List[Example]:
    """Greedy, order-preserving packing into rows of <= block_size tokens; each row keeps per-token segment ids.
    An example longer than block_size is cut to block_size (set cutoff_len <= block_size to avoid that)."""
    rows: List[Example] = []
    cur = Example([], [], [])
    for ex in examples:
        ids, labels = ex.input_ids[:block_size], ex.labels[:block_size]
        if len(cur) + len(ids) > block_size:
            rows.append(cur)
            cur = Example([], [], [])
        seg = cur.segments[-1] + 1 if cur.segments else 0
        cur.input_ids += ids
        cur.labels += labels
        cur.segments += [seg] * len(ids)
    if cur.input_ids:
        rows.append(cur)
    return rows


def block_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) boolean: query i sees key j iff j <= i and both belong to the same example. Padding carries
    segment -1, so a padded query sees the padding before it (never an empty row, which would give NaN)."""
    s = segments.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]
    return (same & causal)[:, None]


def collate(rows: Sequence[Example], pad_id: int = PAD_ID) -> Dict[str, Optional[torch.Tensor]]:
    """Right-padded ``tokens`` (pad_id), ``labels`` (-100 on padding) and ``mask``: None for unpacked rows (the
    model's causal mask already keeps real tokens from seeing right padding), block-diagonal for packed rows."""
    if not rows:
        raise DataError("cannot collate an empty batch")
    s = max(len(r) for r in rows)
    tokens = torch.full((len(rows), s), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), s), IGNORE_INDEX, dtype=torch.long)
    segments = torch.full((len(rows), s), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r)
        tokens[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        segments[i, :n] = torch.tensor(r.segments) if r.segments is not None else 0
    packed = any(r.segments is not None and len(set(r.segments)) > 1 for r in rows)
    return {"tokens": tokens, "labels": labels, "mask": block_causal_mask(segments) if packed else None}


def count_targets(rows: Sequence[Example]) -> int:
    """Tokens that contribute to the loss (label != -100 at positions 1..), i.e. the loss's denominator."""
    return sum(sum(1 for t in r.labels[1:] if t != IGNORE_INDEX) for r in rows)
