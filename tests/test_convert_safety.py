"""Converter safety: a conversion never writes over what it reads, cleans up after itself (errors, Ctrl-C, SIGTERM,
killed runs), carries every companion file, refuses index paths outside the model folder, and answers bad
params.json / config.json values and non-checkpoint files with one clear CheckpointError."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import llama.checkpoint
from llama import convert
from llama.checkpoint import CheckpointError, read_params, reshard, write_checkpoint
from llama.loading import open_checkpoint
from llama.hf import hf_to_meta, meta_to_hf
from llama.llama2c import write_llama2c
from tests.helpers import params_of, random_model, save_meta, tiny_args

ROOT = Path(__file__).resolve().parents[1]
ARGS = tiny_args()  # dim 48, 6 heads, 2 kv heads


@pytest.fixture(scope="module")
def model():
    return random_model(ARGS)


@pytest.fixture
def meta(tmp_path, model):
    return save_meta(model, tmp_path / "work" / "meta", mp=1)


def snapshot(path: Path) -> dict:
    """Every file under ``path`` (or the file itself) with its bytes."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list:
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# ------------------------------------------------------------------------------------------------------------
# 1. The destination never overlaps the source; --overwrite swaps only a complete output
# ------------------------------------------------------------------------------------------------------------
def make_source(kind: str, tmp_path: Path, model) -> Path:
    """The source of command ``kind`` at tmp_path/work/<name>."""
    work = tmp_path / "work"
    if kind == "llama2c":
        work.mkdir(parents=True)
        return write_llama2c(work / "m.bin", params_of(ARGS), model.state_dict(), seq_len=16)
    meta = save_meta(model, work / "meta", mp=1)
    if kind == "hf_to_meta":
        return meta_to_hf(meta, work / "hf", show_progress=False)
    return meta


RUN = {
    "reshard": lambda src, dst: reshard(src, dst, 2, overwrite=True),
    "meta_to_hf": lambda src, dst: meta_to_hf(src, dst, overwrite=True, show_progress=False),
    "hf_to_meta": lambda src, dst: hf_to_meta(src, dst, mp=2, overwrite=True, show_progress=False),
    "llama2c": lambda src, dst: convert.llama2c(str(src), str(dst), mp=2, overwrite=True),
}


@pytest.mark.parametrize("relation", ["is", "is inside", "contains", "is (a symlink to it)"])
@pytest.mark.parametrize("kind", sorted(RUN))
def test_destination_overlapping_the_source_is_refused(tmp_path, model, kind, relation):
    src = make_source(kind, tmp_path, model)
    if relation == "is":
        dst = src
    elif relation == "is inside":
        dst = src / "out"
    elif relation == "contains":
        dst = src.parent
    else:
        dst = tmp_path / "link"
        dst.symlink_to(src)
    before = snapshot(src)
    with pytest.raises(CheckpointError) as e:
        RUN[kind](src, dst)
    message = str(e.value)
    assert f"destination {dst} {relation.split(' (')[0]} the source {src}" in message
    assert "choose a destination outside" in message and "\n" not in message
    assert snapshot(src) == before
    assert leftovers(src.parent) == [] and not (src.parent / "out").exists()


def test_overwrite_keeps_the_old_destination_until_the_new_one_is_complete(tmp_path, meta, monkeypatch):
    dst = reshard(meta, tmp_path / "dst", 1)
    before = snapshot(dst)
    saved, real_save = [], torch.save

    def fails_on_the_second_shard(state, path, *args, **kwargs):
        if saved:
            raise OSError("disk full")
        saved.append(path)
        return real_save(state, path, *args, **kwargs)

    monkeypatch.setattr(llama.checkpoint.torch, "save", fails_on_the_second_shard)
    with pytest.raises(OSError, match="disk full"):
        reshard(meta, dst, 2, overwrite=True)
    assert snapshot(dst) == before and leftovers(tmp_path) == []


def test_output_folder_gets_the_umask_modes(tmp_path, meta):
    old = os.umask(0o027)
    try:
        out = reshard(meta, tmp_path / "dst", 2)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o750  # as mkdir gives, not tempfile.mkdtemp's 0o700


def test_to_llama2c_needs_overwrite_to_replace_a_file(tmp_path, meta, capsys):
    target = tmp_path / "model.bin"
    target.write_bytes(b"mine")
    with pytest.raises(CheckpointError, match=f"destination {target} exists; .*--overwrite"):
        convert.to_llama2c(str(meta), str(target), seq_len=16)
    assert target.read_bytes() == b"mine"
    convert.to_llama2c(str(meta), str(target), seq_len=16, overwrite=True)
    assert target.stat().st_size > 1000


def test_cli_reports_one_line_and_exit_status_2(tmp_path, meta):
    before = snapshot(meta)
    run = subprocess.run([sys.executable, "-m", "llama.convert", "reshard", str(meta), str(meta), "--mp", "2",
                          "--overwrite"], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: destination {meta} is the source {meta}"), run.stderr
    assert snapshot(meta) == before


# ------------------------------------------------------------------------------------------------------------
# 2. Temporary folders: removed on Ctrl-C / SIGTERM, and stale ones of killed runs on the next run
# ------------------------------------------------------------------------------------------------------------
SLOW_WRITER = """
import signal, sys, time, torch
from llama.checkpoint import write_checkpoint
# A shell's background job ignores SIGINT; a terminal run (what this stands for) has Python's default handler.
signal.signal(signal.SIGINT, signal.default_int_handler)

def slow():
    yield "norm.weight", torch.ones(8)
    print("writing", flush=True)
    time.sleep(120)
    yield "other.weight", torch.ones(8)

write_checkpoint(sys.argv[1], {"dim": 8, "n_layers": 1, "n_heads": 2}, [slow()])
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_removes_the_temporary_folder(tmp_path, sig):
    dst = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(dst)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
        assert len(leftovers(tmp_path)) == 1  # the write is under way in its temporary folder
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode != 0
    assert leftovers(tmp_path) == [] and not dst.exists()


def test_the_sigterm_handler_is_installed_only_while_writing(tmp_path):
    if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        pytest.skip("something else handles SIGTERM in this process; the writer leaves it alone")
    seen = []

    def shard():
        seen.append(signal.getsignal(signal.SIGTERM))
        yield "norm.weight", torch.ones(2)

    write_checkpoint(tmp_path / "out", {"dim": 8, "n_layers": 1, "n_heads": 2}, [shard()])
    assert callable(seen[0]) and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def staging(parent: Path, name: str, kind: str, pid: int, host: str, age_hours: float = 0) -> Path:
    path = parent / f".{name}.{kind}-{pid}@{host}-0123abcd"
    path.mkdir()
    (path / "consolidated.00.pth").write_bytes(b"half")
    stamp = time.time() - age_hours * 3600
    os.utime(path, (stamp, stamp))
    return path


def test_stale_temporary_folders_are_removed_on_the_next_run(tmp_path, meta, capsys):
    here = llama.checkpoint._host()
    parent = tmp_path / "out"
    parent.mkdir()
    gone = staging(parent, "a", "tmp", dead_pid(), here)
    old = staging(parent, "b", "tmp", 1, "elsewhere", age_hours=30)
    legacy = parent / ".c.tmp-ab_12xyz"  # tempfile.mkdtemp's name, from an earlier version
    legacy.mkdir()
    os.utime(legacy, (time.time() - 30 * 3600,) * 2)
    running = staging(parent, "d", "tmp", os.getpid(), here)
    elsewhere = staging(parent, "e", "tmp", 1, "elsewhere")
    capsys.readouterr()
    reshard(meta, parent / "dst", 2)
    err = capsys.readouterr().err
    for path in (gone, old, legacy):
        assert not path.exists()
        assert f"removed {path}, left by an interrupted conversion" in err
    assert "process" in err and "unchanged for 30 hours" in err
    assert running.is_dir() and elsewhere.is_dir()  # their writers may still be at work
    assert len(err.strip().splitlines()) == 3


def test_a_previous_destination_left_by_a_killed_swap_is_reported_not_removed(tmp_path, meta, capsys):
    parent = tmp_path / "out"
    parent.mkdir()
    kept = staging(parent, "model", "old", dead_pid(), llama.checkpoint._host())
    capsys.readouterr()
    reshard(meta, parent / "dst", 2)
    err = capsys.readouterr().err
    assert kept.is_dir() and f"rename it back to {parent / 'model'}" in err


# ------------------------------------------------------------------------------------------------------------
# 3. reshard carries every companion file
# ------------------------------------------------------------------------------------------------------------
def test_reshard_copies_every_non_weight_file(tmp_path, meta):
    companions = {"tok512.model": b"sentencepiece", "tokenizer_config.json": b"{}",
                  "resize_info.json": b'{"old_vocab": 100}', "README.md": b"notes"}
    for name, data in companions.items():
        (meta / name).write_bytes(data)
    out = reshard(meta, tmp_path / "dst", 2)
    for name, data in companions.items():
        assert (out / name).read_bytes() == data, name
    listed = {line.split("  ")[1] for line in (out / "checklist.chk").read_text().splitlines()}
    assert set(companions) | {"params.json", "consolidated.00.pth", "consolidated.01.pth"} == listed


# ------------------------------------------------------------------------------------------------------------
# 4. An HF index may only name files inside the model folder
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture
def hf_sharded(tmp_path, meta):
    hf = meta_to_hf(meta, tmp_path / "hf", max_shard_size="20KB", show_progress=False)
    assert (hf / "model.safetensors.index.json").is_file()
    return hf


def point_entry_at(hf: Path, target: str) -> str:
    index_path = hf / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    victim = "model.norm.weight"
    real = hf / index["weight_map"][victim]
    shutil.copyfile(real, hf.parent / "outside.safetensors")  # a readable file, so only the path is wrong
    index["weight_map"][victim] = target
    index_path.write_text(json.dumps(index))
    return victim


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_index_entries_outside_the_folder_are_refused(tmp_path, hf_sharded, how):
    outside = tmp_path / "outside.safetensors"
    if how == "dotdot":
        target = "../outside.safetensors"
    elif how == "absolute":
        target = str(outside)
    else:
        target = "link.safetensors"
        (hf_sharded / target).symlink_to(outside)
    victim = point_entry_at(hf_sharded, target)
    with pytest.raises(CheckpointError, match=f"weight_map entry '{victim}': \"{target}\" points outside"):
        open_checkpoint(hf_sharded)
    with pytest.raises(CheckpointError, match="points outside"):
        hf_to_meta(hf_sharded, tmp_path / "dst", show_progress=False)
    assert not (tmp_path / "dst").exists()


def test_the_hugging_face_cache_layout_still_loads(tmp_path, hf_sharded, model):
    """snapshots/REV/ holds symlinks into the repository's blobs/: allowed, it is how the hub cache stores files."""
    repo = tmp_path / "models--x--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "rev1"
    snap.mkdir(parents=True)
    for p in hf_sharded.iterdir():
        shutil.copyfile(p, repo / "blobs" / p.name)
        (snap / p.name).symlink_to(Path("../../blobs") / p.name)
    back = hf_to_meta(snap, tmp_path / "back", show_progress=False)
    got = open_checkpoint(back)
    assert got.vocab_size == ARGS.vocab_size


# ------------------------------------------------------------------------------------------------------------
# 5. Wrong types and sizes in params.json / config.json, before any tensor is read
# ------------------------------------------------------------------------------------------------------------
BAD_PARAMS = [
    ("dim", "48", 'dim is "48", expected a positive whole number'),
    ("n_layers", 2.5, "n_layers is 2.5, expected a positive whole number"),
    ("n_heads", True, "n_heads is true, expected a positive whole number"),
    ("dim", 0, "dim is 0, expected a positive whole number"),
    ("n_layers", -2, "n_layers is -2, expected a positive whole number"),
    ("n_heads", 5, "n_heads is 5, expected a head count that divides dim 48"),
    ("n_kv_heads", 4, "n_kv_heads is 4, expected a number that divides n_heads 6"),
    ("vocab_size", "auto", 'vocab_size is "auto", expected a positive whole number \\(or -1\\)'),
    ("norm_eps", "1e-5", 'norm_eps is "1e-5", expected a positive number'),
]


@pytest.mark.parametrize("field,value,message", BAD_PARAMS, ids=[f"{f}={v!r}" for f, v, _ in BAD_PARAMS])
def test_bad_params_json_is_refused_before_any_tensor_is_read(tmp_path, meta, monkeypatch, field, value, message):
    path = meta / "params.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))

    def no_tensors(*args, **kwargs):
        raise AssertionError("a tensor file was opened before params.json was checked")

    monkeypatch.setattr(llama.checkpoint, "open_shards", no_tensors)
    monkeypatch.setattr(llama.checkpoint, "ShardReader", no_tensors)
    for attempt in (lambda: open_checkpoint(meta), lambda: reshard(meta, tmp_path / "dst", 1)):
        with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: {message}.*; correct the file"):
            attempt()


def test_whole_floats_in_params_json_are_accepted(meta):
    path = meta / "params.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "n_layers": 2.0, "dim": 48.0}))
    params = read_params(meta)
    assert params["n_layers"] == 2 and isinstance(params["n_layers"], int) and isinstance(params["dim"], int)
    assert open_checkpoint(meta).params["n_layers"] == 2


BAD_CONFIG = [
    ("hidden_size", "48", 'hidden_size is "48", expected a positive whole number'),
    ("num_hidden_layers", 2.5, "num_hidden_layers is 2.5, expected a positive whole number"),
    ("num_attention_heads", False, "num_attention_heads is false, expected a positive whole number"),
    ("intermediate_size", 0, "intermediate_size is 0, expected a positive whole number"),
    ("num_attention_heads", 5, "num_attention_heads is 5, expected a head count that divides hidden_size 48"),
    ("num_key_value_heads", 4, "num_key_value_heads is 4, expected a number that divides num_attention_heads 6"),
]


@pytest.mark.parametrize("field,value,message", BAD_CONFIG, ids=[f"{f}={v!r}" for f, v, _ in BAD_CONFIG])
def test_bad_config_json_is_refused(tmp_path, meta, field, value, message):
    hf = meta_to_hf(meta, tmp_path / "hf", show_progress=False)
    path = hf / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: {message}.*; correct the file"):
        hf_to_meta(hf, tmp_path / "dst", show_progress=False)
    assert not (tmp_path / "dst").exists()


# ------------------------------------------------------------------------------------------------------------
# 6. Files that are not checkpoints
# ------------------------------------------------------------------------------------------------------------
def test_an_html_page_saved_as_pth(meta):
    shard = meta / "consolidated.00.pth"
    shard.write_text("<!DOCTYPE html>\n<html><body>403 Forbidden</body></html>\n")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(meta)
    message = str(e.value)
    assert message.startswith(f"{shard} is not a PyTorch checkpoint (it starts with '<!DOCTYPE html>'...; "
                              f"the download probably failed): download it again")
    assert "weights_only=False" not in message and "\n" not in message
    shard.write_bytes(b"")
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint \\(it is empty"):
        open_checkpoint(meta)


def test_pickled_code_error_gives_no_advice_to_disable_weights_only(meta):
    torch.save({"x": torch.zeros(1), "f": os.getcwd}, meta / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match="refused to load .*weights_only=True rejects pickled code") as e:
        open_checkpoint(meta)
    assert "posix.getcwd" in str(e.value) and "False" not in str(e.value)  # torch's "set it to False" advice


def test_truncated_safetensors_name_their_file(tmp_path, model):
    meta = save_meta(model, tmp_path / "meta", mp=1, fmt="safetensors")
    shard = meta / "consolidated.00.safetensors"
    hf = meta_to_hf(meta, tmp_path / "hf", show_progress=False)
    for path, folder in ((shard, meta), (hf / "model.safetensors", hf)):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        with pytest.raises(CheckpointError, match=f"cannot read {path} as safetensors .*truncated"):
            open_checkpoint(folder)
