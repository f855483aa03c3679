"""kollama.data.rows on bad input: every problem ends in one DataError line naming file:line and the fix (or, for one
bad row, a ``file:line: why`` entry in DataStats.skipped), never a raw UnicodeDecodeError / KeyError / TypeError."""
import json
import pathlib

import pytest

from helpers import ENGLISH, train_tiny_tokenizer
from kollama.data import rows as D
from llama.tokenizer import Tokenizer

KO_ROWS = [{"instruction": "한국어 문장을 번역하세요.", "output": "번역한 문장입니다."},
           {"instruction": "영화 리뷰를 요약하세요.", "input": "배우들의 연기가 좋았습니다.",
            "output": "좋은 영화입니다."}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer(str(train_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tok.model")))


def data_error(fn, *args, **kwargs) -> str:
    """The message of the DataError ``fn`` raises; it must be a single line."""
    with pytest.raises(D.DataError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def korean_file(path: pathlib.Path, encoding: str) -> pathlib.Path:
    """Two instruction rows (Korean from line 2 on) in the layout the suffix asks for, written in ``encoding``."""
    if path.suffix == ".txt":
        text = "plain english first line\n" + "\n".join(r["instruction"] for r in KO_ROWS) + "\n"
    elif path.suffix == ".json":
        text = "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in KO_ROWS) + "\n]\n"
    else:
        text = json.dumps({"instruction": "english first", "output": "ok"}) + "\n" + \
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in KO_ROWS)
    path.write_bytes(text.encode(encoding))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".txt"])
def test_cp949_file_is_named_with_line_and_fix(tmp_path, suffix):
    path = korean_file(tmp_path / f"ko{suffix}", "cp949")
    message = data_error(D.read_rows, path)
    assert message.startswith(f"{path}:2: not valid utf-8")  # line 1 is ASCII; the first Korean byte is on line 2
    assert "CP949/EUC-KR" in message and "--encoding cp949" in message
    assert f"iconv -f cp949 -t utf-8 {path} > {tmp_path / ('ko.utf8' + suffix)}" in message


def test_invalid_utf8_that_is_not_korean(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("one\ntwo\ncafé au lait\n".encode("latin-1"))
    message = data_error(D.read_rows, path)
    assert message.startswith(f"{path}:3: not valid utf-8 (byte 0xE9)")
    assert "CP949" not in message and "--encoding" in message and "iconv -f ENCODING -t utf-8" in message
    # UTF-16 (Windows "Unicode" text, Excel's export) is known by its byte-order mark
    path = tmp_path / "u16.txt"
    path.write_bytes("첫 줄\n둘째 줄\n".encode("utf-16"))
    message = data_error(D.read_rows, path)
    assert message.startswith(f"{path}:1: not valid utf-8 (byte 0xFF)")
    assert "UTF-16" in message and "--encoding utf-16" in message and "iconv -f utf-16 -t utf-8" in message
    assert [r.value for r in D.read_rows(path, encoding="utf-16")] == ["첫 줄", "둘째 줄"]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".txt"])
def test_encoding_option_reads_cp949(tmp_path, tok, suffix):
    utf8 = D.read_rows(korean_file(tmp_path / f"u{suffix}", "utf-8"))
    cp949 = D.read_rows(korean_file(tmp_path / f"c{suffix}", "cp949"), encoding="cp949")
    assert [(r.kind, r.value) for r in cp949] == [(r.kind, r.value) for r in utf8] and len(utf8) >= 2
    template = "text" if suffix == ".txt" else "kullm"
    same = D.load_examples(tmp_path / f"u{suffix}", tok, template, 512)
    assert [e.input_ids for e in D.load_examples(tmp_path / f"c{suffix}", tok, template, 512, encoding="cp949")] == \
        [e.input_ids for e in same]
    # The other way round: a UTF-8 file read as cp949 names the default
    message = data_error(D.read_rows, tmp_path / f"u{suffix}", encoding="cp949")
    assert message.startswith(f"{tmp_path / ('u' + suffix)}:2: not valid cp949") and "valid UTF-8" in message
    assert "drop --encoding cp949" in message


def test_unknown_encoding_names_the_option(tmp_path, tok):
    path = korean_file(tmp_path / "d.jsonl", "utf-8")
    for bad in ("cp-949x", "base64"):
        message = data_error(D.load_examples, path, tok, "kullm", 512, encoding=bad)
        assert f"unknown text encoding {bad!r}" in message and "--encoding" in message and "cp949" in message


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".txt"])
def test_utf8_bom_is_accepted_silently(tmp_path, suffix):
    plain = D.read_rows(korean_file(tmp_path / f"plain{suffix}", "utf-8"))
    stats = D.DataStats()
    bom = D.read_rows(korean_file(tmp_path / f"bom{suffix}", "utf-8-sig"), stats=stats)
    assert (tmp_path / f"bom{suffix}").read_bytes().startswith(b"\xef\xbb\xbf")
    assert [(r.kind, r.value) for r in bom] == [(r.kind, r.value) for r in plain] and stats.skipped == []
    assert [r.source.rsplit(":", 1)[1] for r in bom] == [r.source.rsplit(":", 1)[1] for r in plain]


def test_wrong_types_are_skipped_with_file_and_line(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    records = [{"conversations": [{"from": ["human"], "value": "hi"}]},  # 1 unhashable speaker
               {"messages": "hello"},  # 2 not a list
               {"messages": [["user", "hi"]]},  # 3 turn not an object
               {"instruction": "a", "instances": {"input": "x", "output": "y"}},  # 4 not a list
               {"instruction": "a", "instances": ["x"]},  # 5 item not an object
               {"instruction": ["a"], "output": "b"},  # 6 not a string
               {"instruction": "a", "output": {"text": "b"}},  # 7 not a string
               {"text": 5}]  # 8 not a string
    lines = [json.dumps(r) for r in records]
    lines.append('{"instruction": "broken emoji \\ud83d", "output": "b"}')  # 9 unpaired surrogate escape
    lines.append(json.dumps({"instruction": "a", "output": "b"}))  # 10 ok
    path.write_text("\n".join(lines) + "\n")
    stats = D.DataStats()
    examples = D.load_examples(path, tok, "alpaca", 512, stats=stats)
    assert len(examples) == 1 and stats.rows == 10
    assert [s.split(": ")[0] for s in stats.skipped] == [f"{path}:{n}" for n in range(1, 10)]
    assert "unknown ShareGPT speaker ['human']" in stats.skipped[0]
    assert "unpaired surrogate" in stats.skipped[8] and "'instruction'" in stats.skipped[8]


def test_every_row_malformed_says_counts_first_reason_and_fix(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"id": i, "body": s}) + "\n" for i, s in enumerate(ENGLISH[:3])))
    message = data_error(D.load_examples, path, tok, "text", 512)
    assert message.startswith(f"no usable training examples in {path} with --template text: 3 rows read, "
                              f"3 skipped, 0 dropped")
    assert f"first skipped: {path}:1: no known fields" in message and "--text_field body" in message


def test_every_example_dropped_at_the_cutoff_names_the_length_needed(tmp_path, tok):
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"instruction": s, "output": "ok"}) + "\n" for s in ENGLISH[:2]))
    message = data_error(D.load_examples, path, tok, "alpaca", 16)
    assert message.startswith(f"no usable training examples in {path} with --template alpaca: 2 rows read, "
                              f"0 skipped, 2 dropped")
    need = int(message.split("use --cutoff_len ")[1].split()[0])
    assert f"first dropped: {path}:1" in message and need > 16
    # the length named is enough for that row (and the longest prompt decides the other)
    assert len(D.load_examples(path, tok, "alpaca", need)) >= 1


def test_empty_file_says_so(tmp_path, tok):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    message = data_error(D.load_examples, path, tok, "kullm", 512)
    assert f"{path}" in message and "empty" in message and "--data" in message


def test_json_file_errors_name_the_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a" "output": "b"}\n]\n')
    assert data_error(D.read_rows, bad).startswith(f"{bad}:3: not valid JSON")
    # one pretty-printed object (AI Hub / KorQuAD style {"data": [...]}) is not a list of rows
    obj = tmp_path / "obj.json"
    obj.write_text(json.dumps({"version": 1, "data": [{"instruction": "a", "output": "b"}]}, indent=2))
    message = data_error(D.read_rows, obj)
    assert message.startswith(f"{obj}:1: one JSON object") and "'data'" in message
    assert f"jq -c '.data[]' {obj} > {tmp_path / 'obj.jsonl'}" in message


def test_directory_and_unreadable_file(tmp_path, monkeypatch):
    message = data_error(D.read_rows, tmp_path)
    assert message.startswith(f"data path {str(tmp_path)!r} is a directory") and "--data" in message
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n")
    real = pathlib.Path.read_bytes

    def denied(self):  # tests run as root, where chmod 000 does not stop a read
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", denied)
    assert data_error(D.read_rows, path) == f"cannot read data file {path}: Permission denied; check its permissions"
