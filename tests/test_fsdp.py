"""kollama.train --fsdp (kollama/train/fsdp.py) on CPU processes (gloo): FSDP over 2 processes, and FSDP x model
parallel over 4, give one process's losses and weights; each process stores its share of every weight and of AdamW's state
(also uneven shares, over 3); resume is bit-exact; unsupported settings fail with a clear message."""
import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from helpers import free_port, short_lines, tiny_training_base
from kollama import train as T
from kollama.train.fsdp import FSDPError
from llama.checkpoint import read_slice
from llama.loading import open_checkpoint
from train_workers import train_worker

pytestmark = pytest.mark.usefixtures("one_thread")
LR, STEPS = 3e-3, 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    tok, base, _ = tiny_training_base(root)
    (root / "d.txt").write_text("\n".join(short_lines(60)) + "\n")
    # 5 dev rows over 2 ranks at micro batch 1: rank 0 runs 3 forwards, rank 1 has 2 rows and must run a third
    # (each FSDP forward is collective).
    (root / "dev.txt").write_text("\n".join(short_lines(65)[60:]) + "\n")
    # Every knob whose FSDP path differs: accumulation (several reduce-scatters per step), clipping (norm over
    # shards), activation checkpointing (recompute inside FSDP's gather), held-out bits/char (calls
    # model.hidden_states, not model(...)), warmup. Global batch 4 in every run.
    common = dict(data=str(root / "d.txt"), ckpt_dir=str(base), tokenizer_path=str(tok), method="full",
                  template="text", cutoff_len=32, max_steps=STEPS, lr=LR, warmup_steps=1, max_grad_norm=0.05,
                  dev_data=str(root / "dev.txt"), eval_every=2, heldout_text=str(root / "dev.txt"),
                  activation_checkpointing=True, save_every=4, progress=False, seed=5,
                  micro_batch_size=1, gradient_accumulation_steps=2)
    reference = T.train(**{**common, "micro_batch_size": 2, "out_dir": str(root / "one")})
    return dict(root=root, common=common, reference=reference)


def spawn(setup, world, runs):
    out = setup["root"] / f"summaries-{world}.pt"
    port_runs = [(free_port(), {**setup["common"], **kw}) for kw in runs]
    mp.spawn(train_worker, args=(world, port_runs, str(out)), nprocs=world, join=True)
    return torch.load(out, weights_only=False)


def assert_same_run(got, ref, what):
    assert [s for s, _ in got["loss"]] == [1, 2, 3, 4] and [s for s, _ in got["dev_loss"]] == [0, 2, 4]
    for key in ("loss", "dev_loss", "heldout_bpc"):
        for (_, a), (_, b) in zip(got[key], ref[key]):
            assert abs(a - b) < 1e-5, (what, key, got[key], ref[key])
    # AdamW divides by sqrt(v): where a gradient is near 0, summation-order rounding moves that element's update
    # by a visible fraction of lr. 0.5 % of the largest possible total move (lr x steps) is still 50x below one
    # step's update (~lr), so a misplaced or missing gradient cannot pass.
    atol = 5e-3 * LR * STEPS
    a, b = open_checkpoint(got["outputs"]["model"]), open_checkpoint(ref["outputs"]["model"])
    for key in b.readers[0].keys():
        ta, tb = read_slice(a.readers, key, 0, 1), read_slice(b.readers, key, 0, 1)
        assert torch.allclose(ta, tb, atol=atol, rtol=0), (what, key, (ta - tb).abs().max())


def test_fsdp_on_two_processes_equals_one(setup):
    root = setup["root"]
    fsdp, bf16 = spawn(setup, 2, [dict(fsdp=True, out_dir=str(root / "fsdp2")),
                                  dict(fsdp=True, dtype="bfloat16", out_dir=str(root / "fsdp2-bf16"))])
    assert_same_run(fsdp, setup["reference"], "fsdp x2")
    # Mixed precision (the CUDA default): weights gathered and used in bf16, the shards and AdamW stay fp32. bf16
    # keeps 8 bits of mantissa, so a loss of ~5 moves by a few 1e-3 at most.
    ref = setup["reference"]
    diffs = [abs(a - b) for (_, a), (_, b) in zip(bf16["loss"] + bf16["dev_loss"], ref["loss"] + ref["dev_loss"])]
    assert 1e-5 < max(diffs) < 1e-2, (bf16["loss"], ref["loss"])  # it did compute in bf16, and only rounding moved
    bf16_shard = load_file(str(root / "fsdp2-bf16/checkpoints/step-000004/weights.mp00.dp00.safetensors"))
    assert {t.dtype for t in bf16_shard.values()} == {torch.float32}

    # Each process saved only its half (dim-0 chunk) of every weight and of AdamW's moments, and the halves
    # are the final weights.
    step4 = root / "fsdp2" / "checkpoints" / "step-000004"
    halves = [load_file(str(step4 / f"weights.mp00.dp{r:02d}.safetensors")) for r in range(2)]
    moments = [torch.load(step4 / f"optimizer.mp00.dp{r:02d}.pt", weights_only=True)["state"] for r in range(2)]
    final = load_file(str(root / "fsdp2" / "model" / "consolidated.00.safetensors"))
    assert halves[0].keys() == final.keys() and not (step4 / "weights.mp00.safetensors").exists()
    for name, full in final.items():
        assert halves[0][name].shape[0] == halves[1][name].shape[0] == full.shape[0] // 2, name
        assert torch.equal(torch.cat([halves[0][name], halves[1][name]]), full), name
    for r in range(2):
        assert sorted(tuple(s["exp_avg"].shape) for s in moments[r].values()) == \
            sorted(tuple(t.shape) for t in halves[r].values())


def test_fsdp_uneven_shards_resume_bit_exactly(setup):
    """3 processes: the 128-row embedding and output split 43 / 43 / 42 (FSDP pads the last shard internally).
    An interrupted and resumed run ends with every shard bit-identical to an uninterrupted one."""
    root = setup["root"]
    kw = dict(fsdp=True, max_steps=6, save_every=3, eval_every=0, heldout_text=None)
    straight, first, second = spawn(setup, 3, [
        dict(out_dir=str(root / "straight"), **kw),
        dict(out_dir=str(root / "resumed"), stop_at_step=3, **kw),
        dict(out_dir=str(root / "resumed"), resume=True, **kw),
    ])
    assert (straight["step"], first["step"], second["step"]) == (6, 3, 6)
    for r, rows in enumerate((43, 43, 42)):
        a, b = (load_file(str(root / run / f"checkpoints/step-000006/weights.mp00.dp{r:02d}.safetensors"))
                for run in ("straight", "resumed"))
        assert a["output.weight"].shape[0] == a["tok_embeddings.weight"].shape[0] == rows
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), r
    metrics = [json.loads(x) for x in (root / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4, 5, 6]
    # The straight run's model/ equals its own shards, gathered (padding dropped).
    final = load_file(str(root / "straight" / "model" / "consolidated.00.safetensors"))
    shards = [load_file(str(root / f"straight/checkpoints/step-000006/weights.mp00.dp{r:02d}.safetensors"))
              for r in range(3)]
    assert all(torch.equal(torch.cat([s[k] for s in shards]), final[k]) for k in final)


def test_fsdp_times_model_parallel_on_four_processes_equals_one(setup):
    """World 4 = 2 data-parallel (FSDP) x 2 model-parallel: FSDP shards each model-parallel slice."""
    (two_d,) = spawn(setup, 4, [dict(fsdp=True, model_parallel_size=2, out_dir=str(setup["root"] / "fsdp2x2"))])
    assert_same_run(two_d, setup["reference"], "fsdp x2, mp x2")
    assert len(open_checkpoint(two_d["outputs"]["model"]).readers) == 2  # one Meta shard per model-parallel rank


def test_unsupported_settings_say_what_to_do(setup, tmp_path):
    common = {**setup["common"], "out_dir": str(tmp_path / "x")}
    with pytest.raises(FSDPError, match="full fine-tuning only, not --method lora.*--model_parallel_size"):
        T.train(**{**common, "method": "lora", "fsdp": True})
    with pytest.raises(FSDPError, match="full fine-tuning only, not --trainable embeddings"):
        T.train(**{**common, "trainable": "embeddings", "new_rows_from": 100, "fsdp": True})
    with pytest.raises(FSDPError, match="shards over data-parallel processes, but there is 1"):
        T.train(**{**common, "fsdp": True})
    assert not Path(tmp_path / "x").exists()  # refused before anything was written
