"""Tests of kollama.vocab: the merge keeps non-Korean tokenization identical, new scores sit below every base score,
padding is never produced, stats counts are exact, bad input gives clear errors, and (with LLAMA_TEST_DATA) the
merged Llama 2 tokenizer reaches <= 0.85 tokens per Hangul syllable on unseen UD Korean-KAIST sentences."""
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

pytest.importorskip("google.protobuf", reason="editing SentencePiece models needs protobuf")
from sentencepiece import sentencepiece_model_pb2 as pb2  # noqa: E402

from conftest import need  # noqa: E402
from kollama.vocab.__main__ import main  # noqa: E402
from kollama.vocab.common import VocabError, count_hangul_syllables, has_hangul  # noqa: E402
from kollama.vocab.corpus import read_corpus  # noqa: E402
from kollama.vocab.merge import merge, merge_protos, scores_below  # noqa: E402
from kollama.vocab.stats import stats_table, tokenizer_stats  # noqa: E402
from kollama.vocab.train import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
Piece = pb2.ModelProto.SentencePiece

NON_KOREAN = [
    "Once upon a time, there was a little girl who loved the sea.",
    "The quick brown fox jumps over the lazy dog; isn't it? \"Yes!\" -- (maybe) [1] {2} <3>",
    "def train(model, data, lr=3e-4):\n    for x, y in data:\n        loss = model(x).sub(y).pow(2).mean()\n",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42 >> 1); return 0; }\n",
    "https://github.com/meta-llama/llama/blob/main/llama/model.py?x=1&y=%20#L42 user@example.com",
    "3.14159265358979 1,234,567.89 0x7FFF 2024-05-29T12:00:00Z 1e-9 +-*/=%^&|~",
    "emoji: 😀🎉👍🏽 ❤️ ✓ → ∑ ∫ ≤ ≥ ° € £ ¥",
    "  leading and   multiple    spaces\tand\ttabs\n\nnewlines\r\n trailing  ",
    "中文文本 日本語のテキスト русский текст ελληνικά עברית العربية हिन्दी",
    "", " ", "\t\n",
]

WORDS = ["한국어", "토크나이저", "영화", "정말", "재미있다", "배우", "연기", "좋다", "최고", "그리고", "하지만",
         "사람들", "이야기", "오늘", "학교", "친구", "음식", "맛있다", "서울", "날씨"]


def _proto(pieces, remove_extra_whitespaces=False):
    """A hand-made BPE ModelProto: unk, <s>, </s>, 256 byte pieces, then `pieces` [(piece, score)] as NORMAL."""
    m = pb2.ModelProto()
    m.trainer_spec.model_type = pb2.TrainerSpec.BPE
    m.trainer_spec.byte_fallback = True
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = True
    m.normalizer_spec.remove_extra_whitespaces = remove_extra_whitespaces
    m.pieces.add(piece="<unk>", score=0, type=Piece.UNKNOWN)
    m.pieces.add(piece="<s>", score=0, type=Piece.CONTROL)
    m.pieces.add(piece="</s>", score=0, type=Piece.CONTROL)
    for b in range(256):
        m.pieces.add(piece=f"<0x{b:02X}>", score=0, type=Piece.BYTE)
    for piece, score in pieces:
        m.pieces.add(piece=piece, score=score, type=Piece.NORMAL)
    m.trainer_spec.vocab_size = len(m.pieces)
    return m


def _sp(proto):
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def _token_bytes(sp, ids):
    """Byte spans of the tokens: what a merged encoding must coarsen."""
    return [bytes([int(sp.id_to_piece(i)[3:5], 16)]) if sp.is_byte(i)
            else sp.id_to_piece(i).replace("▁", " ").encode() for i in ids]


def _assert_coarsening(base_sp, merged_sp, text):
    """Merged tokens = base tokens with some neighbours joined, and every joined token contains Hangul."""
    b, m = _token_bytes(base_sp, base_sp.encode(text)), _token_bytes(merged_sp, merged_sp.encode(text))
    assert b"".join(b) == b"".join(m)
    cuts = set(np.cumsum([len(t) for t in b]).tolist())
    pos = 0
    for tok in m:
        pos += len(tok)
        assert pos in cuts, f"merged token {tok!r} cuts a base token in {text!r}"
    base_tokens = set(b)
    for tok in m:
        assert tok in base_tokens or has_hangul(tok.decode("utf-8", "replace")), (tok, text)


# ------------------------------------------------------------------------------------ synthetic: score ordering

BASE_PIECES = [("▁t", -1), ("he", -2), ("▁the", -3), ("▁", -4), ("t", -5), ("h", -6), ("e", -7), ("어", -8)]
KO_PIECES = [("▁한", 0), ("▁한국", -1), ("▁한국어", -2), ("th", -3), ("!한!", -4), ("한", -5), ("국", -6),
             ("어", -7), ("▁", -8), ("t", -9), ("h", -10), ("!", -11)]


def test_score_math_on_hand_made_models():
    base, ko = _proto(BASE_PIECES), _proto(KO_PIECES)
    merged, info = merge_protos(base, ko, pad_multiple=8)
    n = len(base.pieces)
    new = [(p.piece, p.score) for p in merged.pieces[n:n + info["added"]]]
    # Kept: Hangul, not in base, reachable; in the Korean merge order, strictly below the base minimum (-8).
    assert new == [("▁한", -9), ("▁한국", -10), ("▁한국어", -11), ("한", -12), ("국", -13)]
    assert info["skipped"] == {"not NORMAL": 259, "no Hangul": 5, "already in base": 1, "unreachable": 1}
    assert max(s for _, s in new) < min(p.score for p in base.pieces)
    assert len(merged.pieces) % 8 == 0 and info["final_size"] == len(merged.pieces) == n + 5 + info["padding"]
    assert [(p.piece, p.score, p.type) for p in merged.pieces[:n]] == [(p.piece, p.score, p.type) for p in base.pieces]
    b, m = _sp(base), _sp(merged)
    for text in NON_KOREAN + ["the the then", "t h e th he"]:
        assert m.encode(text) == b.encode(text), text
    assert m.encode("한국어", out_type=str) == ["▁한국어"]
    assert m.decode(m.encode("the 한국어 the!한!")) == "the 한국어 the!한!"
    _assert_coarsening(b, m, "the 한국어 the!한! he")
    # Chinese-LLaMA style (every missing piece appended with score 0) outranks "▁t"/"he" and changes English.
    naive = _proto(BASE_PIECES + [(p, 0.0) for p, _ in KO_PIECES if p not in dict(BASE_PIECES)])
    assert b.encode("the", out_type=str) == ["▁the"]
    assert _sp(naive).encode("the", out_type=str) == ["▁", "th", "e"]


def test_scores_below_stay_strict_in_float32():
    for floor in (-1e9, -252.0, 0.0, -31740.0):
        s = scores_below(floor, 2000)
        assert all(np.float32(x) == x for x in s)  # exactly representable: what the .model file stores
        assert s[0] < floor and all(a > b for a, b in zip(s, s[1:]))
    assert scores_below(-252.0, 3) == [-253.0, -254.0, -255.0]


def test_padding_is_never_produced_and_decodes():
    base, ko = _proto(BASE_PIECES), _proto(KO_PIECES)
    merged, info = merge_protos(base, ko, pad_multiple=64, model_parallel_size=3)
    assert len(merged.pieces) % 192 == 0 and info["padding"] > 0
    pad = list(range(len(merged.pieces) - info["padding"], len(merged.pieces)))
    assert all(merged.pieces[i].type == Piece.UNUSED and " " in merged.pieces[i].piece for i in pad)
    sp = _sp(merged)
    texts = NON_KOREAN + [merged.pieces[i].piece for i in pad[:5]] + ["<unused 300> <unused 301>한국어"]
    for text in texts:
        assert not set(sp.encode(text)) & set(pad), text
    assert isinstance(sp.decode(pad[:3] + [3 + 256]), str)  # UNUSED, not CONTROL: decoding does not fail


# ------------------------------------------------------------------------------------ stats: hand-counted

def test_stats_counts_by_hand(tmp_path, capsys):
    # Pieces: ▁ a b c 한 and the merge "ab". "한국 abc" -> ▁ 한 <0xEA><0xB5><0xAD> ▁ ab c (국 = U+AD6D is not a piece)
    # = 8 tokens, 3 of them bytes; "abc" -> ▁ ab c = 3 tokens. 9 chars, 2 Hangul syllables.
    model = tmp_path / "hand.model"
    model.write_bytes(_proto([("ab", -1), ("▁", -2), ("a", -3), ("b", -4), ("c", -5), ("한", -6)]).SerializeToString())
    texts = ["한국 abc", "abc"]
    assert count_hangul_syllables("한국 abc ㅋㅋ") == 2  # Jamo are Hangul but not syllables
    s = tokenizer_stats(model, texts)
    assert (s["tokens"], s["byte_tokens"], s["chars"], s["hangul_syllables"]) == (11, 3, 9, 2)
    assert (s["tokens_per_char"], s["tokens_per_hangul_syllable"], s["byte_fallback_share"]) == (11 / 9, 5.5, 3 / 11)
    assert tokenizer_stats(model, "abc")["tokens_per_hangul_syllable"] is None
    text = tmp_path / "t.txt"
    text.write_text("한국 abc\n\nabc\n", encoding="utf-8")
    main(["stats", str(model), "--text", str(text)])
    out = capsys.readouterr().out
    assert out.startswith("| tokenizer |") and f"| {model} | 265 | 11 | 1.2222 | 5.5000 | 0.2727 |" in out
    assert stats_table([dict(s, tokens_per_hangul_syllable=None)]).endswith("| n/a | 0.2727 |")


# ------------------------------------------------------------------------------------ bad input

def _korean_corpus(path, n=400, seed=0):
    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.choices(WORDS, k=8)) for _ in range(n)) + "\n", encoding="utf-8")
    return path


def test_train_reports_bad_jsonl_lines_and_trains(tmp_path, capsys):
    rng = random.Random(1)
    rows = [json.dumps({"text": " ".join(rng.choices(WORDS, k=8)), "rating": 1}, ensure_ascii=False) for _ in range(300)]
    rows[4] = '{"review": "no text field"}'
    rows[9] = "{not json"
    rows[12] = '{"text": 7}'
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(("\n".join(rows) + "\n").encode() + b"\xff\xfe bad utf8\n")
    lines = read_corpus([corpus])
    err = capsys.readouterr().err
    assert len(lines) == 297 and f"{corpus}:5: no field 'text'" in err and f"{corpus}:10: not valid JSON" in err
    assert f"{corpus}:13: field 'text' is int" in err and f"{corpus}: 297 lines used, 4 skipped" in err
    out = tmp_path / "ko.model"
    info = train(corpus, _korean_corpus(tmp_path / "plain.txt"), out=out, vocab_size=350, max_lines=200)
    assert info["lines"] == 400 and spm.SentencePieceProcessor(model_file=str(out)).vocab_size() == 350


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "the file is empty"),
    ("no_field", "no usable lines in corpus file"),
    ("tiny_vocab", "is too small"),
    ("chars_need_more", "is too small: the corpus characters"),
    ("huge_vocab", "is too large for this corpus"),
])
def test_train_errors_leave_no_file(tmp_path, case, message):
    corpus = _korean_corpus(tmp_path / "c.txt", n=50)
    kwargs = dict(vocab_size=300)
    if case == "missing":
        corpus = tmp_path / "nope.txt"
    elif case == "empty":
        corpus = tmp_path / "e.txt"
        corpus.write_text("\n \n")
    elif case == "no_field":
        corpus = tmp_path / "c.jsonl"
        corpus.write_text('{"text": "가나"}\n', encoding="utf-8")
        kwargs["field"] = "review"
    elif case == "tiny_vocab":
        kwargs["vocab_size"] = 100
    elif case == "chars_need_more":
        corpus.write_text("".join(chr(0xAC00 + i) + " " for i in range(400)), encoding="utf-8")
        kwargs.update(vocab_size=300, character_coverage=1.0)
    elif case == "huge_vocab":
        kwargs["vocab_size"] = 20000
    out = tmp_path / "out.model"
    with pytest.raises(VocabError, match=message) as e:
        train(corpus, out=out, **kwargs)
    if case == "no_field":
        assert "--field" in str(e.value) and f"{corpus}:1: no field 'review'" in str(e.value)
    assert not out.exists() and not list(tmp_path.glob(".out.model*"))


def test_merge_and_stats_errors(tmp_path, capsys):
    base = tmp_path / "base.model"
    base.write_bytes(_proto(BASE_PIECES).SerializeToString())
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\x00\x01 this is not a model")
    out = tmp_path / "out.model"
    with pytest.raises(VocabError, match="base model .*missing.model does not exist"):
        merge(tmp_path / "missing.model", base, out)
    with pytest.raises(VocabError, match="Korean model .*junk.model is not a SentencePiece .model file"):
        merge(base, junk, out)
    with pytest.raises(VocabError, match="--pad_multiple must be a positive integer"):
        merge(base, base, out, pad_multiple=0)
    unigram = _proto(KO_PIECES)
    unigram.trainer_spec.model_type = pb2.TrainerSpec.UNIGRAM
    (tmp_path / "uni.model").write_bytes(unigram.SerializeToString())
    with pytest.raises(VocabError, match="Korean model is not a BPE model"):
        merge(base, tmp_path / "uni.model", out)
    with pytest.raises(VocabError, match="tokenizer model .*junk.model is not a SentencePiece"):
        tokenizer_stats(junk, ["x"])
    assert not out.exists()
    with pytest.raises(SystemExit) as e:
        main(["merge", str(base), str(tmp_path / "nope.model"), str(out)])
    assert e.value.code == 2 and "error: Korean model" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ real data (LLAMA_TEST_DATA)

@pytest.fixture(scope="module")
def real(test_data, tmp_path_factory):
    """Korean BPE model trained on all NSMC train reviews + UD Korean-GSD dev, merged into Llama 2 and tok512."""
    llama, tok512, nsmc, gsd = need(test_data, "tokenizer.model", "tok512.model", "korean/nsmc_train.jsonl",
                                    "korean/ud_ko_gsd_dev.txt")
    d = tmp_path_factory.mktemp("vocab")
    t0 = time.perf_counter()
    train(nsmc, gsd, out=d / "ko.model", vocab_size=16000, field="text")
    t1 = time.perf_counter()
    info = merge(llama, d / "ko.model", d / "llama_ko.model", pad_multiple=64)
    t2 = time.perf_counter()
    merge(tok512, d / "ko.model", d / "tok512_ko.model", pad_multiple=64)
    print(f"\ntrain {t1 - t0:.2f} s, merge {t2 - t1:.2f} s: {info}")
    return {"llama": llama, "tok512": tok512, "ko": d / "ko.model", "llama_ko": d / "llama_ko.model",
            "tok512_ko": d / "tok512_ko.model", "info": info, "data": test_data}


@pytest.mark.parametrize("name", ["llama", "tok512"])
def test_real_merge_keeps_non_korean_ids(real, name):
    base = spm.SentencePieceProcessor(model_file=str(real[name]))
    merged = spm.SentencePieceProcessor(model_file=str(real[name + "_ko"]))
    english = (real["data"] / "korean/parallel/park_dev.en").read_text(encoding="utf-8").splitlines()
    texts = NON_KOREAN + english + ["\n".join(NON_KOREAN)]
    assert merged.encode(texts) == base.encode(texts)
    assert merged.encode(texts, out_type=str) == base.encode(texts, out_type=str)
    for i in range(3):
        assert merged.id_to_piece(i) == base.id_to_piece(i)
    assert [merged.id_to_piece(i) for i in range(base.vocab_size())] == [base.id_to_piece(i)
                                                                         for i in range(base.vocab_size())]


def test_real_korean_round_trip_and_coarsening(real):
    kaist = (real["data"] / "korean/ud_ko_kaist_dev.txt").read_text(encoding="utf-8").splitlines()
    mixed = (real["data"] / "korean/parallel/park_dev.ko").read_text(encoding="utf-8").splitlines()[:300]
    llama_ko = spm.SentencePieceProcessor(model_file=str(real["llama_ko"]))
    tok512_ko = spm.SentencePieceProcessor(model_file=str(real["tok512_ko"]))
    assert llama_ko.decode(llama_ko.encode(kaist + mixed)) == kaist + mixed
    squeezed = [" ".join(t.split()) for t in kaist]  # tok512 removes extra whitespace when encoding
    assert tok512_ko.decode(tok512_ko.encode(squeezed)) == squeezed
    base = spm.SentencePieceProcessor(model_file=str(real["llama"]))
    # Runs of spaces before Hangul: Llama's "▁▁" merges (score -1e9) must still win over the new "▁한"-like pieces.
    extra = ["Llama 2는 2023년 7월에 공개됐다 (https://ai.meta.com/llama). print('안녕') x=1;", "영화  재미있다\t 정말    좋다"]
    for text in mixed[:100] + extra:
        _assert_coarsening(base, llama_ko, text)


def test_real_tokens_per_hangul_syllable(real):
    kaist = (real["data"] / "korean/ud_ko_kaist_dev.txt").read_text(encoding="utf-8").splitlines()
    rows = [tokenizer_stats(real[k], kaist) for k in ("llama", "llama_ko", "ko")]
    print("\n" + stats_table(rows))
    base, merged, _ = rows
    assert 2.0 <= base["tokens_per_hangul_syllable"] <= 2.3 and base["byte_fallback_share"] > 0.4  # measured as ~2.1
    assert merged["tokens_per_hangul_syllable"] <= 0.85
    assert merged["byte_fallback_share"] < 0.05
    info = real["info"]
    assert info["added"] <= 16000 and info["final_size"] % 64 == 0 and merged["vocab_size"] == info["final_size"]


def test_cli_entry_point(real, tmp_path):
    """`python -m kollama.vocab` end to end: train, merge and stats as subprocesses, with what they print."""
    run = dict(cwd=REPO, capture_output=True, text=True, check=True)
    gsd = real["data"] / "korean/ud_ko_gsd_dev.txt"
    ko, out = tmp_path / "ko.model", tmp_path / "merged.model"
    r = subprocess.run([sys.executable, "-m", "kollama.vocab", "train", str(gsd), "--out", str(ko),
                        "--vocab_size", "2000"], **run)
    assert f"trained {ko}: 2000 pieces from 950 lines" in r.stdout
    r = subprocess.run([sys.executable, "-m", "kollama.vocab", "merge", str(real["llama"]), str(ko), str(out),
                        "--pad_multiple", "128", "--model_parallel_size", "8"], **run)
    assert r.stdout.startswith("added ") and "final size" in r.stdout
    assert spm.SentencePieceProcessor(model_file=str(out)).vocab_size() % 128 == 0
    r = subprocess.run([sys.executable, "-m", "kollama.vocab", "stats", str(real["llama"]), str(out),
                        "--text", str(real["data"] / "korean/nsmc_train.jsonl"), "--max_lines", "500"], **run)
    assert r.stdout.count("\n") == 4 and str(out) in r.stdout
