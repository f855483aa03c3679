"""llama.device: one rule for which device a process uses. CUDA is simulated by patching torch.cuda at the single
boundary the function reads (is_available, device_count, set_device), so these run on CPU machines."""
import pytest
import torch

from llama.device import resolve_device, select_device
from llama.errors import UserError


@pytest.fixture
def gpus(monkeypatch):
    """A machine with n GPUs; set_device records its argument and refuses one without an index, as NCCL would
    need (torch.cuda.set_device("cuda") silently means the *current* device, which is the bug this guards)."""
    calls = []

    def fake(n):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

        def set_device(d):
            d = torch.device(d)
            assert d.type == "cuda" and d.index is not None, f"set_device without an index: {d}"
            calls.append(d)
        monkeypatch.setattr(torch.cuda, "set_device", set_device)
        return calls
    return fake


def test_cpu_only_machine(gpus, monkeypatch):
    gpus(0)
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")
    for asked in ("cuda", "cuda:0", torch.device("cuda")):
        with pytest.raises(UserError, match="CUDA is not available.*use device cpu"):
            resolve_device(asked)


def test_cuda_without_index_means_this_process_gpu(gpus, monkeypatch):
    calls = gpus(4)
    monkeypatch.setenv("LOCAL_RANK", "2")  # torchrun's third process on this node
    assert select_device(None) == select_device("cuda") == select_device(torch.device("cuda")) == \
        torch.device("cuda", 2)
    assert select_device("cuda:1") == torch.device("cuda", 1)
    assert calls == [torch.device("cuda", 2)] * 3 + [torch.device("cuda", 1)]
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("cuda") == torch.device("cuda", 0)  # plain python: the first GPU


@pytest.mark.parametrize("asked,message", [
    ("gpu", "unknown device 'gpu'; use cpu, cuda or cuda:N \\(available: cpu, cuda \\(cuda:0..cuda:1\\)\\)"),
    ("cuda:5", "device cuda:5 does not exist: this machine has 2 GPU"),
    ("mps", "device 'mps' is not supported"),
    (3, "unknown device 3"),
])
def test_bad_devices_name_what_is_available(gpus, asked, message):
    calls = gpus(2)
    with pytest.raises(UserError, match=message):
        select_device(asked)
    assert calls == []


def test_llama_build_and_trainer_use_it(gpus, tmp_path):
    """Both entry points refuse a typo before touching a checkpoint (the folder does not even exist)."""
    gpus(0)
    from kollama.train import train
    from llama import Llama

    with pytest.raises(UserError, match="unknown device 'gpu'"):
        Llama.build(str(tmp_path / "none"), str(tmp_path / "t.model"), 16, 1, device="gpu")
    with pytest.raises(UserError, match="CUDA is not available"):
        train(str(tmp_path / "d.txt"), str(tmp_path / "none"), str(tmp_path / "t.model"), str(tmp_path / "run"),
              device="cuda")
