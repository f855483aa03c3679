"""Continued pretraining (kollama/train/pretrain.py via kollama.train): trainable sets, the row mask that keeps old
embedding rows bit-identical (also under 2-way model parallelism), held-out bits/char in metrics.jsonl, long
documents split instead of truncated, and (with LLAMA_TEST_DATA) stories260K + a Korean-expanded tok512 whose
held-out bits/char falls on NSMC."""
import json

import pytest
import torch
import torch.multiprocessing as mp

from conftest import need
from helpers import ENGLISH, free_port, tiny_training_base
from kollama import train as T
from kollama.data import rows as D
from kollama.eval.evaluate import bits_per_char
from kollama.train import ConfigError
from kollama.train.pretrain import PretrainError
from llama import Llama
from llama.checkpoint import read_slice
from llama.loading import open_checkpoint
from train_workers import train_worker

NEW = 100  # the tiny tokenizer's ids >= NEW play the "pieces a resize appended"
EMB = ("tok_embeddings.weight", "output.weight")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    tok, base, args = tiny_training_base(root)
    (root / "d.txt").write_text("\n".join(ENGLISH * 6) + "\n")
    (root / "heldout.txt").write_text("\n".join(ENGLISH[:3]) + "\n")
    return dict(root=root, tok=str(tok), base=str(base), data=str(root / "d.txt"), heldout=str(root / "heldout.txt"))


def run(setup, out, **kw):
    kw = {"task": "pretrain", "block_size": 48, "micro_batch_size": 2, "max_steps": 4, "lr": 3e-2,
          "weight_decay": 0.1, "eval_every": 4, "save_every": 0, "progress": False, "dev_fraction": 0.1, "seed": 3,
          "heldout_text": setup["heldout"], **kw}
    return T.train(setup["data"], setup["base"], setup["tok"], str(setup["root"] / out), **kw)


def state(folder):
    c = open_checkpoint(folder)
    return {k: read_slice(c.readers, k, 0, 1) for k in c.readers[0].keys()}


def test_embeddings_set_keeps_old_rows_bit_identical(setup):
    s = run(setup, "emb", trainable="embeddings", new_rows_from=NEW)
    base, new = state(setup["base"]), state(s["outputs"]["model"])
    for k in base:
        if k in EMB:
            assert torch.equal(new[k][:NEW], base[k][:NEW]), k  # no gradient, no weight decay
            changed = (new[k][NEW:] != base[k][NEW:]).any(dim=1)
            # output: every new row gets a softmax gradient; tok_embeddings: the new ids the text contains
            assert changed.all() if k == "output.weight" else changed.sum() >= 5, (k, changed)
        else:
            assert torch.equal(new[k], base[k]), k  # frozen
    saved = json.loads((setup["root"] / "emb/config.json").read_text())
    assert (saved["trainable"], saved["new_rows_from"], saved["method"], saved["template"]) == \
        ("embeddings", NEW, "full", "text")
    # bits/char at step 0 and at the end, logged and equal to kollama.eval.evaluate's on the written model
    m = [json.loads(x) for x in (setup["root"] / "emb/metrics.jsonl").read_text().splitlines()]
    bpc = [(r["step"], r["heldout_bpc"]) for r in m if "heldout_bpc" in r]
    assert [st for st, _ in bpc] == [0, 4] and bpc == s["heldout_bpc"] and bpc[1][1] < bpc[0][1]
    llama = Llama.build(s["outputs"]["model"], setup["tok"], max_seq_len=48, max_batch_size=2, device="cpu")
    ref = bits_per_char(llama.model, llama.tokenizer, ENGLISH[:3], window=48)["bits_per_char"]
    assert abs(ref - bpc[1][1]) < 1e-5
    # resuming with another row mask is refused
    run(setup, "emb2", trainable="embeddings", new_rows_from=NEW, stop_at_step=2)
    with pytest.raises(ValueError, match="new_rows_from"):
        run(setup, "emb2", trainable="embeddings", new_rows_from=NEW + 4, resume=True)


def test_lora_plus_embeddings_trains_lora_and_all_embedding_rows(setup):
    s = run(setup, "le", trainable="lora+embeddings", lora_targets="wq,wv", heldout_text=None)
    assert set(s["outputs"]) == {"adapter", "merged"}  # the adapter alone would lose the embeddings
    ckpt = setup["root"] / "le/checkpoints"
    assert not ckpt.exists() or not any(ckpt.iterdir())
    base, merged = state(setup["base"]), state(s["outputs"]["merged"])
    for k in EMB:
        assert (merged[k][:NEW] != base[k][:NEW]).any(dim=1).float().mean() > 0.5, k  # old rows train too
    for k in base:
        changed = not torch.equal(merged[k], base[k])
        assert changed == (k in EMB or k.endswith(("wq.weight", "wv.weight"))), k


def test_trainable_errors(setup):
    with pytest.raises(PretrainError, match="--new_rows_from"):
        run(setup, "x", trainable="embeddings")
    with pytest.raises(ConfigError, match="--trainable must be one of"):
        run(setup, "x", trainable="head")
    with pytest.raises(PretrainError, match="drop --method full"):
        run(setup, "x", trainable="lora+embeddings", method="full")


def test_pretrain_splits_long_documents():
    ex = D.Example(list(range(1, 12)), [-100] + list(range(2, 12)))
    pieces = D.split_example(ex, 4)
    assert [p.input_ids for p in pieces] == [[1, 2, 3, 4], [4, 5, 6, 7], [7, 8, 9, 10], [10, 11]]
    assert [p.labels for p in pieces] == [[-100, 2, 3, 4], [-100, 5, 6, 7], [-100, 8, 9, 10], [-100, 11]]
    assert D.count_targets(pieces) == D.count_targets([ex])  # every target trained once, none across a boundary


def test_embedding_row_mask_under_model_parallelism(setup, tmp_path):
    """2 processes x model parallel 2: output is split on dim 0, so rank 1's local rows are global ids 64..127;
    the mask must still freeze exactly ids < NEW and give the single-process weights."""
    common = dict(data=setup["data"], ckpt_dir=setup["base"], tokenizer_path=setup["tok"], task="pretrain",
                  block_size=48, micro_batch_size=2, max_steps=3, lr=3e-2, weight_decay=0.1, eval_every=0,
                  save_every=0, progress=False, dev_fraction=0.1, seed=3, trainable="embeddings", new_rows_from=NEW)
    mp.spawn(train_worker, args=(2, [(free_port(), {**common, "model_parallel_size": 2,
                                                    "out_dir": str(tmp_path / "mp2")})], str(tmp_path / "s.pt")),
             nprocs=2, join=True)
    one = T.train(**{**common, "out_dir": str(tmp_path / "mp1")})
    base, two, ref = state(setup["base"]), state(tmp_path / "mp2/model"), state(one["outputs"]["model"])
    assert len(open_checkpoint(tmp_path / "mp2/model").readers) == 2
    for k in EMB:
        assert torch.equal(two[k][:NEW], base[k][:NEW]), k
        assert torch.allclose(two[k], ref[k], atol=1e-5, rtol=0), (k, (two[k] - ref[k]).abs().max())


def test_stories260k_expanded_vocab_pretraining_lowers_heldout_bpc(test_data, tmp_path):
    """Real data, small scale: tok512 + Korean pieces learned on NSMC, stories260K resized to it, continued
    pretraining (lora+embeddings) on NSMC text; bits/char on NSMC dev reviews goes down."""
    model_bin, tok, nsmc, nsmc_dev = need(test_data, "stories260K.bin", "tok512.model", "korean/nsmc_train.jsonl",
                                          "korean/nsmc_dev.jsonl")
    from kollama.vocab.merge import merge
    from kollama.vocab.resize import resize
    from kollama.vocab.train import train as train_tokenizer
    from llama.convert import llama2c

    texts = [json.loads(x)["text"] for x in nsmc.read_text(encoding="utf-8").splitlines()[:3000]]
    (tmp_path / "ko.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    train_tokenizer(tmp_path / "ko.txt", out=tmp_path / "ko.model", vocab_size=1500, character_coverage=0.99,
                    num_threads=1)
    info = merge(tok, tmp_path / "ko.model", tmp_path / "merged.model")
    assert info["added"] > 100
    base = llama2c(str(model_bin), str(tmp_path / "s260"), tokenizer=str(tok))
    resize(base, tmp_path / "merged.model", tmp_path / "s260ko", old_tokenizer=tok)
    (tmp_path / "train.txt").write_text("\n".join(texts[:400]) + "\n", encoding="utf-8")
    dev = [json.loads(x)["text"] for x in nsmc_dev.read_text(encoding="utf-8").splitlines()[:40]]
    (tmp_path / "dev.txt").write_text("\n".join(dev) + "\n", encoding="utf-8")
    s = T.train(str(tmp_path / "train.txt"), str(tmp_path / "s260ko"), str(tmp_path / "merged.model"),
                str(tmp_path / "out"), task="pretrain", trainable="lora+embeddings", block_size=128,
                micro_batch_size=8, max_steps=30, lr=1e-2, warmup_steps=3, lora_targets="wq,wk,wv,wo,w1,w2,w3",
                lora_dropout=0.0, dev_fraction=0.05, eval_every=30, save_every=0, progress=False, seed=0,
                heldout_text=str(tmp_path / "dev.txt"))
    (_, before), (_, after) = s["heldout_bpc"]
    print(f"stories260K + tok512+Korean ({info['final_size']} pieces), lora+embeddings, 30 steps on NSMC: "
          f"held-out bits/char {before:.3f} -> {after:.3f}")
    assert after < before - 0.3
