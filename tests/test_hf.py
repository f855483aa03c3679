"""Hugging Face layout: Meta <-> HF conversion (bit-exact round trips, sharded writer), transformers loading our
export and we loading transformers' save_pretrained, per-rank slicing, tokenizer files, and every bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from conftest import need
from helpers import (ENGLISH, free_port, hf_model, hf_state_dict, random_model, save_meta, tiny_args,
                     train_tiny_tokenizer)
from llama import Llama
from llama.checkpoint import CheckpointError, open_shards, read_params, read_slice, split_tensor
from llama.loading import open_checkpoint
from llama.convert import llama2c
from llama.hf import HFCheckpoint, hf_to_meta, meta_to_hf
from llama.model import ModelArgs
from llama.tokenizer import Tokenizer
from mp_workers import PROMPTS, TOKENS, generation_worker

ROOT = Path(__file__).resolve().parents[1]
MHA = tiny_args(dim=48, n_heads=6, n_kv_heads=None, vocab_size=128)
GQA = tiny_args(dim=64, n_heads=8, n_kv_heads=4, vocab_size=128, rope_theta=50000.0)
KOREAN = ["옛날 옛적에 작은 마을에 한 소녀가 살았습니다.", "한국어 문장도 똑같이 나뉘어야 합니다!"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=128)


@pytest.fixture(scope="module")
def models():
    return {"mha": random_model(MHA, seed=1), "gqa": random_model(GQA, seed=2)}


def meta_state(ckpt):
    readers = open_shards(ckpt)
    return {k: read_slice(readers, k, 0, 1) for k in readers[0].keys()}


def hf_files(folder):
    state = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def leftovers(parent):
    return [p.name for p in Path(parent).iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def logits_of(model, tokens):
    with torch.no_grad():
        return model(tokens, 0)


def hf_logits(folder, tokens):
    from transformers import LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(str(folder), attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(tokens).logits


# ------------------------------------------------------------------------------------------------------------
# Round trips
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mha", "gqa"])
@pytest.mark.parametrize("mp,fmt", [(1, "pth"), (1, "safetensors"), (2, "pth"), (2, "safetensors")])
def test_meta_hf_meta_is_bit_exact(tmp_path, models, tokenizer, kind, mp, fmt):
    model = models[kind]
    src = save_meta(model, tmp_path / "meta", mp=mp, fmt=fmt, extra_files=[tokenizer])
    hf = meta_to_hf(src, tmp_path / "hf", show_progress=False)
    # the HF tensors are exactly the ones transformers' own conversion script makes (helpers' reference)
    ref = hf_state_dict(model.state_dict(), model.params)
    got = hf_files(hf)
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    back = hf_to_meta(hf, tmp_path / "back", mp=mp, fmt=fmt, show_progress=False)
    assert sorted(p.name for p in back.glob("consolidated.*")) == [f"consolidated.{i:02d}.{fmt}" for i in range(mp)]
    state = meta_state(back)
    assert set(state) == set(model.state_dict())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    params = read_params(back)
    want = read_params(src)
    for key in ("dim", "n_layers", "n_heads", "vocab_size", "norm_eps", "rope_theta"):
        assert params[key] == want[key], key
    assert (params.get("n_kv_heads") or params["n_heads"]) == model.params.kv_heads
    assert ModelArgs(**params).ffn_hidden_dim == model.params.ffn_hidden_dim
    assert (back / "tokenizer.model").read_bytes() == tokenizer.read_bytes()
    assert leftovers(tmp_path) == []


def test_sharded_writer_round_trips_and_loads_in_transformers(tmp_path, models):
    model = models["gqa"]
    src = save_meta(model, tmp_path / "meta", mp=1, fmt="safetensors")
    limit = 20_000
    hf = meta_to_hf(src, tmp_path / "hf", max_shard_size=limit, show_progress=False)
    files = sorted(hf.glob("model-*.safetensors"))
    assert len(files) > 3 and not (hf / "model.safetensors").exists()
    n = len(files)
    assert [f.name for f in files] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    for f in files:  # each file within the limit unless it holds one tensor that alone exceeds it
        tensors = load_file(str(f))
        data = sum(t.numel() * t.element_size() for t in tensors.values())
        assert data <= limit or len(tensors) == 1
        assert all(index["weight_map"][k] == f.name for k in tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.state_dict().values())
    back = hf_to_meta(hf, tmp_path / "back", show_progress=False)
    assert all(torch.equal(meta_state(back)[k], v) for k, v in model.state_dict().items())
    tokens = torch.randint(0, GQA.vocab_size, (2, 11))
    assert (hf_logits(hf, tokens) - logits_of(model, tokens)).abs().max().item() <= 1e-4


def test_bfloat16_export(tmp_path, models):
    model = models["mha"]
    src = save_meta(model, tmp_path / "meta", mp=1)
    hf = meta_to_hf(src, tmp_path / "hf", dtype="bfloat16", show_progress=False)
    assert json.loads((hf / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in hf_files(hf).values())
    state = meta_state(hf_to_meta(hf, tmp_path / "back", show_progress=False))
    assert all(torch.equal(state[k], v.to(torch.bfloat16)) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------------------------
# transformers loads ours; we load transformers'
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, models, tokenizer, kind):
    model = models[kind]
    src = save_meta(model, tmp_path / "meta", mp=2, fmt="pth", extra_files=[tokenizer])
    hf = meta_to_hf(src, tmp_path / "hf", show_progress=False)
    config = json.loads((hf / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is False
    assert config["intermediate_size"] == model.params.ffn_hidden_dim and config["max_position_embeddings"] == 4096
    tokens = torch.randint(0, model.params.vocab_size, (2, 13))
    assert (hf_logits(hf, tokens) - logits_of(model, tokens)).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def saved_by_transformers(tmp_path_factory, models, tokenizer):
    """GQA model written by transformers' save_pretrained: one file and sharded, with our tokenizer beside."""
    model = models["gqa"]
    ref = hf_model(model.state_dict(), GQA, GQA.ffn_hidden_dim)
    root = tmp_path_factory.mktemp("saved")
    ref.save_pretrained(root / "one")
    ref.save_pretrained(root / "sharded", max_shard_size="20KB")
    for d in ("one", "sharded"):
        (root / d / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    return root


@pytest.mark.parametrize("layout", ["one", "sharded"])
def test_save_pretrained_folder_loads_in_llama_build(saved_by_transformers, models, tokenizer, layout):
    folder = saved_by_transformers / layout
    assert (folder / ("model.safetensors" if layout == "one" else "model.safetensors.index.json")).is_file()
    llama = Llama.build(str(folder), str(tokenizer), max_seq_len=32, max_batch_size=2, device="cpu")
    tokens = torch.randint(0, GQA.vocab_size, (2, 9))
    assert torch.equal(logits_of(llama.model, tokens), logits_of(models["gqa"], tokens))
    assert llama.model.params.rope_theta == GQA.rope_theta


def test_save_pretrained_folder_converts_to_meta(saved_by_transformers, models, tmp_path):
    back = hf_to_meta(saved_by_transformers / "sharded", tmp_path / "meta", mp=2, fmt="pth", show_progress=False)
    state = meta_state(back)
    assert all(torch.equal(state[k], v) for k, v in models["gqa"].state_dict().items())
    shard0 = torch.load(back / "consolidated.00.pth", weights_only=True)
    assert shard0["layers.0.attention.wk.weight"].shape == (GQA.kv_heads * GQA.head_dim // 2, GQA.dim)


@pytest.mark.parametrize("world", [2, 4])
def test_hf_local_state_dict_slices_whole_heads_per_rank(saved_by_transformers, models, world):
    ckpt = open_checkpoint(saved_by_transformers / "sharded")
    assert isinstance(ckpt, HFCheckpoint) and ckpt.vocab_size == GQA.vocab_size
    full = models["gqa"].state_dict()
    for rank in range(world):
        expected = {k: split_tensor(k, v, world)[rank] for k, v in full.items()}
        got = ckpt.local_state_dict(expected, rank, world)
        assert all(torch.equal(got[k], expected[k]) for k in expected), rank


def test_hf_folder_on_two_processes(saved_by_transformers, tokenizer, tmp_path):
    folder = str(saved_by_transformers / "one")
    mp.spawn(generation_worker, args=(2, free_port(), {"hf": folder}, str(tokenizer), str(tmp_path)), nprocs=2,
             join=True)
    single = Llama.build(folder, str(tokenizer), max_seq_len=32, max_batch_size=3, device="cpu")
    ref = logits_of(single.model, TOKENS)
    greedy, _ = single.generate(PROMPTS, 8, temperature=0)
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)["hf"]
        assert (r["logits"] - ref).abs().max().item() < 1e-5 and r["greedy"] == greedy


def test_tied_embeddings_are_copied_to_output(tmp_path, saved_by_transformers, models):
    folder = tmp_path / "tied"
    folder.mkdir()
    config = json.loads((saved_by_transformers / "one" / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    state = load_file(str(saved_by_transformers / "one" / "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    back = meta_state(hf_to_meta(folder, tmp_path / "meta", mp=2, show_progress=False))
    assert torch.equal(back["output.weight"], models["gqa"].state_dict()["tok_embeddings.weight"])


def test_cli_aliases_and_plain_progress(tmp_path, models, tokenizer):
    src = save_meta(models["mha"], tmp_path / "meta", mp=2, extra_files=[tokenizer])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # tqdm hidden: the progress falls back to a plain counter on stderr
    code = ("import sys; sys.modules['tqdm'] = None; from llama.convert import main; sys.argv[0] = 'convert'; "
            "main()")
    run = subprocess.run([sys.executable, "-c", code, "meta-to-hf", str(src), str(tmp_path / "hf"),
                          "--max_shard_size", "30KB"], env=env, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "meta_to_hf: 21/21 tensors" in run.stderr
    run = subprocess.run([sys.executable, "-m", "llama.convert", "hf_to_meta", str(tmp_path / "hf"),
                          str(tmp_path / "back"), "--mp", "2", "--fmt", "pth"], env=env, capture_output=True,
                         text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert len(list((tmp_path / "back").glob("consolidated.*.pth"))) == 2
    assert all(torch.equal(meta_state(tmp_path / "back")[k], v) for k, v in models["mha"].state_dict().items())


# ------------------------------------------------------------------------------------------------------------
# Tokenizer files
# ------------------------------------------------------------------------------------------------------------
def check_tokenizer_loads(folder, tokenizer_model, texts):
    from transformers import AutoTokenizer, LlamaTokenizer

    ours = Tokenizer(str(tokenizer_model))
    for cls in (LlamaTokenizer, AutoTokenizer):
        theirs = cls.from_pretrained(str(folder))
        assert theirs.bos_token_id == ours.bos_id and theirs.eos_token_id == ours.eos_id
        for text in texts:
            assert theirs(text).input_ids == ours.encode(text, bos=True, eos=False), (cls.__name__, text)


def test_tiny_tokenizer_loads_in_transformers(tmp_path, models, tokenizer):
    src = save_meta(models["mha"], tmp_path / "meta", extra_files=[tokenizer])
    hf = meta_to_hf(src, tmp_path / "hf", show_progress=False)
    assert {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"} <= {p.name for p in hf.iterdir()}
    check_tokenizer_loads(hf, tokenizer, ["Once upon a time"] + ENGLISH[:2])


def test_real_llama2_tokenizer_survives_the_round_trip(test_data, tmp_path):
    (tok_path,) = need(test_data, "tokenizer.model")
    ours = Tokenizer(str(tok_path))
    args = tiny_args(vocab_size=ours.n_words, dim=32, n_heads=4, n_kv_heads=2, n_layers=1)
    src = save_meta(random_model(args), tmp_path / "meta", extra_files=[tok_path])
    hf = meta_to_hf(src, tmp_path / "hf", tokenizer=str(tok_path), show_progress=False)
    config = json.loads((hf / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("<s>", "</s>", "<unk>")
    assert ours.encode("Once upon a time", bos=True, eos=False) == [1, 9038, 2501, 263, 931]
    check_tokenizer_loads(hf, tok_path, ["Once upon a time"] + ENGLISH + KOREAN)
    back = hf_to_meta(hf, tmp_path / "back", show_progress=False)
    assert (back / "tokenizer.model").read_bytes() == tok_path.read_bytes()


def test_stories260k_round_trip(test_data, tmp_path):
    model_bin, tok = need(test_data, "stories260K.bin", "tok512.model")
    meta = Path(llama2c(str(model_bin), str(tmp_path / "meta"), tokenizer=str(tok)))
    hf = meta_to_hf(meta, tmp_path / "hf", tokenizer=str(tok), max_position_embeddings=512, show_progress=False)
    back = hf_to_meta(hf, tmp_path / "back", mp=2, fmt="pth", show_progress=False)
    original, again = meta_state(meta), meta_state(back)
    assert set(original) == set(again) and all(torch.equal(original[k], again[k]) for k in original)
    llama = Llama.build(str(hf), str(tok), max_seq_len=64, max_batch_size=1, device="cpu")
    tokens = torch.tensor([llama.tokenizer.encode("Once upon a time", bos=True, eos=False)])
    assert (hf_logits(hf, tokens) - logits_of(llama.model, tokens)).abs().max().item() <= 1e-4
    check_tokenizer_loads(hf, tok, ["Once upon a time there was a little girl."])


# ------------------------------------------------------------------------------------------------------------
# Bad input: a clear error, no DST, no temporary folder
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture
def hf_folder(tmp_path, saved_by_transformers):
    """A private copy of the sharded save_pretrained folder, to damage."""
    folder = tmp_path / "src"
    folder.mkdir()
    for p in (saved_by_transformers / "sharded").iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    return folder


def refuses(tmp_path, match, fn, *args, **kwargs):
    with pytest.raises(CheckpointError, match=match):
        fn(*args, tmp_path / "dst", show_progress=False, **kwargs)
    assert not (tmp_path / "dst").exists()
    assert leftovers(tmp_path) == []


def test_unknown_layout(tmp_path, tokenizer):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"not a checkpoint folder: found \['weights.bin'\].*config.json"):
        open_checkpoint(folder)
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        Llama.build(str(folder), str(tokenizer), max_seq_len=8, max_batch_size=1, device="cpu")
    refuses(tmp_path, "config.json is missing", hf_to_meta, folder)
    refuses(tmp_path, "params.json is missing", meta_to_hf, folder)


def test_config_without_required_fields(tmp_path, hf_folder):
    config = json.loads((hf_folder / "config.json").read_text())
    del config["intermediate_size"], config["num_hidden_layers"]
    (hf_folder / "config.json").write_text(json.dumps(config))
    refuses(tmp_path, r"lacks the required fields \['intermediate_size', 'num_hidden_layers'\]", hf_to_meta,
            hf_folder)


def test_config_and_weights_disagree(tmp_path, hf_folder):
    config = json.loads((hf_folder / "config.json").read_text())
    (hf_folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    refuses(tmp_path, r"does not match its config.json: missing \['model.layers.2\.", hf_to_meta,
            hf_folder)
    (hf_folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 256}))
    refuses(tmp_path, r"gate_proj.weight has shape \(176, 64\) but config.json implies \(256, 64\)", hf_to_meta,
            hf_folder)


def test_unsupported_config(tmp_path, hf_folder):
    config = json.loads((hf_folder / "config.json").read_text())
    (hf_folder / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_type": "llama3"}}))
    refuses(tmp_path, "rope scaling 'llama3'", hf_to_meta, hf_folder)


def test_index_pointing_at_a_missing_file(tmp_path, hf_folder):
    victim = sorted(p.name for p in hf_folder.glob("model-*.safetensors"))[1]
    (hf_folder / victim).unlink()
    refuses(tmp_path, f"points at {victim}, which is missing", hf_to_meta, hf_folder)


def test_pytorch_bin_weights_are_not_read(tmp_path, hf_folder):
    for p in hf_folder.glob("model*"):
        p.unlink()
    (hf_folder / "pytorch_model.bin").write_bytes(b"x")
    refuses(tmp_path, "neither model.safetensors nor .*safe_serialization=True", hf_to_meta, hf_folder)


def test_unsupported_dtype(tmp_path, models):
    src = save_meta(models["mha"], tmp_path / "meta")
    refuses(tmp_path, "dtype 'int8' is not supported", meta_to_hf, src, dtype="int8")


def test_shard_count_that_cannot_split_the_heads(tmp_path, hf_folder):
    refuses(tmp_path, "3 shards cannot split 8 attention heads and 4 kv heads", hf_to_meta, hf_folder, mp=3)


def test_shard_count_that_cannot_split_the_ffn(tmp_path, models):
    src = save_meta(models["mha"], tmp_path / "meta")  # 6 heads but 128 FFN and vocabulary rows
    hf = meta_to_hf(src, tmp_path / "hf", show_progress=False)
    refuses(tmp_path, "w1.weight has 128 rows along dim 0, which 3 shards cannot split", hf_to_meta, hf, mp=3)


def test_swapped_directions(tmp_path, hf_folder, models):
    refuses(tmp_path, "is a Hugging Face folder.*use hf_to_meta", meta_to_hf, hf_folder)
    src = save_meta(models["mha"], tmp_path / "meta")
    refuses(tmp_path, "is a Meta folder.*use meta_to_hf", hf_to_meta, src)


def test_non_empty_destination_needs_overwrite(tmp_path, models):
    src = save_meta(models["mha"], tmp_path / "meta")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "precious.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty.*--overwrite"):
        meta_to_hf(src, dst, show_progress=False)
    assert (dst / "precious.txt").read_text() == "mine" and leftovers(tmp_path) == []
    meta_to_hf(src, dst, overwrite=True, show_progress=False)
    assert not (dst / "precious.txt").exists() and (dst / "model.safetensors").is_file()
    assert leftovers(tmp_path) == []


def test_failure_midway_leaves_nothing(tmp_path, models, monkeypatch):
    src = save_meta(models["mha"], tmp_path / "meta")
    import llama.hf

    calls = []

    def broken(*args, **kwargs):
        if len(calls) == 2:
            raise OSError("disk full")
        calls.append(1)
        return save_file(*args, **kwargs)

    monkeypatch.setattr(llama.hf, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        meta_to_hf(src, tmp_path / "dst", max_shard_size="10KB", show_progress=False)
    assert not (tmp_path / "dst").exists() and leftovers(tmp_path) == []
