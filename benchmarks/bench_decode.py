"""Decode / prefill speed of llama.generation against transformers' LlamaForCausalLM on identical weights, int8
speed and perplexity change, and this machine's own memory bandwidth and matmul rate to judge them by.

    python benchmarks/bench_decode.py [--shapes stories260K,stories15M,1.1B] [--steps 16] [--batches 1,8,32]
        [--prefill 512] [--no-hf] [--no-int8] [--device cpu|cuda] [--dtype float32|bfloat16] [--threads N]
        [--out benchmarks/RESULTS.md]
    python benchmarks/bench_decode.py --peers [--llama2c DIR] [--shapes stories15M,1.1B] [--out FILE]

--peers: the CPU comparison of issue 18, batch-1 decode and prefill of --peer-prefill (128) tokens, on the same
random weights: this library in fp32, bf16 and int8, transformers (fp32), llama.cpp f32 and q8_0 (through
llama-cpp-python on a GGUF from `python -m llama.convert to_gguf`; `pip install -e ".[bench]"`) and, with
--llama2c DIR, llama2.c's run.c (fp32) and runq.c (q8_0) built by you (benchmarks/peers.py says how). Each row
gives tok/s, its ratio to ours at the same precision and the bytes it streams per token as a share of this
machine's measured read bandwidth (a parallel sum over 256 MB).

Shapes: stories260K (real weights when LLAMA_TEST_DATA has stories260K.bin + tok512.model, converted with
llama.convert.llama2c; else random), stories15M (dim 288, 6 layers, FFN 768, vocab 32000; random), 1.1B
(TinyLlama's: dim 2048, 22 layers, 32 heads, 4 kv heads, FFN 5632; random, built in memory, ~4.4 GB fp32), 7B
(GPU only, bf16). Decode time per token = (time to generate N tokens - time to generate 1) / (N - 1), so prefill
is excluded; the same for transformers (greedy, no EOS). Bytes per decode step = every weight except the
embedding table (one row is read) + the KV cache read at the mean context length. The CPU default stays fp32:
this benchmark never switches a CPU run to bf16 on its own.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llama import kernels  # noqa: E402
from llama.generation import Llama  # noqa: E402
from llama.model import ModelArgs, Transformer  # noqa: E402
from llama.quantize import quantize_model, quantized_bytes  # noqa: E402

SHAPES = {
    "stories260K": dict(dim=64, n_layers=5, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=4),
    "stories15M": dict(dim=288, n_layers=6, n_heads=6, vocab_size=32000, multiple_of=32),  # FFN 768
    "1.1B": dict(dim=2048, n_layers=22, n_heads=32, n_kv_heads=4, vocab_size=32000, multiple_of=256),  # FFN 5632
    "7B": dict(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, multiple_of=256),
}
# Held-out text for perplexity: written for this benchmark (TinyStories-like, not from the training set).
HELD_OUT = (
    "Mia had a small blue kite. Every morning she ran to the hill behind her house to fly it. One windy day the "
    "kite pulled very hard and the string slipped from her hand. Mia was sad and she began to cry. Her friend Ben "
    "saw the kite stuck in a tall tree. He said, \"Do not cry, Mia. We can ask your dad to help.\" Dad came with a "
    "long ladder and got the kite down. Mia hugged Ben and said thank you. From that day on, they flew the kite "
    "together, and Mia always held the string tight.\n"
    "Once there was a little dog named Max. Max liked to dig holes in the garden. His mom told him not to dig near "
    "the flowers, but Max did not listen. He dug and dug until he found an old red box. Inside the box was a shiny "
    "ball. Max was so happy that he forgot about the flowers. When his mom saw the garden, she was not happy. Max "
    "said sorry and helped her plant new flowers. Then they played with the shiny ball in the sun."
)


class NoEos:
    """generate() only needs eos_id; -1 is never sampled, so every run makes exactly the tokens asked for."""
    eos_id = -1


def timed(fn, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def machine_rates(device):
    """Large copy and large matrix-vector bandwidth (bytes/s), fp32 matmul rate (FLOP/s), on ``device``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    n = 64 * 2**20  # 256 MB of fp32
    a, b = torch.empty(n, device=device), torch.empty(n, device=device)
    a.normal_()

    def run(f, reps):
        f(); sync()
        return timed(lambda: (f(), sync()), reps)

    copy = 2 * n * 4 / run(lambda: b.copy_(a), 5)
    read = n * 4 / run(lambda: a.sum(), 5)
    del a, b
    w = torch.randn(16384, 8192, device=device)  # 512 MB: far larger than any cache
    x = torch.randn(1, 8192, device=device)
    mv = w.numel() * 4 / run(lambda: F.linear(x, w), 5)
    del w
    m = torch.randn(2048, 2048, device=device)
    mm = 2 * 2048**3 / run(lambda: m @ m, 5)
    return dict(copy=copy, read=read, matvec=mv, matmul=mm)


def random_model(args, device, dtype, seed=0):
    torch.manual_seed(seed)  # a benchmark script may use the global RNG; the library never does
    with torch.device(device):
        model = Transformer(args, dtype=dtype)  # ParallelLinear initialises N(0, 0.02)
    return model.requires_grad_(False).eval()


def load_model(shape, device, dtype, max_seq_len, max_batch):
    """(model, tokenizer or None, 'real'/'random')."""
    data = os.environ.get("LLAMA_TEST_DATA")
    if shape == "stories260K" and data and (Path(data) / "stories260K.bin").exists():
        from llama.convert import llama2c

        out = Path(tempfile.mkdtemp()) / "s260k"
        llama2c(str(Path(data) / "stories260K.bin"), str(out), tokenizer=str(Path(data) / "tok512.model"))
        g = Llama.build(str(out), str(Path(data) / "tok512.model"), max_seq_len=max_seq_len, max_batch_size=max_batch,
                        device=str(device), dtype=dtype)
        return g.model, g.tokenizer, "real"
    args = ModelArgs(**SHAPES[shape], max_seq_len=max_seq_len, max_batch_size=max_batch)
    return random_model(args, device, dtype), None, "random"


def step_bytes(model, bsz, ctx):
    p = model.params
    emb = model.tok_embeddings.weight
    weights = quantized_bytes(model) - emb.numel() * emb.element_size() + p.dim * emb.element_size()
    kv = 2 * p.n_layers * bsz * ctx * p.kv_heads * p.head_dim * model.layers[0].attention.cache.k.element_size()
    return weights + kv


def per_token(t_n: float, t_1: float, steps: int) -> float:
    """Decode seconds per token from whole generations of ``steps`` and of 1 token (prefill cancels out). On a
    loaded machine the 1-token run can take longer than the long one; that is noise, not a speed, so say so."""
    if t_n <= t_1:
        raise SystemExit(f"timing noise: {steps} tokens took {t_n:.3f}s, 1 token {t_1:.3f}s; rerun on a quieter "
                         f"machine or with more --steps")
    return (t_n - t_1) / (steps - 1)


def ours_decode(model, bsz, prompt_len, steps, device, compile=False):
    llama = Llama(model, NoEos(), compile=compile)
    prompts = torch.randint(3, model.vocab_size, (bsz, prompt_len)).tolist()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    llama.generate(prompts, 2, temperature=0)  # warm-up (and compile)
    reps = 3 if model.params.dim < 1024 else 1  # best of 3 on a shared machine, where it is cheap
    t_n = timed(lambda: (llama.generate(prompts, steps, temperature=0), sync()), reps)
    t_1 = timed(lambda: (llama.generate(prompts, 1, temperature=0), sync()), reps + 1)
    return per_token(t_n, t_1, steps)


def hf_from(model):
    """transformers' LlamaForCausalLM sharing our tensors (only q/k are permuted copies): no second 4 GB."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import hf_state_dict
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    a = model.params
    config = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.ffn_hidden_dim,
                         num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.kv_heads,
                         rms_norm_eps=a.norm_eps, rope_theta=a.rope_theta, max_position_embeddings=a.max_seq_len * 2,
                         tie_word_embeddings=False)
    device = model.tok_embeddings.weight.device
    with torch.device("meta"):
        hf = LlamaForCausalLM(config)
    hf.load_state_dict(hf_state_dict(model.state_dict(), a), strict=True, assign=True)
    hf.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)  # its buffer was left on meta
    return hf.to(model.tok_embeddings.weight.dtype).eval()


def hf_decode(hf, bsz, prompt_len, steps, vocab, device):
    ids = torch.randint(3, vocab, (bsz, prompt_len), device=device)
    mask = torch.ones_like(ids)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def gen(n):
        with torch.inference_mode():
            hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        pad_token_id=0, eos_token_id=None)
        sync()

    gen(2)
    reps = 3 if hf.config.hidden_size < 1024 else 1
    t_n = timed(lambda: gen(steps), reps)
    t_1 = timed(lambda: gen(1), reps + 1)
    return per_token(t_n, t_1, steps)


def prefill(fn, tokens, device, repeat=3):
    """Seconds for one prefill of ``tokens``, the minimum over ``repeat`` runs (one run swings by 2-5x on a shared
    machine)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        fn(tokens[:, :8]); sync()
        return timed(lambda: (fn(tokens), sync()), repeat)


def prefill_flops(model, s):
    p = model.params
    per_token = 2 * sum(m.numel() for n, m in model.named_parameters() if "tok_embeddings" not in n and "norm" not in n)
    if per_token == 0 or any(m.weight is None for m in model.modules() if hasattr(m, "local_linear")):
        per_token = 2 * (p.n_layers * (2 * p.dim * p.dim + 2 * p.dim * p.kv_heads * p.head_dim
                                       + 3 * p.dim * p.ffn_hidden_dim) + p.dim * p.vocab_size)
    attn = p.n_layers * 2 * 2 * p.dim * s * s / 2  # QK^T and PV over the causal half
    # only the last position goes through the classifier (generate's prefill)
    return per_token * s - 2 * p.dim * p.vocab_size * (s - 1) + attn


def perplexity(model, tok):
    ids = torch.tensor([tok.encode(HELD_OUT, bos=True, eos=False)])
    with torch.inference_mode():
        logits = model(ids[:, :-1], 0, use_cache=False)
    return float(torch.exp(F.cross_entropy(logits[0], ids[0, 1:]))), ids.shape[1]


def matrix_params(model) -> int:
    """Weights a decode step reads in full: every matrix but the embedding table (one row of it is read)."""
    p = model.params
    return p.n_layers * (2 * p.dim * p.dim + 2 * p.dim * p.kv_heads * p.head_dim + 3 * p.dim * p.ffn_hidden_dim) \
        + p.dim * p.vocab_size


def peer_table(shape, a, rates, say):
    """One table: decode and prefill, batch 1, of ours (fp32 / bf16 / int8) and the peers on the same weights."""
    import peers

    threads = torch.get_num_threads()
    prompt, steps, pre = a.prompt, max(a.steps, 32), a.peer_prefill
    max_seq = max(pre, prompt + steps) + 8
    model, _, kind = load_model(shape, torch.device("cpu"), torch.float32, max_seq, 1)
    n = matrix_params(model)
    bytes_per = {"fp32": 4, "bf16": 2, "int8": 1 + 4 / model.params.dim, "q8_0": 34 / 32}
    tokens = torch.randint(3, model.vocab_size, (1, pre))
    work = Path(tempfile.mkdtemp(prefix="peers-"))
    results = {}  # name -> (precision, s/token decode, s prefill or None)

    def ours(name, precision, m):
        t = ours_decode(m, 1, prompt, steps, torch.device("cpu"))
        tp = prefill(lambda x: m.output(m.hidden_states(x, 0)[:, -1:]), tokens, torch.device("cpu"))
        results[name] = (precision, t, tp)

    ours("llama fp32", "fp32", model)
    if not a.no_hf:
        hf = hf_from(model)
        th = hf_decode(hf, 1, prompt, steps, model.vocab_size, torch.device("cpu"))
        results["transformers fp32"] = ("fp32", th, prefill(lambda x: hf(x, logits_to_keep=1), tokens,
                                                          torch.device("cpu")))
        del hf
    why_not = peers.llama_cpp_available()
    tokenizer = Path(os.environ.get("LLAMA_TEST_DATA", "")) / "tokenizer.model"
    if why_not is None and model.vocab_size == 32000 and tokenizer.is_file():
        meta = peers.save_meta(model, work / "meta")
        for outtype, precision in (("f32", "fp32"), ("q8_0", "q8_0")):
            r = peers.llama_cpp_rates(meta, tokenizer, outtype, threads, prompt, steps, pre)
            results[f"llama.cpp {outtype}"] = (precision, r["decode"], r["prefill"])
    else:
        why_not = why_not or "needs a 32000-piece tokenizer: LLAMA_TEST_DATA/tokenizer.model"
        say(f"llama.cpp not measured: {why_not}")
    if a.llama2c:
        for name, t in peers.llama2c_rates(Path(a.llama2c).expanduser(), model, work, prompt + steps,
                                           threads).items():
            results[name] = ("fp32" if "fp32" in name else "q8_0", t, None)
    bf16 = Transformer(model.params, device="meta", dtype=torch.bfloat16)
    bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, assign=True)
    bf16.init_buffers(torch.device("cpu"), torch.bfloat16)
    ours("llama bf16", "bf16", bf16.requires_grad_(False).eval())
    del bf16
    quantize_model(model, "int8")
    ours("llama int8", "int8", model)
    shutil.rmtree(work, ignore_errors=True)

    ref = {"fp32": results["llama fp32"], "bf16": results["llama bf16"], "int8": results["llama int8"],
           "q8_0": results["llama int8"]}
    say("")
    say(f"**{shape}** ({kind} weights, {n / 1e6:.0f}M matrix parameters), batch 1, {threads} threads; decode over "
        f"positions {prompt}..{prompt + steps}")
    say("")
    say("| system | decode tok/s | ours (same precision) / it | streamed GB/s (of read bw) | prefill tok/s "
        f"(S={pre}) | ours / it |")
    say("|---|---|---|---|---|---|")
    for name, (precision, t, tp) in results.items():
        ours_t, ours_p = ref[precision][1], ref[precision][2]
        gbs = n * bytes_per[precision] / t / 1e9
        row = (f"| {name} | {1 / t:.1f} | {t / ours_t:.2f}x | {gbs:.1f} ({gbs * 1e9 / rates['read']:.0%}) | "
               + (f"{pre / tp:.0f} | {tp / ours_p:.2f}x |" if tp else "- | - |"))
        say(row)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="stories260K,stories15M,1.1B", help="comma-separated model shapes (see "
                    "SHAPES above; 7B on CUDA only); default %(default)s, e.g. --shapes stories15M")
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed per run (default %(default)s; "
                    "--peers uses at least 32)")
    ap.add_argument("--batches", default="1,8,32", help="batch sizes for the small shapes (1.1B: batch 1 only)")
    ap.add_argument("--prompt", type=int, default=16, help="prompt length for decode runs")
    ap.add_argument("--prefill", type=int, default=512, help="prompt length of the prefill row for the 1.1B/7B "
                    "shapes (default %(default)s; stories15M uses 256)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers (the slowest part)")
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 decode and perplexity rows")
    ap.add_argument("--compile", action="store_true", help="also time Llama(..., compile=True)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice), "
                    "e.g. --threads 2")
    ap.add_argument("--peers", action="store_true", help="the CPU peer comparison (see above) instead of the "
                    "default tables; shapes default to stories15M,1.1B")
    ap.add_argument("--llama2c", default=None, metavar="DIR", help="with --peers: a llama2.c folder holding the "
                    "compiled run, runq and tokenizer.bin (example: --llama2c ~/src/llama2.c)")
    ap.add_argument("--peer-prefill", type=int, default=128, help="with --peers: prompt length of the prefill "
                    "column (default 128)")
    ap.add_argument("--out", "--results", dest="results", default=None,
                    help="append the figures as Markdown to this file (nothing is written without it)")
    a = ap.parse_args()
    device = torch.device(a.device)
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if a.threads:
        torch.set_num_threads(a.threads)
    cmd = " ".join(shlex.quote(x) for x in [f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}",
                                            "python", "benchmarks/bench_decode.py", *sys.argv[1:]])
    lines = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    say(f"command: `{cmd}`")
    say(f"machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"device {device}, dtype {dtype}, load before: `{os.getloadavg()}`")
    if device.type == "cpu" and dtype != torch.float32:
        say("NOTE: a non-fp32 dtype was asked for on CPU; the library's CPU default is fp32.")
    rates = machine_rates(device)
    if a.peers:
        say(f"measured: read {rates['read'] / 1e9:.1f} GB/s (parallel sum over 256 MB), copy {rates['copy'] / 1e9:.1f}"
            f" GB/s (read+write); llama kernels: {kernels.isa()}")
        shapes = a.shapes if "--shapes" in sys.argv else "stories15M,1.1B"
        for shape in shapes.split(","):
            peer_table(shape, a, rates, say)
        return finish(a, lines, say)
    say(f"measured: copy {rates['copy'] / 1e9:.1f} GB/s (read+write), matrix-vector {rates['matvec'] / 1e9:.1f} GB/s, "
        f"fp32 matmul {rates['matmul'] / 1e9:.0f} GFLOP/s")
    say("")
    say("| shape | weights | what | batch | ours | transformers | ours / transformers | ours: bytes/s (of matvec bw) |")
    say("|---|---|---|---|---|---|---|---|")
    for shape in a.shapes.split(","):
        if shape == "7B" and device.type != "cuda":
            say(f"| 7B | - | decode | 1 | not measured (needs a GPU; CPU has no fast bf16 path here) | | | |")
            continue
        big = shape in ("1.1B", "7B")
        batches = [1] if big else [int(b) for b in a.batches.split(",")]
        # stories260K: its training context (512), which the held-out perplexity text needs
        max_seq = max(a.prefill if big else 256, 504 if shape == "stories260K" else 0, a.prompt + a.steps) + 8
        model, tok, kind = load_model(shape, device, dtype, max_seq, max(batches))
        hf = None if a.no_hf else hf_from(model)
        for bsz in batches:
            t = ours_decode(model, bsz, a.prompt, a.steps, device)
            bps = step_bytes(model, bsz, a.prompt + a.steps // 2) / t
            row = f"| {shape} | {kind} | decode tok/s | {bsz} | {bsz / t:.1f} ({t * 1e3:.1f} ms/step)"
            if hf is not None:
                th = hf_decode(hf, bsz, a.prompt, a.steps, model.vocab_size, device)
                row += f" | {bsz / th:.1f} ({th * 1e3:.1f} ms/step) | {th / t:.2f}x"
            else:
                row += " | - | -"
            say(row + f" | {bps / 1e9:.2f} GB/s ({bps / rates['matvec']:.0%}) |")
            if a.compile:
                tc = ours_decode(model, bsz, a.prompt, a.steps, device, compile=True)
                say(f"| {shape} | {kind} | decode tok/s, compile=True | {bsz} | {bsz / tc:.1f} ({tc * 1e3:.1f} ms) "
                    f"| | {t / tc:.2f}x of eager | |")
        if big or shape == "stories15M":
            s = a.prefill if big else 256
            tokens = torch.randint(3, model.vocab_size, (1, s), device=device)
            tp = prefill(lambda x: model.output(model.hidden_states(x, 0)[:, -1:]), tokens, device)
            fl = prefill_flops(model, s)
            row = (f"| {shape} | {kind} | prefill tok/s (S={s}) | 1 | {s / tp:.0f} ({fl / tp / 1e9:.0f} GFLOP/s = "
                   f"{fl / tp / rates['matmul']:.0%} of matmul)")
            if hf is not None:
                th = prefill(lambda x: hf(x, logits_to_keep=1), tokens, device)
                row += f" | {s / th:.0f} | {th / tp:.2f}x"
            else:
                row += " | - | -"
            say(row + " | |")
        if hf is not None:
            hf_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
            say(f"| {shape} | {kind} | memory: weights + static KV cache | | "
                f"{quantized_bytes(model) / 1e6:.0f} MB + "
                f"{sum(c.nbytes for c in model.kv_caches()) / 1e6:.0f} MB | "
                f"{hf_bytes / 1e6:.0f} MB (+ cache grown per call) | | |")
            del hf
        if not a.no_int8 and device.type == "cpu" and shape in ("stories260K", "1.1B"):
            t32 = ours_decode(model, 1, a.prompt, a.steps, device)
            ppl32 = perplexity(model, tok)[0] if tok is not None else None
            quantize_model(model, "int8")
            t8 = ours_decode(model, 1, a.prompt, a.steps, device)
            bps = step_bytes(model, 1, a.prompt + a.steps // 2) / t8
            row = (f"| {shape} | {kind} | int8 decode tok/s | 1 | {1 / t8:.1f} ({t8 * 1e3:.1f} ms/step; fp32 "
                   f"{1 / t32:.1f} in the same run) | | int8/fp32 {t32 / t8:.2f}x | {bps / 1e9:.2f} GB/s "
                   f"({bps / rates['matvec']:.0%}) |")
            say(row)
            if ppl32 is not None:
                ppl8, n = perplexity(model, tok)
                say(f"| {shape} | {kind} | perplexity, {n} held-out tokens written for this script | | fp32 {ppl32:.3f}"
                    f", int8 {ppl8:.3f} | | change {ppl8 / ppl32 - 1:+.2%} | |")
        del model
    finish(a, lines, say)


def finish(a, lines, say):
    say("")
    say(f"load after: `{os.getloadavg()}`, peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f} GB")
    if a.results:
        with open(a.results, "a") as f:
            f.write(f"\n## Decode / prefill ({time.strftime('%Y-%m-%d %H:%M')}, {platform.node()})\n\n")
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
