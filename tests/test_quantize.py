"""Weight-only quantization: error bounds of one layer, whole-model logits near fp32, the ParallelLinear hook,
int4 where PyTorch has the kernels, and clear errors for what is not supported."""
import gc
import os

import pytest
import torch
import torch.nn.functional as F

from helpers import random_model, save_meta, tiny_args, train_tiny_tokenizer
from llama.generation import Llama
from llama.parallel import ParallelLinear
from llama import kernels
from llama.quantize import Int4Linear, Int8Linear, quantize_model

HAS_INT4_CPU = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


@pytest.mark.parametrize("rows", [1, 3, 8, 37])
def test_int8_linear_within_the_quantization_bound(rows):
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(67, 150, generator=g), torch.randn(rows, 150, generator=g)
    layer = Int8Linear.from_weight(w)
    w_hat = layer.dequantize()
    # Every weight is off by at most half a step, scale_n / 2 = max|w_n| / 254, so the weight rounding moves
    # output n by at most ||x||_1 * max|w_n| / 254 (plus fp32 rounding of the sums).
    bound = x.abs().sum(1, keepdim=True) * w.abs().amax(1) / 254
    if layer.use_kernel:
        # The CPU kernel also rounds the activations, per block of 64 inputs, by at most max|x_block| / 254 each,
        # which moves output n by at most sum_b max|x_b| / 254 * sum_{k in b} |w_hat[n, k]|.
        block = kernels.qblock()
        xb = F.pad(x, (0, -150 % block)).view(rows, -1, block).abs().amax(-1)  # (rows, blocks)
        wb = F.pad(w_hat.abs(), (0, -150 % block)).view(67, -1, block).sum(-1)  # (67, blocks)
        bound = bound + xb @ wb.T / 254
    else:
        assert torch.allclose(layer(x), F.linear(x, w_hat), atol=1e-5)  # weight-only: the dequantized product
    err = (layer(x) - F.linear(x, w)).abs()
    assert (err <= bound + 1e-4).all()


def test_int8_model_logits_close_to_fp32():
    args = tiny_args(dim=64, n_heads=8, n_kv_heads=4)
    model = random_model(args, seed=4)
    # Seeded (the global RNG depends on which tests ran before) and 128 positions, so the argmax share is stable.
    tokens = torch.randint(0, args.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(tokens, 0, use_cache=False)
        quantize_model(model, "int8")
        got = model(tokens, 0, use_cache=False)
    assert all(m.weight is None for m in model.modules() if isinstance(m, ParallelLinear))
    # Per weight the rounding error is uniform in +-scale/2: rms scale/sqrt(12) = max|w_row| / 440, about 0.7 % of
    # a Gaussian row's rms (max ~ 3 sigma at these widths). 15 quantized products in sequence, errors adding
    # roughly in quadrature, give ~3 %; 6 % leaves room for the tails.
    rel = (got - ref).norm() / ref.norm()
    assert rel < 0.06, rel
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


@pytest.mark.skipif(not HAS_INT4_CPU, reason="this PyTorch has no int4 CPU kernels")
def test_int4_linear_equals_its_dequantized_weight():
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(48, 128, generator=g), torch.randn(3, 128, generator=g)
    layer = Int4Linear.from_weight(w, group_size=32)
    q, scale, zero = Int4Linear.quantize_groups(w, 32)
    deq = ((q.float().view(48, 4, 32) - 8) * scale[..., None] + zero[..., None]).view(48, 128)
    assert (deq - w).abs().max() <= (scale.max() / 2) + 1e-6  # half a step of 16 levels per group
    assert torch.allclose(layer(x), F.linear(x, deq), atol=1e-4)


@pytest.mark.skipif(not HAS_INT4_CPU, reason="this PyTorch has no int4 CPU kernels")
def test_int4_model_runs_and_stays_close():
    args = tiny_args(dim=64, n_heads=8, n_kv_heads=4, multiple_of=32)
    model = random_model(args, seed=4)
    tokens = torch.randint(0, args.vocab_size, (2, 10))
    with torch.no_grad():
        ref = model(tokens, 0, use_cache=False)
        quantize_model(model, "int4", group_size=32)
        got = model(tokens, 0, use_cache=False)
    # 16 levels per group: step ~ range / 15 ~ 4 sigma / 15 for Gaussian groups of 32, rms error step / sqrt(12)
    # ~ 8 % per product; 15 products in sequence add to ~30 % in quadrature (int8: ~3 %). Bound with room: 50 %.
    assert (got - ref).norm() / ref.norm() < 0.5


def test_build_quantized_generates_like_fp32(tmp_path):
    args = tiny_args(dim=64, n_heads=8, n_kv_heads=4)
    ckpt = save_meta(random_model(args, seed=11, std=0.3), tmp_path / "ckpt")
    tok = train_tiny_tokenizer(tmp_path / "tok.model")
    fp32 = Llama.build(str(ckpt), str(tok), max_seq_len=32, max_batch_size=2, device="cpu")
    int8 = Llama.build(str(ckpt), str(tok), max_seq_len=32, max_batch_size=2, device="cpu", quantize="int8")
    assert isinstance(int8.model.layers[0].attention.wq.local_linear, Int8Linear)
    assert isinstance(int8.model.output.local_linear, Int8Linear)
    a = fp32.generate([[1, 5, 9]], 6, temperature=0)[0][0]
    b = int8.generate([[1, 5, 9]], 6, temperature=0)[0][0]
    assert a[:2] == b[:2]  # early greedy tokens agree (later ones may diverge after one near-tie)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_quantizing_while_loading_equals_quantizing_after(tmp_path, fmt):
    """Llama.build(quantize="int8") quantizes each weight as it is read (the dense model never exists); the result
    is the model quantized after a dense load, bit for bit, and keeps no tensor of the memory-mapped checkpoint."""
    args = tiny_args(dim=64, n_heads=8, n_kv_heads=4)
    ckpt = save_meta(random_model(args, seed=12, std=0.3), tmp_path / "ckpt", mp=2, fmt=fmt)
    tok = train_tiny_tokenizer(tmp_path / "tok.model")
    while_loading = Llama.build(str(ckpt), str(tok), max_seq_len=32, max_batch_size=2, device="cpu",
                                quantize="int8").model
    gc.collect()
    if os.path.exists("/proc/self/maps"):  # nothing of the checkpoint stays mapped (its pages would count as RSS)
        assert str(ckpt) not in open("/proc/self/maps").read()
    after = Llama.build(str(ckpt), str(tok), max_seq_len=32, max_batch_size=2, device="cpu").model
    quantize_model(after, "int8")
    assert list(while_loading.state_dict()) == list(after.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(while_loading.state_dict().values(), after.state_dict().values()))
    tokens = torch.randint(0, args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(while_loading(tokens, 0), after(tokens, 0))


def test_unsupported_modes_raise_clear_errors(monkeypatch):
    from llama.quantize import QUANTIZERS

    model = random_model(tiny_args())
    monkeypatch.delitem(QUANTIZERS, "nf4", raising=False)  # as in a process that never imported kollama
    with pytest.raises(ValueError, match="'nf4' is provided by kollama: use kollama.inference.build"):
        quantize_model(model, "nf4")
    with pytest.raises(ValueError, match="unknown quantize mode 'int3'"):
        quantize_model(model, "int3")
    with pytest.raises(ValueError, match="divisible by group_size"):
        Int4Linear.from_weight(torch.randn(8, 48), group_size=32)
