"""The real stories260K model (llama2.c's TinyStories 260K), converted and run; skipped without LLAMA_TEST_DATA."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import need
from helpers import hf_model
from llama import Llama
from llama.convert import llama2c
from llama.model import ModelArgs

ROOT = Path(__file__).resolve().parents[1]
# run.c -t 0.0 on the same weights, as published in llama2.c's doc/stories260K.md (its first lines)
LLAMA2C_GREEDY = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she saw "
    "a big, red ball. She wanted to play with it, but it was too high.\nLily's mom said, \"Lily, let's go to the "
    "park.\" Lily was sad and didn't know what to do."
)


@pytest.fixture(scope="module")
def stories(test_data, tmp_path_factory):
    model_bin, tok = need(test_data, "stories260K.bin", "tok512.model")
    out = tmp_path_factory.mktemp("real") / "stories260K"
    llama2c(str(model_bin), str(out), tokenizer=str(tok))
    return out, tok


def test_greedy_matches_transformers_and_llama2c(stories):
    ckpt, tok = stories
    llama = Llama.build(str(ckpt), str(tok), max_seq_len=256, max_batch_size=1, device="cpu")
    prompt = llama.tokenizer.encode("Once upon a time", bos=True, eos=False)
    (ours,), _ = llama.generate([prompt], max_gen_len=60, temperature=0)

    state = {k: v.clone() for k, v in llama.model.state_dict().items()}
    args = ModelArgs(**{**llama.model.params.__dict__})
    ref = hf_model(state, args, llama.model.params.ffn_hidden_dim)
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=60, do_sample=False, eos_token_id=2,
                           pad_token_id=0)
    assert ours == out[0, len(prompt):].tolist()
    assert len(ours) == 60

    text = "Once upon a time" + llama.tokenizer.decode(ours)
    print(text)
    assert LLAMA2C_GREEDY.startswith(text) or text.startswith(LLAMA2C_GREEDY)


def run_example(args, nproc):
    # --standalone picks a free rendezvous port, so parallel runs on one machine do not collide on 29500.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("nproc", [1, 2])
def test_examples_run_under_torchrun(stories, nproc):
    ckpt, tok = stories
    common = ["--ckpt_dir", str(ckpt), "--tokenizer_path", str(tok), "--temperature", "0"]
    text = run_example(["example_text_completion.py", *common, "--max_gen_len", "16"], nproc)
    assert text.returncode == 0, text.stderr[-3000:]
    assert text.stdout.count("==================================") == 4
    assert "I believe the meaning of life is\n> " in text.stdout
    chat = run_example(["example_chat_completion.py", *common, "--max_seq_len", "1024", "--max_gen_len", "8"],
                       nproc)
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert chat.stdout.count("> Assistant: ") == 6
    assert "> Assistant: Error: special tags are not allowed as part of the prompt." in chat.stdout
