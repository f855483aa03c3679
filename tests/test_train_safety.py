"""The trainer never loses a run, and tells the user what to do: a reused run folder, a damaged newest checkpoint, a
torn metrics line, a full disk, a diverged run resumed with a lower lr, another base or tokenizer on resume, bad
encodings and bad options; the config file, --help and summary.json."""
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import random_model, save_meta, short_lines, tiny_training_base
from kollama import train as T
from kollama.adapters.fingerprint import FingerprintMismatch
from kollama.train import ConfigError, TrainConfig, optim
from kollama.train import checkpointing as CK
from kollama.train.checkpointing import CheckpointSaveError, TrainingDiverged

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    tok, base, args = tiny_training_base(root)
    (root / "d.txt").write_text("\n".join(short_lines(40)) + "\n")
    return dict(root=root, tok=str(tok), base=str(base), data=str(root / "d.txt"), args=args)


def run(setup, out, **kw):
    kw = {"method": "full", "template": "text", "cutoff_len": 32, "micro_batch_size": 4, "max_steps": 6, "lr": 3e-3,
          "eval_every": 0, "save_every": 2, "save_total_limit": 5, "progress": False, "dev_fraction": 0.1,
          "seed": 5, **kw}
    return T.train(setup["data"], setup["base"], setup["tok"], str(Path(setup["root"]) / out), **kw)


def metrics(folder):
    return [json.loads(x) for x in (Path(folder) / "metrics.jsonl").read_text().splitlines()]


def cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "kollama.train", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_reused_out_dir_is_refused_and_overwrite_moves_it_aside(setup):
    out = setup["root"] / "reuse"
    run(setup, "reuse", max_steps=2)
    before = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match=r"holds a previous run \(checkpoints, config.json, metrics.jsonl.*--resume"
                                          r".*--overwrite"):
        run(setup, "reuse", max_steps=4)
    assert (out / "metrics.jsonl").read_bytes() == before  # untouched
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    (setup["root"] / "notarun").mkdir()
    (setup["root"] / "notarun" / "mine.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"holds other files \(mine.txt\)"):
        run(setup, "notarun", max_steps=2)
    run(setup, "reuse", max_steps=4, overwrite=True)
    moved = [p for p in setup["root"].iterdir() if p.name.startswith("reuse.replaced-")]
    assert len(moved) == 1 and (moved[0] / "metrics.jsonl").read_bytes() == before
    assert [m["step"] for m in metrics(out) if "loss" in m] == [1, 2, 3, 4]


def test_resume_skips_a_damaged_newest_checkpoint_and_repairs_torn_metrics(setup, capsys):
    straight = run(setup, "straight")
    out = setup["root"] / "damaged"
    run(setup, "damaged", stop_at_step=4)
    # The newest checkpoint is damaged (a flipped byte) and the last metrics line was torn by a kill mid-write.
    weights = out / "checkpoints/step-000004/weights.mp00.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 4.')
    resumed = run(setup, "damaged", resume=True)
    said = capsys.readouterr().out
    assert "skipping damaged checkpoint" in said and "step-000004" in said and "sha256" in said
    assert "torn line" in said and "resumed from" in said and "step-000002" in said
    assert [m["step"] for m in metrics(out) if "loss" in m] == [1, 2, 3, 4, 5, 6]
    assert resumed["loss"] == straight["loss"][2:]  # steps 3-6 redone exactly from step 2
    a = load_file(str(setup["root"] / "straight/model/consolidated.00.safetensors"))
    b = load_file(str(out / "model/consolidated.00.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_disk_full_while_saving_keeps_earlier_checkpoints(setup, monkeypatch):
    out = setup["root"] / "full"
    real = CK.atomic_write

    def no_space(path, write_fn):
        if "step-000004" in str(path) and "optimizer" in Path(path).name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, write_fn)

    monkeypatch.setattr(CK, "atomic_write", no_space)
    with pytest.raises(CheckpointSaveError, match=r"step 4 .*optimizer.*No space left on device.*step-000002"):
        run(setup, "full")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]  # no temp folder left
    assert CK.verify_checkpoint(out / "checkpoints/step-000002") is None
    monkeypatch.setattr(CK, "atomic_write", real)
    assert run(setup, "full", resume=True)["step"] == 6


def test_loss_spike_stops_and_resume_with_lower_lr_works(setup, monkeypatch):
    """A loss far above the recent mean stops the run before the update; the checkpoint that produced it is moved
    aside; the message's advice (--resume with a lower --lr) works and changes the lr from there on."""
    real = optim.token_loss
    calls = {"n": 0}

    def spiking(logits, labels, denominator):
        calls["n"] += 1
        loss = real(logits, labels, denominator)
        return loss * 50 if calls["n"] == 5 else loss  # step 5 (one micro batch per step)

    monkeypatch.setattr(optim, "token_loss", spiking)
    out = setup["root"] / "spike"
    kw = dict(divergence_window=3, divergence_factor=4.0)
    with pytest.raises(TrainingDiverged, match=r"step 5: loss .* more than --divergence_factor 4 x the mean .* of "
                                               r"the previous 3 steps.*moved to .*diverged-step-000004.*last good "
                                               r"checkpoint is .*step-000002.*--resume --lr 0.0015"):
        run(setup, "spike", **kw)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["diverged-step-000004", "step-000002"]
    assert metrics(out)[-1]["event"] == "diverged"
    monkeypatch.setattr(optim, "token_loss", real)
    resumed = run(setup, "spike", resume=True, lr=1.5e-3, **kw)
    assert resumed["step"] == 6
    lrs = [m["lr"] for m in metrics(out) if "loss" in m]
    assert lrs[:2] == [3e-3 * optim.lr_lambda(0, 6, 0.0)(s) for s in range(2)]
    assert lrs[2:] == [1.5e-3 * optim.lr_lambda(0, 6, 0.0)(s) for s in range(2, 6)]


def test_resume_refuses_another_base_or_tokenizer(setup, tmp_path):
    run(setup, "fp", stop_at_step=2)
    other = save_meta(random_model(setup["args"], seed=9, std=0.1), tmp_path / "other")
    with pytest.raises(FingerprintMismatch, match=r"checkpoint .*step-000002 was trained on base .* but --ckpt_dir "
                                                  r".*other.*--allow_base_mismatch"):
        T.train(setup["data"], str(other), setup["tok"], str(setup["root"] / "fp"), method="full", template="text",
                cutoff_len=32, micro_batch_size=4, max_steps=6, lr=3e-3, eval_every=0, save_every=2,
                progress=False, dev_fraction=0.1, seed=5, resume=True)
    # A tokenizer of the same size (128 pieces) but another file: same row count, so only its sha256 can tell.
    tok2 = tmp_path / "tok2.model"
    import sentencepiece.sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(Path(setup["tok"]).read_bytes())
    proto.pieces[-1].piece = "\u2581zz"
    tok2.write_bytes(proto.SerializeToString())
    with pytest.raises(FingerprintMismatch, match=r"tokenizer .*--allow_base_mismatch"):
        T.train(setup["data"], setup["base"], str(tok2), str(setup["root"] / "fp"), method="full", template="text",
                cutoff_len=32, micro_batch_size=4, max_steps=6, lr=3e-3, eval_every=0, save_every=2,
                progress=False, dev_fraction=0.1, seed=5, resume=True)
    # The explicit flag overrides (a logged warning) and the run continues.
    s = T.train(setup["data"], setup["base"], str(tok2), str(setup["root"] / "fp"), method="full", template="text",
                cutoff_len=32, micro_batch_size=4, max_steps=6, lr=3e-3, eval_every=0, save_every=2,
                progress=False, dev_fraction=0.1, seed=5, resume=True, allow_base_mismatch=True)
    assert s["step"] == 6


def test_resume_with_a_changed_fixed_option_is_refused_before_loading(setup, monkeypatch):
    run(setup, "fixed", stop_at_step=2)
    from kollama.train.recipe import TrainRecipe

    def must_not_load(self):
        raise AssertionError("the data were loaded before the changed option was noticed")

    monkeypatch.setattr(TrainRecipe, "load_data", must_not_load)
    for change, name in ((dict(template="alpaca"), "template"), (dict(cutoff_len=24), "cutoff_len")):
        with pytest.raises(ConfigError, match=f"cannot resume the run in .*fixed.*'{name}'"):
            run(setup, "fixed", resume=True, **change)


def test_config_file_overrides_validation_and_help(setup, tmp_path):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"data": setup["data"], "ckpt_dir": setup["base"], "tokenizer_path": setup["tok"],
                               "method": "lora", "template": "text", "cutoff_len": 32, "max_steps": 2,
                               "lr": 1e-3, "eval_every": 0, "save_every": 0, "progress": False}))
    c = TrainConfig.load(str(cfg), out_dir=str(tmp_path / "o"), lr=2e-3, lora_targets="wq,wk")
    assert (c.method, c.lr, c.lora_targets, c.max_steps) == ("lora", 2e-3, ["wq", "wk"], 2)
    s = T.train(config=str(cfg), out_dir=str(tmp_path / "o"))
    assert s["step"] == 2 and json.loads((tmp_path / "o/config.json").read_text())["lr"] == 1e-3
    yml = tmp_path / "run.yaml"  # the same as YAML, with a list written the YAML way
    yml.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in json.loads(cfg.read_text()).items())
                   + "lora_targets:\n  - wq\n  - w2\n")
    assert TrainConfig.load(str(yml), out_dir="x").lora_targets == ["wq", "w2"]
    bad = {"epochs": 0}, {"lr": -1}, {"method": "dora"}, {"lora_r": 0}, {"lora_targets": "wq,wz"}, {"lrr": 1}
    want = ["--epochs must be > 0", "--lr must be a positive number", "--method must be one of",
            "--lora_r must be >= 1", r"--lora_targets: unknown target\(s\) \['wz'\]", "unknown option 'lrr'; did you "
            "mean 'lr'"]
    for kw, message in zip(bad, want):
        with pytest.raises(ConfigError, match=message):
            TrainConfig.load(str(cfg), out_dir="x", **kw)
    with pytest.raises(ConfigError, match="--max_steps must be an integer, got 'ten'"):
        TrainConfig.load(str(cfg), out_dir="x", max_steps="ten")
    # --help lists every option with its doc; a bad option on the command line is one line, exit code 2.
    proc = cli("--help", cwd=tmp_path)
    assert proc.returncode == 0
    for f in TrainConfig.__dataclass_fields__.values():
        assert f"--{f.name} " in proc.stdout and f.metadata["help"] in proc.stdout
    proc = cli("--config", cfg, "--out_dir", tmp_path / "o2", "--epochs", "0", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --epochs must be > 0 (or give --max_steps), got 0.0"]


def test_bad_encoding_is_one_line_naming_file_and_line(setup, tmp_path):
    data = tmp_path / "ko.txt"
    data.write_bytes("첫 줄입니다\n둘째 줄\n".encode("cp949"))
    proc = cli("--data", data, "--ckpt_dir", setup["base"], "--tokenizer_path", setup["tok"], "--out_dir",
               tmp_path / "o", "--template", "text", "--max_steps", "1", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {data}:1: ") and "--encoding cp949" in line and "iconv" in line
    assert not (tmp_path / "o" / "config.json").exists()


def test_summary_json_feeds_the_report(setup, tmp_path):
    s = run(setup, "summary", method="lora", eval_every=3, save_every=0)
    summary = json.loads((setup["root"] / "summary/summary.json").read_text())
    assert summary["finished"] and summary["step"] == 6
    assert summary["first_loss"] == s["loss"][0][1] and summary["last_loss"] == s["loss"][-1][1]
    assert summary["best_dev_loss"] == min(d for _, d in s["dev_loss"])
    # r 8, dim 48, 4 heads of 12, 2 kv heads: wq A 8x48 + B 48x8, wv A 8x48 + B 24x8; 2 layers
    assert summary["trainable_params"] == 2 * ((8 * 48 + 48 * 8) + (8 * 48 + 24 * 8))
    assert summary["train_tokens"] > summary["target_tokens"] > 0 and summary["train_wall_time_s"] > 0
    assert len(summary["config_hash"]) == 64
    from kollama.eval.report import load_run

    info = load_run(setup["root"] / "summary")["info"]
    assert (info["trainable_params"], info["train_tokens"], info["train_wall_time_s"]) == (
        summary["trainable_params"], summary["train_tokens"], summary["train_wall_time_s"])
