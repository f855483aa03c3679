"""Pins of what generation returns today on the real stories260K model, written by the code before the generation
loop and the KV cache were restructured (issue 15): sampled ids at temperature 0.6 / top-p 0.9 / seed 1, greedy ids,
log-probabilities, echo, stop strings, streaming, chat, and logits of prefill, chunked prefill and decode.

Regenerate only on purpose (an intended change of outputs): ``LLAMA_WRITE_GOLDEN=1 pytest tests/test_generation_golden.py``.
Ids and texts must match exactly; logits and log-probabilities to 1e-4 (other CPUs round matmuls differently)."""
import json
import os
from pathlib import Path

import pytest
import torch

from conftest import need
from llama import Llama

GOLDEN = Path(__file__).parent / "golden" / "generation_stories260k.json"
PROMPTS = ["Once upon a time", "The little dog", "Lily wanted"]
DIALOG = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Tell me about a cat."}]


@pytest.fixture(scope="module")
def llama(test_data, tmp_path_factory):
    import subprocess
    import sys

    bin_, tok = need(test_data, "stories260K.bin", "tok512.model")
    ckpt = tmp_path_factory.mktemp("golden") / "ckpt"
    subprocess.run([sys.executable, "-m", "llama.convert", "llama2c", str(bin_), str(ckpt)], check=True,
                   capture_output=True, cwd=Path(__file__).resolve().parents[1])
    return Llama.build(str(ckpt), str(tok), max_seq_len=96, max_batch_size=4, device="cpu", seed=1)


def observe(llama) -> dict:
    out = {}
    g = llama.text_completion(PROMPTS, temperature=0.6, top_p=0.9, max_gen_len=24, logprobs=True)
    out["sampled"] = [{"text": r["generation"], "tokens": r["tokens"], "logprobs": r["logprobs"]} for r in g]
    out["greedy_ids"] = llama.generate([llama.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS],
                                       max_gen_len=20, temperature=0)[0]
    out["echo"] = [r["generation"] for r in llama.text_completion(PROMPTS[:2], temperature=0, max_gen_len=8,
                                                                   echo=True)]
    out["stop"] = [r["generation"] for r in llama.text_completion(PROMPTS, temperature=0.6, max_gen_len=40,
                                                                   stop=[".", " and"])]
    out["stream"] = list(llama.stream_text(PROMPTS[0], temperature=0.6, max_gen_len=24))
    out["chat"] = llama.chat_completion([DIALOG], temperature=0.6, max_gen_len=24)[0]["generation"]["content"]
    tokens = torch.tensor([llama.tokenizer.encode("Once upon a time there was a little girl", bos=True, eos=False)])
    model = llama.model
    with torch.inference_mode():
        full = model(tokens, 0)
        chunked = torch.cat([model(tokens[:, :4], 0), model(tokens[:, 4:7], 4)] +
                            [model(tokens[:, i:i + 1], i) for i in range(7, tokens.shape[1])], 1)
    out["logits_full"] = full[0, :, :16].tolist()
    out["logits_chunked"] = chunked[0, :, :16].tolist()
    return out


def test_outputs_equal_the_pinned_ones(llama):
    got = observe(llama)
    if os.environ.get("LLAMA_WRITE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, ensure_ascii=False, indent=1) + "\n")
    want = json.loads(GOLDEN.read_text())
    for key in ("greedy_ids", "echo", "stop", "stream", "chat"):
        assert got[key] == want[key], key
    for g, w in zip(got["sampled"], want["sampled"]):
        assert (g["text"], g["tokens"]) == (w["text"], w["tokens"])
        assert g["logprobs"] == pytest.approx(w["logprobs"], abs=1e-4)
    for key in ("logits_full", "logits_chunked"):
        torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(want[key]), atol=1e-4, rtol=0, msg=key)
