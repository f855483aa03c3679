"""llama.fusion: stacked wq|wk|wv and w1|w3 give bit-identical logits to the separate products (dense and int8),
leave the state_dict untouched (names, shapes, values, no extra keys), see in-place weight changes, and step aside
when a weight is replaced, re-bound or needs a gradient."""
import torch

from helpers import random_model, tiny_args
from llama.fusion import stack_projections
from llama.quantize import quantize_model


def _model(quantize=None):
    model = random_model(tiny_args(dim=64, n_heads=8, n_kv_heads=4, multiple_of=4), seed=3).requires_grad_(False)
    if quantize:
        quantize_model(model, quantize)
    return model


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens, 0), model(tokens[:, :1], tokens.shape[1]), model(tokens[:, :3], tokens.shape[1] + 1)


TOKENS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))


def test_stacked_products_are_bit_identical_and_the_state_dict_unchanged():
    for quantize in (None, "int8"):
        plain, stacked = _model(quantize), _model(quantize)
        before = {k: v.clone() for k, v in stacked.state_dict().items()}
        assert stack_projections(stacked) == 2 * len(stacked.layers)
        for a, b in zip(_logits(plain, TOKENS), _logits(stacked, TOKENS)):
            assert torch.equal(a, b), quantize
        after = stacked.state_dict()
        assert list(after) == list(before)
        assert all(torch.equal(after[k], before[k]) and after[k].shape == before[k].shape for k in before)
        assert all(not name.startswith("stacked") for name, _ in stacked.named_modules())


def test_in_place_changes_are_seen_and_replacements_step_aside():
    model = _model()
    stack_projections(model)
    attn = model.layers[0].attention
    with torch.no_grad():
        attn.wk.weight.mul_(2)  # in place (an adapter merge, load_state_dict): the stacked view sees it
    assert attn.stacked_qkv.usable()
    reference = _model()
    with torch.no_grad():
        reference.layers[0].attention.wk.weight.mul_(2)
    assert torch.equal(_logits(model, TOKENS)[0], _logits(reference, TOKENS)[0])

    attn.wv.weight.data = attn.wv.weight.data.clone()  # re-bound: the stacked copy would be stale
    assert not attn.stacked_qkv.usable()
    ffn = model.layers[1].feed_forward
    quantize_model(model, "int8")  # replaced: every group steps aside until stacked again
    assert not ffn.stacked_w13.usable()
    quantize_model(reference, "int8")
    assert torch.equal(_logits(model, TOKENS)[0], _logits(reference, TOKENS)[0])


def test_a_weight_that_needs_a_gradient_is_not_stacked_over():
    model = _model()
    stack_projections(model)
    model.layers[0].feed_forward.w1.weight.requires_grad_(True)
    assert not model.layers[0].feed_forward.stacked_w13.usable()
    model(TOKENS, 0, use_cache=False).sum().backward()
    assert model.layers[0].feed_forward.w1.weight.grad is not None
