"""llama/kernels against plain torch: f32_mm equals the float64 product within fp32 reassociation; q8_mm equals
an independent torch implementation of per-block int8 activations x per-row int8 weights (llama.cpp's q8_0
definition with 64-input blocks); every instruction-set path the compiler can target here is built and checked
(AVX-512 VNNI, AVX-512 without VNNI, AVX2, scalar), and ``kernels.linear`` leaves autograd to torch."""
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from llama import kernels

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC", "gcc")) is None, reason="no C compiler")

# (M, N, K): decode (M=1), speculative verification (M=5), a prefill tile tail (M=17 = 4*4+1), weights with N not
# a multiple of the 4-row tile, K not a multiple of 16 (fp32 vector) nor of 64 (int8 block), and stories260K's FFN.
SHAPES = [(1, 5, 7), (1, 288, 288), (3, 768, 288), (5, 17, 172), (8, 64, 64), (17, 30, 200), (2, 33, 130),
          (1, 1, 1), (4, 6, 65)]

# Flags that make gcc compile the other paths of cpu.c on this CPU (each only where this CPU can run it).
CPU_FLAGS = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
VARIANTS = {
    "native": (),
    "avx512 without vnni or bf16": ("-mno-avx512vnni", "-mno-avxvnni", "-mno-avx512bf16"),
    "avx2 with avx-vnni": ("-mno-avx512f", "-mavxvnni"),
    "avx2": ("-mno-avx512f", "-mno-avxvnni"),
    "scalar": ("-mno-avx2", "-mno-avx512f", "-mno-fma"),
}
NEEDS = {"avx512 without vnni or bf16": "avx512bw", "avx2 with avx-vnni": "avx_vnni", "avx2": "avx2"}


def q8_reference(x, q, scale, block=64):
    """Per block of ``block`` inputs: s = max|x| / 127, xq = round(x / s) (half to even) in [-127, 127]; then
    y[m, n] = scale[n] * sum_b s[m, b] * sum_{k in b} xq[m, k] q[n, k], in float64."""
    m, k = x.shape
    kp = -(-k // block) * block
    xb = F.pad(x.double(), (0, kp - k)).view(m, -1, block)
    amax = xb.abs().amax(-1, keepdim=True)
    s = (amax.float() / 127).double()
    xq = torch.where(amax > 0, torch.round(xb.float() * (127 / amax.float())).double(), 0.0).clamp(-127, 127)
    qb = F.pad(q.double(), (0, kp - k)).view(q.shape[0], -1, block)
    dots = torch.einsum("mbk,nbk->mnb", xq, qb)  # exact: integers far below 2**53
    return (dots * s.squeeze(-1)[:, None, :]).sum(-1) * scale.double()


@pytest.fixture(scope="module", params=list(VARIANTS))
def lib(request):
    name = request.param
    if name in NEEDS and NEEDS[name] not in CPU_FLAGS:
        pytest.skip(f"this CPU has no {NEEDS[name]}: the {name} path cannot run here")
    built = kernels._build(kernels._CFLAGS + VARIANTS[name])
    assert built is not None
    print(f"{name}: compiled for {built.llama_kernel_isa().decode()}")
    return built


@pytest.mark.parametrize("m, n, k", SHAPES)
def test_f32_mm_is_the_product(lib, m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    ref = x.double() @ w.double().T
    got = kernels._f32_mm(lib, x, w)
    # fp32 sums of k terms in another order: within a few ulps of sum |x||w|.
    bound = 4 * k * torch.finfo(torch.float32).eps * (x.abs().double() @ w.abs().double().T)
    assert ((got.double() - ref).abs() <= bound + 1e-30).all()


@pytest.mark.parametrize("m, n, k", SHAPES)
def test_bf16_mm_is_the_product_rounded_once(lib, m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x, w = torch.randn(m, k, generator=g).bfloat16(), torch.randn(n, k, generator=g).bfloat16()
    ref = x.double() @ w.double().T  # bf16 products are exact in float64
    got = kernels._bf16_mm(lib, x, w)
    assert got.dtype == torch.bfloat16
    # fp32 accumulation (a few ulps of sum |x||w|), then one rounding to bf16 (half an ulp: 2**-8 relative).
    bound = (4 * k * torch.finfo(torch.float32).eps * (x.abs().double() @ w.abs().double().T)
             + ref.abs() * 2.0**-8)
    assert ((got.double() - ref).abs() <= bound + 1e-30).all()


@pytest.mark.parametrize("m, n, k", SHAPES)
def test_q8_mm_is_the_block_quantized_product(lib, m, n, k):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    x = torch.randn(m, k, generator=g) * torch.rand(1, k, generator=g) * 3  # uneven magnitudes across blocks
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) + 0.01
    ref = q8_reference(x, q, scale)
    got = kernels._q8_mm(lib, x, q, scale).double()
    # The integer dot products are exact; what differs is fp32 rounding of the scaled block sums.
    tol = 1e-5 * (ref.abs() + (q8_reference(x.abs(), q.abs(), scale)))
    assert ((got - ref).abs() <= tol + 1e-6).all(), (got - ref).abs().max()


def test_q8_mm_of_zero_blocks_and_extremes(lib):
    x = torch.zeros(2, 130)
    x[1, 64:128] = torch.linspace(-1000, 1000, 64)  # one block large, the others zero
    q = torch.full((5, 130), -127, dtype=torch.int8)
    q[2] = 127
    scale = torch.ones(5)
    assert torch.allclose(kernels._q8_mm(lib, x, q, scale).double(), q8_reference(x, q, scale), rtol=1e-6)
    assert (kernels._q8_mm(lib, x, q, scale)[0] == 0).all()


def test_linear_uses_the_kernel_only_without_autograd():
    w = torch.randn(40, 24, requires_grad=True)
    x = torch.randn(3, 24)
    y = kernels.linear(x, w)
    y.sum().backward()  # recorded by torch: the kernel has no backward
    assert torch.allclose(w.grad, x.sum(0).expand(40, 24))
    with torch.no_grad():
        assert torch.allclose(kernels.linear(x, w), F.linear(x, w), atol=1e-5)
        x3 = torch.randn(2, 3, 24)
        assert kernels.linear(x3, w).shape == (2, 3, 40)
        assert torch.allclose(kernels.linear(x3, w), F.linear(x3, w), atol=1e-5)
    print(f"kernels built for {kernels.isa()}")


def test_decode_step_kernels_match_torch_formulas():
    """rms_norm, rotary, silu_mul and attention against the torch formulas of Meta's model.py."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(3, 5, 48, generator=g), torch.rand(48, generator=g) + 0.5
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    assert torch.allclose(kernels.rms_norm(x, w, 1e-5), ref, rtol=1e-5, atol=1e-6)

    q = torch.randn(2, 3, 4, 8, generator=g)  # (B, S, H, D)
    angles = torch.rand(3, 4, generator=g) * 6
    rope = torch.stack([angles.cos(), angles.sin()], -1)  # (S, D/2, 2)
    pairs = q.view(2, 3, 4, 4, 2)
    c, s = rope[None, :, None, :, 0], rope[None, :, None, :, 1]
    ref = torch.stack([pairs[..., 0] * c - pairs[..., 1] * s, pairs[..., 0] * s + pairs[..., 1] * c], -1).flatten(3)
    assert torch.allclose(kernels.rotary(q, rope), ref, atol=1e-6)
    wide = torch.cat([q.reshape(2, 3, 32), torch.randn(2, 3, 16, generator=g)], -1)  # a stacked q|k product
    assert torch.allclose(kernels.rotary(wide[..., :32].view(2, 3, 4, 8), rope), ref, atol=1e-6)

    a, b = torch.randn(2, 70, generator=g) * 5, torch.randn(2, 70, generator=g)
    assert torch.allclose(kernels.silu_mul(a, b), F.silu(a) * b, rtol=1e-5, atol=1e-6)
    gate, up = torch.cat([a, b], -1).view(2, 1, 140).split(70, -1)  # views into a stacked w1|w3 product
    assert torch.allclose(kernels.silu_mul(gate, up), (F.silu(a) * b).view(2, 1, 70), rtol=1e-5, atol=1e-6)

    # 3 new queries at positions 4..6 of rows 0..1 over a cache of 2 x 10 positions, 6 heads over 2 kv heads.
    bsz, new, heads, kv_heads, dim, start = 2, 3, 6, 2, 8, 4
    k_cache, v_cache = torch.randn(3, 10, kv_heads, dim, generator=g), torch.randn(3, 10, kv_heads, dim, generator=g)
    q = torch.randn(bsz, new, heads, dim, generator=g)
    got = kernels.attention(q, k_cache, v_cache, start)
    keys = k_cache[:bsz, : start + new].repeat_interleave(heads // kv_heads, dim=2).transpose(1, 2)
    values = v_cache[:bsz, : start + new].repeat_interleave(heads // kv_heads, dim=2).transpose(1, 2)
    scores = q.transpose(1, 2) @ keys.transpose(2, 3) / dim**0.5  # (B, H, S, T)
    visible = torch.arange(start + new)[None, :] <= torch.arange(start, start + new)[:, None]
    ref = (scores.masked_fill(~visible, float("-inf")).softmax(-1) @ values).transpose(1, 2)
    assert torch.allclose(got, ref, atol=1e-5)
