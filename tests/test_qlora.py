"""QLoRA (--method qlora): gradients through NF4 equal those through the dequantized dense weights, the trainer
lowers the loss, resumes bit for bit and merges into a loadable Meta checkpoint, 2-process tensor parallelism
equals one process, and the stored bits per parameter follow the NF4 storage formula."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file

from helpers import free_port, random_model, randomize_lora, short_lines, tiny_args, tiny_training_base
from kollama import train as T
from kollama.adapters.lora import TARGETS, apply_lora, load_adapter, lora_layers, merged_state_dict, save_adapter
from kollama.adapters.nf4 import NF4Linear
from kollama.adapters.qlora import BLOCK_LINEARS, expected_bits_per_parameter, memory_accounting, quantize_base_nf4
from llama import Llama
from llama.checkpoint import split_tensor
from llama.model import Transformer
from llama.parallel import ParallelLinear
from lora_workers import TOKENS, train_step
from qlora_workers import qlora_tp_worker



pytestmark = pytest.mark.usefixtures("one_thread")


def logits_of(model, tokens=TOKENS):
    with torch.no_grad():
        return model.eval()(tokens, 0, use_cache=False)


def dense_twin(quantized, args, seed):
    """A dense model (same seed) whose block linears hold the dequantized NF4 weights of ``quantized``."""
    dense = random_model(args, seed=seed)
    with torch.no_grad():
        for name, m in quantized.named_modules():
            if isinstance(m, ParallelLinear) and m.weight is None:
                dense.get_submodule(name.replace(".base", "")).weight.copy_(m.local_linear.dequantize(torch.float32))
    return dense


def test_gradients_equal_dense_dequantized_model():
    args = tiny_args(n_layers=3)
    quant = random_model(args, seed=4)
    report = quantize_base_nf4(quant)
    assert report["layers"] == 3 * 7 and report["targets"] == list(BLOCK_LINEARS)
    assert quant.output.weight is not None and quant.tok_embeddings.weight is not None  # kept dense
    dense = dense_twin(quant, args, seed=4)
    grads = []
    for model in (quant, dense):
        torch.manual_seed(5)  # same A init on both
        randomize_lora(apply_lora(model, TARGETS, r=4, alpha=8, dropout=0.0), seed=6).train()
        loss = F.cross_entropy(model(TOKENS[:, :-1], 0, use_cache=False).flatten(0, 1), TOKENS[:, 1:].flatten())
        loss.backward()
        grads.append({f"{p}.{k}": getattr(m, k).grad for p, m in lora_layers(model).items()
                      for k in ("lora_A", "lora_B")})
    diff = max((grads[0][k] - grads[1][k]).abs().max().item() for k in grads[1])
    scale = max(g.abs().max().item() for g in grads[1].values())
    print(f"QLoRA vs dense(dequantized) LoRA gradients: max |diff| {diff:.3e} (largest gradient {scale:.3e}), "
          f"{len(grads[1])} tensors")
    assert all(g is not None for g in grads[0].values()) and diff <= 1e-5
    # Only the adapter trains; the NF4 buffers are not parameters.
    assert {n for n, p in quant.named_parameters() if p.requires_grad} == set(grads[0])
    acct = memory_accounting(quant)
    assert acct["nf4"] == report["stored_bytes"] and acct["optimizer"] == 2 * acct["gradients"]


def test_merge_difference_of_a_quantized_base():
    """Merged QLoRA weight = dequant(NF4(W)) + BA. Against W + BA it differs by the NF4 error alone."""
    args = tiny_args(n_layers=2)
    original = random_model(args, seed=7)
    quant = random_model(args, seed=7)
    report = quantize_base_nf4(quant)
    for model in (quant, original):
        torch.manual_seed(8)
        randomize_lora(apply_lora(model, TARGETS, r=4, alpha=8, dropout=0.0), seed=9)
    merged_q, merged_exact = merged_state_dict(quant), merged_state_dict(original)
    assert merged_q.keys() == merged_exact.keys() == random_model(args).state_dict().keys()
    quantized_keys = [k for k in merged_q if k.rsplit(".", 2)[-2] in BLOCK_LINEARS]
    max_delta = max((merged_q[k] - merged_exact[k]).abs().max().item() for k in quantized_keys)
    assert all(torch.equal(merged_q[k], merged_exact[k]) for k in merged_q if k not in quantized_keys)
    assert max_delta == pytest.approx(report["max_abs_error"], abs=1e-6)  # the update cancels: only NF4 error left

    def build(state):
        model = Transformer(args)
        model.load_state_dict(state)
        return model

    in_memory = logits_of(quant)
    from_merged_q, from_exact = logits_of(build(merged_q)), logits_of(build(merged_exact))
    logit_diff = (from_merged_q - from_exact).abs().max().item()
    print(f"merge into NF4 base (tiny model, weights std 0.2): max |dequant(NF4(W)) + BA - (W + BA)| = {max_delta:.4f}"
          f" (relative RMS NF4 error {report['rel_rms_error']:.4f}); logits vs W + BA: max |diff| {logit_diff:.4f}"
          f" (logit std {from_exact.std().item():.3f}); vs in-memory QLoRA: "
          f"{(from_merged_q - in_memory).abs().max().item():.2e}")
    assert (from_merged_q - in_memory).abs().max() <= 1e-4
    assert 0 < logit_diff  # a real, documented difference (not silently equal to W + BA)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    tok, base, args = tiny_training_base(root)
    lines = short_lines(60)
    (root / "d.txt").write_text("\n".join(lines) + "\n")
    return dict(root=root, tok=str(tok), base=str(base), data=str(root / "d.txt"), args=args)


def run(setup, out, **kw):
    kw = {"method": "qlora", "template": "text", "cutoff_len": 32, "micro_batch_size": 4, "max_steps": 8,
          "lr": 1e-2, "eval_every": 0, "save_every": 0, "progress": False, "dev_fraction": 0.1, "seed": 5,
          "lora_targets": "wq,wk,wv,wo,w1,w2,w3", **kw}
    return T.train(setup["data"], setup["base"], setup["tok"], str(setup["root"] / out), **kw)


def test_trainer_qlora_lowers_loss_and_merges(setup):
    summary = run(setup, "train", merge=True, eval_every=8)
    (s0, before), (s8, after) = summary["dev_loss"]
    print(f"QLoRA trainer: dev loss {before:.4f} -> {after:.4f}")
    assert (s0, s8) == (0, 8) and after < before - 0.05
    out = Path(summary["outputs"]["merged"])
    # In memory: the base quantized again (deterministic) + the saved adapter.
    model = random_model(setup["args"], seed=1, std=0.1)
    quantize_base_nf4(model)
    load_adapter(model, summary["outputs"]["adapter"])
    merged = Llama.build(str(out), setup["tok"], max_seq_len=32, max_batch_size=2, device="cpu")
    tokens = torch.tensor([[1, 5, 9, 30, 31, 2], [1, 70, 71, 72, 3, 4]])
    diff = (logits_of(model, tokens) - logits_of(merged.model, tokens)).abs().max().item()
    print(f"merged checkpoint vs in-memory QLoRA logits: max |diff| {diff:.2e}")
    assert diff <= 1e-4
    # bits/param: in config.json and as the step-0 metrics record, equal to the storage formula.
    config = json.loads((setup["root"] / "train" / "config.json").read_text())
    a = setup["args"]
    hidden, kv = a.ffn_hidden_dim, a.kv_heads * a.head_dim
    shapes = a.n_layers * [(a.dim, a.dim), (kv, a.dim), (kv, a.dim), (a.dim, a.dim),
                           (hidden, a.dim), (a.dim, hidden), (hidden, a.dim)]
    assert config["nf4"]["bits_per_parameter"] == pytest.approx(expected_bits_per_parameter(shapes), rel=1e-12)
    first = json.loads((setup["root"] / "train" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["event"] == "nf4" and first["bits_per_parameter"] == config["nf4"]["bits_per_parameter"]
    assert json.loads((Path(summary["outputs"]["adapter"]) / "adapter_config.json").read_text())[
        "base_quantization"] == "nf4"


def test_trainer_qlora_resume_is_bit_exact(setup):
    kw = dict(lora_dropout=0.1, packing=True, block_size=32, micro_batch_size=2, gradient_accumulation_steps=2,
              warmup_steps=2, max_grad_norm=0.05, max_steps=6, save_every=3, lora_targets="wq,wv,w2")
    run(setup, "straight", **kw)
    assert run(setup, "resumed", stop_at_step=3, **kw)["step"] == 3
    assert run(setup, "resumed", resume=True, **kw)["step"] == 6
    a, b = (load_file(str(setup["root"] / f"{d}/checkpoints/step-000006/weights.mp00.safetensors"))
            for d in ("straight", "resumed"))
    assert set(a) == {f"layers.{i}.{m}.{k}" for i in range(2) for m in ("attention.wq", "attention.wv",
                                                                          "feed_forward.w2")
                      for k in ("lora_A", "lora_B")}  # only the adapter is checkpointed, no NF4 buffers
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = [json.loads(x) for x in (setup["root"] / "resumed/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4, 5, 6]
    assert sum(m.get("event") == "nf4" for m in metrics) == 1  # logged at the start, not again on resume


def test_tensor_parallel_qlora_equals_one_process(tmp_path):
    """Each rank quantizes its own shard. Reference: one process, dense, holding exactly those dequantized
    shards (concatenated), with the same adapter: logits, gradients and one AdamW step agree."""
    args = tiny_args(dim=64, n_heads=8, n_kv_heads=4, vocab_size=128)
    base = random_model(args, seed=11, std=0.3)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    torch.save({"args": vars(args), "state": state}, tmp_path / "base.pt")
    torch.manual_seed(12)
    adapter_model = randomize_lora(apply_lora(random_model(args, seed=11, std=0.3), TARGETS, r=4, alpha=8,
                                              dropout=0.0), seed=13)
    save_adapter(adapter_model, tmp_path / "adapter")

    mp.spawn(qlora_tp_worker, args=(2, free_port(), str(tmp_path / "base.pt"), str(tmp_path / "adapter"),
                                    str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    # The ranks' NF4 is NF4 of each local slice, computed independently here.
    for name, w in ranks[0]["dequantized"].items():
        expect = torch.cat([NF4Linear.from_weight(s).dequantize() for s in split_tensor(name, state[name], 2)],
                           dim=0 if name.rsplit(".", 2)[-2] in ("wq", "wk", "wv", "w1", "w3") else 1)
        assert torch.equal(w, expect), name
    reference = random_model(args, seed=11, std=0.3)
    with torch.no_grad():
        for name, w in ranks[0]["dequantized"].items():
            reference.get_submodule(name.removesuffix(".weight")).weight.copy_(w)
    single = train_step(load_adapter(reference, tmp_path / "adapter"))

    one_proc_nf4 = random_model(args, seed=11, std=0.3)
    quantize_base_nf4(one_proc_nf4)
    one_proc = logits_of(load_adapter(one_proc_nf4, tmp_path / "adapter"), TOKENS[:, :-1])
    # Row-parallel layers sum partial products in another order (an all-reduce): fp32 rounding differs by a few
    # tens of ulps of the largest logit, as in test_parallel.
    tolerance = 4e-6 * single["logits"].abs().max().item()
    for r in ranks:
        logit_diff = (r["logits"] - single["logits"]).abs().max().item()
        assert logit_diff <= tolerance, (logit_diff, tolerance)
        for k, g in single["grads"].items():
            assert torch.allclose(r["grads"][k], g, atol=1e-5, rtol=1e-4), k
        for k, v in single["after"].items():
            assert torch.allclose(r["after"][k], v, atol=1e-5), k  # AdamW step 1 ~ lr*sign(grad): see test_lora
    print(f"TP=2 QLoRA vs 1-process dense(dequantized shards): logits max |diff| {logit_diff:.2e} (tolerance "
          f"{tolerance:.2e}); vs 1-process "
          f"QLoRA (NF4 of unsharded weights, another rounding): {(ranks[0]['logits'] - one_proc).abs().max():.3f}")
    assert ranks[0]["report"]["layers"] == 2 * 7


def test_bits_per_parameter_follow_the_formula():
    # 256 x 256 and 768 x 256 linears: large enough for the fixed costs to vanish, like Llama's 4096 x 4096.
    args = tiny_args(dim=256, n_layers=1, n_heads=4, n_kv_heads=4, multiple_of=256, vocab_size=64)
    model = random_model(args, seed=0, std=0.02)
    report = quantize_base_nf4(model)
    hidden = args.ffn_hidden_dim
    assert hidden == 768
    shapes = [(256, 256)] * 4 + [(hidden, 256), (256, hidden), (hidden, 256)]
    # Per weight of N values: 4 bits per code, 8 bits per 64-block int8 scale, a 32-bit factor per 256 scales,
    # one 32-bit mean. (Written out here rather than calling kollama.adapters.qlora, to check it independently.)
    bits = sum(4 * o * i + 8 * (o * i // 64) + 32 * math.ceil(o * i / 64 / 256) + 32 for o, i in shapes)
    expected = bits / sum(o * i for o, i in shapes)
    print(f"NF4 bits/param: measured {report['bits_per_parameter']:.5f}, formula {expected:.5f}; "
          f"4096x4096 formula {expected_bits_per_parameter([(4096, 4096)]):.5f}")
    assert report["bits_per_parameter"] == pytest.approx(expected, rel=1e-12)
    assert report["expected_bits_per_parameter"] == pytest.approx(expected, rel=1e-12)
    assert abs(report["bits_per_parameter"] - 4.127) < 1e-3
    assert expected_bits_per_parameter([(4096, 4096)]) == pytest.approx(4.12695, abs=1e-5)
    assert report["stored_bytes"] * 8 == bits and report["dense_bytes"] == 4 * sum(o * i for o, i in shapes)


def test_clear_errors(setup):
    model = random_model(tiny_args(), seed=0)
    with pytest.raises(ValueError, match=r"unknown NF4 targets \['q_proj'\]"):
        quantize_base_nf4(model, targets=("wq", "q_proj"))
    quantize_base_nf4(model)
    with pytest.raises(ValueError, match="no dense ParallelLinear.*already quantized"):
        quantize_base_nf4(model)
    odd = random_model(tiny_args(dim=40, n_heads=4, n_kv_heads=2, multiple_of=8), seed=0)  # wk: 20 x 40 = 800
    with pytest.raises(ValueError, match=r"cannot quantize layers\.0\.attention\.wk .*divisible by the block size"):
        quantize_base_nf4(odd)
    with pytest.raises(ValueError, match="--merge only applies to --method lora or qlora"):
        run(setup, "x", method="full", merge=True)


def test_trainer_qlora_model_parallel_merge(setup, tmp_path):
    """The trainer under 2-way model parallelism: global NF4 figures in config.json, and the merged 2-shard
    checkpoint holds dequant(NF4(local shard)) + B A, i.e. equals the shard-quantized base + the saved adapter."""
    from train_workers import train_worker

    kw = dict(data=setup["data"], ckpt_dir=setup["base"], tokenizer_path=setup["tok"], method="qlora",
              template="text", cutoff_len=32, micro_batch_size=4, max_steps=3, lr=1e-2, eval_every=0, save_every=0,
              progress=False, dev_fraction=0.1, seed=5, lora_targets="wq,wk,wo,w2", lora_dropout=0.0,
              model_parallel_size=2, merge=True, out_dir=str(tmp_path / "mp"))
    mp.spawn(train_worker, args=(2, [(free_port(), kw)], str(tmp_path / "summaries.pt")), nprocs=2, join=True)
    (summary,) = torch.load(tmp_path / "summaries.pt", weights_only=False)
    nf4 = json.loads((tmp_path / "mp" / "config.json").read_text())["nf4"]
    single = random_model(setup["args"], seed=1, std=0.1)
    report = quantize_base_nf4(single)
    assert nf4["quantized_params"] == report["quantized_params"] and nf4["layers"] == report["layers"]
    assert nf4["bits_per_parameter"] == pytest.approx(8 * nf4["stored_bytes"] / nf4["quantized_params"])

    reference = random_model(setup["args"], seed=1, std=0.1)  # dense, holding the per-shard NF4 roundings
    state = reference.state_dict()
    with torch.no_grad():
        for name, m in reference.named_modules():
            if isinstance(m, ParallelLinear) and name.rsplit(".", 1)[-1] in BLOCK_LINEARS:
                key = f"{name}.weight"
                dim = 0 if name.rsplit(".", 1)[-1] in ("wq", "wk", "wv", "w1", "w3") else 1
                m.weight.copy_(torch.cat([NF4Linear.from_weight(s).dequantize() for s in
                                          split_tensor(key, state[key], 2)], dim=dim))
    load_adapter(reference, summary["outputs"]["adapter"])
    merged = Llama.build(summary["outputs"]["merged"], setup["tok"], max_seq_len=32, max_batch_size=2, device="cpu")
    tokens = torch.tensor([[1, 5, 9, 30, 31, 2], [1, 70, 71, 72, 3, 4]])
    assert (logits_of(reference, tokens) - logits_of(merged.model, tokens)).abs().max() <= 1e-4


def test_trainer_qlora_activation_checkpointing_changes_nothing(setup):
    """Recomputing each block (and so dequantizing NF4 again) in backward gives the same losses and adapter."""
    a = run(setup, "ac0", max_steps=3)
    b = run(setup, "ac1", max_steps=3, activation_checkpointing=True)
    assert [x for _, x in a["loss"]] == pytest.approx([x for _, x in b["loss"]], abs=1e-6)
    ta, tb = (load_file(str(Path(s["outputs"]["adapter"]) / "adapter.safetensors")) for s in (a, b))
    assert ta.keys() == tb.keys() and all(torch.allclose(ta[k], tb[k], atol=1e-6) for k in ta)
