"""kollama.vocab resize: old rows untouched, new rows the mean of their old pieces, any shard count."""
import json

import pytest
import torch
from sentencepiece import SentencePieceProcessor

from helpers import ENGLISH, random_model, save_meta, tiny_args
from kollama.vocab.__main__ import main as vocab_main
from kollama.vocab.common import VocabError
from kollama.vocab.merge import merge
from kollama.vocab.resize import resize
from kollama.vocab.train import train as train_tokenizer
from llama.checkpoint import open_shards, read_params, read_slice
from llama.model import ModelArgs, Transformer

KOREAN = ["안녕하세요 반갑습니다 오늘은 날씨가 좋네요", "영화가 정말 재미있었어요 배우들이 연기를 잘했어요",
          "한국어 토크나이저를 만들어 봅시다 정말 좋아요"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    (d / "en.txt").write_text("\n".join(ENGLISH * 20))
    (d / "ko.txt").write_text("\n".join(KOREAN * 20))
    train_tokenizer(d / "en.txt", out=d / "tokenizer.model", vocab_size=300)  # byte fallback: Hangul -> <0xNN> pieces
    train_tokenizer(d / "ko.txt", out=d / "ko.model", vocab_size=340)
    merge(d / "tokenizer.model", d / "ko.model", d / "merged.model")
    return d / "tokenizer.model", d / "merged.model"


def piece_bytes(sp, i):
    """The bytes a piece stands for, read off the piece string (byte pieces are <0xNN>)."""
    piece = sp.id_to_piece(i)
    if sp.is_byte(i):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("▁", " ").encode()


def load(ckpt):
    readers = open_shards(ckpt)
    return {k: read_slice(readers, k, 0, 1) for k in readers[0].keys()}, read_params(ckpt)


@pytest.mark.parametrize("mp", [1, 2])
def test_resize_keeps_old_rows_and_initialises_new_ones(tmp_path, tokenizers, mp):
    old_tok, new_tok = tokenizers
    args = tiny_args(dim=64, n_heads=8, n_kv_heads=4, vocab_size=300)
    model = random_model(args, seed=2)
    ckpt = save_meta(model, tmp_path / "old", mp=mp, extra_files=[old_tok])
    info = resize(ckpt, new_tok, tmp_path / "new")
    old_sp, new_sp = SentencePieceProcessor(model_file=str(old_tok)), SentencePieceProcessor(model_file=str(new_tok))
    assert info["old_vocab"] == 300 and info["new_vocab"] == new_sp.vocab_size() and info["new_vocab"] % 64 == 0
    assert len(list((tmp_path / "new").glob("consolidated.*"))) == mp
    assert (tmp_path / "new" / "tokenizer.model").read_bytes() == new_tok.read_bytes()
    assert json.loads((tmp_path / "new" / "resize_info.json").read_text())["old_vocab"] == 300

    state, params = load(tmp_path / "new")
    old = model.state_dict()
    for name in ("tok_embeddings.weight", "output.weight"):
        w = state[name]
        assert w.shape == (info["new_vocab"], args.dim)
        assert torch.equal(w[:300], old[name])
        for i in range(300, info["new_vocab"]):
            if new_sp.is_unused(i):
                assert torch.allclose(w[i], old[name].mean(0), atol=1e-6)
                continue
            ids = _old_split(old_tok, new_sp.id_to_piece(i))
            # independent check of the split: the old pieces spell the new piece exactly
            assert b"".join(piece_bytes(old_sp, j) for j in ids) == new_sp.id_to_piece(i).replace("▁", " ").encode()
            assert torch.allclose(w[i], old[name][ids].mean(0), atol=1e-6)
    assert all(torch.equal(state[k], v) for k, v in old.items() if k not in ("tok_embeddings.weight", "output.weight"))

    # logits over old tokens, for inputs made of old tokens, are those of the old model
    grown = Transformer(ModelArgs(**{**params, "vocab_size": info["new_vocab"], "max_seq_len": 64,
                                     "max_batch_size": 4}))
    grown.load_state_dict(state)
    tokens = torch.randint(0, 300, (2, 11))
    with torch.no_grad():
        before, after = model(tokens, 0), grown(tokens, 0)
    # The old columns are the same dot products; a wider matmul may block them differently, hence 1e-5, not equal.
    assert torch.allclose(after[..., :300], before, atol=1e-5)


def _old_split(old_tok, piece):
    from kollama.vocab.resize import _processor_without_dummy_prefix

    return _processor_without_dummy_prefix(old_tok).encode(piece.replace("▁", " "))


def test_resize_refuses_a_tokenizer_that_does_not_extend_the_old_one(tmp_path, tokenizers):
    old_tok, _ = tokenizers
    model = random_model(tiny_args(vocab_size=340), seed=2)
    ckpt = save_meta(model, tmp_path / "old", extra_files=[old_tok.parent / "ko.model"])
    with pytest.raises(VocabError, match="holds no tokenizer.model"):
        resize(ckpt, old_tok, tmp_path / "new")
    with pytest.raises(VocabError, match="extends the old one"):
        resize(ckpt, old_tok.parent / "merged.model", tmp_path / "new", old_tokenizer=old_tok.parent / "ko.model")
    assert not (tmp_path / "new").exists()


def test_resize_refuses_the_wrong_old_tokenizer(tmp_path, tokenizers):
    old_tok, new_tok = tokenizers
    ckpt = save_meta(random_model(tiny_args(vocab_size=128)), tmp_path / "old", extra_files=[old_tok])
    with pytest.raises(VocabError, match="128 rows but the old tokenizer has 300 pieces"):
        resize(ckpt, new_tok, tmp_path / "new")


def test_cli(tmp_path, tokenizers, capsys):
    old_tok, new_tok = tokenizers
    ckpt = save_meta(random_model(tiny_args(vocab_size=300)), tmp_path / "old", extra_files=[old_tok])
    vocab_main(["resize", str(ckpt), str(new_tok), str(tmp_path / "new")])
    assert "resized 300 -> 384 rows (1 shard(s))" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        vocab_main(["resize", str(tmp_path / "missing"), str(new_tok), str(tmp_path / "new2")])
    assert "error:" in capsys.readouterr().err
