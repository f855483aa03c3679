"""Which device a process runs on: one rule for ``Llama.build``, ``kollama.train``, evaluation and the examples.

* None: ``cuda:LOCAL_RANK`` when CUDA is available (torchrun sets LOCAL_RANK; 0 otherwise), else ``cpu``;
* ``"cuda"`` (or ``torch.device("cuda")``): ``cuda:LOCAL_RANK`` -- a CUDA device always carries an index, because
  ``torch.cuda.set_device`` and NCCL need one and every process of a node must pick its own GPU;
* ``"cuda:N"``, ``"cpu"``, a ``torch.device``: as given, after checking that it exists.
Anything else (a typo such as ``"gpu"``, a GPU that is not there) is a UserError naming the devices available.
"""
from __future__ import annotations

import os
from typing import Union

import torch

from llama.errors import UserError

DeviceLike = Union[None, str, torch.device]


def available_devices() -> str:
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return "cpu" + (f", cuda (cuda:0..cuda:{n - 1})" if n else " (CUDA is not available in this PyTorch/machine)")


def resolve_device(device: DeviceLike = None) -> torch.device:
    """The device this process should use (see the module docstring); does not change any global state."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"unknown device {device!r}; use cpu, cuda or cuda:N (available: {available_devices()})") \
            from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise UserError(f"device {device!r} is not supported; use cpu, cuda or cuda:N "
                        f"(available: {available_devices()})")
    if not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but CUDA is not available (no GPU, or a CPU-only PyTorch "
                        f"build); use device cpu")
    index = dev.index if dev.index is not None else int(os.environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise UserError(f"device cuda:{index} does not exist: this machine has {count} GPU(s) "
                        f"(available: {available_devices()})")
    return torch.device("cuda", index)


def select_device(device: DeviceLike = None) -> torch.device:
    """``resolve_device`` and, for CUDA, make it this process's current GPU (always with an index)."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev
