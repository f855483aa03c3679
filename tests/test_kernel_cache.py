"""The CPU kernel cache loads only libraries it built itself: a planted, corrupt or truncated .so is rebuilt, never
dlopen'ed; a cache (folder or file) that others could write is refused with one warning; the folder is made 0700
whatever the umask. Each test points LLAMA_KERNEL_CACHE at its own folder and starts from an unloaded kernel."""
import hashlib
import os
import shutil
import subprocess
import warnings

import pytest
import torch
import torch.nn.functional as F

from llama import kernels
from llama.quantize import Int8Linear

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC", "gcc")) is None, reason="no C compiler")

MARKER_ENV = "KERNEL_CACHE_TEST_MARKER"
# dlopen runs constructors: if this library is ever loaded, the marker file appears. It also exports the kernels'
# names, so code that loads it without checking would take it for the kernels.
PLANTED_C = r"""
#include <stdio.h>
#include <stdlib.h>
void f32_mm(void) {}
void q8_linear(void) {}
const char* llama_kernel_isa(void) { return "planted"; }
int llama_kernel_qblock(void) { return 64; }
__attribute__((constructor)) static void planted(void) {
  const char* p = getenv("%s");
  FILE* f = p ? fopen(p, "w") : 0;
  if (f) { fputs("planted library was loaded\n", f); fclose(f); }
}
""" % MARKER_ENV


def _load_into(folder):
    """kernels._library() with the cache at ``folder`` and nothing loaded yet; restores both."""
    before_env, before_lib = os.environ.get("LLAMA_KERNEL_CACHE"), kernels._LIB
    os.environ["LLAMA_KERNEL_CACHE"] = str(folder)
    kernels._LIB = None
    try:
        return kernels._library()
    finally:
        kernels._LIB = before_lib
        if before_env is None:
            del os.environ["LLAMA_KERNEL_CACHE"]
        else:
            os.environ["LLAMA_KERNEL_CACHE"] = before_env


@pytest.fixture(scope="module")
def genuine(tmp_path_factory):
    """A cache folder holding a kernel the code built itself (loaded here from this folder's path only: glibc
    reuses an already loaded library by path, so each test works on a copy under a path never loaded before)."""
    folder = tmp_path_factory.mktemp("genuine") / "cache"
    assert _load_into(folder) is not None
    return folder


@pytest.fixture(scope="module")
def planted_bytes(tmp_path_factory):
    d = tmp_path_factory.mktemp("planted")
    (d / "planted.c").write_text(PLANTED_C)
    subprocess.run([os.environ.get("CC", "gcc"), "-shared", "-fPIC", "planted.c", "-o", "planted.so"], cwd=d,
                   check=True, capture_output=True)
    return (d / "planted.so").read_bytes()


@pytest.fixture
def marker(tmp_path, monkeypatch):
    path = tmp_path / "planted_library_was_loaded"
    monkeypatch.setenv(MARKER_ENV, str(path))
    return path


@pytest.fixture
def cache(tmp_path, genuine, monkeypatch):
    """A private copy of the genuine cache, the code pointed at it, nothing loaded: returns the cached .so."""
    folder = tmp_path / "cache"
    shutil.copytree(genuine, folder)
    os.chmod(folder, 0o700)
    monkeypatch.setenv("LLAMA_KERNEL_CACHE", str(folder))
    monkeypatch.setattr(kernels, "_LIB", None)
    (so,) = folder.glob("*.so")
    return so


def _kernel_matches_reference():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(40, 24, generator=g), torch.randn(3, 24, generator=g)
    assert Int8Linear.from_weight(w).use_kernel and kernels.isa() != "planted"
    assert torch.allclose(kernels.f32_mm(x, w), F.linear(x, w), atol=1e-5)


def _digest_ok(so):
    return (so.parent / (so.name + ".sha256")).read_text().strip() == hashlib.sha256(so.read_bytes()).hexdigest()


@pytest.mark.parametrize("digest", ["missing", "stale"])
def test_planted_library_is_never_loaded_and_the_kernel_is_rebuilt(cache, planted_bytes, marker, digest):
    cache.write_bytes(planted_bytes)  # "stale": the copied digest is the genuine build's, not this file's
    if digest == "missing":
        (cache.parent / (cache.name + ".sha256")).unlink(missing_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels._library() is not None
    assert not marker.exists(), "the planted library was dlopen'ed"
    assert cache.read_bytes() != planted_bytes and _digest_ok(cache)
    _kernel_matches_reference()


@pytest.mark.parametrize("unsafe", ["world-writable folder", "group-writable file", "folder of another user"])
def test_cache_others_could_write_is_refused(cache, planted_bytes, marker, monkeypatch, unsafe):
    # The planted library even carries a matching digest: only the ownership and mode checks stand in its way.
    cache.write_bytes(planted_bytes)
    (cache.parent / (cache.name + ".sha256")).write_text(hashlib.sha256(planted_bytes).hexdigest() + "\n")
    if unsafe == "world-writable folder":
        os.chmod(cache.parent, 0o777)
        expect = [str(cache.parent), "chmod 700", "LLAMA_KERNEL_CACHE"]
    elif unsafe == "group-writable file":
        os.chmod(cache, 0o770)
        expect = [str(cache), "chmod go-w"]
    else:
        uid = os.getuid()
        monkeypatch.setattr(os, "getuid", lambda: uid + 1)
        expect = [str(cache.parent), f"owned by uid {uid}", "LLAMA_KERNEL_CACHE"]
    with pytest.warns(UserWarning) as record:
        assert kernels._library() is None
    assert not marker.exists(), "a library was loaded from an unsafe cache"
    (w,) = record
    message = str(w.message)
    assert "\n" not in message and all(e in message for e in expect), message
    layer = Int8Linear.from_weight(torch.randn(8, 16))  # the fallback still computes the right product
    x = torch.randn(2, 16)
    assert not layer.use_kernel and torch.allclose(layer(x), F.linear(x, layer.dequantize()), atol=1e-5)


def test_cache_folder_is_private_even_under_umask_000(tmp_path, monkeypatch):
    folder = tmp_path / "made_here" / "cache"
    monkeypatch.setenv("LLAMA_KERNEL_CACHE", str(folder))
    monkeypatch.setattr(kernels, "_LIB", None)
    old = os.umask(0)
    try:
        assert kernels._library() is not None
    finally:
        os.umask(old)
    for d in (folder.parent, folder):
        assert d.stat().st_mode & 0o777 == 0o700, (d, oct(d.stat().st_mode))
    for f in folder.iterdir():
        assert not f.stat().st_mode & 0o022, (f, oct(f.stat().st_mode))
    _kernel_matches_reference()


@pytest.mark.parametrize("keep, digest", [("header", "stale"), ("half", "stale"), ("header", "matching")])
def test_truncated_library_is_rebuilt(cache, keep, digest):
    # "half": dlopen maps segments past the end of the file, and touching them kills the process (SIGBUS), so the
    # digest check is what keeps it alive. A file matching its digest that dlopen refuses is rebuilt too.
    size = cache.stat().st_size
    with open(cache, "r+b") as f:
        f.truncate(64 if keep == "header" else size // 2)
    if digest == "matching":
        (cache.parent / (cache.name + ".sha256")).write_text(hashlib.sha256(cache.read_bytes()).hexdigest())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _kernel_matches_reference()
    assert cache.stat().st_size > size // 2 and _digest_ok(cache)
