"""Adapters mean what they say: a QLoRA adapter is applied over dequant(NF4(W)) as trained, by inference and by
evaluation alike (kollama.adapters.adapter.apply_adapter), and adapters record the base model and tokenizer they
belong to (kollama.adapters.fingerprint), whatever format that base is stored in."""
import io
import json
from pathlib import Path

import pytest
import torch

from helpers import ENGLISH, random_model, randomize_lora, save_meta, tiny_args, train_tiny_tokenizer
from kollama.adapters.fingerprint import FingerprintMismatch, base_fingerprint, check_same_base, tokenizer_sha256
from kollama.adapters.lora import LoRALinear, apply_lora, load_adapter, merge_and_unload, save_adapter
from kollama.adapters.nf4 import NF4Linear
from kollama.adapters.qlora import merged_dense_state
from kollama.eval import evaluate as E
from kollama.inference import build
from kollama.train.loading import load_qlora_model
from llama import Llama
from llama.checkpoint import reshard
from llama.hf import meta_to_hf
from llama.model import Transformer
from llama.parallel import ParallelLinear
from llama.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = tiny_args(dim=64, n_heads=8, n_kv_heads=4, vocab_size=128)  # every block linear divides into NF4 blocks
TOKENS = torch.arange(14).reshape(2, 7) * 9 % 128
# wk, wo, w1, w3 carry no adapter but are NF4 in training all the same: their rounding has to be reproduced too.
ADAPTED = ("wq", "wv", "w2", "output")


def tol(expected: torch.Tensor) -> float:
    """Applying an adapter folds it into the weights: x (W' + s B A)^T instead of x W'^T + s (x A^T) B^T, the same
    numbers summed in another order, through every layer. In fp32 that moves the logits by a few tens of ulps of
    the largest one (ulp = 2^-23 relative: 4e-6 relative is ~30 ulps; measured ~14 ulps, 1.3e-5 on logits up to
    13.6), while merging a QLoRA adapter onto W instead of dequant(NF4(W)) moves them by whole units (printed)."""
    return 4e-6 * expected.abs().max().item()


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model.eval()(tokens, 0, use_cache=False)


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    tok = train_tiny_tokenizer(d / "tok.model", vocab_size=128)
    ckpt = save_meta(random_model(ARGS, seed=4), d / "base")
    return dict(dir=d, tok=str(tok), ckpt=str(ckpt))


def train_adapter(base, out: Path, nf4: bool, seed: int = 5):
    """An adapter with non-zero B over the base as the trainer loads it (kollama.train.loading.load_qlora_model for
    QLoRA: every block linear NF4), saved as kollama.train.checkpointing.write_outputs saves it. Returns (adapter dir,
    the training-time model, eval mode)."""
    if nf4:
        model, _, _ = load_qlora_model(base["ckpt"], Tokenizer(base["tok"]), 32, torch.device("cpu"), None)
    else:
        model = random_model(ARGS, seed=4)
    torch.manual_seed(seed)
    randomize_lora(apply_lora(model, ADAPTED, r=4, alpha=8, dropout=0.0), seed=seed, std=0.3)
    config = {"base_model": base["ckpt"], **({"base_quantization": "nf4"} if nf4 else {})}
    save_adapter(model, out, config, base=base_fingerprint(base["ckpt"]),
                 tokenizer_sha256=tokenizer_sha256(base["tok"]))
    return out, model.eval()


@pytest.fixture(scope="module")
def qlora(base):
    return train_adapter(base, base["dir"] / "qlora_adapter", nf4=True)


@pytest.fixture(scope="module")
def lora(base):
    return train_adapter(base, base["dir"] / "lora_adapter", nf4=False, seed=6)


# ------------------------------------------------------------------------------------------------ QLoRA as trained

def test_qlora_adapter_is_applied_over_the_nf4_base(base, qlora):
    adapter, trained = qlora
    assert json.loads((adapter / "adapter_config.json").read_text())["base_quantization"] == "nf4"
    assert isinstance(trained.layers[0].attention.wk.local_linear, NF4Linear)  # NF4 without an adapter
    expected = logits(trained)

    inference = build(base["ckpt"], base["tok"], 32, 2, device="cpu", lora_path=str(adapter)).model
    assert not any(isinstance(m, LoRALinear) for m in inference.modules())
    assert all(m.weight is not None for m in inference.modules() if isinstance(m, ParallelLinear))  # dense again

    # kollama.evaluate --lora_path: Llama.build, then attach_lora (the call evaluate() makes)
    evaluation = Llama.build(base["ckpt"], base["tok"], 32, 2, device="cpu").model
    evaluation = E.attach_lora(evaluation, adapter, ckpt_dir=base["ckpt"], tokenizer_path=base["tok"])

    # What applying it onto the dense W would give (what a plain load_adapter + merge does).
    dense = merge_and_unload(load_adapter(random_model(ARGS, seed=4), adapter))
    d_inf, d_eval, d_dense = (max_diff(logits(m), expected) for m in (inference, evaluation, dense))
    print(f"QLoRA adapter vs training-time logits: inference.build {d_inf:.2e}, evaluate {d_eval:.2e}; "
          f"merged onto dense W instead: {d_dense:.2e} (largest logit {expected.abs().max().item():.2f})")
    assert d_inf <= tol(expected) and d_eval <= tol(expected)
    assert d_dense > 1000 * tol(expected)  # the test can tell the two bases apart


def test_qlora_inference_equals_the_trainers_merged_export(base, qlora):
    """apply_adapter folds to exactly the numbers write_outputs(--merge) writes (merged_dense_state)."""
    adapter, trained = qlora
    applied = build(base["ckpt"], base["tok"], 32, 2, device="cpu", lora_path=str(adapter)).model
    exported = merged_dense_state(trained)
    state = applied.state_dict()
    assert exported.keys() == state.keys()
    assert all(torch.equal(exported[k], state[k]) for k in state)


# ------------------------------------------------------------------------------------------------ evaluate --lora_path

def _bpc(base, out: Path, ckpt, **kw) -> float:
    text = base["dir"] / "text.txt"
    text.write_text("\n".join(ENGLISH) + "\n")
    res = E.evaluate(str(ckpt), base["tok"], tasks="bpc", text_files=[str(text)], out=str(out), max_seq_len=64,
                     batch_size=2, device="cpu", dtype="fp32", progress=False, **kw)
    return res["tasks"]["bpc"]["text"]["bits_per_char"]


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_evaluate_with_lora_path_equals_the_merged_model(base, kind, request, tmp_path):
    adapter, trained = request.getfixturevalue(kind)
    merged = Transformer(ARGS)  # the trained model written out as a dense checkpoint
    merged.load_state_dict(merged_dense_state(trained))
    merged_ckpt = save_meta(merged, tmp_path / "merged")
    with_adapter = _bpc(base, tmp_path / "a.json", base["ckpt"], lora_path=str(adapter))
    without = _bpc(base, tmp_path / "b.json", base["ckpt"])
    reference = _bpc(base, tmp_path / "c.json", merged_ckpt)
    print(f"{kind}: bits/char base {without:.6f}, with --lora_path {with_adapter:.6f}, merged model {reference:.6f}")
    assert abs(with_adapter - without) > 1e-3
    assert with_adapter == pytest.approx(reference, rel=1e-6)
    meta = json.loads((tmp_path / "a.json").read_text())["meta"]
    assert meta["lora_path"] == str(adapter)


# ------------------------------------------------------------------------------------------------ fingerprints

def test_fingerprint_is_the_same_in_every_format(base, tmp_path):
    src = Path(base["ckpt"])
    folders = {
        "meta pth": src,
        "meta safetensors": save_meta(random_model(ARGS, seed=4), tmp_path / "st", fmt="safetensors"),
        "2 shards": save_meta(random_model(ARGS, seed=4), tmp_path / "mp2", mp=2),
        "resharded 4": reshard(src, tmp_path / "rs4", 4, fmt="safetensors"),
        "hf": meta_to_hf(src, tmp_path / "hf", show_progress=False),
        "hf, 9 files": meta_to_hf(src, tmp_path / "hf9", max_shard_size="40KB", show_progress=False),
    }
    assert len(list((tmp_path / "hf9").glob("model-*.safetensors"))) > 2
    prints = {name: base_fingerprint(path) for name, path in folders.items()}
    reference = prints["meta pth"]
    assert reference["params"] == {"dim": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 4, "vocab_size": 128,
                                   "ffn_hidden_dim": ARGS.ffn_hidden_dim, "norm_eps": 1e-5, "rope_theta": 10000.0}
    assert all(p == reference for p in prints.values()), {n: p["digest"][:12] for n, p in prints.items()}


def test_fingerprint_reads_only_its_sample(base, tmp_path, monkeypatch):
    """Safetensors files are read with pread: the headers plus 4 blocks of 64 values per matrix, 64 per norm."""
    import kollama.adapters.fingerprint as FP

    hf = meta_to_hf(base["ckpt"], tmp_path / "hf", show_progress=False)
    sizes = []
    real_pread = FP.os.pread
    monkeypatch.setattr(FP.os, "pread", lambda fd, n, offset: sizes.append(n) or real_pread(fd, n, offset))
    FP.base_fingerprint(hf)
    header = 8 + sizes[1]  # the first file's length prefix and header (there is one file)
    n_matrices, n_norms = 2 + 7 * ARGS.n_layers, 1 + 2 * ARGS.n_layers
    assert sum(sizes) - header == 4 * (n_matrices * 4 * 64 + n_norms * 64)  # fp32: 4 bytes a value
    assert sum(sizes) < (hf / "model.safetensors").stat().st_size / 10


def test_fingerprint_sees_changed_weights_and_dtype(base, tmp_path):
    reference = base_fingerprint(base["ckpt"])
    changed = random_model(ARGS, seed=4)
    with torch.no_grad():
        w2 = changed.layers[1].feed_forward.w2.weight
        w2.add_(1e-3 * torch.randn_like(w2))
    assert base_fingerprint(save_meta(changed, tmp_path / "w2"))["digest"] != reference["digest"]

    merged = merge_and_unload(randomize_lora(apply_lora(random_model(ARGS, seed=4), ("wv",), r=2), seed=1))
    assert base_fingerprint(save_meta(merged, tmp_path / "merged"))["digest"] != reference["digest"]

    # float32 values are hashed: a bf16 model and its fp32 copy are the same model; the bf16 and the fp16 roundings
    # of the fp32 base are two other models.
    bf16 = save_meta(random_model(ARGS, seed=4).to(torch.bfloat16), tmp_path / "bf16")
    bf16_as_fp32 = save_meta(random_model(ARGS, seed=4).to(torch.bfloat16).float(), tmp_path / "bf16_fp32")
    fp16 = save_meta(random_model(ARGS, seed=4).half(), tmp_path / "fp16")
    digests = [base_fingerprint(p)["digest"] for p in (bf16, bf16_as_fp32, fp16)]
    assert digests[0] == digests[1] and len({digests[0], digests[2], reference["digest"]}) == 3


def other_tokenizer(path: Path) -> Path:
    """Same vocabulary size as the base's (so Llama.build accepts it), trained on other text: other pieces."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([s.upper() for s in ENGLISH] * 20), model_writer=buf, vocab_size=128,
        model_type="bpe", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=True,
        minloglevel=2, num_threads=1)
    path.write_bytes(buf.getvalue())
    return path


def test_tokenizer_sha256(base, tmp_path):
    same = tmp_path / "copy.model"
    same.write_bytes(Path(base["tok"]).read_bytes())
    assert tokenizer_sha256(same) == tokenizer_sha256(base["tok"])
    assert tokenizer_sha256(other_tokenizer(tmp_path / "other.model")) != tokenizer_sha256(base["tok"])


# ------------------------------------------------------------------------------------------------ mismatches

def test_adapter_on_another_base_stops_with_both_named(base, lora, tmp_path):
    adapter, _ = lora
    other = save_meta(random_model(ARGS, seed=99), tmp_path / "other")
    recorded, actual = base_fingerprint(base["ckpt"])["digest"], base_fingerprint(other)["digest"]
    with pytest.raises(FingerprintMismatch) as e:
        build(str(other), base["tok"], 32, 2, device="cpu", lora_path=str(adapter))
    message = str(e.value)
    print(message)
    assert "\n" not in message and str(adapter) in message and str(other) in message
    assert recorded[:12] in message and actual[:12] in message and "--allow_base_mismatch" in message
    assert "dim 64, 2 layers" in message

    with pytest.raises(FingerprintMismatch, match=f"trained on base {recorded[:12]}.*is base {actual[:12]}"):
        _bpc(base, tmp_path / "x.json", other, lora_path=str(adapter))

    with pytest.warns(UserWarning, match="allow_base_mismatch"):
        model = build(str(other), base["tok"], 32, 2, device="cpu", lora_path=str(adapter),
                      allow_base_mismatch=True).model
    reference = merge_and_unload(load_adapter(random_model(ARGS, seed=99), adapter))
    expected = logits(reference)
    assert max_diff(logits(model), expected) <= tol(expected)  # loaded all the same


def test_adapter_with_another_tokenizer_stops(base, lora, tmp_path):
    adapter, _ = lora
    tok = other_tokenizer(tmp_path / "other.model")
    with pytest.raises(FingerprintMismatch, match=f"with tokenizer {tokenizer_sha256(base['tok'])[:12]}.*"
                                                  f"pass the tokenizer it was trained with"):
        build(base["ckpt"], str(tok), 32, 2, device="cpu", lora_path=str(adapter))


def test_adapters_without_a_record_still_load(base, tmp_path):
    old = random_model(ARGS, seed=4)
    randomize_lora(apply_lora(old, ADAPTED, r=4, alpha=8, dropout=0.0), seed=3)
    save_adapter(old, tmp_path / "old")  # as written before the base was recorded
    with pytest.warns(UserWarning, match="does not record which base"):
        model = build(base["ckpt"], base["tok"], 32, 2, device="cpu", lora_path=str(tmp_path / "old")).model
    expected = logits(old)
    assert max_diff(logits(model), expected) <= tol(expected)
    with pytest.warns(UserWarning, match="older version"):  # nothing recorded: nothing to compare
        check_same_base({"r": 4}, {"base": {"digest": "ab"}}, "adapter x", "--y")


def test_save_adapter_refuses_a_malformed_base(tmp_path):
    model = apply_lora(random_model(ARGS, seed=4), ("wq",), r=2)
    with pytest.raises(ValueError, match="base_fingerprint"):
        save_adapter(model, tmp_path / "a", base={"digest": "ab"})
