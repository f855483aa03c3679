"""Speculative decoding (llama/speculative.py): greedy output equals plain greedy decoding of the target, with a
draft that agrees (the target's int8 copy) and with one that mostly does not (another random model); sampled output
is distributed as the target's own sampling, checked against the exact distribution on a tiny vocabulary."""
import math

import pytest
import torch

from conftest import need
from helpers import random_model, tiny_args
from llama.generation import Llama, TokenBatch
from llama.sampling import Sampler
from llama.speculative import speculative_tokens

pytestmark = pytest.mark.usefixtures("one_thread")


class IdTokenizer:
    def __init__(self, eos_id=-5):
        self.eos_id = eos_id

    def decode(self, t):
        return str(list(t))


def plain_and_speculative(target, draft, prompts, k, **kw):
    plain = Llama(target, IdTokenizer())
    spec = Llama(target, IdTokenizer(), draft=draft, speculate_k=k)
    for p in prompts:
        want = plain.generate([p], **kw)[0]
        assert spec.generate([p], **kw)[0] == want, (p, k)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_equals_plain_greedy_with_a_disagreeing_draft(k):
    args = tiny_args()
    target = random_model(args, seed=3, std=0.5).requires_grad_(False)
    draft = random_model(tiny_args(n_layers=1), seed=9, std=0.5).requires_grad_(False)  # a different model
    prompts = [[1, 5, 9], [1], [1, 77, 3, 100, 4, 8, 9, 2, 60], [1, 30, 31]]
    plain_and_speculative(target, draft, prompts, k, max_gen_len=20, temperature=0)


def test_greedy_equals_plain_greedy_with_the_int8_self_draft_on_stories260k(test_data, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    bin_, tok = need(test_data, "stories260K.bin", "tok512.model")
    ckpt = tmp_path / "ckpt"
    subprocess.run([sys.executable, "-m", "llama.convert", "llama2c", str(bin_), str(ckpt)], check=True,
                   capture_output=True, cwd=Path(__file__).resolve().parents[1])
    plain = Llama.build(str(ckpt), str(tok), max_seq_len=128, max_batch_size=1, device="cpu")
    spec = Llama.build(str(ckpt), str(tok), max_seq_len=128, max_batch_size=1, device="cpu", draft="int8",
                       speculate_k=4)
    starts = ["Once upon a time", "The little dog", "Lily wanted", "Tom and Sue", "One day, a big", "The sun",
              "She saw a", "There was a bird", "Mom said", "The cat and the"]
    for s in starts:
        want = plain.text_completion([s], temperature=0, max_gen_len=60)
        assert spec.text_completion([s], temperature=0, max_gen_len=60) == want, s
    # streaming and stop strings consume the same loop
    assert "".join(spec.stream_text(starts[0], temperature=0, max_gen_len=40)) == \
        plain.text_completion([starts[0]], temperature=0, max_gen_len=40)[0]["generation"]
    assert spec.text_completion(starts[:1], temperature=0, max_gen_len=60, stop=["."]) == \
        plain.text_completion(starts[:1], temperature=0, max_gen_len=60, stop=["."])


def exact_pair_distribution(model, prompt, sampler):
    """P(t1, t2) of two tokens sampled by the target alone after ``prompt``, by enumeration."""
    with torch.inference_mode():
        p1 = sampler.distribution(model(torch.tensor([prompt]), 0, use_cache=False)[:, -1])[0]
        rows = torch.tensor([prompt + [t] for t in range(p1.numel())])
        p2 = sampler.distribution(model(rows, 0, use_cache=False)[:, -1])
    return p1[:, None] * p2


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.8, 0.7)])
def test_sampled_tokens_follow_the_target_distribution(temperature, top_p):
    vocab, n = 6, 6000
    target = random_model(tiny_args(vocab_size=vocab, n_layers=1), seed=3, std=0.3).requires_grad_(False)
    draft = random_model(tiny_args(vocab_size=vocab, n_layers=1), seed=11, std=0.6).requires_grad_(False)
    prompt = [1, 4]
    g = torch.Generator().manual_seed(0)
    sampler = Sampler(temperature, top_p, g)
    exact = exact_pair_distribution(target, prompt, sampler)
    counts = torch.zeros(vocab, vocab)
    for _ in range(n):
        batch = TokenBatch([prompt], len(prompt) + 2, 2, False, torch.device("cpu"))
        for _ in speculative_tokens(target, draft, batch, sampler, eos_id=-5, k=2):
            pass
        t1, t2 = batch.tokens[0, 2:].tolist()
        counts[t1, t2] += 1
    # Pearson's chi-square over the outcomes the target can produce; nothing outside them may appear.
    possible = exact > 0
    assert counts[~possible].sum() == 0
    expected = exact[possible] * n
    chi2 = ((counts[possible] - expected) ** 2 / expected).sum().item()
    df = int(possible.sum()) - 1
    # 0.1 % upper tail of chi-square (Wilson-Hilferty): a correct sampler fails 1 run in 1000; the draft's own
    # distribution (what a broken acceptance rule leaks) is far off.
    z = 3.09
    bound = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    assert chi2 < bound, (chi2, bound, df)
    draft_exact = exact_pair_distribution(draft, prompt, Sampler(temperature, top_p))
    assert (draft_exact - exact).abs().sum() > 0.3  # the test would notice the draft's distribution
