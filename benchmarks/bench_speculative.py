"""Speculative decoding with the target's own int8 copy as the draft, against plain fp32 decoding of the target:
acceptance rate and decode speed, greedy, one prompt at a time, in the same run on the same weights.

    python benchmarks/bench_speculative.py [--shapes stories260K,1.1B] [--tokens 64] [--k 2,4,6] [--prompts 4]
        [--threads N] [--out FILE]

stories260K uses the real model when LLAMA_TEST_DATA holds stories260K.bin and tok512.model (TinyStories prompts);
1.1B is TinyLlama's shape with random weights (random prompt ids) -- random weights give flatter logits than a
trained model, so int8 rounding flips more argmaxes and its acceptance rate is a lower bound. Times are the
minimum over repeats of whole generations (prefill included, the same prompts for both). The outputs of both
methods are compared token for token. Figures are printed; they are written only to --out.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_decode import NoEos, load_model, timed  # noqa: E402
from llama.cpu_decode import prepare_inference  # noqa: E402
from llama.generation import Llama, TokenBatch  # noqa: E402
from llama.quantize import quantize_model  # noqa: E402
from llama.sampling import Sampler  # noqa: E402
from llama.speculative import speculative_tokens  # noqa: E402

STARTS = ["Once upon a time", "The little dog", "Lily wanted to", "One day, Tom found", "The sun was", "Mom said"]


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> str:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "?"
    return " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags)


def run_shape(shape: str, tokens: int, ks, n_prompts: int) -> list:
    model, tok, kind = load_model(shape, torch.device("cpu"), torch.float32, max_seq_len=tokens + 64, max_batch=1)
    draft = prepare_inference(quantize_model(copy.deepcopy(model), "int8"))  # as Llama.build(draft="int8")
    if tok is not None:
        prompts = [tok.encode(s, bos=True, eos=False) for s in STARTS[:n_prompts]]
    else:
        g = torch.Generator().manual_seed(0)
        prompts = [[1] + torch.randint(3, model.vocab_size, (8,), generator=g).tolist() for _ in range(n_prompts)]
    # No EOS (NoEos): every generation makes exactly --tokens tokens, so both methods do the same work.
    repeat = 3 if model.params.dim < 1024 else 1
    plain = Llama(model, NoEos())

    def plain_run():
        return [plain.generate([p], tokens, temperature=0)[0][0] for p in prompts]

    def spec_run(k, stats=None):
        out = []
        for p in prompts:
            batch = TokenBatch([p], len(p) + tokens, tokens, False, torch.device("cpu"))
            for _ in speculative_tokens(model, draft, batch, Sampler(0, 1.0), NoEos.eos_id, k, stats):
                pass
            out.append(batch.result(NoEos.eos_id, echo=False)[0][0])
        return out

    want = plain_run()  # warm-up, and the reference ids
    t_plain = timed(plain_run, repeat)
    rows = []
    for k in ks:
        stats = {}
        same = spec_run(k, stats) == want
        t_spec = timed(lambda: spec_run(k), repeat)
        n = tokens * len(prompts)
        rows.append(dict(shape=f"{shape} ({kind})", k=k, accept=stats["accepted"] / stats["proposed"],
                         per_round=n / stats["rounds"], plain=n / t_plain, spec=n / t_spec, speedup=t_plain / t_spec,
                         same=same))
        print(f"{shape} ({kind}) k={k}: acceptance {rows[-1]['accept']:.2f}, {rows[-1]['per_round']:.2f} tokens per "
              f"target forward, plain fp32 {rows[-1]['plain']:.1f} tok/s, speculative {rows[-1]['spec']:.1f} tok/s "
              f"= {rows[-1]['speedup']:.2f}x, identical greedy output: {same}", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="stories260K,1.1B", help="comma-separated shapes of bench_decode.SHAPES "
                    "(default %(default)s)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens generated per prompt (default %(default)s)")
    ap.add_argument("--k", default="2,4,6", help="comma-separated draft lengths to try (default %(default)s)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per shape (default %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--out", default=None, help="append a Markdown table of the figures to this file")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    command = "python " + " ".join(shlex.quote(x) for x in sys.argv)
    machine = f"{cpu_name()} [{cpu_flags()}], {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(command)
    print(machine)
    rows = []
    for shape in a.shapes.split(","):
        rows += run_shape(shape, a.tokens, [int(k) for k in a.k.split(",")], a.prompts)
    if a.out:
        lines = [f"\n### Speculative decoding, int8 self-draft vs plain fp32 ({time.strftime('%Y-%m-%d')})\n",
                 f"`{command}` on {machine}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}.\n",
                 "| shape | k | acceptance | tokens per target forward | plain fp32 tok/s | speculative tok/s | "
                 "speedup | same greedy output |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r['k']} | {r['accept']:.2f} | {r['per_round']:.2f} | {r['plain']:.1f} | "
                  f"{r['spec']:.1f} | {r['speedup']:.2f}x | {'yes' if r['same'] else 'NO'} |" for r in rows]
        with open(a.out, "a") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
