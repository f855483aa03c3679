"""Shared test fixtures. Real data is read only through LLAMA_TEST_DATA; tests that need it skip when it is unset."""
import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def test_data() -> Path:
    """The fixtures folder (tokenizer.model, stories260K.bin, tok512.model, korean/...), or skip."""
    root = os.environ.get("LLAMA_TEST_DATA")
    if not root:
        pytest.skip("LLAMA_TEST_DATA is not set; real-data tests skipped")
    path = Path(root)
    if not path.is_dir():
        pytest.skip(f"LLAMA_TEST_DATA={root} is not a folder")
    return path


def need(test_data: Path, *names: str) -> list:
    """Paths of the named fixture files, skipping the test when one is missing."""
    paths = [test_data / n for n in names]
    for p in paths:
        if not p.exists():
            pytest.skip(f"fixture {p} is missing")
    return paths


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and on a shared 2-core machine two OpenMP threads spin waiting for
    each other (~8x slower). Modules of tiny training runs use it with ``pytest.mark.usefixtures``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
