"""Meta checkpoints: any shard count on one process, resharding, llama2.c, and every bad input of Llama.build."""
import json
import os
import shutil

import pytest
import torch

from helpers import params_of, random_model, save_meta, tiny_args, train_tiny_tokenizer
from llama import Llama
from llama.checkpoint import CheckpointError, open_shards, read_slice, reshard
from llama.llama2c import read_llama2c, write_llama2c

ARGS = tiny_args(dim=64, n_heads=8, n_kv_heads=4, vocab_size=128)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tok.model", vocab_size=ARGS.vocab_size)


@pytest.fixture(scope="module")
def model():
    return random_model(ARGS, seed=5)


def build(ckpt, tokenizer, **kw):
    return Llama.build(str(ckpt), str(tokenizer), max_seq_len=32, max_batch_size=2, device="cpu", **kw)


def full_state(ckpt):
    readers = open_shards(ckpt)
    return {k: read_slice(readers, k, 0, 1) for k in readers[0].keys()}


@pytest.mark.parametrize("mp,fmt", [(1, "pth"), (2, "pth"), (4, "safetensors")])
def test_any_shard_count_loads_on_one_process(tmp_path, model, tokenizer, mp, fmt):
    ckpt = save_meta(model, tmp_path / "ckpt", mp=mp, fmt=fmt)
    llama = build(ckpt, tokenizer)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(llama.model(tokens, 0), model(tokens, 0))


def test_reshard_round_trip_is_bit_exact(tmp_path, model):
    src = save_meta(model, tmp_path / "mp1", mp=1)
    two = reshard(src, tmp_path / "mp2", 2)
    assert sorted(p.name for p in two.iterdir()) == [
        "checklist.chk", "consolidated.00.pth", "consolidated.01.pth", "params.json"]
    four = reshard(two, tmp_path / "mp4", 4)
    back = reshard(four, tmp_path / "back", 1, fmt="safetensors")
    ref = model.state_dict()
    got = full_state(back)
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    # the shard files split along Meta's dims
    shard0 = torch.load(two / "consolidated.00.pth", weights_only=True)
    assert shard0["layers.0.attention.wq.weight"].shape == (ARGS.dim // 2, ARGS.dim)
    assert shard0["layers.0.attention.wo.weight"].shape == (ARGS.dim, ARGS.dim // 2)
    assert shard0["tok_embeddings.weight"].shape == (ARGS.vocab_size, ARGS.dim // 2)
    assert torch.equal(shard0["norm.weight"], ref["norm.weight"])
    lines = (two / "checklist.chk").read_text().split("\n")
    assert any(line.endswith("  consolidated.01.pth") and len(line.split()[0]) == 32 for line in lines)


def test_reshard_refuses_a_count_that_does_not_divide_the_heads(tmp_path, model):
    src = save_meta(model, tmp_path / "mp1", mp=1)
    with pytest.raises(CheckpointError, match="cannot split 8 attention heads and 4 kv heads"):
        reshard(src, tmp_path / "mp3", 3)
    assert not (tmp_path / "mp3").exists()


def test_write_refuses_a_non_empty_destination(tmp_path, model):
    src = save_meta(model, tmp_path / "mp1", mp=1)
    keep = tmp_path / "dst"
    keep.mkdir()
    (keep / "precious.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty.*--overwrite"):
        reshard(src, keep, 2)
    assert (keep / "precious.txt").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_llama2c_round_trip(tmp_path, model):
    path = write_llama2c(tmp_path / "m.bin", params_of(ARGS), model.state_dict(), seq_len=32)
    params, state = read_llama2c(path)
    assert params["dim"] == ARGS.dim and params["n_kv_heads"] == ARGS.n_kv_heads
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    # header: 7 int32, negative vocab because the classifier is not shared
    header = torch.frombuffer(bytearray(path.read_bytes()[:28]), dtype=torch.int32).tolist()
    assert header == [ARGS.dim, ARGS.ffn_hidden_dim, ARGS.n_layers, ARGS.n_heads, ARGS.n_kv_heads, -128, 32]


def test_llama2c_truncated_file_is_refused(tmp_path, model):
    path = write_llama2c(tmp_path / "m.bin", params_of(ARGS), model.state_dict(), seq_len=32)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        read_llama2c(path)


# ------------------------------------------------------------------------------------------------------------
# Bad input to Llama.build: each a clear error naming the problem.
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture
def ckpt(tmp_path, model):
    return save_meta(model, tmp_path / "ckpt", mp=2)


def test_missing_ckpt_dir(tmp_path, tokenizer):
    with pytest.raises(CheckpointError, match="params.json is missing|does not exist"):
        build(tmp_path / "nope", tokenizer)


def test_no_shards(ckpt, tokenizer):
    for p in ckpt.glob("consolidated.*"):
        p.unlink()
    with pytest.raises(CheckpointError, match="no consolidated.NN.pth"):
        build(ckpt, tokenizer)


def test_missing_params(ckpt, tokenizer):
    (ckpt / "params.json").unlink()
    with pytest.raises(CheckpointError, match="params.json is missing"):
        build(ckpt, tokenizer)


def test_malformed_params(ckpt, tokenizer):
    (ckpt / "params.json").write_text('{"dim": 48,')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        build(ckpt, tokenizer)


def test_unknown_params_key(ckpt, tokenizer):
    params = json.loads((ckpt / "params.json").read_text())
    (ckpt / "params.json").write_text(json.dumps({**params, "use_scaled_rope": True}))
    with pytest.raises(CheckpointError, match=r"unknown keys \['use_scaled_rope'\]"):
        build(ckpt, tokenizer)


def test_shapes_disagree_with_params(ckpt, tokenizer):
    params = json.loads((ckpt / "params.json").read_text())
    (ckpt / "params.json").write_text(json.dumps({**params, "multiple_of": 96}))
    with pytest.raises(CheckpointError, match="feed_forward.w1.weight.*params.json and the shards disagree"):
        build(ckpt, tokenizer)
    # The converters open the same way, so none of them writes a model whose config contradicts its tensors.
    from llama.checkpoint import reshard
    from llama.convert import meta_to_hf, to_llama2c

    for convert in (lambda: reshard(ckpt, ckpt.parent / "r", 1), lambda: meta_to_hf(str(ckpt), str(ckpt.parent / "h")),
                    lambda: to_llama2c(str(ckpt), str(ckpt.parent / "m.bin"))):
        with pytest.raises(CheckpointError, match="params.json and the shards disagree"):
            convert()
    assert sorted(p.name for p in ckpt.parent.iterdir()) == [ckpt.name]


def test_missing_shard_in_the_numbering(ckpt, tokenizer):
    shutil.move(ckpt / "consolidated.01.pth", ckpt / "consolidated.02.pth")
    with pytest.raises(CheckpointError, match=r"shard numbers .* are \[0, 2\]"):
        build(ckpt, tokenizer)


def test_heads_not_divisible_by_model_parallel_size(tmp_path, tokenizer):
    args = tiny_args(dim=40, n_heads=5, n_kv_heads=None)
    ckpt = save_meta(random_model(args), tmp_path / "c", mp=1)
    with pytest.raises(CheckpointError, match="cannot split 5 attention heads"):
        reshard(ckpt, tmp_path / "c2", 2)


def test_missing_tokenizer(ckpt, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer model not found.*--tokenizer_path"):
        build(ckpt, tmp_path / "missing.model")


def test_tokenizer_vocab_differs_from_checkpoint(tmp_path, model):
    ckpt = save_meta(model, tmp_path / "ckpt", mp=1)
    small = train_tiny_tokenizer(tmp_path / "small.model", vocab_size=100)
    with pytest.raises(CheckpointError, match="100 pieces but the checkpoint has 128 embedding rows"):
        build(ckpt, small)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_with_code_is_refused(ckpt, tokenizer):
    torch.save({"tok_embeddings.weight": torch.zeros(2), "x": Evil()}, ckpt / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="refused to load .*weights_only"):
        build(ckpt, tokenizer)


def test_llama2c_round_trip_is_byte_exact_by_default(test_data, tmp_path):
    """llama2c -> Meta folder -> to_llama2c with no --seq_len gives back the very same file (the rotary tables'
    length travels in llama2c.json beside the weights)."""
    from conftest import need
    from llama.convert import llama2c, to_llama2c

    (bin_,) = need(test_data, "stories260K.bin")
    llama2c(str(bin_), str(tmp_path / "ckpt"))
    to_llama2c(str(tmp_path / "ckpt"), str(tmp_path / "back.bin"))
    assert (tmp_path / "back.bin").read_bytes() == bin_.read_bytes()
