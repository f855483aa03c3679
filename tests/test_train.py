"""kollama.train on tiny models: the loss falls (full and LoRA), resume is bit-exact, NaN stops the run, and 2-process
data-parallel / model-parallel runs equal one process."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from conftest import need
from helpers import free_port, random_model, short_lines, tiny_training_base
from kollama import train as T
from kollama.train import optim
from kollama.train.checkpointing import TrainingDiverged
from llama import Llama
from llama.checkpoint import read_slice
from llama.loading import open_checkpoint
from train_workers import train_worker

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny base checkpoint, its tokenizer, and a text file of short lines (several fit one packed block)."""
    root = tmp_path_factory.mktemp("train")
    tok, base, args = tiny_training_base(root)
    lines = short_lines(60)
    (root / "d.txt").write_text("\n".join(lines) + "\n")
    return dict(root=root, tok=str(tok), base=str(base), data=str(root / "d.txt"), args=args)


def run(setup, out, **kw):
    kw = {"template": "text", "cutoff_len": 32, "micro_batch_size": 4, "max_steps": 8, "lr": 3e-3,
          "eval_every": 0, "save_every": 0, "progress": False, "dev_fraction": 0.1, "seed": 5, **kw}
    return T.train(setup["data"], setup["base"], setup["tok"], str(setup["root"] / out), **kw)


def weights(folder):
    return load_file(str(Path(folder) / "consolidated.00.safetensors"))


def test_full_and_lora_lower_the_dev_loss(setup):
    full = run(setup, "full", method="full", eval_every=8)
    lora = run(setup, "lora", method="lora", lr=1e-2, lora_targets="wq,wk,wv,wo,w1,w2,w3", merge=True, eval_every=8)
    for s in (full, lora):
        (s0, before), (s8, after) = s["dev_loss"]
        assert (s0, s8) == (0, 8) and after < before - 0.05, s["dev_loss"]
    # The saved adapter loads onto a fresh base and gives the merged checkpoint's logits.
    from kollama.adapters.lora import load_adapter

    model = load_adapter(random_model(setup["args"], seed=1, std=0.1), lora["outputs"]["adapter"])
    merged = Llama.build(lora["outputs"]["merged"], setup["tok"], max_seq_len=32, max_batch_size=2, device="cpu")
    tokens = torch.tensor([[1, 5, 9, 30, 31, 2], [1, 70, 71, 72, 3, 4]])
    with torch.no_grad():
        assert (model(tokens, 0, use_cache=False) - merged.model(tokens, 0, use_cache=False)).abs().max() < 1e-4
    assert set(weights(full["outputs"]["model"])) == set(open_checkpoint(setup["base"]).readers[0].keys())


@pytest.mark.parametrize("method", ["full", "lora"])
def test_resume_is_bit_exact(setup, method):
    # LoRA dropout draws from the RNG, packing + accumulation exercise the data position; warmup + cosine the
    # scheduler; clipping is active (small max norm).
    kw = dict(method=method, lora_dropout=0.1, packing=True, block_size=32, micro_batch_size=2,
              gradient_accumulation_steps=2, warmup_steps=2, max_grad_norm=0.05, max_steps=6, save_every=3)
    run(setup, f"straight-{method}", **kw)
    first = run(setup, f"resumed-{method}", stop_at_step=3, **kw)
    assert first["step"] == 3 and first["outputs"] == {}
    second = run(setup, f"resumed-{method}", resume=True, **kw)
    assert second["step"] == 6
    a = load_file(str(setup["root"] / f"straight-{method}/checkpoints/step-000006/weights.mp00.safetensors"))
    b = load_file(str(setup["root"] / f"resumed-{method}/checkpoints/step-000006/weights.mp00.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = [json.loads(x) for x in (setup["root"] / f"resumed-{method}/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4, 5, 6]
    # Settings that decide the data order or the update rule must match; the learning rate may change.
    with pytest.raises(ValueError, match=r"settings differ.*'seed': \(5, 6\)"):
        run(setup, f"resumed-{method}", resume=True, **{**kw, "seed": 6})


def test_nan_loss_stops_and_keeps_last_checkpoint(setup, monkeypatch):
    calls = {"n": 0}
    real = optim.token_loss

    def poisoned(logits, labels, denominator):
        calls["n"] += 1
        loss = real(logits, labels, denominator)
        return loss * float("nan") if calls["n"] > 5 else loss  # step 6 (one micro batch per step)

    monkeypatch.setattr(optim, "token_loss", poisoned)
    out = setup["root"] / "nan"
    with pytest.raises(TrainingDiverged, match=r"step 6: loss is nan.*last good checkpoint is .*step-000004"):
        run(setup, "nan", method="full", save_every=2, save_total_limit=5)
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert saved == ["step-000002", "step-000004"]  # nothing half-written, nothing after the NaN
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["event"] == "diverged"
    # The kept checkpoint resumes (the poisoned loss is gone once the monkeypatch is undone).
    monkeypatch.setattr(optim, "token_loss", real)
    assert run(setup, "nan", method="full", save_every=2, resume=True)["step"] == 8


def test_two_processes_equal_one(setup, tmp_path):
    """Data parallel: 2 processes x micro batch 4 == 1 process x micro batch 4 x accumulation 2. Model parallel:
    2 processes sharding one model == 1 process (full fine-tuning and LoRA). Clipping is active throughout."""
    common = dict(data=setup["data"], ckpt_dir=setup["base"], tokenizer_path=setup["tok"], template="text",
                  cutoff_len=32, max_steps=4, lr=3e-3, eval_every=4, save_every=0, progress=False,
                  dev_fraction=0.1, seed=5, max_grad_norm=0.05, lora_dropout=0.0, micro_batch_size=4)
    runs = {
        "dp": dict(method="full", out_dir=str(tmp_path / "dp2")),
        "mp_full": dict(method="full", model_parallel_size=2, gradient_accumulation_steps=2,
                        out_dir=str(tmp_path / "mp_full")),
        "mp_lora": dict(method="lora", model_parallel_size=2, gradient_accumulation_steps=2, merge=True,
                        lora_targets="wq,wo,w2,w3", lr=1e-2, out_dir=str(tmp_path / "mp_lora")),
    }
    port_runs = [(free_port(), {**common, **kw}) for kw in runs.values()]
    mp.spawn(train_worker, args=(2, port_runs, str(tmp_path / "summaries.pt")), nprocs=2, join=True)
    two = dict(zip(runs, torch.load(tmp_path / "summaries.pt", weights_only=False)))
    one = {
        "dp": T.train(**{**common, **runs["dp"], "gradient_accumulation_steps": 2, "out_dir": str(tmp_path / "dp1")}),
        "mp_full": T.train(**{**common, **runs["mp_full"], "model_parallel_size": 1, "out_dir": str(tmp_path / "mp1")}),
        "mp_lora": T.train(**{**common, **runs["mp_lora"], "model_parallel_size": 1, "out_dir": str(tmp_path / "l1")}),
    }
    for name in runs:
        got, ref = two[name], one[name]
        assert [s for s, _ in got["loss"]] == [1, 2, 3, 4]
        for (_, a), (_, b) in zip(got["loss"] + got["dev_loss"], ref["loss"] + ref["dev_loss"]):
            assert abs(a - b) < 1e-5, (name, got["loss"], ref["loss"])
        folder = "merged" if name == "mp_lora" else "model"
        a = open_checkpoint(got["outputs"][folder])  # 2 shards when model parallel: merged on read
        b = open_checkpoint(ref["outputs"][folder])
        assert len(a.readers) == (2 if name != "dp" else 1)
        for key in b.readers[0].keys():
            ta, tb = read_slice(a.readers, key, 0, 1), read_slice(b.readers, key, 0, 1)
            assert torch.allclose(ta, tb, atol=1e-5, rtol=0), (name, key, (ta - tb).abs().max())
    a, b = (load_file(str(Path(s["outputs"]["adapter"]) / "adapter.safetensors"))
            for s in (two["mp_lora"], one["mp_lora"]))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in a)


def test_activation_checkpointing_and_dev_file(setup):
    """Recomputing each block in backward changes memory, not results; a separate dev file replaces the split."""
    dev = setup["root"] / "dev.txt"
    dev.write_text("the little girl\nthe big green melon\n")
    a = run(setup, "ac0", method="lora", max_steps=3, dev_data=str(dev), eval_every=3)
    b = run(setup, "ac1", method="lora", max_steps=3, dev_data=str(dev), eval_every=3, activation_checkpointing=True)
    assert [x for _, x in a["loss"]] == pytest.approx([x for _, x in b["loss"]], abs=1e-6)
    assert [s for s, _ in a["dev_loss"]] == [s for s, _ in b["dev_loss"]] and len(a["dev_loss"]) == 2
    assert [x for _, x in a["dev_loss"]] == pytest.approx([x for _, x in b["dev_loss"]], abs=1e-6)
    ta, tb = (load_file(str(Path(s["outputs"]["adapter"]) / "adapter.safetensors")) for s in (a, b))
    assert all(torch.allclose(ta[k], tb[k], atol=1e-6) for k in ta)


def test_cli_and_clear_errors(setup, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "kollama.train", "--data", setup["data"], "--ckpt_dir", setup["base"],
           "--tokenizer_path", setup["tok"], "--out_dir", str(out), "--method", "lora", "--template", "text",
           "--cutoff_len", "32", "--max_steps", "2", "--micro_batch_size", "2", "--eval_every", "2", "--progress",
           "False"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "adapter" / "adapter.safetensors").is_file() and "trainable params" in proc.stdout
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 2]
    with pytest.raises(ValueError, match="--method must be"):
        run(setup, "x", method="dora")
    with pytest.raises(ValueError, match="fewer than one global batch"):
        run(setup, "x", micro_batch_size=500)


def test_stories260k_lora_on_nsmc_lowers_dev_loss(test_data, tmp_path):
    """Real data: stories260K (English TinyStories) adapted with LoRA to Korean movie reviews (NSMC) as plain
    text; tok512 has byte fallback, so Hangul arrives as UTF-8 byte pieces the model rarely saw."""
    model_bin, tok, nsmc = need(test_data, "stories260K.bin", "tok512.model", "korean/nsmc_train.jsonl")
    from llama.convert import llama2c

    base = llama2c(str(model_bin), str(tmp_path / "stories260K"), tokenizer=str(tok))
    rows = [json.loads(x) for x in nsmc.read_text(encoding="utf-8").splitlines()[:200]]
    data = tmp_path / "nsmc.jsonl"
    data.write_text("".join(json.dumps({"text": r["text"]}, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    summary = T.train(str(data), base, str(tok), str(tmp_path / "out"), method="lora", template="text",
                      cutoff_len=128, packing=True, block_size=256, micro_batch_size=4, max_steps=20, lr=2e-2,
                      warmup_steps=2, lora_targets="wq,wk,wv,wo,w1,w2,w3", lora_r=8, lora_dropout=0.0,
                      dev_fraction=0.1, eval_every=20, save_every=0, progress=False, seed=0)
    (_, before), (_, after) = summary["dev_loss"]
    print(f"stories260K + LoRA on NSMC: dev loss {before:.4f} -> {after:.4f}")
    assert after < before - 1.0
