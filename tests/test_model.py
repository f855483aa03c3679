"""llama.model against transformers' LlamaForCausalLM, the KV cache against full forwards, Meta's geometries."""
import pytest
import torch

from helpers import hf_model, random_model, tiny_args
from llama.model import ModelArgs, RMSNorm, Transformer

CONFIGS = {
    "mha": dict(dim=40, n_layers=2, n_heads=5, n_kv_heads=None, vocab_size=97, multiple_of=7),
    "gqa": dict(dim=48, n_layers=3, n_heads=6, n_kv_heads=2, vocab_size=61, multiple_of=16, ffn_dim_multiplier=1.3),
    "mqa_theta": dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=50, multiple_of=1, rope_theta=500.0),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(name):
    torch.manual_seed(0)
    args = tiny_args(**CONFIGS[name])
    model = random_model(args, seed=1)
    ref = hf_model(model.state_dict(), args, args.ffn_hidden_dim)
    tokens = torch.randint(0, args.vocab_size, (3, 23))
    with torch.no_grad():
        ours = model(tokens, 0)
        theirs = ref(tokens).logits
    assert ours.dtype == torch.float32 and ours.shape == (3, 23, args.vocab_size)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_parameter_names_are_metas():
    model = random_model(tiny_args(n_layers=1))
    expected = {"tok_embeddings.weight", "norm.weight", "output.weight"} | {
        f"layers.0.{k}.weight" for k in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                                         "feed_forward.w1", "feed_forward.w2", "feed_forward.w3",
                                         "attention_norm", "ffn_norm")}
    assert set(model.state_dict()) == expected  # the KV cache and rope table are not in the state_dict


@pytest.mark.parametrize("geometry,ffn", [
    (dict(dim=4096, n_layers=32, n_heads=32), 11008),  # 7B
    (dict(dim=5120, n_layers=40, n_heads=40), 13824),  # 13B
    (dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096, ffn_dim_multiplier=1.3), 28672),  # 70B
])
def test_meta_geometries_build_on_meta_device(geometry, ffn):
    args = ModelArgs(vocab_size=32000, **geometry)
    model = Transformer(args, device="meta")
    layer = model.layers[0]
    assert layer.feed_forward.w1.weight.shape == (ffn, args.dim)
    kv = args.n_kv_heads or args.n_heads
    assert layer.attention.wk.weight.shape == (kv * args.dim // args.n_heads, args.dim)
    assert layer.attention.cache.k.shape == (32, 2048, kv, args.dim // args.n_heads)


def test_defaults_are_metas():
    a = ModelArgs()
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size, a.multiple_of, a.ffn_dim_multiplier,
            a.norm_eps, a.max_batch_size, a.max_seq_len, a.rope_theta) == (
        4096, 32, 32, None, -1, 256, None, 1e-5, 32, 2048, 10000.0)


def test_rmsnorm_statistics_in_fp32():
    norm = RMSNorm(8, eps=1e-5)
    x = (torch.randn(4, 8) * 300).to(torch.float16)
    expected = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).half()
    assert torch.equal(norm(x), expected * norm.weight)


def test_kv_cache_prefill_then_single_tokens_equals_full_forward():
    args = tiny_args()
    model = random_model(args)
    tokens = torch.randint(0, args.vocab_size, (2, 20))
    with torch.no_grad():
        full = model(tokens, 0, use_cache=False)
        steps = [model(tokens[:, :8], 0)]
        steps += [model(tokens[:, p : p + 1], p) for p in range(8, 20)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_chunked_prefill_equals_full_forward():
    args = tiny_args()
    model = random_model(args)
    tokens = torch.randint(0, args.vocab_size, (3, 30))
    with torch.no_grad():
        full = model(tokens, 0)
        chunks = [model(tokens[:, a:b], a) for a, b in ((0, 7), (7, 19), (19, 20), (20, 30))]
    assert torch.allclose(torch.cat(chunks, dim=1), full, atol=1e-5)


def test_bounds_raise_value_errors_naming_both_numbers():
    model = random_model(tiny_args(max_seq_len=16, max_batch_size=2))
    with pytest.raises(ValueError, match=r"17.*max_seq_len is 16"):
        model(torch.zeros(1, 17, dtype=torch.long), 0)
    with pytest.raises(ValueError, match=r"20.*max_seq_len is 16"):
        model(torch.zeros(1, 5, dtype=torch.long), 15)
    with pytest.raises(ValueError, match=r"3 rows.*max_batch_size is 2"):
        model(torch.zeros(3, 4, dtype=torch.long), 0)


def test_no_cache_path_trains():
    args = tiny_args()
    model = random_model(args).train()
    tokens = torch.randint(0, args.vocab_size, (2, 12))
    loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1], use_cache=False).flatten(0, 1),
                                             tokens[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(not c.k.any() for c in model.kv_caches())  # the cache was not touched


def test_replaced_local_linear_keeps_the_layer_working():
    from kollama.adapters.nf4 import NF4Linear

    model = random_model(tiny_args(dim=64, n_heads=8, n_kv_heads=4))
    tokens = torch.randint(0, 128, (1, 5))
    wq = model.layers[0].attention.wq
    dense = wq.weight.detach().clone()
    nf4 = NF4Linear.from_weight(dense)
    with torch.no_grad():
        wq.weight.copy_(nf4.dequantize())
        expected = model(tokens, 0)
        wq.replace_local_linear(nf4)
        got = model(tokens, 0)
    assert wq.weight is None and "layers.0.attention.wq.weight" not in model.state_dict()
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("dim,hidden,expected", [
    (4096, 11008, {"multiple_of": 256, "ffn_dim_multiplier": None}),  # Llama 2 7B params.json
    (8192, 28672, {"multiple_of": 4096, "ffn_dim_multiplier": 1.3}),  # Llama 2 70B params.json
    (64, 172, {"multiple_of": 4, "ffn_dim_multiplier": None}),  # stories260K (llama2.c: multiple_of=4)
])
def test_ffn_params_for_recovers_metas_choices(dim, hidden, expected):
    from llama.model import ffn_params_for

    assert ffn_params_for(dim, hidden) == expected


def test_ffn_params_for_any_width():
    from llama.model import ffn_hidden_dim, ffn_params_for

    for dim, hidden in ((100, 333), (96, 250), (512, 1377)):
        p = ffn_params_for(dim, hidden)
        assert ffn_hidden_dim(dim, p["multiple_of"], p["ffn_dim_multiplier"]) == hidden
