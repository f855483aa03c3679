"""Generation semantics: ragged batches, EOS, echo, logprobs, top-p, determinism and bad input."""
import pytest
import torch

from helpers import random_model, tiny_args
from llama.generation import Llama
from llama.sampling import sample_top_p


class IdTokenizer:
    """generate() only needs eos_id; decode is shown as the id list for readable failures."""

    def __init__(self, eos_id=2):
        self.eos_id = eos_id

    def decode(self, t):
        return str(list(t))


def make_llama(eos_id=2, seed=1, **overrides):
    model = random_model(tiny_args(**overrides), seed=3, std=0.5)
    model.requires_grad_(False)
    return Llama(model, IdTokenizer(eos_id), seed=seed)


PROMPTS = [[1, 5, 9, 11, 40, 7], [1, 77], [1, 3, 8, 100]]


def test_ragged_batch_equals_one_prompt_at_a_time():
    llama = make_llama(eos_id=-5)  # an id never produced, so every row runs to max_gen_len
    batched, _ = llama.generate(PROMPTS, max_gen_len=12, temperature=0)
    alone = [llama.generate([p], max_gen_len=12, temperature=0)[0][0] for p in PROMPTS]
    assert batched == alone
    assert all(len(t) == 12 for t in batched)


def test_output_cut_at_first_generated_eos():
    llama = make_llama(eos_id=-5)
    (free,), _ = llama.generate([PROMPTS[0]], max_gen_len=15, temperature=0)
    k = next(i for i in range(2, len(free)) if free[i] not in free[:i])  # first fresh token from position 2 on
    llama.tokenizer.eos_id = free[k]
    (cut,), _ = llama.generate([PROMPTS[0]], max_gen_len=15, temperature=0)
    assert cut == free[:k]


def test_eos_inside_the_prompt_does_not_cut_echo():
    llama = make_llama(eos_id=9)  # 9 occurs in PROMPTS[0]
    (out,), _ = llama.generate([PROMPTS[0]], max_gen_len=5, temperature=0, echo=True)
    assert out[: len(PROMPTS[0])] == PROMPTS[0]


def reference_logprobs(llama, seq):
    logits = llama.model(torch.tensor([seq]), 0, use_cache=False)[0]
    lp = torch.log_softmax(logits, dim=-1)
    return [0.0] + [lp[t - 1, seq[t]].item() for t in range(1, len(seq))]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprobs_are_log_softmax_of_the_next_token(temperature):
    llama = make_llama(eos_id=-5)
    tokens, logprobs = llama.generate(PROMPTS, max_gen_len=6, temperature=temperature, logprobs=True, echo=True)
    for prompt, seq, lps in zip(PROMPTS, tokens, logprobs):
        assert seq[: len(prompt)] == prompt and len(lps) == len(seq) == len(prompt) + 6
        assert lps == pytest.approx(reference_logprobs(llama, seq), abs=1e-4)


def test_logprobs_when_nothing_is_generated_score_the_next_token():
    # Meta's code scores token[t] with logit[t] in this case; logit[t] must score token[t + 1].
    llama = make_llama()
    prompt = [1, 5, 9, 11]
    llama.model.params.max_seq_len = len(prompt)  # forces total_len == prompt length
    try:
        (seq,), (lps,) = llama.generate([prompt], max_gen_len=4, temperature=0, logprobs=True, echo=True)
    finally:
        llama.model.params.max_seq_len = 64
    assert seq == prompt
    assert lps == pytest.approx(reference_logprobs(llama, prompt), abs=1e-4)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    g = torch.Generator().manual_seed(0)
    # masses before each token in sorted order 0.5, 0.3, 0.15, 0.05: 0, 0.5, 0.8, 0.95
    for p, allowed in ((0.4, {1}), (0.5, {1, 3}), (0.7, {1, 3}), (0.85, {1, 3, 2}), (1.0, {0, 1, 2, 3})):
        draws = {sample_top_p(probs, p, g).item() for _ in range(300)}
        assert draws == allowed, p
    counts = torch.bincount(torch.cat([sample_top_p(probs, 0.7, g) for _ in range(4000)]).flatten(), minlength=4)
    assert abs(counts[1].item() / 4000 - 0.5 / 0.8) < 0.03  # renormalised over the kept mass


def test_greedy_is_deterministic_and_sampling_follows_the_seed():
    a, b, c = make_llama(eos_id=-5, seed=7), make_llama(eos_id=-5, seed=7), make_llama(eos_id=-5, seed=8)
    assert a.generate(PROMPTS, 10, temperature=0)[0] == b.generate(PROMPTS, 10, temperature=0)[0]
    sa = a.generate(PROMPTS, 10, temperature=1.0, top_p=1.0)[0]
    assert sa == b.generate(PROMPTS, 10, temperature=1.0, top_p=1.0)[0]
    assert sa != c.generate(PROMPTS, 10, temperature=1.0, top_p=1.0)[0]


def test_sampling_leaves_the_global_rng_alone():
    llama = make_llama(eos_id=-5)
    state = torch.get_rng_state()
    llama.generate(PROMPTS, 5, temperature=1.0)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompt_tokens=[]), "no prompts"),
    (dict(prompt_tokens=[[1]] * 5), r"5 prompts.*max_batch_size is 4"),
    (dict(prompt_tokens=[[1] * 65]), r"65 tokens.*max_seq_len=64"),
    (dict(prompt_tokens=[[1], []]), "no tokens"),
    (dict(prompt_tokens=[[1, 128]]), r"prompt_tokens\[0\] holds 128, not a token id .*\(0..127\)"),
    (dict(prompt_tokens=[[1, -1]]), r"holds -1, not a token id"),
    (dict(prompt_tokens=[[1]], temperature=-0.1), "temperature must be a finite number >= 0"),
    (dict(prompt_tokens=[[1]], temperature=float("nan")), r"temperature must be a finite number >= 0 \(0 = greedy\), got nan"),
    (dict(prompt_tokens=[[1]], temperature=float("inf")), r"temperature must be a finite number >= 0 \(0 = greedy\), got inf"),
    (dict(prompt_tokens=[[1]], top_p=1.5), r"top_p must be a number in \[0, 1\]"),
    (dict(prompt_tokens=[[1]], top_p=-0.1), r"top_p must be a number in \[0, 1\]"),
    (dict(prompt_tokens=[[1]], max_gen_len=-1), "max_gen_len must be a whole number >= 0"),
    (dict(prompt_tokens=[[1]], max_gen_len=2.5), "max_gen_len must be a whole number >= 0"),
])
def test_bad_input(kwargs, message):
    llama = make_llama()
    kwargs.setdefault("max_gen_len", 4)
    with pytest.raises(ValueError, match=message):
        llama.generate(**kwargs)


def test_top_p_zero_is_greedy_and_ignored_at_temperature_zero():
    """Meta's sample_top_p keeps only the most likely token at p = 0, and temperature 0 never looks at top_p."""
    llama = make_llama(eos_id=-5)
    greedy, _ = llama.generate(PROMPTS, max_gen_len=6, temperature=0)
    assert llama.generate(PROMPTS, max_gen_len=6, temperature=0.8, top_p=0.0)[0] == greedy
    assert llama.generate(PROMPTS, max_gen_len=6, temperature=0, top_p=7.0)[0] == greedy


def test_a_flat_token_list_is_a_type_error():
    with pytest.raises(TypeError, match=r"prompt_tokens\[0\] is a int; .*generate\(\[ids\]\)"):
        make_llama().generate([1, 5, 9], max_gen_len=2)
