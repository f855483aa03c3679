"""CUDA parity: the model, generation, LoRA training, int8 and NF4 on a GPU against the same computation on the CPU,
and two GPUs under torchrun (NCCL) against one process. Skipped where torch sees no CUDA device; run them with
``scripts/check_gpu.sh``, which prints one summary line. fp32 throughout (TF32 off, torch's default for matmul), so
CPU and GPU differ only by kernel summation order."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import random_model, save_meta, tiny_args, train_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
ARGS = tiny_args(dim=64, n_heads=8, n_kv_heads=4, vocab_size=128, max_seq_len=64, max_batch_size=4)
TOKENS = torch.tensor([[1, 5, 9, 30, 31, 2, 7, 8], [1, 70, 71, 72, 3, 4, 100, 101]])


def close(a, b, rtol=1e-4):
    a, b = a.float().cpu(), b.float().cpu()
    err = ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
    assert err <= rtol, f"relative difference {err:.2e} > {rtol:.0e}"


def test_logits_and_kv_cache_match_cpu():
    cpu = random_model(ARGS, seed=1)
    gpu = random_model(ARGS, seed=1).cuda()
    gpu.init_buffers(torch.device("cuda"), torch.float32)
    with torch.no_grad():
        close(gpu(TOKENS.cuda(), 0, use_cache=False), cpu(TOKENS, 0, use_cache=False))
        full = gpu(TOKENS.cuda(), 0)
        gpu.init_buffers(torch.device("cuda"), torch.float32)
        steps = torch.cat([gpu(TOKENS[:, :5].cuda(), 0)] + [gpu(TOKENS[:, i:i + 1].cuda(), i) for i in range(5, 8)], 1)
        close(steps, full)


def test_greedy_generation_matches_cpu(tmp_path):
    from llama import Llama

    tok = train_tiny_tokenizer(tmp_path / "tok.model")
    ckpt = save_meta(random_model(ARGS, seed=2, std=0.5), tmp_path / "ckpt")
    prompts = ["Once upon a time", "The cat"]
    out = {}
    for device in ("cpu", "cuda"):
        llama = Llama.build(str(ckpt), str(tok), max_seq_len=48, max_batch_size=2, device=device,
                            dtype=torch.float32)
        out[device] = llama.text_completion(prompts, temperature=0, max_gen_len=16)
    assert out["cuda"] == out["cpu"]


def test_lora_gradients_match_cpu():
    from kollama.adapters.lora import apply_lora

    grads = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = apply_lora(random_model(ARGS, seed=3), targets=("wq", "wv", "w2"), r=4, alpha=8, dropout=0.0)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("lora_B"):
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        model = model.to(device).train()
        logits = model(TOKENS.to(device), 0, use_cache=False)
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), TOKENS[:, 1:].flatten().to(device)).backward()
        grads[device] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for n in grads["cpu"]:
        close(grads["cuda"][n], grads["cpu"][n], rtol=1e-3)


def test_int8_and_nf4_match_cpu():
    from kollama.adapters.nf4 import dequantize_nf4, quantize_nf4
    from llama.quantize import quantize_model

    outs = {}
    for device in ("cpu", "cuda"):
        model = random_model(ARGS, seed=4).to(device)
        model.init_buffers(torch.device(device), torch.float32)
        quantize_model(model, "int8")
        with torch.no_grad():
            outs[device] = model(TOKENS.to(device), 0, use_cache=False)
    close(outs["cuda"], outs["cpu"], rtol=1e-3)
    w = torch.randn(256, 128, generator=torch.Generator().manual_seed(5))
    q_cpu, q_gpu = quantize_nf4(w), quantize_nf4(w.cuda())
    assert torch.equal(q_gpu[0].cpu(), q_cpu[0])  # the same 4-bit codes
    close(dequantize_nf4(*q_gpu, shape=w.shape), dequantize_nf4(*q_cpu, shape=w.shape), rtol=1e-6)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_nccl_equal_one(tmp_path):
    tok = train_tiny_tokenizer(tmp_path / "tok.model")
    ckpt = save_meta(random_model(ARGS, seed=2, std=0.5), tmp_path / "ckpt", mp=2)
    common = ["example_text_completion.py", "--ckpt_dir", str(ckpt), "--tokenizer_path", str(tok),
              "--temperature", "0", "--max_gen_len", "8"]
    one = subprocess.run([sys.executable, *common], cwd=ROOT, capture_output=True, text=True, timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *common], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    strip = lambda s: [line for line in s.splitlines() if not line.startswith("Loaded in")]  # noqa: E731
    assert strip(two.stdout) == strip(one.stdout)
