"""Messages that misled (issue 13): each bad input is one UserError line that names the input (file:line or the
flag) and the fix, raised before any work and without writing anything."""
import json
import logging

import pytest

from helpers import ENGLISH, random_model, randomize_lora, save_meta, tiny_args, train_tiny_tokenizer
from kollama.adapters.adapter import apply_adapter
from kollama.adapters.lora import apply_lora, load_adapter, save_adapter
from kollama.data import rows as D
from kollama.eval import evaluate as E
from kollama.vocab.__main__ import main as vocab_main
from kollama.vocab.common import load_model_proto
from kollama.vocab.merge import merge
from kollama.vocab.train import train as train_tokenizer
from llama.errors import UserError, cli_errors
from llama.tokenizer import Tokenizer

KOREAN = ["안녕하세요 반갑습니다 오늘은 날씨가 좋네요", "영화가 정말 재미있었어요 배우들이 연기를 잘했어요",
          "한국어 토크나이저를 만들어 봅시다 정말 좋아요"]


def cli_error(main, argv, capsys) -> str:
    """The `error: ...` line a CLI prints (exit code 2, one line)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err[len("error: "):].strip()


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    """tok.model (the tiny English base, 128 pieces), ko.model (Korean, 340) and merged.model (tok + Korean)."""
    d = tmp_path_factory.mktemp("tok")
    tok = train_tiny_tokenizer(d / "tok.model")
    (d / "ko.txt").write_text("\n".join(KOREAN * 20), encoding="utf-8")
    train_tokenizer(d / "ko.txt", out=d / "ko.model", vocab_size=340, num_threads=1)
    merge(tok, d / "ko.model", d / "merged.model")
    return {"tok": tok, "ko": d / "ko.model", "merged": d / "merged.model"}


# ------------------------------------------------------------------------------------------------ 1. vocab merge

def test_merge_that_adds_no_piece_is_an_error_and_writes_nothing(tmp_path, toks, capsys):
    out = tmp_path / "out.model"
    for ko in (toks["tok"], toks["merged"]):  # no Hangul at all; every Korean piece already in the base
        message = cli_error(vocab_main, ["merge", str(toks["merged"]), str(ko), str(out)], capsys)
        assert f"Korean model {ko} adds no new piece to base model {toks['merged']}" in message
        assert "check that it was trained on Korean text" in message
    assert not out.exists() and not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------------ 2. vocab stats

def test_stats_on_a_binary_or_non_utf8_file_names_file_line_and_fix(tmp_path, toks, capsys):
    model = str(toks["tok"])
    message = cli_error(vocab_main, ["stats", model, "--text", model], capsys)  # a .model file as the text
    assert message.startswith(f"{model}:") and "NUL byte" in message and "binary file, not text" in message
    cp949 = tmp_path / "ko.txt"
    cp949.write_bytes("plain english\n".encode() + "\n".join(KOREAN).encode("cp949"))
    message = cli_error(vocab_main, ["stats", model, "--text", str(cp949)], capsys)
    assert message.startswith(f"{cp949}:2: not valid UTF-8")
    assert f"iconv -f cp949 -t utf-8 {cp949} > {tmp_path / 'ko.utf8.txt'}" in message


# ------------------------------------------------------------------------------------------------ 3. evaluate flags

@pytest.fixture
def no_model(monkeypatch):
    """Loading the model means the flags were not checked before the work started."""
    from llama.generation import Llama

    def build(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")
    monkeypatch.setattr(Llama, "build", build)


@pytest.mark.parametrize("flag, value, expected", [
    ("--limit", "-1", "--limit must be a positive whole number (or left out to score every item), got -1"),
    ("--limit", "0", "--limit must be a positive whole number"),
    ("--limit", "1.5", "--limit must be a positive whole number"),
    ("--limit", "abc", "--limit must be a positive whole number"),
    ("--batch_size", "0", "--batch_size must be a positive whole number, got 0"),
    ("--k_shot", "-1", "--k_shot must be a whole number >= 0, got -1"),
    ("--max_seq_len", "0", "--max_seq_len must be a whole number >= 2"),
    ("--max_gen_len", "-5", "--max_gen_len must be a positive whole number"),
    ("--window", "0", "--window must be a positive whole number"),
    ("--window", "4096", "--window 4096 is longer than --max_seq_len 2048"),
    ("--stride", "3000", "--stride 3000 is longer than the window (2048 tokens)"),
    ("--model_parallel_size", "0", "--model_parallel_size must be a positive whole number"),
])
def test_evaluate_checks_counts_before_loading_the_model(tmp_path, no_model, capsys, flag, value, expected):
    text = tmp_path / "ko.txt"
    text.write_text("\n".join(KOREAN) + "\n", encoding="utf-8")
    argv = ["--ckpt_dir", str(tmp_path), "--tokenizer_path", str(tmp_path / "tok.model"), "--tasks", "bpc",
            "--text_files", str(text), "--out", str(tmp_path / "r.json"), flag, value]
    assert expected in cli_error(E.main, argv, capsys)
    assert not (tmp_path / "r.json").exists()


def test_evaluate_checks_out_before_loading_the_model(tmp_path, no_model, capsys):
    text = tmp_path / "ko.txt"
    text.write_text("\n".join(KOREAN) + "\n", encoding="utf-8")
    argv = ["--ckpt_dir", str(tmp_path), "--tokenizer_path", str(tmp_path / "tok.model"), "--text_files", str(text)]
    message = cli_error(E.main, argv + ["--tasks", "bpc", "--out", str(text / "run" / "r.json")], capsys)
    assert message.startswith(f"--out {text / 'run' / 'r.json'}: {text} is a file, not a folder")
    message = cli_error(E.main, argv + ["--tasks", "bpc", "--out", str(tmp_path)], capsys)
    assert message.startswith(f"--out {tmp_path} is a folder")
    message = cli_error(E.main, argv + ["--tasks", "kullm", "--data_dir", str(tmp_path), "--max_gen_len", "2048"],
                        capsys)
    assert "--max_gen_len 2048 leaves no room for a prompt in --max_seq_len 2048" in message


# ------------------------------------------------------------------------------------------------ 4a. resize

@pytest.mark.parametrize("case", ["another tokenizer", "swapped", "missing"])
def test_resize_blames_the_old_tokenizer_when_it_is_the_wrong_one(tmp_path, toks, capsys, case):
    ckpt = save_meta(random_model(tiny_args(vocab_size=128)), tmp_path / "ckpt", extra_files=[toks["tok"]])
    new, old = {"another tokenizer": (toks["merged"], toks["ko"]), "swapped": (toks["tok"], toks["merged"]),
                "missing": (toks["merged"], tmp_path / "nope.model")}[case]
    message = cli_error(vocab_main, ["resize", str(ckpt), str(new), str(tmp_path / "out"), "--old_tokenizer",
                                     str(old)], capsys)
    if case == "missing":
        assert message.startswith(f"--old_tokenizer {old} does not exist")
    else:
        n_old = len(load_model_proto(old).pieces)
        assert f"tok_embeddings.weight of {ckpt} has 128 rows but the old tokenizer has {n_old} pieces" in message
        assert f"so --old_tokenizer {old} is not the tokenizer this checkpoint was trained with" in message
        assert "new tokenizer" not in message
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ 4c. cutoff

@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer(str(train_tiny_tokenizer(tmp_path_factory.mktemp("dtok") / "tok.model")))


def _instruction_file(path, instructions):
    path.write_text("".join(json.dumps({"instruction": s, "output": "ok"}) + "\n" for s in instructions))
    return path


def test_cutoff_messages_name_the_flag_and_the_length_that_keeps_every_row(tmp_path, tok, caplog):
    # The second prompt is the longer one: a length that keeps only the first row would not do.
    path = _instruction_file(tmp_path / "long.jsonl", [ENGLISH[0], ENGLISH[0] + " " + ENGLISH[1]])
    with pytest.raises(D.DataError) as e:
        D.load_examples(path, tok, "alpaca", 16)
    message = str(e.value)
    need = int(message.split("use --cutoff_len ")[1].split()[0])
    stats = D.DataStats()
    assert len(D.load_examples(path, tok, "alpaca", need, stats=stats)) == 2 and stats.truncated == 0
    assert "\n" not in message and f"first dropped: {path}:1: its prompt fills --cutoff_len 16" in message

    # Some rows dropped, others kept: a warning with the flag and the length, not only a count.
    mixed = _instruction_file(tmp_path / "mixed.jsonl", ["a", ENGLISH[0]])
    short = len(D.load_examples(_instruction_file(tmp_path / "a.jsonl", ["a"]), tok, "alpaca", 512)[0])
    with caplog.at_level(logging.WARNING, logger="kollama.data"):
        assert len(D.load_examples(mixed, tok, "alpaca", short)) == 1
    warning = next(r.getMessage() for r in caplog.records if "dropped" in r.getMessage())
    assert f"1 examples dropped at --cutoff_len {short}; first dropped: {mixed}:2" in warning
    need = int(warning.split("use --cutoff_len ")[1].split()[0])
    assert len(D.load_examples(mixed, tok, "alpaca", need)) == 2
    with pytest.raises(D.DataError, match="^--cutoff_len must be >= 2"):
        D.load_examples(mixed, tok, "alpaca", 1)


# ------------------------------------------------------------------------------------------------ 5. adapters

@pytest.fixture
def adapter(tmp_path):
    args = tiny_args()
    model = randomize_lora(apply_lora(random_model(args), ("wq", "wv"), r=2))
    return save_adapter(model, tmp_path / "adapter"), args


def _one_line_cli_error(fn, capsys) -> str:
    with pytest.raises(SystemExit) as e, cli_errors():
        fn()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("damage", ["weights cut in half", "config cut in half", "config not an object",
                                    "config missing"])
def test_damaged_adapter_files_are_named(adapter, capsys, damage):
    folder, args = adapter
    weights, config = folder / "adapter.safetensors", folder / "adapter_config.json"
    if damage == "weights cut in half":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "config cut in half":
        config.write_text(config.read_text()[:40])
    elif damage == "config not an object":
        config.write_text("[1, 2]\n")
    else:
        config.unlink()
    bad = weights if damage.startswith("weights") else config
    for load in (lambda: load_adapter(random_model(args), folder), lambda: apply_adapter(random_model(args), folder)):
        if damage != "config missing":
            with pytest.raises(UserError, match="save the adapter again"):
                load()
        err = _one_line_cli_error(load, capsys)
        assert err.startswith(f"error: {bad} ") and ("damaged or incomplete" in err or "not the object" in err
                                                      or "is missing" in err)
