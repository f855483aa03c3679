"""kollama.adapters.lora: identity at init, merge/unmerge, adapter files, model parallelism on 2 gloo processes,
equality with transformers + peft (an implementation we did not write), and LoRA over an NF4 base."""
import json
import math

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from helpers import _permute_for_hf, free_port, hf_model, random_model, randomize_lora, tiny_args
from kollama.adapters.lora import (
    TARGETS,
    LoRALinear,
    apply_lora,
    base_state_dict,
    export_peft,
    load_adapter,
    lora_layers,
    lora_state_dict,
    merge_lora,
    merged_state_dict,
    save_adapter,
    trainable_parameters,
    trainable_parameters_report,
    unmerge_lora,
)
from kollama.adapters.nf4 import NF4Linear
from lora_workers import INIT_SEED, TOKENS, TP_LORA, TP_TARGETS, lora_tp_worker, train_step
from llama.parallel import ColumnParallelLinear, ParallelLinear


def logits_of(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens, 0, use_cache=False)


def test_init_is_identity_and_freezes(tmp_path):
    model = random_model(tiny_args(), seed=1)
    ref = logits_of(model)
    apply_lora(model, TARGETS, r=4, alpha=8, dropout=0.1)
    assert torch.equal(logits_of(model), ref)  # B = 0: exactly the base model (eval: no dropout)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{p}.{k}" for p in lora_layers(model) for k in ("lora_A", "lora_B")}
    assert len(lora_layers(model)) == 2 * 7 + 1
    wq = model.layers[0].attention.wq
    assert wq.scale == 2.0 and wq.lora_A.shape == (4, 48) and wq.lora_B.shape == (48, 4)
    assert wq.lora_A.abs().max() <= 1 / math.sqrt(48) and wq.lora_A.abs().max() > 0.5 / math.sqrt(48)
    counts = trainable_parameters(model)
    n_lora = sum(t.numel() for t in lora_state_dict(model).values())
    n_base = sum(p.numel() for p in base_state_dict(model).values())
    assert counts["trainable"] == n_lora and counts["total"] == n_lora + n_base
    assert f"trainable params: {n_lora:,}" in trainable_parameters_report(model)
    assert list(base_state_dict(model)) == list(random_model(tiny_args()).state_dict())  # Meta names kept
    assert LoRALinear(nn.Linear(16, 8), r=4, alpha=8, use_rslora=True).scale == 4.0  # alpha / sqrt(r)


def test_dropout_only_on_lora_input():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = LoRALinear(base, r=2, alpha=2, dropout=0.5).train()
    x = torch.randn(4, 16)
    assert torch.equal(layer(x), base(x))  # B = 0: dropout never touches the base path
    with torch.no_grad():
        layer.lora_B.normal_()
    lora = layer(x) - base(x)
    assert not torch.allclose(lora, layer.eval()(x) - base(x))  # the LoRA input was dropped in training mode
    layer.merge()
    assert torch.allclose(layer(x), base(x))


def test_bf16_base_keeps_fp32_adapter():
    torch.manual_seed(0)
    base = ColumnParallelLinear(32, 16, dtype=torch.bfloat16)
    layer = LoRALinear(base, r=4, alpha=4)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32 and not base.weight.requires_grad
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    expect = x.float() @ (base.weight.float() + layer.lora_delta()).T
    assert (y.float() - expect).abs().max() < 0.1
    layer.merge()
    assert (layer(x).float() - expect).abs().max() < 0.1


def test_merge_unmerge():
    model = apply_lora(random_model(tiny_args(), seed=2), TARGETS, r=4, alpha=8, dropout=0.0)
    before = {k: v.clone() for k, v in base_state_dict(model).items()}
    randomize_lora(model)
    unmerged = logits_of(model)
    merge_lora(model)
    assert all(m.merged for m in lora_layers(model).values())
    merged = logits_of(model)
    assert (merged - unmerged).abs().max() < 1e-4
    with torch.no_grad():  # merged forward skips the LoRA path: zeroing B changes nothing
        for m in lora_layers(model).values():
            m.lora_B.zero_()
    assert torch.equal(logits_of(model), merged)
    with pytest.raises(RuntimeError, match="already merged"):
        merge_lora(model)
    unmerge_lora(model)  # subtracts the delta that was merged (kept factors), not the zeroed B
    for k, v in base_state_dict(model).items():
        # Exact to one fp32 rounding of W + delta (documented), not bit for bit.
        ulp = torch.finfo(torch.float32).eps * (before[k].abs() + 0.1)
        assert ((v - before[k]).abs() <= ulp).all(), k
    base_logits = logits_of(random_model(tiny_args(), seed=2))
    assert (logits_of(model) - base_logits).abs().max() < 1e-5  # B is zero now: back to the base model
    with pytest.raises(RuntimeError, match="not merged"):
        unmerge_lora(model)


def test_adapter_round_trip(tmp_path):
    args = tiny_args()
    model = randomize_lora(apply_lora(random_model(args, seed=3), ("wq", "wk", "w2", "output"), r=2, alpha=4,
                                      dropout=0.05, use_rslora=True))
    out = save_adapter(model, tmp_path / "adapter", {"base_model": "tiny-random", "r": 2})
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["alpha"] == 4 and config["dropout"] == 0.05 and config["use_rslora"] is True
    assert config["targets"] == ["wq", "wk", "w2", "output"] and config["model_parallel_size"] == 1
    assert config["base_model"] == "tiny-random" and config["model_args"]["n_kv_heads"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["adapter.safetensors", "adapter_config.json"]  # no temp left

    fresh = load_adapter(random_model(args, seed=3), out)  # applies LoRA with the saved settings
    assert torch.equal(logits_of(fresh), logits_of(model))
    assert not any(p.requires_grad for n, p in fresh.named_parameters() if ".lora_" not in n)

    with pytest.raises(ValueError, match=r"layers\.0\.attention\.wq\.lora_A has shape \(2, 48\).*\(2, 64\)"):
        load_adapter(random_model(tiny_args(dim=64, n_heads=8, n_kv_heads=4)), out)
    with pytest.raises(ValueError, match="other LoRA settings"):
        load_adapter(apply_lora(random_model(args), ("wq", "wk", "w2", "output"), r=4), out)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(random_model(args), tmp_path / "nowhere")
    with pytest.raises(ValueError, match="contradicts"):
        save_adapter(model, tmp_path / "bad", {"alpha": 99})


def test_bad_inputs():
    args = tiny_args()
    with pytest.raises(ValueError, match=r"unknown LoRA targets \['q_proj'\]; valid targets are \['wq'"):
        apply_lora(random_model(args), ("wq", "q_proj"))
    for kwargs, msg in [(dict(r=0), "r must be an integer >= 1"), (dict(r=2.5), "integer"),
                        (dict(alpha=0), "alpha"), (dict(dropout=1.0), "dropout")]:
        with pytest.raises(ValueError, match=msg):
            apply_lora(random_model(args), **kwargs)
    model = apply_lora(random_model(args), "wv")  # a single string is one target, not the letters w and v
    assert list(lora_layers(model)) == ["layers.0.attention.wv", "layers.1.attention.wv"]
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model)
    with pytest.raises(ValueError, match=r"\['wq'\] name no linear layer"):
        apply_lora(nn.Sequential(nn.Linear(4, 4)), ("wq",))
    with pytest.raises(TypeError, match="not Embedding"):
        LoRALinear(nn.Embedding(4, 4))
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(random_model(args), "unused")


def nf4_pair(args):
    """(NF4 model, dense model whose weights are the NF4 dequantized ones), same seed."""
    quant, dense = random_model(args, seed=4), random_model(args, seed=4)
    for name, q in list(quant.named_modules()):
        if isinstance(q, ParallelLinear):
            q.replace_local_linear(NF4Linear.from_weight(q.weight.detach()))
            with torch.no_grad():
                dense.get_submodule(name).weight.copy_(q.local_linear.dequantize(torch.float32))
    return quant, dense


def test_lora_over_nf4_base_matches_dense_base():
    quant, dense = nf4_pair(tiny_args())
    for model in (quant, dense):
        torch.manual_seed(5)
        randomize_lora(apply_lora(model, TARGETS, r=4, alpha=8, dropout=0.0), seed=6)
        F.cross_entropy(model(TOKENS[:, :-1], 0, use_cache=False).flatten(0, 1), TOKENS[:, 1:].flatten()).backward()
    dq, dd = lora_layers(quant), lora_layers(dense)
    for path in dq:
        for key in ("lora_A", "lora_B"):
            gq, gd = getattr(dq[path], key).grad, getattr(dd[path], key).grad
            assert gq is not None and torch.allclose(gq, gd, atol=1e-6, rtol=1e-5), (path, key)
    assert torch.allclose(logits_of(quant), logits_of(dense), atol=1e-5)
    with pytest.raises(RuntimeError, match="cannot merge LoRA into a NF4Linear base.*merged_weight"):
        merge_lora(quant)
    mq, md = merged_state_dict(quant), merged_state_dict(dense)
    assert mq.keys() == md.keys() == random_model(tiny_args()).state_dict().keys()
    for k in mq:
        assert torch.allclose(mq[k], md[k], atol=1e-6), k
    assert "layers.0.attention.wq.local_linear.packed_codes" in base_state_dict(quant)
    counts = trainable_parameters(quant)
    assert counts["total"] == trainable_parameters(dense)["total"]  # NF4 weights are counted as frozen params


def test_two_processes_equal_one(tmp_path):
    args = tiny_args(dim=64, n_heads=8, n_kv_heads=4, vocab_size=128)
    base = random_model(args, seed=11, std=0.3)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    torch.save({"args": vars(args), "state": state}, tmp_path / "base.pt")
    torch.manual_seed(INIT_SEED)
    ref = apply_lora(base, TP_TARGETS, **TP_LORA)
    ref_init = {k: v.clone() for k, v in lora_state_dict(ref).items()}
    save_adapter(randomize_lora(ref, seed=12), tmp_path / "adapter")

    mp.spawn(lora_tp_worker, args=(2, free_port(), str(tmp_path / "base.pt"), str(tmp_path / "adapter"),
                                   str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    single = train_step(ref)

    saved = load_adapter(random_model(args, seed=11, std=0.3), tmp_path / "mp_adapter")  # written by rank 0
    for r in ranks:
        assert all(torch.equal(r["init"][k], v) for k, v in ref_init.items())  # init sliced from the global draw
        assert (r["logits"] - single["logits"]).abs().max() < 1e-5
        for k, g in single["grads"].items():
            assert torch.allclose(r["grads"][k], g, atol=1e-5, rtol=1e-4), k
        for k, v in single["after"].items():
            # AdamW's first step is ~lr * sign(grad): a ~1e-6 gradient that differs in its last bits (another
            # summation order) moves by a few 1e-6. 1e-5 is 0.1% of the lr.
            assert torch.allclose(r["after"][k], v, atol=1e-5), k
            assert torch.equal(lora_state_dict(saved)[k], ranks[0]["after"][k]), k
        assert r["merge_diff"] < 1e-4
        assert r["counts"]["trainable"] == trainable_parameters(ref)["trainable"]
        assert r["counts"]["total"] == trainable_parameters(ref)["total"]
        assert r["counts"]["local_trainable"] < r["counts"]["trainable"]


def test_equal_to_peft_training_and_export(tmp_path):
    peft = pytest.importorskip("peft")
    args = tiny_args()
    hidden = args.ffn_hidden_dim
    ours = random_model(args, seed=7)
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    torch.manual_seed(8)
    randomize_lora(apply_lora(ours, TARGETS, r=4, alpha=8, dropout=0.0), seed=9)  # B != 0, so its layout matters

    hf_targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    theirs = peft.get_peft_model(hf_model(state, args, hidden),
                                 peft.LoraConfig(r=4, lora_alpha=8, target_modules=hf_targets, lora_dropout=0.0))
    n_kv = args.n_kv_heads
    names = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj", "wo": "self_attn.o_proj",
             "w1": "mlp.gate_proj", "w3": "mlp.up_proj", "w2": "mlp.down_proj"}
    with torch.no_grad():
        for path, m in lora_layers(ours).items():
            leaf = path.rsplit(".", 1)[-1]
            hf = "lm_head" if path == "output" else f"model.layers.{path.split('.')[1]}.{names[leaf]}"
            target = theirs.base_model.model.get_submodule(hf)
            b = m.lora_B.detach()
            if leaf in ("wq", "wk"):
                b = _permute_for_hf(b, args.n_heads if leaf == "wq" else n_kv)
            target.lora_A["default"].weight.copy_(m.lora_A)
            target.lora_B["default"].weight.copy_(b)
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == trainable_parameters(ours)["trainable"]

    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(10)
    diffs = []
    for step in range(5):
        batch = torch.randint(0, args.vocab_size, (2, 12), generator=g)
        losses = []
        for model, opt, logits_fn in (
            (ours, opt_ours, lambda t: ours(t, 0, use_cache=False)),
            (theirs, opt_theirs, lambda t: theirs(input_ids=t).logits),
        ):
            model.train()
            loss = F.cross_entropy(logits_fn(batch[:, :-1]).flatten(0, 1).float(), batch[:, 1:].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        diffs.append(abs(losses[0] - losses[1]))
        print(f"step {step}: ours {losses[0]:.7f} peft {losses[1]:.7f} diff {diffs[-1]:.2e}")
    assert max(diffs) <= 1e-5, diffs

    # export from the model and from a saved adapter folder give the same files; peft loads them.
    export_peft(ours, tmp_path / "peft", base_model_name_or_path="tiny-random")
    save_adapter(ours, tmp_path / "adapter")
    export_peft(tmp_path / "adapter", tmp_path / "peft2")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["lora_alpha"] == 8
    assert sorted(config["target_modules"]) == sorted(hf_targets)
    assert (tmp_path / "peft" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "peft2" / "adapter_model.safetensors").read_bytes()
    loaded = peft.PeftModel.from_pretrained(hf_model(state, args, hidden), str(tmp_path / "peft")).eval()
    ours.eval()
    with torch.no_grad():
        diff = (loaded(input_ids=TOKENS).logits - logits_of(ours)).abs().max().item()
    print(f"export_peft logits max diff {diff:.2e}")
    assert diff <= 1e-4
