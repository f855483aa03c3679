"""Shared test fixtures. Real data is read only through LLAMA_TEST_DATA; tests that need it skip when it is unset."""
import os
from pathlib import Path

import pytest
import torch


# What the real-data tests read from LLAMA_TEST_DATA (../shared/fixtures, see its SOURCES.md).
FIXTURES = ("tokenizer.model", "stories260K.bin", "tok512.model", "korean/nsmc_train.jsonl", "korean/nsmc_dev.jsonl",
            "korean/klue_nli_dev.json", "korean/kobest", "korean/parallel", "korean/ud_ko_kaist_dev.txt")


def missing_fixtures(root: str) -> list:
    return [n for n in FIXTURES if not (Path(root) / n).exists()]


def pytest_configure(config):
    """LLAMA_TEST_DATA set means "run the real-data tests": a wrong path is an error at collection, naming what is
    missing, not dozens of silent skips. Unset, those tests are skipped."""
    root = os.environ.get("LLAMA_TEST_DATA")
    if root and missing_fixtures(root):
        raise pytest.UsageError(
            f"LLAMA_TEST_DATA={root} lacks {', '.join(missing_fixtures(root))}; point it at the fixtures folder "
            f"(../shared/fixtures) or unset it to skip the real-data tests")


@pytest.fixture(scope="session")
def test_data() -> Path:
    """The fixtures folder (tokenizer.model, stories260K.bin, tok512.model, korean/...), or skip when unset."""
    root = os.environ.get("LLAMA_TEST_DATA")
    if not root:
        pytest.skip("LLAMA_TEST_DATA is not set; real-data tests skipped")
    return Path(root)


def need(test_data: Path, *names: str) -> list:
    """Paths of the named fixture files; one that is missing fails the test (LLAMA_TEST_DATA promised it)."""
    paths = [test_data / n for n in names]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        pytest.fail(f"fixture {', '.join(missing)} is missing from LLAMA_TEST_DATA={test_data}")
    return paths


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and on a shared 2-core machine two OpenMP threads spin waiting for
    each other (~8x slower). Modules of tiny training runs use it with ``pytest.mark.usefixtures``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
