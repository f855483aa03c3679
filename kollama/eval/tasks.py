"""Evaluation data: readers for the Korean benchmark files and the prompts that turn their rows into requests.

Multiple-choice prompts of the KoBEST tasks are those of lm-evaluation-harness (`lm_eval/tasks/kobest/*.yaml` and
`utils.py`), character for character, so that accuracies are comparable with numbers published with it:

| task | context | choices (each scored as " " + choice, lm-eval's target_delimiter) |
| --- | --- | --- |
| kobest_boolq | `{paragraph} 질문: {question} 답변: ` | 아니오 / 예 |
| kobest_copa | `{premise}  왜냐하면` (원인) / `{premise}  그래서` (결과), lm-eval's double space | alternative 1 / 2 |
| kobest_hellaswag | `문장: {context}` | ending 1-4 |
| kobest_sentineg | `문장: {sentence} 긍부정:` | 부정 / 긍정 |
| kobest_wic | `문장1: {s1} 문장2: {s2} 두 문장에서 {word}가 같은 뜻으로 쓰였나?` | 아니오 / 예 |
| klue_nli (ours) | `{premise}\\n질문: {hypothesis} 참, 거짓, 중립 중 무엇인가?\\n답변:` (lm-eval's ANLI prompt) | 참 / 중립 / 거짓 |
| nsmc (ours) | `리뷰: {text} 긍부정:` (the SentiNeg prompt, "review" instead of "sentence") | 부정 / 긍정 |

The KoBEST TSV files (SKT-LSL/KoBEST_datarepo v1.0) name their columns differently per task and split (BoolQ
`Text/Question/Answer`, COPA `sentence/question/1/2/Answer` with a 1-based answer, SentiNeg `Label`/`Text` in either
order, WiC `Target/SENTENCE1/SENTENCE2/ANSWER`, HellaSwag `context/choice1-4/label`); the readers find columns by
name (case-insensitive), also accepting the Hugging Face dataset's names (paragraph, alternative_1, ending_1, ...).
WiC sentences keep the `[word]` brackets of the TSV files. Rows that cannot be used are skipped and reported as
"file:line: reason"; a file without a single usable row is an error.
"""
from __future__ import annotations

import glob
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from kollama.data.rows import KULLM_PROMPT_INPUT, KULLM_PROMPT_NO_INPUT, DataError  # one DataError for all data


@dataclass
class MCItem:
    context: str  # the prompt without few-shot examples
    choices: List[str]  # continuations, without the " " delimiter
    gold: int
    where: str = ""  # file:line, for messages


# ----------------------------------------------------------------------------------------------------- readers

def read_tsv(path, problems: List[str]) -> List[Tuple[int, Dict[str, str]]]:
    """(line number, {lower-cased header: value}) per data row. Fields are split on tabs literally: KoBEST texts
    contain unbalanced double quotes, which csv's quoting rules would glue across rows."""
    path = _existing(path)
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        header = None
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if header is None:
                header = [h.strip().lower() for h in line.lstrip("\ufeff").split("\t")]
                continue
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != len(header):
                problems.append(f"{path}:{lineno}: {len(fields)} tab-separated fields, the header has {len(header)}")
                continue
            rows.append((lineno, dict(zip(header, fields))))
    if header is None:
        raise DataError(f"{path} is empty; expected a TSV file with a header row")
    return rows


def _col(row: Dict[str, str], names: Sequence[str]) -> Tuple[str, str]:
    """(column name, value) of the first of `names` present in the row."""
    for n in names:
        if n in row:
            return n, row[n]
    raise ValueError(f"none of the columns {list(names)} is present (columns: {list(row)})")


def _bool_label(value: str) -> int:
    v = value.strip().lower()
    if v in ("true", "1"):
        return 1
    if v in ("false", "0"):
        return 0
    raise ValueError(f"label {value!r} is not True/False/1/0")


def _int_label(value: str, lo: int, hi: int) -> int:
    try:
        v = int(value.strip())
    except ValueError:
        raise ValueError(f"label {value!r} is not an integer") from None
    if not lo <= v <= hi:
        raise ValueError(f"label {v} is outside {lo}..{hi}")
    return v


def boolq_item(r: Dict[str, str]) -> MCItem:
    _, paragraph = _col(r, ["text", "paragraph"])
    _, question = _col(r, ["question"])
    return MCItem(f"{paragraph} 질문: {question} 답변: ", ["아니오", "예"], _bool_label(_col(r, ["answer", "label"])[1]))


COPA_CONNECTOR = {"원인": " 왜냐하면", "결과": " 그래서"}


def copa_item(r: Dict[str, str]) -> MCItem:
    _, premise = _col(r, ["sentence", "premise"])
    _, question = _col(r, ["question"])
    if question.strip() not in COPA_CONNECTOR:
        raise ValueError(f"question {question!r} is neither 원인 nor 결과")
    name, label = _col(r, ["answer", "label"])
    # The TSV's "Answer" is 1-based (1/2); the HF dataset's "label" is 0-based.
    gold = _int_label(label, 1, 2) - 1 if name == "answer" else _int_label(label, 0, 1)
    choices = [_col(r, ["1", "alternative_1"])[1], _col(r, ["2", "alternative_2"])[1]]
    return MCItem(f"{premise} {COPA_CONNECTOR[question.strip()]}", choices, gold)


def hellaswag_item(r: Dict[str, str]) -> MCItem:
    _, context = _col(r, ["context"])
    endings = [_col(r, [f"choice{i}", f"ending_{i}"])[1] for i in range(1, 5)]
    return MCItem(f"문장: {context}", endings, _int_label(_col(r, ["label"])[1], 0, 3))


def sentineg_item(r: Dict[str, str]) -> MCItem:
    _, sentence = _col(r, ["text", "sentence"])
    return MCItem(f"문장: {sentence} 긍부정:", ["부정", "긍정"], _int_label(_col(r, ["label"])[1], 0, 1))


def wic_item(r: Dict[str, str]) -> MCItem:
    _, word = _col(r, ["target", "word"])
    _, s1 = _col(r, ["sentence1", "context_1"])
    _, s2 = _col(r, ["sentence2", "context_2"])
    return MCItem(f"문장1: {s1} 문장2: {s2} 두 문장에서 {word}가 같은 뜻으로 쓰였나?", ["아니오", "예"],
                  _bool_label(_col(r, ["answer", "label"])[1]))


def read_kobest(path, make: Callable[[Dict[str, str]], MCItem], problems: List[str]) -> List[MCItem]:
    items = []
    for lineno, row in read_tsv(path, problems):
        try:
            item = make(row)
        except ValueError as e:
            problems.append(f"{path}:{lineno}: {e}")
            continue
        item.where = f"{path}:{lineno}"
        items.append(item)
    return items


NLI_LABELS = {"entailment": 0, "neutral": 1, "contradiction": 2}


def read_klue_nli(path, problems: List[str]) -> List[MCItem]:
    """KLUE-NLI JSON (a list of {premise, hypothesis, gold_label}). A JSON array has no useful line numbers, so
    problems name the item index."""
    path = _existing(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid UTF-8 JSON ({e})") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of NLI items, got {type(data).__name__}")
    items = []
    for i, d in enumerate(data):
        where = f"{path}:item {i}"
        if not isinstance(d, dict) or not all(isinstance(d.get(k), str) for k in ("premise", "hypothesis")):
            problems.append(f"{where}: needs string fields premise and hypothesis")
            continue
        if d.get("gold_label") not in NLI_LABELS:
            problems.append(f"{where}: gold_label {d.get('gold_label')!r} is not one of {list(NLI_LABELS)}")
            continue
        items.append(MCItem(f"{d['premise']}\n질문: {d['hypothesis']} 참, 거짓, 중립 중 무엇인가?\n답변:",
                            ["참", "중립", "거짓"], NLI_LABELS[d["gold_label"]], where))
    return items


def iter_jsonl(path, problems: List[str]):
    """(line number, object) per non-blank line; bad JSON is reported and skipped."""
    path = _existing(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                problems.append(f"{path}:{lineno}: not valid UTF-8")
                continue
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{lineno}: not valid JSON ({e.msg})")
                continue
            if not isinstance(obj, dict):
                problems.append(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                continue
            yield lineno, obj


def read_nsmc(path, problems: List[str]) -> List[MCItem]:
    """NSMC reviews {"text", "rating" 1-10}: <= 4 negative, >= 9 positive; 5-8 are ambiguous and dropped (not
    problems). The binary NSMC labels were made the same way from the ratings."""
    items = []
    for lineno, d in iter_jsonl(path, problems):
        text, rating = d.get("text"), d.get("rating")
        if not isinstance(text, str) or isinstance(rating, bool) or not isinstance(rating, int) \
                or not 1 <= rating <= 10:
            problems.append(f"{path}:{lineno}: needs a string 'text' and an integer 'rating' 1-10")
            continue
        if 5 <= rating <= 8:
            continue
        items.append(MCItem(f"리뷰: {text} 긍부정:", ["부정", "긍정"], int(rating >= 9), f"{path}:{lineno}"))
    return items


def read_kullm(path, problems: List[str]) -> List[dict]:
    """KULLM user-oriented eval: one row per (instruction, instance); reference outputs are kept for the judge."""
    rows = []
    for lineno, d in iter_jsonl(path, problems):
        instances = d.get("instances") or [{"input": "", "output": ""}]
        if not isinstance(d.get("instruction"), str) or not isinstance(instances, list):
            problems.append(f"{path}:{lineno}: needs a string 'instruction' and a list 'instances'")
            continue
        for j, inst in enumerate(instances):
            if not isinstance(inst, dict):
                problems.append(f"{path}:{lineno}: instance {j} is not an object")
                continue
            rid = str(d.get("id", f"line{lineno}")) + (f"#{j}" if len(instances) > 1 else "")
            rows.append({"id": rid, "instruction": d["instruction"], "input": str(inst.get("input") or ""),
                         "reference": str(inst.get("output") or "")})
    return rows


def read_parallel(src_path, tgt_path) -> List[Tuple[str, str]]:
    """Line-aligned sentence pairs; pairs where either side is blank are dropped (nothing to translate)."""
    src = _existing(src_path).read_text(encoding="utf-8").splitlines()
    tgt = _existing(tgt_path).read_text(encoding="utf-8").splitlines()
    if len(src) != len(tgt):
        raise DataError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}; the files must be "
                        f"line-aligned translations of each other")
    return [(s.strip(), t.strip()) for s, t in zip(src, tgt) if s.strip() and t.strip()]


def _existing(path) -> Path:
    path = Path(str(path))
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; check --data_dir (or the path)")
    return path


# ----------------------------------------------------------------------------------------------------- task table

# name -> (reader, dev file, train file for k-shot) relative to --data_dir
MC_TASKS: Dict[str, Tuple[Callable, str, Optional[str]]] = {
    "kobest_boolq": (lambda p, pr: read_kobest(p, boolq_item, pr), "kobest/BoolQ/dev.tsv", "kobest/BoolQ/train.tsv"),
    "kobest_copa": (lambda p, pr: read_kobest(p, copa_item, pr), "kobest/COPA/dev.tsv", "kobest/COPA/train.tsv"),
    "kobest_hellaswag": (lambda p, pr: read_kobest(p, hellaswag_item, pr), "kobest/HellaSwag/dev.tsv",
                         "kobest/HellaSwag/train.tsv"),
    "kobest_sentineg": (lambda p, pr: read_kobest(p, sentineg_item, pr), "kobest/SentiNeg/dev.tsv",
                        "kobest/SentiNeg/train.tsv"),
    "kobest_wic": (lambda p, pr: read_kobest(p, wic_item, pr), "kobest/WiC/dev.tsv", "kobest/WiC/train.tsv"),
    "klue_nli": (read_klue_nli, "klue_nli_dev.json", "klue_nli_train.json"),
    "nsmc": (read_nsmc, "nsmc_dev.jsonl", "nsmc_train.jsonl"),
}


def load_mc_task(name: str, data_dir, split: str = "dev", problems: Optional[List[str]] = None) -> List[MCItem]:
    """Items of a multiple-choice task's dev (or train) file under data_dir; an error if none is usable."""
    if name not in MC_TASKS:
        raise DataError(f"unknown multiple-choice task {name!r}; known: {', '.join(MC_TASKS)}")
    reader, dev, train = MC_TASKS[name]
    rel = dev if split == "dev" else train
    if rel is None:
        raise DataError(f"task {name} has no {split} split")
    path = Path(str(data_dir)) / rel
    if split == "train" and not path.is_file():
        raise DataError(f"k-shot examples for {name} come from {path}, which does not exist; use --k_shot 0")
    problems = [] if problems is None else problems
    items = reader(path, problems)
    if not items:
        why = f" ({len(problems)} rows skipped, e.g. {problems[0]})" if problems else ""
        raise DataError(f"no usable rows in {path}{why}")
    return items


def parallel_sets(data_dir) -> Dict[str, Tuple[str, str]]:
    """{name: (korean file, english file)} for every parallel/NAME.ko with a matching NAME.en."""
    out = {}
    for ko in sorted(glob.glob(os.path.join(str(data_dir), "parallel", "*.ko"))):
        en = ko[:-3] + ".en"
        if os.path.isfile(en):
            out[Path(ko).stem] = (ko, en)
    return out


# ----------------------------------------------------------------------------------------------------- prompts

def fewshot_context(item: MCItem, shots: Sequence[MCItem]) -> str:
    """lm-eval's layout: each example is its context + " " + its gold choice, examples and the question are
    joined with "\\n\\n"."""
    parts = [s.context + " " + s.choices[s.gold] for s in shots]
    return "\n\n".join(parts + [item.context])


def draw_shots(pool: Sequence[MCItem], k: int, seed: int, task: str, index: int) -> List[MCItem]:
    """k examples for item `index`: a generator seeded from (seed, task, index), so the examples of an item do not
    depend on --limit, batching or the order tasks run in. String seeds are hashed with SHA-512 by `random`, not
    with Python's salted hash, so they are the same in every process."""
    if k <= 0:
        return []
    if k > len(pool):
        raise DataError(f"{task}: {k} shots asked for but the train split has only {len(pool)} rows")
    return random.Random(f"{seed}:{task}:{index}").sample(list(pool), k)


# KULLM's template, shared with training (kollama.data.rows), so an adapter is asked in the format it was tuned on.
KULLM_INPUT, KULLM_NO_INPUT = KULLM_PROMPT_INPUT, KULLM_PROMPT_NO_INPUT
TEMPLATES = ("plain", "kullm", "chat")

TRANSLATE = {"en2ko": ("English", "Korean", "다음 영어 문장을 한국어로 번역하세요."),
             "ko2en": ("Korean", "English", "다음 한국어 문장을 영어로 번역하세요.")}


def instruction_prompt(instruction: str, input_text: str, template: str) -> Tuple[str, bool]:
    """(prompt, is_dialog). `chat` returns the user message (encoded with llama.chat_format by the caller);
    `plain` is a bare completion prompt for base models."""
    if template == "kullm":
        return (KULLM_INPUT.format(instruction=instruction, input=input_text) if input_text
                else KULLM_NO_INPUT.format(instruction=instruction)), False
    if template == "chat":
        return (f"{instruction}\n\n{input_text}" if input_text else instruction), True
    if template == "plain":
        return (f"{instruction}\n\n{input_text}\n\n답변:" if input_text else f"{instruction}\n\n답변:"), False
    raise DataError(f"unknown template {template!r}; use one of {', '.join(TEMPLATES)}")


def translation_prompt(direction: str, source: str, template: str) -> Tuple[str, bool]:
    """`plain`: "English: {src}\\nKorean:" (the first generated line is the translation); the others wrap the
    Korean instruction "translate the following ... sentence" in the instruction template."""
    src_lang, tgt_lang, instruction = TRANSLATE[direction]
    if template == "plain":
        return f"{src_lang}: {source}\n{tgt_lang}:", False
    return instruction_prompt(instruction, source, template)
