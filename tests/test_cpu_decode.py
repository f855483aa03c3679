"""llama.cpu_decode: a batch-1 decode step through every layer in one C call gives the module path's hidden state
bit for bit (fp32 and int8, grouped-query heads, several positions), is really taken where it applies, and steps
aside (None) where it does not: another batch size, a replaced weight, another dtype, more than one process."""
import pytest
import torch

from helpers import random_model, tiny_args
from llama import kernels
from llama.cpu_decode import CpuDecoder
from llama.fusion import stack_projections
from llama.quantize import quantize_model

pytestmark = pytest.mark.skipif(not kernels.available(), reason="llama's CPU kernels cannot be built here")


def _model(quantize=None, **overrides):
    args = tiny_args(dim=64, n_heads=8, n_kv_heads=2, multiple_of=4, **overrides)
    model = random_model(args, seed=7).requires_grad_(False)
    if quantize:
        quantize_model(model, quantize)
    stack_projections(model)
    model.cpu_decoder = CpuDecoder(model)
    return model


class Counting:
    """Wraps a CpuDecoder and counts the steps it took (returned a state) and declined (None)."""

    def __init__(self, decoder):
        self.decoder, self.taken, self.declined = decoder, 0, 0

    def __call__(self, h, start_pos):
        out = self.decoder(h, start_pos)
        self.taken += out is not None
        self.declined += out is None
        return out


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_one_call_decode_is_the_module_path_bit_for_bit(quantize):
    fast, slow = _model(quantize), _model(quantize)
    slow.cpu_decoder = None
    fast.cpu_decoder = counter = Counting(fast.cpu_decoder)
    tokens = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(fast(tokens[:, :5], 0), slow(tokens[:, :5], 0))  # prefill: modules on both
        for pos in range(5, 12):
            assert torch.equal(fast(tokens[:, pos:pos + 1], pos), slow(tokens[:, pos:pos + 1], pos)), pos
    assert (counter.taken, counter.declined) == (7, 0)
    for a, b in zip(fast.kv_caches(), slow.kv_caches()):
        assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)


def test_steps_aside_where_it_does_not_apply(monkeypatch):
    model = _model()
    decoder = model.cpu_decoder
    h = torch.randn(1, 1, 64)
    with torch.no_grad():
        assert decoder(h, 3) is not None
        assert decoder(h.bfloat16(), 3) is None  # another dtype
        monkeypatch.setattr("llama.cpu_decode.get_model_parallel_world_size", lambda: 2)
        assert decoder(h, 3) is None  # tensor parallel: collectives between the products
        monkeypatch.undo()
        model.layers[1].feed_forward.w2.weight.data = model.layers[1].feed_forward.w2.weight.data.clone()
        assert decoder(h, 3) is not None  # re-bound, still dense: the table is rebuilt from the new pointer
        quantize_model(model, "int8")  # replaced: the stacked views are stale until stacked again
        assert decoder(h, 3) is None
        stack_projections(model)
        assert decoder(h, 3) is not None

    counter = Counting(model.cpu_decoder)
    model.cpu_decoder = counter
    with torch.no_grad():
        model(torch.randint(0, 128, (2, 1)), 4)  # batch 2: modules
    assert counter.taken == counter.declined == 0
