"""Curriculum learning: a translation-instruction builder for a first stage, and the ``run`` command.

    python -m kollama.curriculum build_translation KO_FILE EN_FILE OUT.jsonl [--seed 0] [--directions both]
    python -m kollama.curriculum run STAGES.json --ckpt_dir CKPT --tokenizer_path T.model --out_dir RUN [trainer flags]
    (the same as ``python -m kollama.train --curriculum STAGES.json ...``)

The stages themselves (the stage file format, mixing, the per-stage schedule) are a configuration of the trainer:
see kollama/train/stages.py. This module only builds data for them and offers the command above.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from kollama.train.stages import CurriculumError
from llama.errors import run_cli
from llama.files import atomic_write_text, check_new_output

# Instruction phrasings, Korean and English, for each direction (the model should follow either language).
PHRASINGS = {
    "en2ko": ["다음 영어 문장을 한국어로 번역하세요.",
              "아래 영어 문장을 자연스러운 한국어로 옮겨 주세요.",
              "Translate the following English sentence into Korean.",
              "Translate this text from English to Korean."],
    "ko2en": ["다음 한국어 문장을 영어로 번역하세요.",
              "아래 한국어 문장을 자연스러운 영어로 옮겨 주세요.",
              "Translate the following Korean sentence into English.",
              "Translate this text from Korean to English."],
}
DIRECTIONS = {"both": ("en2ko", "ko2en"), "en2ko": ("en2ko",), "ko2en": ("ko2en",)}


# ---------------------------------------------------------------------------------------------------- translation

def _read_lines(path) -> List[str]:
    path = Path(str(path))
    if not path.is_file():
        raise CurriculumError(f"parallel corpus file {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CurriculumError(f"{path} is not UTF-8 text ({e})") from e
    return text.splitlines()  # "\n" and "\r\n" alike; a final newline adds no line


def translation_rows(ko_lines: Sequence[str], en_lines: Sequence[str], seed: int = 0,
                     directions: str = "both") -> List[dict]:
    """Instruction rows (instruction, input, output) for every aligned pair, one per direction (EN->KO first), with
    a phrasing drawn from PHRASINGS by ``random.Random(seed)``, one draw per row in order. Pairs with a blank side
    are skipped (nothing to translate)."""
    if directions not in DIRECTIONS:
        raise CurriculumError(f"--directions must be one of {', '.join(DIRECTIONS)}, got {directions!r}")
    if len(ko_lines) != len(en_lines):
        raise CurriculumError(f"the parallel files are not line-aligned: {len(ko_lines)} Korean lines vs "
                              f"{len(en_lines)} English lines; fix the files so line i of one translates line i "
                              f"of the other")
    rng = random.Random(seed)
    rows = []
    for ko, en in zip(ko_lines, en_lines):
        ko, en = ko.strip(), en.strip()
        if not ko or not en:
            continue
        for d in DIRECTIONS[directions]:
            src, tgt = (en, ko) if d == "en2ko" else (ko, en)
            rows.append({"instruction": rng.choice(PHRASINGS[d]), "input": src, "output": tgt})
    if not rows:
        raise CurriculumError("the parallel corpus has no pair with text on both sides")
    return rows


def build_translation(ko, en, out, seed: int = 0, directions: str = "both", max_pairs: Optional[int] = None,
                      overwrite: bool = False) -> dict:
    """Write translation instructions for the line-aligned ``ko``/``en`` files to ``out`` (JSONL, atomically). An
    existing ``out`` is replaced only with ``overwrite``, and never when it is ``ko`` or ``en``."""
    check_new_output(out, "OUT", (ko, en), overwrite)
    ko_lines, en_lines = _read_lines(ko), _read_lines(en)
    if len(ko_lines) != len(en_lines):  # checked here too, to name the files
        raise CurriculumError(f"{ko} has {len(ko_lines)} lines but {en} has {len(en_lines)}; the parallel files "
                              f"must be line-aligned (line i of one translates line i of the other)")
    if max_pairs is not None:
        ko_lines, en_lines = ko_lines[:max_pairs], en_lines[:max_pairs]
    rows = translation_rows(ko_lines, en_lines, seed, directions)
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {"out": str(out), "rows": len(rows), "pairs": len(ko_lines), "skipped_pairs":
            len(ko_lines) - len(rows) // len(DIRECTIONS[directions])}


# ---------------------------------------------------------------------------------------------------- CLI

def run(stages, **kwargs) -> None:
    """Train through the stages of STAGES.json: run STAGES.json --ckpt_dir C --tokenizer_path T --out_dir O [...]

    Every flag after STAGES is a flag of ``python -m kollama.train`` (see ``python -m kollama.train --help``), e.g.
    --ckpt_dir, --tokenizer_path, --out_dir; this command is the same as ``python -m kollama.train --curriculum``.

    Args:
        stages (str): the stage file, JSON or YAML, {"stages": [...]} or a bare list of stages (datasets with
            weights, epochs or steps, lr; the format is in kollama/train/stages.py), e.g. stages.json
    """
    from kollama.train.__main__ import run as train_cli

    train_cli(curriculum=str(stages), **kwargs)


def _build_translation_cli(ko, en, out, seed: int = 0, directions: str = "both",
                           max_pairs: Optional[int] = None, overwrite: bool = False) -> None:
    """Translation instructions from a parallel corpus: build_translation KO EN OUT.jsonl [--seed 0] [--overwrite]

    Args:
        ko (str): the Korean side, UTF-8 text with one sentence per line, line-aligned with EN, e.g. corpus.ko
        en (str): the English side, UTF-8 text, line i translating line i of KO, e.g. corpus.en
        out (str): the JSONL file to write, one {"instruction", "input", "output"} row per pair and direction (pairs
            with a blank side are skipped), never KO or EN, e.g. translation.jsonl
        seed (int, default 0): seed of the random choice of instruction phrasing (Korean or English) for each row,
            e.g. --seed 1
        directions (str, default "both"): "both" (an en2ko and a ko2en row per pair, en2ko first), "en2ko" or
            "ko2en", e.g. --directions en2ko
        max_pairs (int, default None): use only the first N line pairs of the files; None uses them all, e.g.
            --max_pairs 10000
        overwrite (bool, default False): replace an existing OUT (written atomically), e.g. --overwrite
    """
    info = build_translation(ko, en, out, seed=seed, directions=directions, max_pairs=max_pairs, overwrite=overwrite)
    print(f"wrote {info['rows']} rows from {info['pairs']} pairs ({info['skipped_pairs']} skipped) -> {info['out']}")


def main(argv: Optional[List[str]] = None) -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    run_cli({"run": run, "build_translation": _build_translation_cli}, argv, "python -m kollama.curriculum")


if __name__ == "__main__":
    main()
