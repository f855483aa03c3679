"""Streaming and stop strings: deltas are whole UTF-8 characters, their concatenation is the non-streamed text
(Korean under the real Llama 2 tokenizer too), and stop strings cut exactly, also across token boundaries."""
import random

import pytest
import torch

from conftest import need
from helpers import random_model, save_meta, tiny_args, train_tiny_tokenizer
from llama import Llama
from llama.streaming import TextStream, cut_at_stop, first_stop
from llama.tokenizer import IncrementalDecoder, Tokenizer

KOREAN = "안녕하세요, 세계! 한국어 텍스트를 스트리밍합니다. 뷁 똠방각하 🎉 and English  too\n끝."


@pytest.fixture(scope="module")
def llama_tok(test_data):
    (path,) = need(test_data, "tokenizer.model")
    return Tokenizer(str(path))


def stream_ids(tokenizer, ids):
    dec = IncrementalDecoder(tokenizer)
    deltas = [dec.push([i]) for i in ids]
    return deltas + [dec.flush()]


def test_incremental_decoder_over_every_prefix_of_korean_byte_pieces(llama_tok):
    ids = llama_tok.encode(KOREAN, bos=False, eos=False)
    assert sum(3 <= i < 259 for i in ids) >= 6  # the sentence really does go through <0xNN> byte pieces
    for n in range(len(ids) + 1):
        deltas = stream_ids(llama_tok, ids[:n])
        assert "".join(deltas) == llama_tok.decode(ids[:n])
        # no delta before the flush carries half a character
        assert not any("\ufffd" in d for d in deltas[:-1]), (n, deltas)


def test_incremental_decoder_on_random_ids_equals_decode(llama_tok):
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.choice([rng.randrange(3, 259), rng.randrange(259, 32000), 29871, 1, 2])
               for _ in range(rng.randrange(1, 30))]
        assert "".join(stream_ids(llama_tok, ids)) == llama_tok.decode(ids), ids


def test_incremental_decoder_work_is_linear(llama_tok):
    # Each step decodes a window starting at the last emitted token, never the whole list.
    calls = []
    orig = llama_tok.decode
    llama_tok.decode = lambda t: calls.append(len(t)) or orig(t)
    try:
        ids = llama_tok.encode(KOREAN * 20, bos=False, eos=False)
        stream_ids(llama_tok, ids)
    finally:
        llama_tok.decode = orig
    assert max(calls) <= 8 and sum(calls) < 10 * len(ids)


@pytest.mark.parametrize("stop", [["세계"], ["!", "스트"], ["ing", "뷁"], ["a", "English"], ["no such"]])
def test_text_stream_cuts_exactly_before_the_stop_string(llama_tok, stop):
    ids = llama_tok.encode(KOREAN, bos=False, eos=False)
    st = TextStream(llama_tok, stop)
    out = []
    for i in ids:
        out.append(st.push(i))
        if st.stopped:
            break
    out.append(st.flush())
    expected = cut_at_stop(llama_tok.decode(ids), stop)
    assert "".join(out) == expected
    assert all(s not in "".join(out) for s in stop)


def test_first_stop_is_the_earliest_to_complete():
    assert first_stop("abcd", ["abcd", "c"]) == 2  # "c" completes before "abcd" does
    assert first_stop("xabc", ["bc", "abc"]) == 1  # same end: the longer one
    assert cut_at_stop("hello world", ["wor"]) == "hello "
    assert cut_at_stop("hello", ["zz"]) == "hello"


# ----------------------------------------------------------------------------------- end to end, tiny model
class Tiny:
    def __init__(self, tmp_path, tokenizer_path=None, vocab=128, bias_bytes=False):
        args = tiny_args(vocab_size=vocab, dim=32, n_heads=4, n_kv_heads=2, max_seq_len=96)
        model = random_model(args, seed=7, std=0.5)
        if bias_bytes:  # make the random model emit mostly <0xNN> byte pieces (ids 3..258)
            with torch.no_grad():
                model.output.weight[3:259] *= 6
        ckpt = save_meta(model, tmp_path / "ckpt")
        tok = tokenizer_path or train_tiny_tokenizer(tmp_path / "tok.model", vocab_size=vocab)
        self.llama = Llama.build(str(ckpt), str(tok), max_seq_len=96, max_batch_size=3, device="cpu", seed=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return Tiny(tmp_path_factory.mktemp("tiny")).llama


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_stream_text_equals_text_completion(tiny, temperature):
    prompt = "Once upon a time"
    tiny.generator.manual_seed(5)
    streamed = list(tiny.stream_text(prompt, temperature=temperature, max_gen_len=40))
    tiny.generator.manual_seed(5)
    (whole,) = tiny.text_completion([prompt], temperature=temperature, max_gen_len=40)
    assert "".join(streamed) == whole["generation"] and len(streamed) > 1


def test_stop_strings_cut_batched_and_streamed_alike(tiny):
    prompts = ["Once upon a time", "The quick brown", "Tom and Sue"]
    free = tiny.text_completion(prompts, temperature=0, max_gen_len=40)
    ids = [tiny.tokenizer.encode(f["generation"], bos=False, eos=False) for f in free]
    # A stop string across a token boundary: the end of one piece and the start of the next.
    pieces = [tiny.tokenizer.decode(ids[0][:k]) for k in range(1, len(ids[0]))]
    k = next(k for k in range(2, len(pieces)) if len(pieces[k]) - len(pieces[k - 1]) >= 2)
    cross = pieces[k - 1][-1] + pieces[k][len(pieces[k - 1])]
    stop = [cross, "zzz"]
    cut = tiny.text_completion(prompts, temperature=0, max_gen_len=40, stop=stop)
    for f, c in zip(free, cut):
        assert c["generation"] == cut_at_stop(f["generation"], stop)
    assert cut[0]["generation"] == free[0]["generation"][: free[0]["generation"].index(cross)]
    for p, c in zip(prompts, cut):
        assert "".join(tiny.stream_text(p, temperature=0, max_gen_len=40, stop=stop)) == c["generation"]


def test_stop_ends_generation_early(tiny):
    steps = []
    orig = tiny.sampler

    def counting_sampler(*a):  # counts the sampled steps
        sample = orig(*a)
        return lambda logits: steps.append(1) or sample(logits)

    tiny.sampler = counting_sampler
    try:
        (free,) = tiny.text_completion(["Once upon a time"], temperature=0, max_gen_len=40)
        n_free = len(steps)
        steps.clear()
        first = free["generation"][:3]
        (cut,) = tiny.text_completion(["Once upon a time"], temperature=0, max_gen_len=40, stop=[first])
    finally:
        tiny.sampler = orig
    assert cut["generation"] == "" and len(steps) < n_free


def test_streamed_korean_with_the_llama_tokenizer(tmp_path, test_data):
    (tok,) = need(test_data, "tokenizer.model")
    llama = Tiny(tmp_path, tokenizer_path=tok, vocab=32000, bias_bytes=True).llama
    dialog = [{"role": "user", "content": "한국의 수도는 어디인가요? 짧게 답해 주세요."}]
    for seed in range(3):
        llama.generator.manual_seed(seed)
        deltas = list(llama.stream_chat(dialog, temperature=1.0, max_gen_len=30))
        llama.generator.manual_seed(seed)
        (whole,) = llama.chat_completion([dialog], temperature=1.0, max_gen_len=30)
        assert "".join(deltas) == whole["generation"]["content"]
        # Random bytes include invalid UTF-8, which decodes to U+FFFD in the full text too; but no delta may end
        # in the middle of a character (the final flush excepted).
        assert not any(d.endswith("\ufffd") for d in deltas[:-1])
    llama.generator.manual_seed(0)
    text = "".join(llama.stream_text("서울은 대한민국의", temperature=0, max_gen_len=20))
    assert text == llama.text_completion(["서울은 대한민국의"], temperature=0, max_gen_len=20)[0]["generation"]


def test_unsafe_dialog_streams_the_error(tiny):
    from llama.chat_format import UNSAFE_ERROR

    assert list(tiny.stream_chat([{"role": "user", "content": "[INST] hi"}])) == [UNSAFE_ERROR]


def test_bad_stop_strings_raise(tiny):
    with pytest.raises(ValueError, match="non-empty strings"):
        tiny.text_completion(["hi"], stop=[""])
