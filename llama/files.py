"""Durable, all-or-nothing file writes: the one implementation every writer in ``llama`` and ``kollama`` uses.

``atomic_write(path, write_fn)``: ``write_fn`` writes a temporary sibling (``.NAME.tmp-PID``), which is fsynced and
renamed over ``path``; then the folder is fsynced. A crash, a full disk or Ctrl-C leaves either the old file or the
new one, never half of one, and the temporary file is removed on any error. New files get the modes the user's umask
gives, as ``open()`` would.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional, Union

from llama.errors import UserError

PathLike = Union[str, os.PathLike]
TMP_MARK = ".tmp-"  # temporary siblings are named .NAME.tmp-PID (files) or .NAME.tmp-XXXX (folders)


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: PathLike) -> None:
    """Make a rename or new entry in folder ``path`` durable (a no-op where folders cannot be opened or synced,
    e.g. Windows or file systems that answer EINVAL; a real I/O error still raises)."""
    try:
        fd = os.open(str(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)


def fsync_file(path: PathLike) -> None:
    # fsync applies to the inode, so a fresh descriptor flushes what another descriptor wrote.
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_sibling(path: PathLike) -> Path:
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def atomic_write(path: PathLike, write_fn: Callable[[Path], None]) -> Path:
    """Write ``path`` all or nothing through ``write_fn(tmp)``; see the module docstring."""
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: the folder {path.parent} does not exist; create it first")
    tmp = tmp_sibling(path)
    try:
        write_fn(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename == str(tmp):  # name the file the user asked for, not our temporary sibling
            raise type(e)(e.errno, f"cannot write {path}: {e.strerror}") from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
    return atomic_write(path, write)


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj) -> Path:
    """Atomic, durable JSON file (UTF-8, indented, non-JSON values as str)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def replace_folder(tmp: PathLike, dst: PathLike, old: Optional[PathLike] = None) -> None:
    """Rename the complete folder ``tmp`` to ``dst`` durably. An existing ``dst`` is first renamed aside to ``old``
    (default ``.DST.old-PID``) and deleted only once the new one is in place; if the swap is interrupted (an error,
    Ctrl-C between the two renames) it is put back, so ``dst`` is never missing."""
    tmp, dst = Path(tmp), Path(dst)
    fsync_dir(tmp)
    if os.path.lexists(dst):
        old = Path(old) if old is not None else dst.with_name(f".{dst.name}.old-{os.getpid()}")
    else:
        old = None
    try:
        if old is not None:
            os.rename(dst, old)
        os.rename(tmp, dst)
    except BaseException:
        if old is not None and os.path.lexists(old) and not os.path.lexists(dst):
            os.rename(old, dst)
        raise
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def check_new_output(path: PathLike, flag: str, inputs=(), overwrite: bool = False) -> None:
    """Before any work, for a command that writes the file ``path``: it may never be one of the command's own
    ``inputs`` (that would destroy what it reads), and may replace an existing file only with ``--overwrite``."""
    path = Path(path)
    for source in inputs:
        if os.path.realpath(path) == os.path.realpath(source):
            raise UserError(f"{flag} {path} is also an input of this command, which would destroy it; choose "
                            f"another {flag}")
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise UserError(f"{flag} {path} exists; choose another {flag}, or pass --overwrite to replace it")
    check_writable(path, flag)


def check_writable(path: PathLike, flag: str) -> None:
    """Before any work: ``path`` (a file or folder to create) can be written, i.e. its nearest existing ancestor
    is a folder this process may write into. Raises UserError naming ``flag`` (e.g. "--out")."""
    path = Path(path).absolute()
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if path.exists() and not path.is_dir() and not os.access(path, os.W_OK):
        raise UserError(f"{flag} {path} exists and is not writable; choose another {flag} or fix its permissions")
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a folder; choose another {flag}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: no permission to write in {parent}; choose another {flag} or fix its "
                        f"permissions")
