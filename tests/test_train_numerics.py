"""The trainer's update rule, step by step, against computations written here from public definitions only.

Each optimizer step of a real (in-process) ``kollama.train`` run on a tiny model is observed through hooks on its
AdamW (the weights before the step, the gradients it applies, the lr of its groups, the weights after), and checked:

* gradient: transformers' LlamaForCausalLM (eager attention) on the same weights computes, one row at a time and
  without padding, the summed cross-entropy over the row's target tokens; the step's loss is that sum over the
  step's rows divided by their target count (the token-weighted mean, whatever the micro-batch split), and the
  gradients are clipped with ``torch.nn.utils.clip_grad_norm_``. Target tokens are found from the raw SentencePiece
  model and the templates' published strings: for ``text`` every token after BOS; for ``alpaca`` only the response
  and EOS (the tokens after those of [BOS] + prompt), or every token after BOS with ``train_on_inputs``.
* optimizer: ``torch.optim.AdamW`` (default betas and eps) applied to an independent copy of the weights with the
  trainer's gradients, decay on every tensor with ndim >= 2 and none on the 1-d RMSNorm weights, reproduces the
  trainer's weights after every step.
* schedule: the lr of step s (0-based) is lr * (s + 1) / warmup during warmup, then
  lr * (r + (1 - r) * (1 + cos(pi * (s - warmup) / (total - warmup))) / 2); per curriculum stage, the same over the
  stage's own steps and scaled to the stage's lr.
* LoRA: the reference adds (alpha / r) * x A^T B^T (alpha / sqrt(r) with rsLoRA) to the frozen projections.

Every step trains on all K rows (dev_fraction 0, micro_batch_size * gradient_accumulation_steps = K), so the
trainer's shuffling only reorders a sum. Tolerances: the trainer (Meta-layout model, padded micro-batches) and the
reference (HF model, one unpadded row at a time) sum the same float32 quantities in other orders; the largest observed
relative differences are 2e-7 for losses and gradient norms and 6e-7 for a gradient tensor (bounds: 3e-5, >= 50x);
AdamW's weights come out bit-identical (the same torch kernel on the same gradients; bounds 1e-6 rel + 1e-7). Every
bug these tests exist for (a loss scaled by 3, clipping skipped, prompt or padding trained, per-micro-batch means,
decay on norms, other betas, a shifted schedule, another LoRA scale) changes the checked values by >= 1e-3
(scripts/train_mutants.py applies each one and runs these tests).
"""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import hf_model, hf_row_order, hf_state_dict, random_model, tiny_training_base, RefLoRALinear
from kollama import train as T
from kollama.train import optim
from kollama.train.stages import CurriculumPlan, Stage

pytestmark = pytest.mark.usefixtures("one_thread")

LOSS_RTOL, GRAD_RTOL, WEIGHT_RTOL, WEIGHT_ATOL = 3e-5, 3e-5, 1e-6, 1e-7
LR, WARMUP, MIN_LR_RATIO, WEIGHT_DECAY, STEPS = 1e-3, 2, 0.1, 0.1, 4
CLIP_LORA = 0.09

# Stanford Alpaca's PROMPT_DICT (tatsu-lab/stanford_alpaca, train.py), verbatim.
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n"
                "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")

# Four rows of different lengths (so micro-batches are padded), one with an input.
ALPACA_ROWS = [
    {"instruction": "Tell me about the cat.", "input": "", "output": "The cat sleeps by the warm fire."},
    {"instruction": "Say it again.", "input": "The quick brown fox jumps over the lazy dog", "output": "Again!"},
    {"instruction": "What did Tom and Sue buy at the market?", "input": "",
     "output": "They went to the market to buy apples, bread, milk and a big green melon."},
    {"instruction": "Sing.", "input": "", "output": "The birds sang a happy song."},
]
TEXT_ROWS = [
    "Once upon a time there was a little girl.",
    "The sun rose.",
    "Tom and Sue went to the market to buy apples, bread, milk and a big green melon today.",
    "She said: I want to read a book about ships.",
]


def lr_closed_form(s: int, lr: float = LR, warmup: int = WARMUP, total: int = STEPS, r: float = MIN_LR_RATIO):
    if s < warmup:
        return lr * (s + 1) / warmup
    return lr * (r + (1 - r) * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))) / 2)


# ---------------------------------------------------------------------------------------------------------- setup


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("numerics")
    tok, base, args = tiny_training_base(root)
    args = dataclasses.replace(args, max_seq_len=256)
    (root / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ALPACA_ROWS))
    (root / "text.txt").write_text("\n".join(TEXT_ROWS) + "\n")
    state = random_model(args, seed=1, std=0.1).state_dict()  # tiny_training_base's weights
    return dict(root=root, tok=str(tok), base=str(base), args=args, state=state,
                sp=spm.SentencePieceProcessor(model_file=str(tok)))


def reference_rows(sp, template: str, train_on_inputs: bool) -> list:
    """(token ids, index of the first target token) of every row, from the raw tokenizer and published prompts."""
    rows = []
    if template == "text":
        return [([1] + sp.encode(line) + [2], 1) for line in TEXT_ROWS]
    for r in ALPACA_ROWS:
        prompt = (ALPACA_INPUT if r["input"] else ALPACA_NO_INPUT).format(**r)
        ids = [1] + sp.encode(prompt + r["output"]) + [2]
        head = [1] + sp.encode(prompt)
        assert ids[:len(head)] == head  # the prompt's tokens are a clean prefix, so "response tokens" is unambiguous
        rows.append((ids, 1 if train_on_inputs else len(head)))
    assert len({len(ids) for ids, _ in rows}) == len(rows)
    return rows


def reference_loss_and_grads(model, params: dict, rows: list, max_norm: float):
    """Mean cross-entropy over all target tokens of all rows, its gradient clipped by torch, and the norm."""
    for p in params.values():
        p.grad = None
    n_targets = sum(len(ids) - first for ids, first in rows)
    total = 0.0
    for ids, first in rows:
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
        # logits[j - 1] predicts ids[j]; the targets are ids[first:]
        loss = F.cross_entropy(logits[first - 1:-1], torch.tensor(ids[first:]), reduction="sum") / n_targets
        loss.backward()
        total += loss.item()
    norm = torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm)
    return total, float(norm), {n: p.grad.clone() for n, p in params.items()}


def observe_steps(monkeypatch) -> list:
    """Record, for every optimizer step of the run: lr per group, weights before, gradients, weights after."""
    steps = []
    build = optim.build_optimizer

    def observed(named, *a, **k):
        opt = build(named, *a, **k)

        def before(o, args, kwargs):
            steps.append({"lr": [g["lr"] for g in o.param_groups],
                          "before": {n: p.detach().clone() for n, p in named},
                          "grad": {n: p.grad.detach().clone() for n, p in named}})

        def after(o, args, kwargs):
            steps[-1]["after"] = {n: p.detach().clone() for n, p in named}

        opt.register_step_pre_hook(before)
        opt.register_step_post_hook(after)
        return opt

    monkeypatch.setattr(optim, "build_optimizer", observed)
    return steps


def run_trainer(setup, out, *, template, micro, accum, max_grad_norm, **kw) -> list:
    data = setup["root"] / ("text.txt" if template == "text" else "alpaca.jsonl")
    T.train(str(data), setup["base"], setup["tok"], str(setup["root"] / out), template=template, cutoff_len=256,
            micro_batch_size=micro, gradient_accumulation_steps=accum, dev_fraction=0, max_steps=STEPS, lr=LR,
            warmup_steps=WARMUP, min_lr_ratio=MIN_LR_RATIO, weight_decay=WEIGHT_DECAY, max_grad_norm=max_grad_norm,
            eval_every=0, save_every=0, log_every=1, progress=False, seed=3, **kw)
    records = [json.loads(x) for x in (setup["root"] / out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str) -> None:
    err = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-30)).item()
    assert err <= rtol, f"{what}: relative difference {err:.2e} > {rtol:.0e}"


def check_adamw(steps: list, decays) -> None:
    """torch's AdamW on a copy of the weights, fed the trainer's gradients, gives the trainer's weights."""
    copy = {n: torch.nn.Parameter(w.clone()) for n, w in steps[0]["before"].items()}
    opt = torch.optim.AdamW([{"params": [p for n, p in copy.items() if decays(n, p)], "weight_decay": WEIGHT_DECAY},
                             {"params": [p for n, p in copy.items() if not decays(n, p)], "weight_decay": 0.0}],
                            lr=LR)
    for s, step in enumerate(steps):
        for g in opt.param_groups:
            g["lr"] = lr_closed_form(s)
        for n, p in copy.items():
            p.grad = step["grad"][n].clone()
        opt.step()
        for n, p in copy.items():
            torch.testing.assert_close(step["after"][n], p.detach(), rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL,
                                       msg=lambda m: f"step {s + 1} {n}: {m}")


# ---------------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("warmup,total,ratio", [(0, 1, 0.0), (0, 10, 0.1), (3, 10, 0.0), (3, 4, 0.5), (5, 5, 0.1),
                                                (1, 100, 0.1), (100, 2000, 0.03)])
def test_schedule_is_the_closed_form(warmup, total, ratio):
    f = optim.lr_lambda(warmup, total, ratio)
    for s in range(total):
        assert f(s) == pytest.approx(lr_closed_form(s, 1.0, warmup, total, ratio), rel=1e-12), (s, warmup, total)
    if warmup < total:
        assert f(warmup) == pytest.approx(1.0)  # the peak follows the warmup


def test_curriculum_schedule_restarts_per_stage_at_its_lr():
    def stage(index, start, steps, lr=None, warmup=None, ratio=None):
        return Stage(f"s{index}", index, start, steps, steps, [[]], [0], lr, warmup, ratio)

    plan = CurriculumPlan([stage(0, 0, 5, lr=1e-4), stage(1, 5, 8, warmup=0, ratio=0.5), stage(2, 13, 3, lr=2e-3)],
                          [], 4, 0)
    f = plan.lr_lambda(1e-3, 2, 0.1)
    want = ([lr_closed_form(s, 1e-4, 2, 5, 0.1) for s in range(5)] + [lr_closed_form(s, 1e-3, 0, 8, 0.5)
                                                                       for s in range(8)]
            + [lr_closed_form(s, 2e-3, 2, 3, 0.1) for s in range(3)])
    assert [1e-3 * f(s) for s in range(16)] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("template,train_on_inputs,micro,accum", [
    ("text", False, 1, 4), ("text", False, 4, 1), ("alpaca", False, 2, 2), ("alpaca", False, 1, 4),
    ("alpaca", True, 4, 1)])
def test_full_finetuning_steps_match_the_reference(setup, monkeypatch, tmp_path, template, train_on_inputs, micro,
                                                   accum):
    args, sp = setup["args"], setup["sp"]
    hidden = setup["state"]["layers.0.feed_forward.w1.weight"].shape[0]
    rows = reference_rows(sp, template, train_on_inputs)
    model = hf_model(setup["state"], args, hidden).train()
    params = dict(model.named_parameters())
    _, norm0, _ = reference_loss_and_grads(model, params, rows, math.inf)
    clip = 0.5 * norm0  # clipping is active at least at step 1

    steps = observe_steps(monkeypatch)
    log = run_trainer(setup, f"full-{template}-{train_on_inputs}-{micro}x{accum}", template=template, micro=micro,
                      accum=accum, max_grad_norm=clip, method="full", train_on_inputs=train_on_inputs)
    assert len(steps) == len(log) == STEPS
    assert sorted(hf_state_dict(steps[0]["before"], args)) == sorted(params)

    for s, (step, rec) in enumerate(zip(steps, log)):
        assert step["lr"] == [pytest.approx(lr_closed_form(s), rel=1e-12)] * 2, (s, step["lr"])
        assert rec["lr"] == pytest.approx(lr_closed_form(s), rel=1e-12)
        with torch.no_grad():
            model.load_state_dict(hf_state_dict(step["before"], args))
        loss, norm, grads = reference_loss_and_grads(model, params, rows, clip)
        assert rec["loss"] == pytest.approx(loss, rel=LOSS_RTOL), (s, rec, loss)
        assert rec["grad_norm"] == pytest.approx(norm, rel=GRAD_RTOL), (s, rec, norm)
        got = hf_state_dict(step["grad"], args)
        for name in params:
            assert_close_rel(got[name], grads[name], GRAD_RTOL, f"step {s + 1} gradient of {name}")
    check_adamw(steps, lambda n, p: p.ndim >= 2)
    assert sum(p.ndim < 2 for p in steps[0]["before"].values()) == 2 * args.n_layers + 1  # the norms: no decay


@pytest.mark.parametrize("use_rslora", [False, True])
def test_lora_steps_match_the_reference(setup, monkeypatch, tmp_path, use_rslora):
    args, sp = setup["args"], setup["sp"]
    r, alpha = 4, 8.0
    hidden = setup["state"]["layers.0.feed_forward.w1.weight"].shape[0]
    rows = reference_rows(sp, "alpaca", False)
    steps = observe_steps(monkeypatch)
    # Observed gradient norms: 0.058-0.061 with scale alpha/r = 2, 0.116-0.123 with alpha/sqrt(r) = 4; a threshold
    # between them compares the unclipped branch in one case and the clipped one in the other.
    log = run_trainer(setup, f"lora-{use_rslora}", template="alpaca", micro=2, accum=2, max_grad_norm=CLIP_LORA,
                      method="lora", lora_targets="wq,wv", lora_r=r, lora_alpha=alpha, lora_dropout=0.0,
                      use_rslora=use_rslora)
    assert len(steps) == len(log) == STEPS
    names = sorted(steps[0]["before"])
    assert names == sorted(f"layers.{i}.attention.{m}.{f}" for i in range(args.n_layers) for m in ("wq", "wv")
                           for f in ("lora_A", "lora_B")), names

    model = hf_model(setup["state"], args, hidden).train()
    for p in model.parameters():
        p.requires_grad_(False)
    scale = alpha / (math.sqrt(r) if use_rslora else r)
    q_rows = hf_row_order(args.dim, args.n_heads)
    params, wrapped = {}, {}
    for i, layer in enumerate(model.model.layers):
        for meta, hf in (("wq", "q_proj"), ("wv", "v_proj")):
            key = f"layers.{i}.attention.{meta}"
            lin = getattr(layer.self_attn, hf)
            order = q_rows if meta == "wq" else torch.arange(lin.out_features)
            w = RefLoRALinear(lin, steps[0]["before"][key + ".lora_A"], steps[0]["before"][key + ".lora_B"], scale,
                              order)
            setattr(layer.self_attn, hf, w)
            wrapped[key] = w
            params[key + ".lora_A"], params[key + ".lora_B"] = w.lora_A, w.lora_B
    assert all(v.abs().max() == 0 for k, v in steps[0]["before"].items() if k.endswith("lora_B"))  # B starts at 0

    clipped = 0
    for s, (step, rec) in enumerate(zip(steps, log)):
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(step["before"][n])
        loss, norm, grads = reference_loss_and_grads(model, params, rows, CLIP_LORA)
        clipped += norm > CLIP_LORA
        assert rec["loss"] == pytest.approx(loss, rel=LOSS_RTOL), (s, rec, loss)
        assert rec["grad_norm"] == pytest.approx(norm, rel=GRAD_RTOL), (s, rec, norm)
        for name in names:
            if s == 0 and name.endswith("lora_A"):  # B = 0: the exact gradient of A is exactly zero
                assert step["grad"][name].abs().max() == 0 and grads[name].abs().max() == 0, name
                continue
            assert_close_rel(step["grad"][name], grads[name], GRAD_RTOL, f"step {s + 1} gradient of {name}")
    assert clipped == (STEPS if use_rslora else 0), clipped
    check_adamw(steps, lambda n, p: p.ndim >= 2)  # LoRA A and B both decay
