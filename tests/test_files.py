"""llama.files: the one durable-write helper (all or nothing, temp removed on failure, the user's umask honoured)."""
import os
import stat

import pytest

from llama.errors import UserError
from llama.files import atomic_write, atomic_write_bytes, check_writable


def test_all_or_nothing(tmp_path):
    path = atomic_write_bytes(tmp_path / "a.txt", b"old")

    def fails(tmp):
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(path, fails)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, lambda tmp: (tmp.write_bytes(b"x"), (_ for _ in ()).throw(KeyboardInterrupt()))[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_new_files_get_the_umask_modes(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = atomic_write_bytes(tmp_path / "f.bin", b"x")
        plain = tmp_path / "plain.bin"
        plain.write_bytes(b"x")  # what open() gives: the reference
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~umask


def test_missing_folder_and_unwritable_places_are_named(tmp_path):
    with pytest.raises(UserError, match=f"the folder {tmp_path / 'no'} does not exist"):
        atomic_write_bytes(tmp_path / "no" / "f.txt", b"x")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="--out .*is a file, not a folder"):
        check_writable(tmp_path / "file" / "sub" / "out.json", "--out")
    check_writable(tmp_path / "new" / "deeper" / "out.json", "--out")  # created later: fine


def test_wrong_llama_test_data_fails_at_collection(tmp_path):
    """A wrong LLAMA_TEST_DATA is an error that names what is missing, not silent skips."""
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "tokenizer.model").write_bytes(b"x")
    tests = Path(__file__).resolve().parent
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests / "test_files.py"),
                           "-k", "umask"], env={**os.environ, "LLAMA_TEST_DATA": str(tmp_path)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 4, proc.stdout + proc.stderr  # pytest's usage error
    assert f"LLAMA_TEST_DATA={tmp_path} lacks stories260K.bin, tok512.model" in proc.stderr, proc.stderr


def test_an_unwritable_target_is_named_not_its_temporary_sibling(tmp_path, monkeypatch):
    import errno

    def refuse(tmp):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp))

    with pytest.raises(PermissionError, match=f"cannot write {tmp_path / 'out.json'}: Permission denied") as e:
        atomic_write(tmp_path / "out.json", refuse)
    assert ".tmp-" not in str(e.value)
