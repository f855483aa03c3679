"""Every command-line entry point reports a user's mistake as one line ``error: ...`` on stderr with exit code 2 and
no traceback, also under ``python -m`` (where the running module is imported a second time as ``__main__``, so its
own exception classes are other objects); ``--debug`` shows the traceback instead."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MISSING = "no-such-folder"

# (command, arguments that name a missing or unusable input); run from an empty folder
COMMANDS = [
    (["-m", "kollama.train"], ["--data", "d.jsonl", "--ckpt_dir", MISSING, "--tokenizer_path", "t.model",
                               "--out_dir", "run"]),
    (["-m", "kollama.train"], ["--data", "d.jsonl", "--ckpt_dir", MISSING, "--tokenizer_path", "t.model",
                               "--out_dir", "run", "--epochs", "0"]),
    (["-m", "kollama.evaluate"], ["--ckpt_dir", MISSING, "--tokenizer_path", "t.model", "--tasks", "nope"]),
    (["-m", "kollama.vocab"], ["stats", "t.model", "--text", "x.txt"]),
    (["-m", "kollama.report"], [MISSING, "--out", "r.md"]),
    (["-m", "kollama.curriculum"], ["build_translation", "ko.txt", "en.txt", "out.jsonl"]),
    ([str(ROOT / "example_text_completion.py")], ["--ckpt_dir", MISSING, "--tokenizer_path", "t.model"]),
    ([str(ROOT / "example_chat_completion.py")], ["--ckpt_dir", MISSING, "--tokenizer_path", "t.model"]),
    # fire would run the command with the options it knows and complain about the rest only afterwards
    ([str(ROOT / "example_text_completion.py")], ["--ckpt_dir", MISSING, "--tokenizer_path", "t.model",
                                                  "--bogus", "3"]),
    (["-m", "llama.convert"], ["bogus_cmd", "a", "b"]),
    (["-m", "llama.convert"], ["llama2c", "x.bin", "out", "--tokenizer", "nope.model"]),
    (["-m", "kollama.vocab"], ["stats", "t.model", "--text", "x.txt", "--bogus", "1"]),
]


def run(cmd, args, cwd, env=None):
    env = {**{k: v for k, v in os.environ.items() if k != "LLAMA_DEBUG"}, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, *cmd, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("cmd,args", COMMANDS, ids=[f"{Path(c[-1]).name} {a[0]}-{i}" for i, (c, a) in enumerate(COMMANDS)])
def test_user_error_is_one_line_with_exit_code_2(cmd, args, tmp_path):
    proc = run(cmd, args, tmp_path)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    assert err and err[-1].startswith("error: ") and len(err[-1]) > len("error: ") + 10, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing is written on a user error"


def test_debug_flag_and_env_show_the_traceback(tmp_path):
    cmd, args = COMMANDS[2]
    for extra, env in (["--debug"], None), ([], {"LLAMA_DEBUG": "1"}):
        proc = run(cmd, args + extra, tmp_path, env)
        assert proc.returncode != 0 and "Traceback" in proc.stderr, proc.stderr


def test_outputs_never_replace_inputs_or_existing_files(tmp_path):
    """vocab train/merge and curriculum build_translation write one file: never over one of their inputs, and
    over an existing file only with --overwrite (found by a bad-input sweep: each used to exit 0 and destroy it)."""
    ko, en = tmp_path / "p.ko", tmp_path / "p.en"
    ko.write_text("안녕하세요\n고맙습니다\n", encoding="utf-8")
    en.write_text("Hello\nThank you\n")
    keep = tmp_path / "keep.json"
    keep.write_text("{}")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    attempts = [
        (["-m", "kollama.curriculum", "build_translation", str(ko), str(en), str(ko)], "is also an input"),
        (["-m", "kollama.curriculum", "build_translation", str(ko), str(en), str(keep)], "exists; choose another OUT"),
        (["-m", "kollama.vocab", "train", str(ko), "--out", str(ko), "--vocab_size", "300"], "is also an input"),
        (["-m", "kollama.vocab", "merge", str(keep), str(ko), str(keep)], "is also an input"),
    ]
    for cmd, message in attempts:
        proc = run(cmd, [], tmp_path)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    proc = run(["-m", "kollama.curriculum", "build_translation", str(ko), str(en), str(keep), "--overwrite"], [],
               tmp_path)
    assert proc.returncode == 0 and keep.read_text().startswith("{\"instruction\""), proc.stderr


def test_report_of_unreadable_runs_is_an_error(tmp_path):
    run_dir = tmp_path / "garbage_run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text("not json{")
    (run_dir / "metrics.jsonl").write_text("zzz\n")
    proc = run(["-m", "kollama.report"], [str(run_dir), "--out_dir", str(tmp_path / "rep")], tmp_path)
    assert proc.returncode == 2 and "no run has anything to report" in proc.stderr, proc.stderr
    assert not (tmp_path / "rep").exists()
