"""Every command-line flag and positional argument is explained by ``--help``.

python-fire prints, in the POSITIONAL ARGUMENTS and FLAGS sections of a command's help, one entry per parameter
(``    CKPT_DIR`` / ``    -t, --tokenizer=TOKENIZER``), then its ``Type:`` and ``Default:`` lines and, only when the
function's docstring documents the parameter in a Google-style ``Args:`` section, its description. This test runs
``--help`` of each command (in parallel subprocesses) and requires a description line under every entry. It also
parses each docstring as fire does and refuses an ``Args:`` entry that names no parameter: a continuation line
such as ``dropped (said so). Example: ...`` is read by fire as a new argument ``dropped`` and cuts the description
short.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent

# (argv after the interpreter, source file, function name) per command.
COMMANDS: List[Tuple[Tuple[str, ...], str, str]] = [
    (("-m", "llama.convert", "llama2c"), "llama/convert.py", "llama2c"),
    (("-m", "llama.convert", "to_llama2c"), "llama/convert.py", "to_llama2c"),
    (("-m", "llama.convert", "reshard"), "llama/convert.py", "reshard"),
    (("-m", "llama.convert", "hf_to_meta"), "llama/convert.py", "hf_to_meta"),
    (("-m", "llama.convert", "meta_to_hf"), "llama/convert.py", "meta_to_hf"),
    (("-m", "llama.convert", "to_gguf"), "llama/convert.py", "to_gguf"),
    (("-m", "kollama.report"), "kollama/eval/report.py", "report"),
    (("-m", "kollama.evaluate"), "kollama/eval/evaluate.py", "evaluate"),
    (("-m", "kollama.vocab", "train"), "kollama/vocab/__main__.py", "_train_cli"),
    (("-m", "kollama.vocab", "merge"), "kollama/vocab/__main__.py", "_merge_cli"),
    (("-m", "kollama.vocab", "stats"), "kollama/vocab/__main__.py", "_stats_cli"),
    (("-m", "kollama.vocab", "resize"), "kollama/vocab/__main__.py", "_resize_cli"),
    (("-m", "kollama.curriculum", "run"), "kollama/data/curriculum.py", "run"),
    (("-m", "kollama.curriculum", "build_translation"), "kollama/data/curriculum.py", "_build_translation_cli"),
    (("example_text_completion.py",), "example_text_completion.py", "main"),
    (("example_chat_completion.py",), "example_chat_completion.py", "main"),
]
IDS = [" ".join(argv) for argv, _, _ in COMMANDS]
SECTIONS = ("POSITIONAL ARGUMENTS", "FLAGS")
DETAIL_PREFIXES = ("Type:", "Default:")


def _help(argv: Tuple[str, ...]) -> str:
    env = dict(os.environ, PAGER="cat", LLAMA_DEBUG="")
    proc = subprocess.run([sys.executable, *argv, "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    # fire exits 2 after the help of a **kwargs command (curriculum run), 0 otherwise: judge by the text printed.
    # fire prints the help on stdout or stderr depending on the case; the test reads both.
    text = proc.stdout + proc.stderr
    assert "SYNOPSIS" in text, f"{' '.join(argv)} --help exited {proc.returncode} without a help: {text[-2000:]}"
    return text


@pytest.fixture(scope="module")
def helps() -> Dict[str, str]:
    with ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2))) as pool:
        texts = list(pool.map(_help, [argv for argv, _, _ in COMMANDS]))
    return dict(zip(IDS, texts))


def parse_entries(text: str) -> Dict[str, List[str]]:
    """{entry line: its detail lines} of the POSITIONAL ARGUMENTS and FLAGS sections of fire's help text."""
    entries: Dict[str, List[str]] = {}
    section = None
    current = None
    for line in text.splitlines():
        if line and not line[0].isspace():  # a section title
            section = line.strip() if line.strip() in SECTIONS else None
            current = None
            continue
        if section is None or not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent == 4:
            name = line.strip()
            # FLAGS entries start with a dash; "Flags are accepted." (a **kwargs command) is no entry.
            if section == "FLAGS" and not name.startswith("-"):
                current = None
                continue
            current = name
            entries[current] = []
        elif indent >= 8 and current is not None:
            entries[current].append(line.strip())
    return entries


def test_parse_entries():
    text = ("NAME\n    x\n\nPOSITIONAL ARGUMENTS\n    SRC\n        Type: 'str'\n        the source\n    INPUTS\n\n"
            "FLAGS\n    --out=OUT (required)\n        where\n    -m, --mp=MP\n        Type: int\n        Default: 1\n"
            "    Flags are accepted.\n\nNOTES\n    You can also use flags syntax\n")
    assert parse_entries(text) == {"SRC": ["Type: 'str'", "the source"], "INPUTS": [], "--out=OUT (required)":
                                   ["where"], "-m, --mp=MP": ["Type: int", "Default: 1"]}


@pytest.mark.parametrize("cmd", IDS)
def test_every_argument_has_a_description(helps, cmd):
    text = helps[cmd]
    entries = parse_entries(text)
    assert entries or "Flags are accepted." in text, f"no arguments found in the help of {cmd}:\n{text}"
    undocumented = [name for name, details in entries.items()
                    if not any(d and not d.startswith(DETAIL_PREFIXES) for d in details)]
    assert not undocumented, (f"`{cmd} --help` shows no description for {undocumented}; document them in the "
                              f"Args: section of the function's docstring")


def _docstring(source: str, function: str) -> str:
    tree = ast.parse((ROOT / source).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == function:
            return ast.get_docstring(node) or ""
    raise AssertionError(f"no function {function} in {source}")


def _parameters(source: str, function: str) -> List[str]:
    tree = ast.parse((ROOT / source).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == function:
            a = node.args
            names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
            return names + [x.arg for x in (a.vararg, a.kwarg) if x is not None]
    raise AssertionError(f"no function {function} in {source}")


@pytest.mark.parametrize("argv,source,function", COMMANDS, ids=IDS)
def test_docstring_args_name_parameters(argv, source, function):
    """fire reads a continuation line "word (...): ..." as a new argument; every Args: entry must be a parameter."""
    from fire import docstrings

    info = docstrings.parse(_docstring(source, function))
    params = set(_parameters(source, function))
    phantom = [a.name for a in info.args or [] if a.name not in params]
    assert not phantom, (f"{source}:{function}'s Args: section has entries {phantom} that are not parameters: a "
                         f"continuation line with a colon is read by fire as a new argument; reword it")
