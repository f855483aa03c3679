"""Compile small C kernels once per machine and cache them, without ever loading a library we did not build.

``dlopen`` runs a library's constructors, so a cached ``.so`` is code we execute. It is loaded only when
  - the cache folder and the file are owned by this user and not group- or world-writable (nobody else can
    have planted or changed them): otherwise ``UnsafeCacheError``, whose message names the folder and the fix;
  - the file's sha256 equals its sidecar ``NAME.so.sha256``, written only after one of our own builds succeeded.
Anything else (no digest, another digest, a truncated file, a file dlopen refuses) is rebuilt: compiled in a
private temporary folder next to it, renamed over it (atomic, so concurrent processes never see half a library),
then its digest is written. The name carries a hash of the source, the compiler command and flags and the CPU's
flags (``-march=native`` code runs only on this CPU), so a change to any of them builds a new file.

Between the digest check and ``dlopen`` only this user can replace the file (the folder is private), and our own
processes only ever rename complete builds into place, so whatever is loaded is one of our builds.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from llama.errors import UserError
from llama.files import atomic_write, fsync_file

CACHE_ENV = "LLAMA_KERNEL_CACHE"


class UnsafeCacheError(UserError):
    """The kernel cache (folder or file) could be written by someone else, so nothing is loaded from it."""


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "llama_kernels")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _check_private(st: os.stat_result, path: Path) -> None:
    if st.st_uid != os.getuid():
        why, fix = f"owned by uid {st.st_uid}, not you (uid {os.getuid()})", f"set {CACHE_ENV} to a folder of yours"
    elif st.st_mode & 0o022:
        why = f"writable by {'others' if st.st_mode & 0o002 else 'its group'} (mode {stat.S_IMODE(st.st_mode):o})"
        fix = f"run `chmod {'700' if stat.S_ISDIR(st.st_mode) else 'go-w'} {path}` or set {CACHE_ENV}"
    else:
        return
    raise UnsafeCacheError(f"kernel cache {path} is {why}, so a library there may not be ours; {fix}")


def _private_dir(path: Path) -> Path:
    """``path`` and any missing parents, created 0700; an existing ``path`` must already be private."""
    for p in reversed([p for p in (path, *path.parents) if not p.exists()]):
        try:
            p.mkdir(mode=0o700)  # the umask only clears bits: never more open than 0700, even before the chmod
        except FileExistsError:
            continue  # another process made it; checked below like any existing folder
        os.chmod(p, 0o700)  # mkdir's mode was masked by the umask (e.g. 0500 under umask 0200)
    _check_private(os.stat(path), path)
    return path


def library_path(name: str, source: str, flags: Sequence[str], cc: Optional[str] = None) -> Path:
    cc = cc or os.environ.get("CC", "gcc")
    key = hashlib.sha256("\0".join([source, cc, *flags, _cpu_flags()]).encode()).hexdigest()[:16]
    return cache_dir() / f"{name}_{key}.so"


def _digest_path(so: Path) -> Path:
    return so.with_name(so.name + ".sha256")


def _verified(so: Path) -> bool:
    """Whether ``so`` exists and matches its digest (raises UnsafeCacheError for a file others could write)."""
    digest = _digest_path(so)
    try:
        with open(so, "rb") as f:
            _check_private(os.fstat(f.fileno()), so)
            actual = hashlib.sha256(f.read()).hexdigest()
        _check_private(os.stat(digest), digest)
        return digest.read_text().strip() == actual
    except FileNotFoundError:
        return False


def _build(so: Path, source: str, flags: Sequence[str], cc: str) -> None:
    with tempfile.TemporaryDirectory(dir=so.parent, prefix=".build-") as tmp:  # mkdtemp: mode 0700
        out = Path(tmp) / "k.so"
        (Path(tmp) / "k.c").write_text(source)
        subprocess.run([cc, *flags, "k.c", "-o", out.name], cwd=tmp, check=True, capture_output=True, text=True,
                       timeout=120)
        os.chmod(out, 0o700)  # the linker gives 0777 & ~umask: world-writable under umask 000
        data = out.read_bytes()
        fsync_file(out)  # the bytes are durable before the name points at them
        os.replace(out, so)

    def write_digest(tmp: Path) -> None:
        # Not files.atomic_write_bytes: its files take the umask's mode, world-writable under umask 000.
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(f"{hashlib.sha256(data).hexdigest()}\n".encode())
    atomic_write(_digest_path(so), write_digest)


def load_library(name: str, source: str, flags: Sequence[str]) -> ctypes.CDLL:
    """The compiled ``source`` as a ctypes library, built on first use and cached (see the module docstring).

    Raises UnsafeCacheError (cache not private), OSError or subprocess.SubprocessError (no compiler, build failed).
    """
    cc = os.environ.get("CC", "gcc")
    so = library_path(name, source, flags, cc)
    _private_dir(so.parent)
    if _verified(so):
        try:
            return ctypes.CDLL(str(so))
        except OSError:
            pass  # ours, yet dlopen refuses it (e.g. a library it needs changed): build it again
    _build(so, source, flags, cc)
    return ctypes.CDLL(str(so))
