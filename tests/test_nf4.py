"""Tests of kollama.adapters.nf4: agreement with torchao's NF4Tensor, error bounds, special values, NF4Linear."""
import importlib
import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kollama.adapters.nf4 import (
    BLOCK_SIZE,
    NF4_CODE_BOOK,
    SCALE_BLOCK_SIZE,
    NF4Linear,
    bits_per_parameter,
    dequantize_nf4,
    dequantize_scales,
    pack_codes,
    quantize_blocks,
    quantize_nf4,
    quantize_scales,
    unpack_codes,
)

EPS32 = torch.finfo(torch.float32).eps
# Largest gap between adjacent codes (-1.0 .. -0.696): a value is at most half of it from its nearest code.
MAX_GAP = float((NF4_CODE_BOOK[1:] - NF4_CODE_BOOK[:-1]).max())


def varied_weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Random weight whose rows differ in scale, so block absmaxes (and their int8 error) are not all alike."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g).add(0.05) * 0.1


@pytest.fixture(scope="module")
def ao():
    """torchao's NF4 module (test-only dependency); it moved in torchao 0.15+."""
    pytest.importorskip("torchao", exc_type=ImportError)  # also skip a torchao that fails to import
    for name in ("torchao.dtypes.nf4tensor", "torchao.quantization.quantize_.workflows.nf4.nf4_tensor"):
        try:
            return importlib.import_module(name)
        except ImportError:
            pass
    pytest.skip("this torchao has no NF4Tensor")


def test_code_book():
    assert NF4_CODE_BOOK.dtype == torch.float32 and NF4_CODE_BOOK.numel() == 16
    assert NF4_CODE_BOOK.tolist() == [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ]
    assert abs(MAX_GAP - (1.0 - 0.6961928009986877)) < 1e-7


def test_pack_order_and_round_trip():
    codes = torch.tensor([1, 2, 15, 0, 7, 9], dtype=torch.uint8)
    packed = pack_codes(codes)
    assert packed.tolist() == [0x12, 0xF0, 0x79]  # earlier element in the high nibble
    all_codes = torch.randint(0, 16, (4096,), dtype=torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(all_codes)), all_codes)


# --- agreement with torchao ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(256, 256), (128, 512)])  # N/64 divisible by 256, as torchao requires
def test_matches_torchao(ao, shape):
    w = varied_weight(*shape, seed=shape[1])
    ours = quantize_nf4(w)
    ref = ao.to_nf4(w, BLOCK_SIZE, SCALE_BLOCK_SIZE)

    # Double-quantized scales: same scheme (mean, 256-blocks, factor 128/absmax, int8), so bit-identical.
    assert torch.equal(ref.quantized_scalers, ours.quantized_scales)
    assert torch.equal(ref.quantization_factor, ours.scale_factor)
    assert torch.equal(ref.scaler_mean, ours.scale_mean)

    # Codes: torchao's LUT is our code book rounded to 4 decimals, so with our exact code book its
    # quantizer must give the same packed bytes; with its own LUT, codes may differ only next to a boundary.
    n_blocks = w.numel() // BLOCK_SIZE
    ref_exact = ao.NF4Tensor.convert_to_norm_float_weight(w, n_blocks, BLOCK_SIZE, NF4_CODE_BOOK)
    assert torch.equal(ref_exact, ours.packed_codes)
    ours_codes = unpack_codes(ours.packed_codes).long()
    ref_codes = unpack_codes(ref.quantized_data).long()
    differ = ours_codes != ref_codes
    assert differ.float().mean() < 1e-3
    blocks = w.reshape(-1, BLOCK_SIZE)
    normalized = (blocks / blocks.abs().amax(1, keepdim=True)).reshape(-1)
    midpoints = (NF4_CODE_BOOK[1:] + NF4_CODE_BOOK[:-1]) / 2
    dist_to_boundary = (normalized.unsqueeze(1) - midpoints).abs().min(1).values
    assert (dist_to_boundary[differ] < 1e-4).all()
    assert ((ours_codes - ref_codes).abs()[differ] == 1).all()

    # Dequantized values. torchao as is (its codes, its LUT): where codes agree the difference is the
    # 4-decimal rounding of the LUT (< 5e-5 * scale). With its codes and LUT swapped for ours (exact code
    # book), its dequantizer must reproduce ours bit for bit.
    ours_w = dequantize_nf4(*ours, shape)
    diff = (ref.get_original_weight() - ours_w).abs().reshape(-1)
    ref.quantized_data, ref.nf4 = ref_exact, NF4_CODE_BOOK.clone()
    assert torch.equal(ref.get_original_weight(), ours_w)
    scales = dequantize_scales(ours.quantized_scales, ours.scale_factor, ours.scale_mean)
    per_elem_scale = scales.repeat_interleave(BLOCK_SIZE)
    assert (diff[~differ] <= 5.01e-5 * per_elem_scale[~differ]).all()
    print(f"{shape}: max |ours - torchao| = {diff.max().item():.3e} overall, {diff[~differ].max().item():.3e} "
          f"where codes agree ({differ.sum().item()} of {differ.numel()} codes differ)")


def test_codes_match_torchao_when_scale_count_not_multiple_of_256(ao):
    w = varied_weight(48, 64, seed=3)  # 48 blocks: torchao's to_nf4 refuses this, its block quantizer not
    codes, _ = quantize_blocks(w)
    ref = ao.NF4Tensor.convert_to_norm_float_weight(w, w.numel() // BLOCK_SIZE, BLOCK_SIZE, NF4_CODE_BOOK)
    assert torch.equal(ref, pack_codes(codes))


# --- error bounds ------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(256, 320), (7, 192)])  # 1280 blocks (5 scale blocks); 21 (one short)
def test_error_bound(shape):
    """Bound on |w - dq(w)| derived from the code book and the int8 scale step.

    With a = true block absmax, s = dequantized scale, c = chosen code value (|c| <= 1):
      |w - c*s| <= |w - c*a| + |c|*|a - s| <= (MAX_GAP/2)*a + |a - s|
    since c is the nearest code to w/a. For the scale, q = clamp(round((a - m)*f), -128, 127) with
    f = 128/absmax_j of its 256-block, so |(a - m)*f - q| <= 1 (0.5 from rounding, up to 1 when +128 is
    clipped to 127), i.e. |a - s| <= 1/f. Add a few fp32 ulps for a - m, q/f, + m and c*s.
    """
    w = varied_weight(*shape, seed=11)
    q = quantize_nf4(w)
    codes = unpack_codes(q.packed_codes).long().view(-1, BLOCK_SIZE)
    blocks = w.reshape(-1, BLOCK_SIZE)
    a = blocks.abs().amax(1)
    # Each code is the nearest one (independent check of the search) and within MAX_GAP/2.
    normalized = blocks / a.unsqueeze(1)
    err_code = (normalized - NF4_CODE_BOOK[codes]).abs()
    nearest = (normalized.unsqueeze(-1) - NF4_CODE_BOOK).abs().min(-1).values
    assert torch.equal(err_code, nearest)
    assert (err_code <= MAX_GAP / 2).all()
    # Scale error within one int8 step.
    s = dequantize_scales(q.quantized_scales, q.scale_factor, q.scale_mean)
    step = (1 / q.scale_factor).repeat_interleave(SCALE_BLOCK_SIZE)[: a.numel()]
    slack = 8 * EPS32 * (a + q.scale_mean.abs() + step * 128)
    assert ((a - s).abs() <= step + slack).all()
    # Element error.
    err = (w - dequantize_nf4(*q, shape)).reshape(-1, BLOCK_SIZE).abs()
    bound = (MAX_GAP / 2) * a + step + slack
    assert (err <= bound.unsqueeze(1)).all()


def test_scale_padding_of_last_block():
    """A short last 256-block is quantized with the absmax of its own scales only."""
    absmax = torch.rand(300) + 0.5
    qs, factor, mean = quantize_scales(absmax)
    assert qs.shape == (300,) and factor.shape == (2,)
    centred = absmax - absmax.mean()
    assert torch.equal(mean, absmax.mean())
    assert torch.equal(factor[1], 256 / (2 * centred[256:].abs().max()))
    assert torch.equal(qs[256:], (centred[256:] * factor[1]).round().clamp(-128, 127).to(torch.int8))


# --- special values ----------------------------------------------------------------------------------

def test_all_zeros():
    q = quantize_nf4(torch.zeros(64, 128))
    assert (unpack_codes(q.packed_codes) == 7).all()  # code 7 is 0.0
    w = dequantize_nf4(*q, (64, 128))
    assert torch.isfinite(q.scale_factor).all() and torch.equal(w, torch.zeros(64, 128))


@pytest.mark.parametrize("value", [0.5, -0.75, 3.0])
def test_constant_blocks_round_trip_exactly(value):
    w = torch.full((32, 256), value)  # every block absmax |value|: scales equal their mean, int8 part 0
    assert torch.equal(dequantize_nf4(*quantize_nf4(w), w.shape), w)


def test_plus_minus_absmax_exact_and_no_nan():
    g = torch.Generator().manual_seed(5)
    w = torch.rand(64, 128, generator=g) * 1.8 - 0.9  # inside (-0.9, 0.9)
    blocks = w.view(-1, BLOCK_SIZE)
    blocks[0::2, 3] = 1.25  # every block has absmax 1.25, reached at +1.25 or -1.25
    blocks[1::2, 10] = -1.25
    block5 = blocks[5].clone()
    blocks[5] = 0.0  # one all-zero block among them
    q = quantize_nf4(w)
    dq = dequantize_nf4(*q, w.shape)
    assert torch.isfinite(dq).all()
    codes = unpack_codes(q.packed_codes).view(-1, BLOCK_SIZE)
    odd = [b for b in range(1, codes.shape[0], 2) if b != 5]
    assert (codes[0::2, 3] == 15).all() and (codes[odd, 10] == 0).all()
    dqb = dq.view(-1, BLOCK_SIZE)
    # The zero block pulls the scale mean below 1.25, so the scales come back only up to the int8 step;
    # the block maximum is still exactly +-(dequantized scale), and the zero block exactly 0.
    s = dequantize_scales(q.quantized_scales, q.scale_factor, q.scale_mean)
    assert torch.equal(dqb[0::2, 3], s[0::2]) and torch.equal(dqb[odd, 10], -s[odd])
    assert torch.equal(dqb[5], torch.zeros(BLOCK_SIZE))
    # Without the zero block all scales are 1.25, so +-absmax comes back exactly.
    blocks[5] = block5
    dq = dequantize_nf4(*quantize_nf4(w), w.shape).view(-1, BLOCK_SIZE)
    assert (dq[0::2, 3] == 1.25).all() and (dq[1::2, 10] == -1.25).all()


def test_rejects_nan_and_bad_shapes():
    with pytest.raises(ValueError, match="NaN"):
        quantize_nf4(torch.full((2, 64), float("nan")))
    with pytest.raises(ValueError, match=r"\(3, 5\).*divisible|divisible.*\(3, 5\)"):
        NF4Linear.from_weight(torch.randn(3, 5))
    with pytest.raises(ValueError, match="2-D"):
        NF4Linear.from_weight(torch.randn(128))


# --- NF4Linear ---------------------------------------------------------------------------------------

def test_dequantize_dtypes():
    layer = NF4Linear.from_weight(varied_weight(64, 96))
    w32 = layer.dequantize()
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(layer.dequantize(dtype), w32.to(dtype))
        x = torch.randn(3, 96, dtype=dtype)
        assert layer(x).dtype == dtype
        assert torch.equal(layer(x), F.linear(x, w32.to(dtype)))


def test_forward_backward_matches_dequantized_weight():
    torch.manual_seed(0)
    layer = NF4Linear.from_weight(varied_weight(96, 128))
    assert list(layer.parameters()) == [] and not any(b.requires_grad for b in layer.buffers())
    x = torch.randn(2, 5, 128, requires_grad=True)
    y = layer(x)
    # Only the packed buffers are saved for backward, never a full-size dequantized weight.
    saved = y.grad_fn.saved_tensors
    assert {t.data_ptr() for t in saved} <= {b.data_ptr() for b in layer.buffers()}
    grad_y = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, grad_y)

    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = layer.dequantize(torch.float32)
    y_ref = F.linear(x_ref, w_ref)
    (gx_ref,) = torch.autograd.grad(y_ref, x_ref, grad_y)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(gx, gx_ref, atol=1e-6, rtol=0)
    assert all(b.grad is None for b in layer.buffers())


def test_state_dict_round_trip():
    lin = nn.Linear(128, 64, bias=True)
    layer = NF4Linear.from_linear(lin)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = NF4Linear(128, 64, bias=True)
    fresh.load_state_dict(torch.load(buf))
    assert set(layer.state_dict()) == {"packed_codes", "quantized_scales", "scale_factor", "scale_mean", "bias"}
    for name, t in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], t), name
    x = torch.randn(4, 128)
    assert torch.equal(fresh(x), layer(x))
    with torch.no_grad():  # NF4 is lossy: about 10% relative error on uniform weights
        assert (layer(x) - lin(x)).norm() < 0.15 * lin(x).norm()


def test_model_parallel_shards():
    w = varied_weight(128, 256, seed=9)
    full = quantize_nf4(w)
    # A row shard holds whole blocks of the global weight: same codes (its scale mean differs).
    row = NF4Linear.from_weight(w.chunk(2, dim=0)[1])
    assert (row.out_features, row.in_features) == (64, 256)
    assert torch.equal(row.packed_codes, full.packed_codes.chunk(2)[1])
    # A column shard is a non-contiguous local tensor; it quantizes like its contiguous copy.
    col_view = w.chunk(2, dim=1)[1]
    col = NF4Linear.from_weight(col_view)
    assert (col.out_features, col.in_features) == (128, 128)
    assert all(torch.equal(a, b) for a, b in zip(quantize_nf4(col_view.contiguous()), col.buffers()))


def test_bits_per_parameter():
    n = 4096 * 4096
    expected = 4 + 8 / BLOCK_SIZE + 32 / (BLOCK_SIZE * SCALE_BLOCK_SIZE) + 32 / n  # codes, int8, factor, mean
    layer = NF4Linear.from_weight(torch.randn(4096, 4096))
    bits = bits_per_parameter(layer)
    print(f"bits/param 4096x4096: {bits:.6f} (formula {expected:.6f})")
    assert abs(bits - expected) < 1e-9 and abs(bits - 4.127) < 0.01
    # A model: all NF4Linear layers together; a short scale block still costs a whole fp32 factor.
    small = NF4Linear.from_weight(torch.randn(3, 64))  # 3 blocks, 1 factor
    model = nn.Sequential(layer, nn.ReLU(), small)
    total = n * expected + (96 + 3 + 4 + 4) * 8
    assert math.isclose(bits_per_parameter(model), total / (n + 192), rel_tol=1e-12)
    with pytest.raises(ValueError):
        bits_per_parameter(nn.Linear(4, 4))
