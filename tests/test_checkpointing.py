"""kollama/train/checkpointing.py without the trainer: manifests and verification, resume that skips damaged checkpoints
(and keeps them), exact restore, a full disk that loses nothing (also on one rank of two), rotation, checkpoints of
the previous format, quarantine of a diverged step, and metrics.jsonl repair."""
import errno
import hashlib
import json
import logging
import re
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import free_port, random_model, set_dist_env, tiny_args
from kollama.train import checkpointing as C
from kollama.train.run_folder import RunLog

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIG = {"method": "full", "lr": 1e-3, "seed": 5, "world_size": 1}
EXTRA = {"fingerprint": [60, 1234, 5], "base": {"path": "/base", "sha256": "ab" * 32}, "tokenizer_sha256": "cd" * 32}
RANK0 = dict(rank=0, mp_rank=0, dp_rank=0)
ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def trained(seed: int = 0):
    """A tiny model and an AdamW that has taken one step (so the optimizer has state to save)."""
    model = random_model(tiny_args(), seed=seed)
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW([p for _, p in named], lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _, p in named:
        p.grad = torch.randn(p.shape, generator=g)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, named, optimizer


def save(root, step, state, **kw):
    model, named, optimizer = state
    return C.save_trainer_state(root, step, model, named, optimizer, CONFIG, **RANK0, extra_state=EXTRA, **kw)


def steps(root):
    return sorted(p.name for p in Path(root).iterdir())


def flip_byte(path: Path, at: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def state():
    return trained(0)


def test_manifest_written_and_state_restored_exactly(tmp_path, state):
    path = save(tmp_path, 2, state)
    assert path == tmp_path / "step-000002"
    assert steps(path) == ["manifest.json", "optimizer.mp00.pt", "rng.rank000.pt", "trainer_state.json",
                           "weights.mp00.safetensors"]  # no scheduler.pt, no temporary files
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == 1 and manifest["step"] == 2
    assert set(manifest["files"]) == {"optimizer.mp00.pt", "rng.rank000.pt", "trainer_state.json",
                                      "weights.mp00.safetensors"}
    for name, entry in manifest["files"].items():
        data = (path / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    canonical = json.dumps(CONFIG, sort_keys=True, separators=(",", ":")).encode()
    assert manifest["config_hash"] == C.config_hash(CONFIG) == hashlib.sha256(canonical).hexdigest()
    assert C.config_hash(dict(reversed(list(CONFIG.items())))) == C.config_hash(CONFIG)
    assert manifest["base"] == EXTRA["base"] and manifest["tokenizer_sha256"] == EXTRA["tokenizer_sha256"]
    assert json.loads((path / "trainer_state.json").read_text()) == {"step": 2, "config": CONFIG, **EXTRA}
    assert C.verify_checkpoint(path) is None
    assert C.verify_checkpoint(path, C.files_to_read(0, 0)) is None
    assert C.find_resumable(tmp_path, C.files_to_read(0, 0)) == (path, [])

    model, named, optimizer = state
    expected_next = torch.rand(4)  # the RNG stream right after the save
    weights = {n: p.detach().clone() for n, p in named}
    moments = {i: {k: v.clone() for k, v in s.items()} for i, s in optimizer.state_dict()["state"].items()}
    other = trained(1)  # different weights and optimizer state
    torch.manual_seed(123)
    loaded = C.load_trainer_state(path, other[0], other[1], other[2], **RANK0)
    assert loaded == {"step": 2, "config": CONFIG, **EXTRA}
    assert torch.equal(torch.rand(4), expected_next)
    for n, p in other[1]:
        assert torch.equal(p, weights[n]), n
    for i, s in other[2].state_dict()["state"].items():
        for k, v in s.items():
            assert torch.equal(v, moments[i][k]), (i, k)


def _flip_weights(p):
    flip_byte(p / "weights.mp00.safetensors")


def _truncate_optimizer(p):
    f = p / "optimizer.mp00.pt"
    f.write_bytes(f.read_bytes()[:-7])


def _delete_rng(p):
    (p / "rng.rank000.pt").unlink()


def _garble_manifest(p):
    (p / "manifest.json").write_text('{"format": 1, "step": 4, "files": {')


@pytest.mark.parametrize("damage, reason", [
    (_flip_weights, "weights.mp00.safetensors sha256 mismatch"),
    (_truncate_optimizer, "optimizer.mp00.pt is .* bytes, the manifest says"),
    (_delete_rng, "missing rng.rank000.pt"),
    (_garble_manifest, "manifest.json is not readable JSON"),
])
def test_damaged_checkpoint_is_reported_skipped_and_kept(tmp_path, state, damage, reason):
    good, bad = save(tmp_path, 2, state), save(tmp_path, 4, state)
    damage(bad)
    assert C.verify_checkpoint(good) is None
    assert re.search(reason, C.verify_checkpoint(bad))
    found, damaged = C.find_resumable(tmp_path, C.files_to_read(0, 0))
    assert found == good
    assert [p for p, _ in damaged] == [bad] and re.search(reason, damaged[0][1])
    assert "\n" not in damaged[0][1]
    assert bad.is_dir()  # skipped, never deleted


def test_files_of_another_layout_are_reported(tmp_path, state):
    path = save(tmp_path, 2, state)
    names = C.files_to_read(rank=1, mp_rank=0, dp_rank=1, fsdp=True)
    assert "weights.mp00.dp01.safetensors is not in this checkpoint" in C.verify_checkpoint(path, names)
    assert C.find_resumable(tmp_path, names)[0] is None
    with pytest.raises(FileNotFoundError, match="missing weights.mp00.dp01.safetensors"):
        C.load_trainer_state(path, *state, rank=1, mp_rank=0, dp_rank=1, fsdp=True)


def test_load_checks_names_and_shapes(tmp_path, state):
    path = save(tmp_path, 2, state)
    model, named, optimizer = trained(0)
    with pytest.raises(ValueError, match="do not match the model's trainable parameters"):
        C.load_trainer_state(path, model, named[1:], optimizer, **RANK0)
    wrong = random_model(tiny_args(dim=64, n_heads=4, n_kv_heads=2), seed=0)
    with pytest.raises(ValueError, match=r"tok_embeddings.weight was saved with shape \(128, 48\)"):
        C.load_trainer_state(path, wrong, list(wrong.named_parameters()), optimizer, **RANK0)


@pytest.mark.parametrize("target", ["save_file", "fsync"])
def test_disk_full_raises_and_loses_nothing(tmp_path, state, monkeypatch, target):
    earlier = save(tmp_path, 2, state)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    if target == "save_file":
        monkeypatch.setattr(C, "save_file", full)
    else:
        monkeypatch.setattr(C.os, "fsync", full)
    with pytest.raises(C.CheckpointSaveError) as info:
        save(tmp_path, 4, state)
    message = str(info.value)
    assert "step 4" in message and "weights.mp00.safetensors" in message
    assert "No space left on device" in message and f"newest: {earlier}" in message and "\n" not in message
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert steps(tmp_path) == ["step-000002"]  # no temporary folder, no step-000004
    assert steps(earlier) == ["manifest.json", "optimizer.mp00.pt", "rng.rank000.pt", "trainer_state.json",
                              "weights.mp00.safetensors"]
    assert C.verify_checkpoint(earlier) is None


def test_failed_manifest_or_resave_keeps_the_previous_copy(tmp_path, state, monkeypatch):
    earlier = save(tmp_path, 2, state)
    before = {p.name: p.read_bytes() for p in earlier.iterdir()}
    real = C.write_json

    def manifest_full(path, obj):
        if Path(path).name == "manifest.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, obj)
    monkeypatch.setattr(C, "write_json", manifest_full)
    with pytest.raises(C.CheckpointSaveError, match=r"step 2 .*manifest.json.*No space left on device.*"
                                                    r"step-000002, the previous copy of this step\)$"):
        save(tmp_path, 2, trained(1))  # the same step again, with other weights
    monkeypatch.undo()
    assert steps(tmp_path) == ["step-000002"]
    assert {p.name: p.read_bytes() for p in earlier.iterdir()} == before


def test_same_step_is_replaced_once_complete(tmp_path, state):
    save(tmp_path, 2, state)
    other = trained(1)
    save(tmp_path, 2, other)
    assert steps(tmp_path) == ["step-000002"]
    model, named, optimizer = trained(2)
    C.load_trainer_state(tmp_path / "step-000002", model, named, optimizer, **RANK0)
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(named, other[1]))


def test_rotation_keeps_newest_intact_protected_and_damaged(tmp_path, state):
    for step in (2, 4, 6):
        save(tmp_path, step, state, keep=2)
    assert steps(tmp_path) == ["step-000004", "step-000006"]
    for name in ("notes", "step-abc", "diverged-step-000001", ".step-000099.tmp"):
        (tmp_path / name).mkdir()
    flip_byte(tmp_path / "step-000004" / "weights.mp00.safetensors")
    save(tmp_path, 8, state, keep=2)  # 8 and 6 are the newest intact; 4 is damaged: kept
    assert steps(tmp_path) == ["diverged-step-000001", "notes", "step-000004", "step-000006", "step-000008",
                               "step-abc"]  # the crash leftover .step-000099.tmp is gone
    save(tmp_path, 10, state, keep=2, protect=[tmp_path / "step-000006"])
    assert [s for s in steps(tmp_path) if s.startswith("step-0")] == ["step-000004", "step-000006", "step-000008",
                                                                      "step-000010"]
    save(tmp_path, 12, state, keep=2)
    assert [s for s in steps(tmp_path) if s.startswith("step-0")] == ["step-000004", "step-000010", "step-000012"]
    # Saving an older step again (after resuming from it) keeps the newer intact one and the one just written.
    save(tmp_path, 10, state, keep=1)
    assert [s for s in steps(tmp_path) if s.startswith("step-0")] == ["step-000004", "step-000010", "step-000012"]
    for keep in (0, None):
        save(tmp_path, 14, state, keep=keep)
    assert [s for s in steps(tmp_path) if s.startswith("step-0")] == ["step-000004", "step-000010", "step-000012",
                                                                      "step-000014"]


def test_checkpoint_of_the_previous_format_is_accepted(tmp_path, state, caplog):
    path = save(tmp_path, 2, state)
    (path / "manifest.json").unlink()  # the previous version wrote no manifest, and a scheduler.pt
    torch.save({"last_epoch": 2}, path / "scheduler.pt")
    with caplog.at_level(logging.WARNING, logger="kollama.train.checkpointing"):
        assert C.verify_checkpoint(path, C.files_to_read(0, 0)) is None
    assert "written before manifests; not verified" in caplog.text
    assert C.find_resumable(tmp_path, C.files_to_read(0, 0)) == (path, [])
    assert C.latest_checkpoint(tmp_path) == path
    assert C.load_trainer_state(path, *trained(1), **RANK0)["step"] == 2  # scheduler.pt is ignored
    (path / "rng.rank000.pt").unlink()
    assert C.verify_checkpoint(path, C.files_to_read(0, 0)) == "missing rng.rank000.pt"


def test_quarantine_renames_diverged_step(tmp_path, state):
    good, bad = save(tmp_path, 2, state), save(tmp_path, 4, state)
    moved = C.quarantine_checkpoint(tmp_path, 4)
    assert moved == tmp_path / "diverged-step-000004" and moved.is_dir() and not bad.exists()
    assert C.verify_checkpoint(moved) is None  # intact, just out of the way
    assert C.find_resumable(tmp_path) == (good, []) and C.latest_checkpoint(tmp_path) == good
    save(tmp_path, 4, state)
    assert C.quarantine_checkpoint(tmp_path, 4) == tmp_path / "diverged-step-000004-2"
    assert C.quarantine_checkpoint(tmp_path, 6) is None
    save(tmp_path, 6, state, keep=1)  # rotation leaves quarantined folders alone
    assert steps(tmp_path) == ["diverged-step-000004", "diverged-step-000004-2", "step-000006"]


def test_metrics_torn_line_repaired(tmp_path):
    run = RunLog(tmp_path / "out", is_main=True)
    run.write_json("config.json", CONFIG)
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == CONFIG
    for step in range(1, 7):
        run.append_metrics({"step": step, "loss": 1.0 / step})
    run.sync()
    with open(run.metrics, "ab") as f:
        f.write(b'{"step": 7, "lo')  # the killed run's last, incomplete write
    notice = run.repair_metrics(4)
    assert "dropped 2 records logged after step 4" in notice and "removed 1 torn line" in notice
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3, 4]
    assert run.metrics.read_text().endswith("}\n")
    before = run.metrics.stat().st_mtime_ns, run.metrics.read_bytes()
    assert run.repair_metrics(4) is None  # clean: untouched
    assert (run.metrics.stat().st_mtime_ns, run.metrics.read_bytes()) == before
    run.append_metrics({"step": 5, "loss": 0.2})
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "metrics.jsonl"]

    only_torn = RunLog(tmp_path / "b", is_main=True)
    only_torn.append_metrics({"step": 1})
    with open(only_torn.metrics, "ab") as f:
        f.write(b'{"step": 2}')  # complete JSON but no newline: the write was cut before it
    assert only_torn.repair_metrics(9) == f"{only_torn.metrics}: removed 1 torn line (an incomplete write of an " \
                                          f"interrupted run)"

    other = RunLog(tmp_path / "c", is_main=False)
    other.write_json("config.json", CONFIG)
    other.append_metrics({"step": 1})
    other.sync()
    assert other.repair_metrics(0) is None and not (tmp_path / "c").exists()


# ---------------------------------------------------------------------------------------------------------------
# Two processes (gloo)
# ---------------------------------------------------------------------------------------------------------------
def _two_rank_worker(rank, world, port, root, out):
    torch.set_num_threads(1)
    set_dist_env(rank, world, port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        root, state = Path(root), trained(rank)  # each rank its own shard (FSDP layout, plain tensors)
        kw = dict(rank=rank, mp_rank=0, dp_rank=rank, fsdp=True)
        C.save_trainer_state(root, 2, *state, CONFIG, **kw)
        real, error = C.save_file, None
        if rank == 1:  # the disk fills up while rank 1 writes its shard
            C.save_file = lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
        try:
            C.save_trainer_state(root, 4, *state, CONFIG, **kw)
        except C.CheckpointSaveError as e:
            error = str(e)
        C.save_file = real
        dist.barrier()  # both ranks look before either starts the next save
        after_failure = sorted(p.name for p in root.iterdir())
        dist.barrier()
        C.save_trainer_state(root, 6, *state, CONFIG, **kw)
        if rank == 1:  # damage a file only rank 1 reads: both ranks must still skip step 6
            flip_byte(root / "step-000006" / "weights.mp00.dp01.safetensors")
        dist.barrier()
        found, damaged = C.find_resumable(root, C.files_to_read(rank, 0, rank, fsdp=True))
        loaded = C.load_trainer_state(found, *trained(5), **kw)
        moved = C.quarantine_checkpoint(root, 6)  # collective, as the trainer calls it on divergence
        after_quarantine = C.find_resumable(root, C.files_to_read(rank, 0, rank, fsdp=True))
        torch.save({"error": error, "after_failure": after_failure, "found": found, "damaged": damaged,
                    "step": loaded["step"], "moved": moved, "after_quarantine": after_quarantine},
                   Path(out) / f"rank{rank}.pt")
        dist.barrier()  # neither rank tears gloo down while the other may still be in a collective
    finally:
        dist.destroy_process_group()


def test_disk_full_on_one_rank_raises_on_both(tmp_path):
    root = tmp_path / "checkpoints"
    ctx = mp.start_processes(_two_rank_worker, args=(2, free_port(), str(root), str(tmp_path)), nprocs=2,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + 240
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail("the ranks hung")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for got in results:
        assert got["error"] == results[0]["error"]
        assert got["error"].startswith("checkpoint step 4 was not saved: writing weights.mp00.dp01.safetensors "
                                       "(rank 1) failed: No space left on device; earlier checkpoints are intact "
                                       f"(newest: {root / 'step-000002'})")
        assert got["after_failure"] == ["step-000002"]
        assert got["found"] == root / "step-000002" and got["step"] == 2
        assert [(p, r) for p, r in got["damaged"]] == [
            (root / "step-000006", "weights.mp00.dp01.safetensors sha256 mismatch (the file changed after it was "
                                   "saved) (rank 1)")]
        assert got["after_quarantine"] == (root / "step-000002", [])
    assert results[0]["moved"] == results[1]["moved"] == root / "diverged-step-000006"
    # Rank 0's own files of step 6 are intact: only the rank-1 check made both ranks skip it.
    assert C.verify_checkpoint(root / "diverged-step-000006", C.files_to_read(0, 0, 0, fsdp=True)) is None
