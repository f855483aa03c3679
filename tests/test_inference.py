"""Inference with kollama: a LoRA adapter folded in at load time, NF4 weights via quantize="nf4", and both."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import random_model, save_meta, tiny_args, train_tiny_tokenizer
from kollama.adapters.lora import LoRALinear, apply_lora, save_adapter
from kollama.adapters.nf4 import NF4Linear
from kollama.inference import build
from llama import Llama

ARGS = tiny_args(dim=64, n_heads=8, n_kv_heads=4, vocab_size=128)
TOKENS = torch.arange(14).reshape(2, 7) * 9 % 128
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("inference")
    tok = train_tiny_tokenizer(d / "tok.model", vocab_size=128)
    base = random_model(ARGS, seed=4)
    ckpt = save_meta(base, d / "base", mp=1)
    adapted = random_model(ARGS, seed=4)
    apply_lora(adapted, targets=("wq", "wv", "w2", "output"), r=4, alpha=8, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if name.endswith("lora_B"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))  # B = 0 at init would make the adapter a no-op
        expected = adapted(TOKENS, 0)
    save_adapter(adapted, d / "adapter")
    return dict(tok=str(tok), ckpt=str(ckpt), adapter=str(d / "adapter"), adapted=adapted, expected=expected)


def logits(llama):
    with torch.no_grad():
        return llama.model(TOKENS, 0)


def test_adapter_is_folded_into_the_weights(setup):
    llama = build(setup["ckpt"], setup["tok"], 32, 2, device="cpu", lora_path=setup["adapter"])
    assert not any(isinstance(m, LoRALinear) for m in llama.model.modules())
    # W + s*B@A in one matmul vs x W^T + s x A^T B^T: fp32 rounding of the same sums in another order, which grows
    # with the logits' scale (seen: up to 1.1e-5 at max |logit| 4.7 depending on the thread count) -- relative bound.
    expected = setup["expected"]
    assert (logits(llama) - expected).abs().max().item() < 1e-5 * expected.abs().max().item()


def dequantized_copy(model):
    """A dense model whose every linear holds dequant(NF4(W)): the reference for an NF4 model."""
    from llama.parallel import ParallelLinear

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ParallelLinear):
                m.weight.copy_(NF4Linear.from_weight(m.weight).dequantize())
    return model


def test_nf4_inference_equals_dense_dequantized_weights(setup):
    llama = build(setup["ckpt"], setup["tok"], 32, 2, device="cpu", quantize="nf4")
    assert isinstance(llama.model.layers[0].attention.wq.local_linear, NF4Linear)
    reference = dequantized_copy(random_model(ARGS, seed=4))
    with torch.no_grad():
        assert (logits(llama) - reference(TOKENS, 0)).abs().max().item() < 1e-4


def test_adapter_then_nf4_quantizes_the_adapted_weights(setup):
    from kollama.adapters.lora import merge_and_unload

    llama = build(setup["ckpt"], setup["tok"], 32, 2, device="cpu", lora_path=setup["adapter"], quantize="nf4")
    merged = random_model(ARGS, seed=4)
    apply_lora(merged, targets=("wq", "wv", "w2", "output"), r=4, alpha=8, dropout=0.0)
    merged.load_state_dict(setup["adapted"].state_dict())
    reference = dequantized_copy(merge_and_unload(merged))
    with torch.no_grad():
        assert (logits(llama) - reference(TOKENS, 0)).abs().max().item() < 1e-4


def test_example_script_takes_lora_path(setup):
    cmd = [sys.executable, "example_text_completion.py", "--ckpt_dir", setup["ckpt"], "--tokenizer_path",
           setup["tok"], "--lora_path", setup["adapter"], "--max_gen_len", "4", "--temperature", "0"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("==================================") == 4


@pytest.mark.parametrize("call,error,message", [
    (lambda L: L.text_completion("Hi"), TypeError, r"prompts must be a list of strings: text_completion\(\[prompt\]\); got a str"),
    (lambda L: L.text_completion(["Hi", 3]), TypeError, r"prompts\[1\] is a int"),
    (lambda L: L.text_completion(["Hi"], max_gen_len=0), ValueError, "max_gen_len must be a whole number >= 1"),
    (lambda L: L.text_completion(["Hi"], temperature=float("nan")), ValueError, "temperature must be a finite"),
    (lambda L: L.chat_completion([{"role": "user", "content": "Hi"}]), TypeError,
     r"dialogs must be a list of dialogs .*chat_completion\(\[dialog\]\)"),
    (lambda L: L.chat_completion("Hi"), TypeError, "dialogs must be a list of dialogs"),
    (lambda L: L.chat_completion([[{"role": "user", "content": "Hi"}]], max_gen_len=-3), ValueError,
     "max_gen_len must be a whole number >= 1"),
    (lambda L: list(L.stream_text(["Hi"])), TypeError, "stream_text takes one prompt string, got a list"),
    (lambda L: list(L.stream_chat("Hi")), TypeError, "dialog must be one dialog"),
])
def test_public_api_refuses_misuse(setup, call, error, message):
    llama = Llama.build(setup["ckpt"], setup["tok"], max_seq_len=32, max_batch_size=2, device="cpu")
    with pytest.raises(error, match=message):
        call(llama)


def test_echo_with_max_gen_len_zero_scores_the_prompt(setup):
    llama = Llama.build(setup["ckpt"], setup["tok"], max_seq_len=32, max_batch_size=2, device="cpu")
    out = llama.text_completion(["Once upon a time"], max_gen_len=0, echo=True, logprobs=True)[0]
    assert out["generation"] == "Once upon a time" and len(out["logprobs"]) == len(out["tokens"]) > 1


def test_kv_cache_too_large_is_named_up_front(setup, monkeypatch):
    import llama.loading as G

    monkeypatch.setattr(G, "available_memory", lambda device: 10 * 2**20)  # 10 MiB free
    with pytest.raises(ValueError, match=r"the KV cache needs 0.1 GiB \(max_seq_len 4096 x max_batch_size 64 x 2 "
                                         r"layers\) but cpu has 0.0 GiB free; build with a smaller"):
        Llama.build(setup["ckpt"], setup["tok"], max_seq_len=4096, max_batch_size=64, device="cpu")


def test_a_different_tokenizer_of_the_same_size_is_refused(setup, tmp_path):
    """A folder that carries its tokenizer.model must be built with that one, not another of the same size."""
    import io

    import sentencepiece as spm

    from helpers import ENGLISH
    from llama.checkpoint import CheckpointError

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter([s[::-1] for s in ENGLISH] * 20), model_writer=buf,
                                   vocab_size=128, model_type="bpe", character_coverage=1.0, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, hard_vocab_limit=True, minloglevel=2, num_threads=1)
    other = tmp_path / "other.model"
    other.write_bytes(buf.getvalue())
    ckpt = save_meta(random_model(ARGS, seed=4), tmp_path / "with_tok", extra_files=[Path(setup["tok"])])
    with pytest.raises(CheckpointError, match=f"the tokenizer {other} differs from {ckpt / 'tok.model'}.*"
                                              f"pass --tokenizer_path"):
        Llama.build(str(ckpt), str(other), max_seq_len=32, max_batch_size=2, device="cpu")
    Llama.build(str(ckpt), setup["tok"], max_seq_len=32, max_batch_size=2, device="cpu")  # an equal copy is fine


def test_examples_take_a_prompt_and_a_dialog(test_data, tmp_path):
    """--prompt / --user replace Meta's demo prompts; greedy on stories260K continues the given text."""
    from conftest import need

    bin_, tok = need(test_data, "stories260K.bin", "tok512.model")
    ckpt = tmp_path / "ckpt"
    subprocess.run([sys.executable, "-m", "llama.convert", "llama2c", str(bin_), str(ckpt)], check=True,
                   capture_output=True, cwd=ROOT)
    common = ["--ckpt_dir", str(ckpt), "--tokenizer_path", str(tok), "--temperature", "0", "--max_gen_len", "24"]
    out = subprocess.run([sys.executable, "example_text_completion.py", *common, "--prompt", "Once upon a time"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("==================================") == 1
    assert "Once upon a time\n> , there was a little girl named Lily" in out.stdout, out.stdout
    chat = subprocess.run([sys.executable, "example_chat_completion.py", *common, "--max_seq_len", "256", "--user",
                           "Tell me a story.", "--system", "Be kind."], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert chat.stdout.count("==================================") == 1 and "System: Be kind." in chat.stdout


def test_chat_example_fits_small_models_and_chats_interactively(test_data, tmp_path):
    """On stories260K (512 positions, 512-piece tokenizer) the demo, at its default max_seq_len, skips the dialog
    that cannot fit, with a note, instead of failing; --interactive keeps the dialog, drops its oldest turns when it outgrows max_seq_len, refuses
    a message that cannot fit, and ends on an empty line."""
    from conftest import need

    bin_, tok = need(test_data, "stories260K.bin", "tok512.model")
    ckpt = tmp_path / "ckpt"
    subprocess.run([sys.executable, "-m", "llama.convert", "llama2c", str(bin_), str(ckpt)], check=True,
                   capture_output=True, cwd=ROOT)
    common = [sys.executable, "example_chat_completion.py", "--ckpt_dir", str(ckpt), "--tokenizer_path", str(tok),
              "--temperature", "0", "--max_gen_len", "16"]
    demo = subprocess.run(common, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert demo.returncode == 0, demo.stderr[-2000:]
    assert "note: demo dialog 2 skipped: its prompt is 589 tokens and max_seq_len is 512" in demo.stdout
    assert demo.stdout.count("==================================") == 5  # the other five dialogs

    story = "Tom and Lily played in the park with a big red ball. " * 4  # ~220 tokens with tok512
    messages = ["Tell me a story.", story, story, "word " * 600, "Thank you.", ""]
    chat = subprocess.run(common + ["--interactive", "--system", "Be kind."], input="\n".join(messages) + "\n",
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert chat.returncode == 0, chat.stderr[-2000:]
    assert chat.stdout.count("> Assistant: ") == 4  # every message but the one that cannot fit
    assert "its oldest turn was dropped" in chat.stdout
    assert "that message is too long for max_seq_len 512" in chat.stdout
