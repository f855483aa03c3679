"""Fast paths give the eager model's answers: the static-shape decode step, torch.compile of it, grouped-query
attention without copies, and the generate loop's shortcuts (checked against a plain full-forward greedy loop)."""
import torch

from helpers import random_model, tiny_args
from llama.generation import Llama
from test_generation import PROMPTS, IdTokenizer


def reference_greedy(model, prompt, n):
    """Greedy decoding by full forwards without the cache: the slowest, simplest possible loop."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]), 0, use_cache=False)[0, -1].argmax()))
    return seq[len(prompt):]


def test_generate_equals_full_forward_greedy():
    model = random_model(tiny_args(), seed=3, std=0.5).requires_grad_(False)
    llama = Llama(model, IdTokenizer(-5))
    got, _ = llama.generate(PROMPTS, 10, temperature=0)
    assert got == [reference_greedy(model, p, 10) for p in PROMPTS]


def test_static_shape_decode_step_equals_forward():
    args = tiny_args()
    model = random_model(args, seed=2)
    prompt = torch.randint(0, args.vocab_size, (3, 9))
    new = torch.randint(0, args.vocab_size, (3, 1))
    with torch.inference_mode():
        model(prompt, 0)
        expected = model(new, 9)[:, -1]
        model(prompt, 0)  # the same cache state again
        got = model(new, torch.tensor([9]))[:, -1]  # the static-shape decode step
    # Same arithmetic, but attention sums over the masked-off rest of the cache: equal up to summation order.
    assert torch.allclose(got, expected, atol=1e-5)


def test_compiled_decode_equals_eager():
    # One layer and one batch size: inductor compiles once (tens of seconds on two shared cores).
    model = random_model(tiny_args(n_layers=1), seed=3, std=0.5).requires_grad_(False)
    eager = Llama(model, IdTokenizer(-5))
    compiled = Llama(model, IdTokenizer(-5), compile=True)
    got, _ = compiled.generate(PROMPTS, 8, temperature=0)
    assert got == eager.generate(PROMPTS, 8, temperature=0)[0]
    tok = torch.tensor([[5], [7], [9]])
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]] * 3), 0)
        expected = model(tok, 3)[:, -1]
        model(torch.tensor([[1, 2, 3]] * 3), 0)
        logits = compiled._decode_step(tok, torch.tensor([3]))
    assert torch.allclose(logits, expected, atol=1e-5)


def test_gqa_attention_equals_repeated_kv_heads():
    # enable_gqa must pair query head h with kv head h // n_rep, as Meta's repeat_kv; an MHA model with the kv
    # weights repeated is the same function.
    args = tiny_args(n_heads=6, n_kv_heads=2)
    gqa = random_model(args, seed=5)
    mha = random_model(tiny_args(n_heads=6, n_kv_heads=None), seed=5)
    hd = args.head_dim
    state = gqa.state_dict()
    for k, v in state.items():
        if k.endswith(("wk.weight", "wv.weight")):
            v = v.view(2, hd, -1).repeat_interleave(3, dim=0).reshape(6 * hd, -1)
        mha.state_dict()[k].copy_(v)
    tokens = torch.randint(0, args.vocab_size, (2, 11))
    with torch.no_grad():
        assert torch.allclose(gqa(tokens, 0), mha(tokens, 0), atol=1e-5)


def test_no_thread_or_dtype_side_effects_at_import_and_build():
    import subprocess
    import sys

    # A fresh interpreter: importing the library (and quantizing) must leave threads and default dtype alone.
    code = ("import torch; t, d = torch.get_num_threads(), torch.get_default_dtype(); import llama.generation, "
            "llama.quantize; assert (torch.get_num_threads(), torch.get_default_dtype()) == (t, d)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    Llama(random_model(tiny_args()), IdTokenizer())
    assert (torch.get_num_threads(), torch.get_default_dtype()) == (threads, dtype)
