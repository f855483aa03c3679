"""Evaluate a Llama checkpoint (optionally with a LoRA adapter) on Korean: bits per character, multiple choice,
translation, tokenizer efficiency and instruction-following generations.

    python -m kollama.evaluate --ckpt_dir CKPT --tokenizer_path tokenizer.model --data_dir DATA \\
        --tasks bpc,tokenizer,kobest,klue_nli,nsmc,en2ko,ko2en,kullm --out run/results.json [--lora_path ADAPTER] \\
        [--limit N] [--k_shot K] [--max_seq_len 2048] [--batch_size 8] [--window W] [--stride S] \\
        [--allow_base_mismatch]  # evaluate an adapter recorded for another base / tokenizer anyway
    torchrun --nproc_per_node 2 -m kollama.evaluate ...   # a model-parallel checkpoint; only rank 0 writes files

Tasks (`kobest` = the five kobest_* tasks, `translation` = en2ko + ko2en): see ``kollama.eval.tasks`` for the data files
and the prompts. results.json is rewritten (atomically) after every task, so a crash keeps the finished ones.

How log-likelihoods are computed. Every score is "the summed log-probability of the last n tokens of a token list
given the tokens before it". Requests are sorted by length, cut into batches of at most --batch_size rows, padded on
the right and run as one forward each WITHOUT the KV cache (use_cache=False): the causal mask keeps right padding
invisible to real tokens, so each row's result equals its own unpadded forward. Only the scored positions go through
the output layer, in chunks, so a 32k vocabulary never materializes logits for whole batches.

Conventions:
* multiple choice (lm-evaluation-harness): a choice's score is log P(" " + choice | context), where context and
  continuation are tokenized together and the continuation is the tail after the context's own tokens, trailing
  spaces of the context moved to the continuation (lm-eval's `_encode_pair`). BOS is prepended (--bos; lm-eval's
  HFLM does the same with add_bos_token=True). Over-long requests keep their last max_seq_len + 1 tokens (lm-eval's
  left truncation). acc = argmax score; acc_norm = argmax score / len(choice in characters); macro-F1 (sklearn's
  definition) of the acc predictions. k-shot examples come from the train split (see tasks.draw_shots).
* bits per character: each non-blank line of a text file is one document, BOS + the line's tokens (no EOS); every
  token after BOS is predicted once. A document longer than the window is scored with sliding windows: the model
  sees at most `window` tokens; the first window scores all its predictions, each later one advances by `stride`
  tokens and scores only its last `stride` predictions, so each of those has at least window - stride tokens of
  context. bits/char = sum of NLL in nats / (ln 2 x characters of the lines), bits/byte likewise with UTF-8 bytes;
  both are comparable across tokenizers. token_ppl = exp(mean NLL per token) is not.
* generation: greedy, --max_gen_len tokens, with --template plain|kullm|chat (tasks.instruction_prompt). With
  `plain` the first generated line is the answer. BLEU and chrF++ come from sacrebleu (an optional extra).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from kollama.eval import tasks as T
from kollama.vocab.common import is_hangul
from kollama.vocab.corpus import iter_corpus_lines
from kollama.vocab.stats import tokenizer_stats
from llama.errors import UserError, run_cli
from llama.files import atomic_write_bytes, check_writable

MC_TASK_NAMES = list(T.MC_TASKS)
ALIASES = {"kobest": [n for n in MC_TASK_NAMES if n.startswith("kobest_")], "translation": ["en2ko", "ko2en"]}
OTHER_TASKS = ["bpc", "tokenizer", "en2ko", "ko2en", "kullm"]
DEFAULT_TASKS = "bpc,tokenizer,kobest"
LOGIT_CHUNK = 1024  # scored positions per output-layer call: bounds the (positions x vocab) fp32 logits
MAX_REPORTED_PROBLEMS = 5


class EvalError(UserError):
    """A usage problem; the message says what to change."""


# ------------------------------------------------------------------------------------------------ scoring core

def model_device(model) -> torch.device:
    return model.tok_embeddings.weight.device


@torch.inference_mode()
def score_requests(model, requests: Sequence[Tuple[Sequence[int], int]], batch_size: int, pad_id: int = 0,
                   progress=None) -> List[Tuple[float, bool]]:
    """For each (tokens, n): (sum of log P(token) over the last n tokens given all tokens before them, whether each
    of those tokens is the argmax). The model input is tokens[:-1]; it must fit max_seq_len."""
    max_len = model.params.max_seq_len
    for toks, n in requests:
        if not 1 <= n < len(toks):
            raise EvalError(f"a request of {len(toks)} tokens cannot score its last {n} (need 1 <= n < length)")
        if len(toks) - 1 > max_len:
            raise EvalError(f"a request of {len(toks)} tokens does not fit max_seq_len={max_len}")
    device = model_device(model)
    # Longest first (lm-eval's order): similar lengths share a batch, and an out-of-memory error shows up at once.
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
    results: List[Optional[Tuple[float, bool]]] = [None] * len(requests)
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        width = max(len(requests[i][0]) - 1 for i in idx)
        inp = torch.full((len(idx), width), pad_id, dtype=torch.long)
        rows, cols, targets = [], [], []
        for r, i in enumerate(idx):
            toks, n = requests[i]
            inp[r, : len(toks) - 1] = torch.tensor(toks[:-1], dtype=torch.long)
            # Position p predicts token p + 1: the last n tokens are predicted at positions len-1-n .. len-2.
            rows += [r] * n
            cols += range(len(toks) - 1 - n, len(toks) - 1)
            targets += toks[len(toks) - n :]
        h = model.hidden_states(inp.to(device), 0, use_cache=False)
        h = h[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
        tgt = torch.tensor(targets, device=device)
        logp, greedy = [], []
        for c in range(0, len(targets), LOGIT_CHUNK):
            logits = model.output(h[None, c : c + LOGIT_CHUNK])[0].float()
            lp = torch.log_softmax(logits, dim=-1)
            t = tgt[c : c + LOGIT_CHUNK]
            logp.append(lp.gather(-1, t[:, None])[:, 0])
            greedy.append(logits.argmax(-1) == t)
        logp_all = torch.cat(logp).double().cpu()
        greedy_all = torch.cat(greedy).cpu()
        start = 0
        for i in idx:
            n = requests[i][1]
            results[i] = (float(logp_all[start : start + n].sum()), bool(greedy_all[start : start + n].all()))
            start += n
        if progress is not None:
            progress.update(len(idx))
    return results  # type: ignore[return-value]


def encode_pair(tokenizer, context: str, continuation: str, bos: bool = True) -> Tuple[List[int], List[int]]:
    """lm-eval's `_encode_pair`: trailing spaces of the context move to the continuation; the continuation's ids are
    the tail of encode(context + continuation) after len(encode(context))."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation, bos=bos, eos=False)
    ctx = tokenizer.encode(context, bos=bos, eos=False)
    if not ctx:  # empty context without BOS: condition on BOS, as lm-eval's prefix token
        ctx, whole = [tokenizer.bos_id], [tokenizer.bos_id] + whole
    cont = whole[len(ctx) :]
    if not cont:
        raise EvalError(f"continuation {continuation!r} encodes to no tokens after context {context[-40:]!r}")
    return ctx, cont


def mc_loglikelihoods(model, tokenizer, questions: Sequence[Tuple[str, Sequence[str]]], *, batch_size: int,
                      bos: bool = True, progress=None) -> Tuple[List[List[float]], int]:
    """Scores log P(" " + choice | context) for each (context, choices); returns the scores and how many requests
    were left-truncated to fit max_seq_len."""
    max_len = model.params.max_seq_len
    requests, shape, truncated = [], [], 0
    for context, choices in questions:
        shape.append(len(choices))
        for choice in choices:
            ctx, cont = encode_pair(tokenizer, context, " " + choice, bos)
            toks = ctx + cont
            if len(cont) > max_len:
                raise EvalError(f"a choice of {len(cont)} tokens does not fit max_seq_len={max_len}")
            if len(toks) > max_len + 1:
                toks, truncated = toks[-(max_len + 1) :], truncated + 1
            requests.append((toks, len(cont)))
    scores = [s for s, _ in score_requests(model, requests, batch_size, progress=progress)]
    out, k = [], 0
    for n in shape:
        out.append(scores[k : k + n])
        k += n
    return out, truncated


def macro_f1(golds: Sequence[int], preds: Sequence[int]) -> float:
    """sklearn's f1_score(average="macro"): mean over the labels seen in golds or preds of 2TP / (2TP + FP + FN),
    0 for a label with no TP, FP or FN (sklearn's zero_division=0)."""
    labels = sorted(set(golds) | set(preds))
    f1s = []
    for c in labels:
        tp = sum(g == c and p == c for g, p in zip(golds, preds))
        fp = sum(g != c and p == c for g, p in zip(golds, preds))
        fn = sum(g == c and p != c for g, p in zip(golds, preds))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(f1s) / len(f1s) if f1s else 0.0


def _argmax(xs: Sequence[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # first maximum, as numpy's argmax


def mc_metrics(scores: Sequence[Sequence[float]], choices: Sequence[Sequence[str]], golds: Sequence[int]) -> dict:
    """acc, acc_norm (scores divided by the choice's length in characters, lm-eval's acc_norm) and macro-F1."""
    if not scores:
        raise EvalError("no items were scored")
    preds = [_argmax(s) for s in scores]
    norm = [_argmax([x / max(len(c), 1) for x, c in zip(s, ch)]) for s, ch in zip(scores, choices)]
    n = len(golds)
    return {"acc": sum(p == g for p, g in zip(preds, golds)) / n,
            "acc_norm": sum(p == g for p, g in zip(norm, golds)) / n,
            "macro_f1": macro_f1(golds, preds), "n": n}


# ------------------------------------------------------------------------------------------------ bits per character

def rolling_windows(n_tokens: int, window: int, stride: int) -> List[Tuple[int, int, int]]:
    """(start, end, n_scored) per window over a document of n_tokens (BOS first): the request is tokens[start:end],
    the model sees tokens[start:end-1] (at most `window` tokens) and its last n_scored predictions are counted.
    Together the windows score tokens 1..n_tokens-1 exactly once."""
    if window < 1 or not 1 <= stride <= window:
        raise EvalError(f"need window >= 1 and 1 <= stride <= window, got window={window}, stride={stride}")
    if n_tokens < 2:
        return []
    end = min(n_tokens, window + 1)
    out = [(0, end, end - 1)]
    while end < n_tokens:
        new_end = min(n_tokens, end + stride)
        out.append((max(0, new_end - 1 - window), new_end, new_end - end))
        end = new_end
    return out


def bits_per_char(model, tokenizer, docs: Sequence[str], *, window: Optional[int] = None,
                  stride: Optional[int] = None, batch_size: int = 8, progress=None) -> dict:
    """Intrinsic metrics of `docs` (one document each, BOS + text, see the module notes)."""
    window = window or model.params.max_seq_len
    stride = stride or max(1, window // 2)
    if window > model.params.max_seq_len:
        raise EvalError(f"window {window} is longer than max_seq_len {model.params.max_seq_len}")
    requests = []
    for text in docs:
        toks = tokenizer.encode(text, bos=True, eos=False)
        requests += [(toks[a:b], n) for a, b, n in rolling_windows(len(toks), window, stride)]
    if progress is not None:
        progress.total = (progress.total or 0) + len(requests)
    results = score_requests(model, requests, batch_size, progress=progress)
    nll = -sum(s for s, _ in results)
    n_tok = sum(n for _, n in requests)
    chars = sum(len(d) for d in docs)
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    if not chars or not n_tok:
        raise EvalError("nothing to score: the documents are empty")
    return {"bits_per_char": nll / (math.log(2) * chars), "bits_per_byte": nll / (math.log(2) * nbytes),
            "token_ppl": math.exp(nll / n_tok), "nll_nats": nll, "tokens": n_tok, "chars": chars, "bytes": nbytes,
            "docs": len(docs), "window": window, "stride": stride}


# ------------------------------------------------------------------------------------------------ generation

def hangul_share(text: str) -> Optional[float]:
    """Share of Hangul among the letters (str.isalpha) of `text`; None when it has no letters."""
    letters = [c for c in text if c.isalpha()]
    return sum(is_hangul(c) for c in letters) / len(letters) if letters else None


def generate_texts(llama, prompts: Sequence[Tuple[str, bool]], *, max_gen_len: int, batch_size: int,
                   first_line: bool = False, progress=None) -> List[str]:
    """Greedy completions of (prompt, is_dialog) pairs. Prompts longer than max_seq_len - max_gen_len keep their
    tail (where the question is)."""
    from llama.chat_format import encode_dialog_prompt

    tok = llama.tokenizer
    room = llama.model.params.max_seq_len - max_gen_len
    if room < 1:
        raise EvalError(f"max_gen_len {max_gen_len} leaves no room for a prompt in max_seq_len "
                        f"{llama.model.params.max_seq_len}")
    encoded = [encode_dialog_prompt(tok, [{"role": "user", "content": p}]) if dialog
               else tok.encode(p, bos=True, eos=False) for p, dialog in prompts]
    encoded = [e if len(e) <= room else e[-room:] for e in encoded]
    out: List[str] = []
    for b in range(0, len(encoded), batch_size):
        ids, _ = llama.generate(encoded[b : b + batch_size], max_gen_len, temperature=0.0, top_p=1.0)
        for t in ids:
            text = tok.decode(t).strip()
            out.append(text.split("\n")[0].strip() if first_line else text)
        if progress is not None:
            progress.update(len(ids))
    return out


def translation_scores(hyps: Sequence[str], refs: Sequence[str], target: str) -> dict:
    try:
        import sacrebleu
    except ImportError as e:
        raise EvalError(f"translation metrics need sacrebleu ({e}); pip install 'sacrebleu>=2' "
                        f"(the [eval] extra)") from e
    chrf = sacrebleu.metrics.CHRF(word_order=2)  # word_order=2 is chrF++
    # 13a tokenization for both directions: Korean-specific BLEU tokenizers need MeCab; chrF++ is the main metric.
    bleu = sacrebleu.metrics.BLEU(tokenize="13a")
    return {"chrf++": chrf.corpus_score(list(hyps), [list(refs)]).score,
            "bleu": bleu.corpus_score(list(hyps), [list(refs)]).score,
            "bleu_signature": str(bleu.get_signature()), "target": target, "n": len(hyps)}


# ------------------------------------------------------------------------------------------------ CLI

def _progress(desc: str, total: Optional[int], enabled: bool):
    """tqdm when installed and enabled, else a silent stand-in with the same two methods."""
    if enabled:
        try:
            from tqdm import tqdm
            return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            pass

    return _Silent()


class _Silent:
    total = None

    def update(self, n=1):
        pass

    def close(self):
        pass


def expand_tasks(tasks) -> List[str]:
    names = tasks.split(",") if isinstance(tasks, str) else [str(t) for t in tasks]
    out: List[str] = []
    for name in (n.strip() for n in names if n.strip()):
        for n in ALIASES.get(name, [name]):
            if n not in MC_TASK_NAMES and n not in OTHER_TASKS:
                raise EvalError(f"unknown task {n!r}; known: {', '.join(MC_TASK_NAMES + OTHER_TASKS)}, aliases "
                                f"{', '.join(ALIASES)}")
            if n not in out:
                out.append(n)
    if not out:
        raise EvalError("no tasks given; e.g. --tasks bpc,tokenizer,kobest")
    return out


def attach_lora(model, lora_path, *, ckpt_dir=None, tokenizer_path=None, allow_base_mismatch: bool = False):
    """Fold an adapter into ``model`` exactly as ``kollama.inference.build(lora_path=...)`` does (one function,
    ``kollama.adapters.adapter.apply_adapter``: base/tokenizer check, NF4 base for QLoRA adapters, merge)."""
    from kollama.adapters.adapter import apply_adapter

    return apply_adapter(model, str(lora_path), ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path,
                         allow_base_mismatch=allow_base_mismatch)


def _dtype(name: Optional[str]):
    if name is None:
        return None
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise EvalError(f"--dtype must be one of {', '.join(table)}, got {name!r}")
    return table[name]


def _text_docs(files: Sequence[str], limit: Optional[int]) -> Dict[str, List[str]]:
    out = {}
    for f in files:
        problems: List[str] = []
        docs = list(iter_corpus_lines(f, "text", limit, problems))
        for p in problems[:MAX_REPORTED_PROBLEMS]:
            print(f"skipped {p}", file=sys.stderr)
        if not docs:  # not --limit's doing: it is checked to be >= 1
            why = f"; {len(problems)} lines skipped, e.g. {problems[0]}" if problems else " (the file is empty)"
            raise EvalError(f"no usable lines in {f}{why}; check --text_files / --data_dir")
        out[Path(f).stem] = docs
    return out


def _whole(value, flag: str, minimum: int = 1, unset: Optional[str] = None) -> None:
    """A count from the command line, checked before any work; ``unset``: what leaving it out means (None allowed).
    fire passes `--limit 1.5` as a float, `--limit abc` as a str and a bare `--limit` as True; a negative --limit
    would slice items[:-1] and score all items but one."""
    if value is None and unset:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        bound = "a positive whole number" if minimum == 1 else f"a whole number >= {minimum}"
        raise EvalError(f"{flag} must be {bound}{f' (or left out {unset})' if unset else ''}, got {value!r}")


def check_settings(task_list: Sequence[str], *, limit, k_shot, max_seq_len, batch_size, window, stride, max_gen_len,
                  model_parallel_size, out, gen_out) -> None:
    """Every count names its flag, and the output paths can be written, before a model is loaded."""
    _whole(limit, "--limit", unset="to score every item")
    _whole(k_shot, "--k_shot", minimum=0)
    _whole(max_seq_len, "--max_seq_len", minimum=2)
    _whole(batch_size, "--batch_size")
    _whole(max_gen_len, "--max_gen_len")
    _whole(model_parallel_size, "--model_parallel_size", unset="for one shard per process")
    _whole(window, "--window", unset="for --max_seq_len")
    _whole(stride, "--stride", unset="for half the window")
    span = window or max_seq_len
    if span > max_seq_len:
        raise EvalError(f"--window {window} is longer than --max_seq_len {max_seq_len}; lower --window or raise "
                        f"--max_seq_len")
    if stride is not None and stride > span:
        raise EvalError(f"--stride {stride} is longer than the window ({span} tokens); use --stride <= {span}")
    generating = [t for t in task_list if t in ("en2ko", "ko2en", "kullm")]
    if generating and max_gen_len >= max_seq_len:
        raise EvalError(f"--max_gen_len {max_gen_len} leaves no room for a prompt in --max_seq_len {max_seq_len} "
                        f"(tasks {', '.join(generating)} generate); lower --max_gen_len or raise --max_seq_len")
    outputs = [("--out", out)] + ([("--gen_out", gen_out)] if gen_out and "kullm" in task_list else [])
    for flag, path in outputs:
        if Path(str(path)).is_dir():
            raise EvalError(f"{flag} {path} is a folder; pass the path of a file to write (in it or elsewhere)")
        check_writable(str(path), flag)


def preflight(task_list: Sequence[str], data_dir, text_files, k_shot: int) -> None:
    """Every input file exists: fail before loading a large model, not after hours of earlier tasks."""
    missing = []
    for task in task_list:
        if task in MC_TASK_NAMES:
            _, dev, train = T.MC_TASKS[task]
            missing += [f"{task}: {Path(str(data_dir)) / rel}" for rel in ([dev] + [train] * (k_shot > 0))
                        if not (Path(str(data_dir)) / rel).is_file()]
        elif task == "kullm" and not (Path(str(data_dir)) / "kullm_user_oriented_eval.jsonl").is_file():
            missing.append(f"kullm: {Path(str(data_dir)) / 'kullm_user_oriented_eval.jsonl'}")
        elif task in ("en2ko", "ko2en") and not T.parallel_sets(data_dir):
            missing.append(f"{task}: parallel/NAME.ko + NAME.en under {data_dir}")
        elif task in ("bpc", "tokenizer"):
            if not text_files:
                missing.append(f"{task}: text files (--text_files a.txt,b.txt or ud_ko_*_dev.txt in --data_dir)")
            missing += [f"{task}: {f}" for f in text_files or [] if not Path(str(f)).is_file()]
    if missing:
        hint = " (k-shot examples come from the train split; use --k_shot 0 without one)" if k_shot > 0 else ""
        raise EvalError("missing input files" + hint + ":\n  " + "\n  ".join(missing))


def evaluate(ckpt_dir: str, tokenizer_path: str, tasks=DEFAULT_TASKS, out: str = "results.json",
             data_dir: Optional[str] = None, text_files=None, lora_path: Optional[str] = None,
             max_seq_len: int = 2048, batch_size: int = 8, window: Optional[int] = None, stride: Optional[int] = None,
             k_shot: int = 0, seed: int = 1234, limit: Optional[int] = None, bos: bool = True,
             template: str = "plain", max_gen_len: int = 256, gen_out: Optional[str] = None,
             model_parallel_size: Optional[int] = None, device: Optional[str] = None, dtype: Optional[str] = None,
             progress: bool = True, allow_base_mismatch: bool = False) -> dict:
    """Run the tasks and write `out` (JSON: {"meta": ..., "tasks": {name: metrics}}); returns the same dict.
    `allow_base_mismatch`: evaluate a --lora_path adapter recorded for another base or tokenizer (a warning).

    Args:
        ckpt_dir (str): the Meta folder to evaluate, params.json + consolidated.NN.pth or .safetensors (any shard
            count), e.g. --ckpt_dir llama-2-7b-ko/
        tokenizer_path (str): the SentencePiece .model the checkpoint was trained with (the tokenizer task measures
            this one), e.g. --tokenizer_path llama-2-7b-ko/tokenizer.model
        tasks (str, default "bpc,tokenizer,kobest"): comma-separated task names, among kobest_boolq, kobest_copa,
            kobest_hellaswag, kobest_sentineg, kobest_wic, klue_nli, nsmc, bpc, tokenizer, en2ko, ko2en and kullm,
            or the aliases kobest (the five kobest_*) and translation (en2ko + ko2en), e.g. --tasks bpc,nsmc,en2ko
        out (str, default "results.json"): the JSON file of results, rewritten atomically after every task (only
            rank 0 writes), e.g. --out runs/lora/results.json
        data_dir (str, default None): the folder with the task data (kobest/, klue_nli_*.json, nsmc_*.jsonl,
            parallel/NAME.ko + NAME.en, kullm_user_oriented_eval.jsonl, ud_ko_*_dev.txt); needed by every task
            except bpc and tokenizer given --text_files, e.g. --data_dir data/eval
        text_files (str, default DATA_DIR/ud_ko_*_dev.txt): comma-separated text files for bpc and tokenizer, one
            document per non-blank line, e.g. --text_files a.txt,b.txt
        lora_path (str, default None): a LoRA/QLoRA adapter folder (kollama.train's adapter/) folded into the model
            before evaluating; None evaluates the checkpoint alone, e.g. --lora_path runs/lora/adapter
        max_seq_len (int, default 2048): longest token sequence the model sees (at least 2); longer
            multiple-choice requests keep their last tokens, e.g. --max_seq_len 4096
        batch_size (int, default 8): requests (or prompts) per forward pass, e.g. --batch_size 16
        window (int, default MAX_SEQ_LEN): tokens the model sees per window when scoring bpc documents, at most
            MAX_SEQ_LEN, e.g. --window 1024
        stride (int, default half the window): tokens each later bpc window advances (and scores), at most the
            window, e.g. --stride 256
        k_shot (int, default 0): examples from the train split put before each multiple-choice question (0 =
            zero-shot, needs no train files), e.g. --k_shot 5
        seed (int, default 1234): seed of the k-shot example draws (and of the generator; generation is greedy),
            e.g. --seed 1
        limit (int, default None): evaluate only the first N items of each task (questions, text lines of each file,
            sentence pairs of each set, kullm rows); None evaluates all, e.g. --limit 100
        bos (bool, default True): prepend BOS to multiple-choice requests, as lm-evaluation-harness does, e.g.
            --nobos
        template (str, default "plain"): prompt format for en2ko, ko2en and kullm, "plain" (bare completion, the
            first generated line is the answer), "kullm" or "chat" (Llama 2 chat format), e.g. --template chat
        max_gen_len (int, default 256): most tokens generated per answer, less than MAX_SEQ_LEN, e.g.
            --max_gen_len 128
        gen_out (str, default OUT's name with .kullm.jsonl): the JSONL file of kullm answers (one row per prompt
            with its hangul_share), e.g. --gen_out runs/lora/kullm.jsonl
        model_parallel_size (int, default None): model-parallel shards to load the checkpoint as; None uses one
            per process (the torchrun world size), e.g. --model_parallel_size 2
        device (str, default None): cpu, cuda (this process's GPU) or cuda:N; None uses cuda:LOCAL_RANK when CUDA
            is available, else cpu, e.g. --device cpu
        dtype (str, default None): weight type, fp32/float32, bf16/bfloat16 or fp16/float16; None is bf16 on GPUs
            that support it (else fp16) and fp32 on CPU, e.g. --dtype fp32
        progress (bool, default True): show progress bars on stderr (rank 0 only), e.g. --noprogress
        allow_base_mismatch (bool, default False): evaluate a --lora_path adapter recorded for another base model
            or tokenizer anyway (with a warning) instead of refusing it, e.g. --allow_base_mismatch
    """
    from llama.generation import Llama

    task_list = expand_tasks(tasks)
    if template not in T.TEMPLATES:
        raise EvalError(f"--template must be one of {', '.join(T.TEMPLATES)}, got {template!r}")
    check_settings(task_list, limit=limit, k_shot=k_shot, max_seq_len=max_seq_len, batch_size=batch_size,
                  window=window, stride=stride, max_gen_len=max_gen_len, model_parallel_size=model_parallel_size,
                  out=out, gen_out=gen_out)
    # bpc and tokenizer can run on --text_files alone; every other task reads its files from --data_dir.
    needs_data = [t for t in task_list if t not in ("bpc", "tokenizer") or not text_files]
    if needs_data and data_dir is None:
        raise EvalError(f"tasks {', '.join(needs_data)} read their files from --data_dir (the folder with kobest/, "
                        f"parallel/, klue_nli_dev.json, ud_ko_*_dev.txt, ...); pass it")
    if isinstance(text_files, str):
        text_files = text_files.split(",")
    if not text_files and data_dir is not None:
        text_files = sorted(str(p) for p in Path(str(data_dir)).glob("ud_ko_*_dev.txt"))
    preflight(task_list, data_dir, text_files, k_shot)
    start = time.time()
    llama = Llama.build(str(ckpt_dir), str(tokenizer_path), max_seq_len, batch_size, model_parallel_size, seed,
                        device=device, dtype=_dtype(dtype))
    if lora_path:
        llama.model = attach_lora(llama.model, lora_path, ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path,
                                  allow_base_mismatch=allow_base_mismatch)
    model, tok = llama.model, llama.tokenizer
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    out_path = Path(str(out))
    result = {"meta": {"ckpt_dir": str(ckpt_dir), "tokenizer_path": str(tokenizer_path), "lora_path": lora_path,
                       "tasks": task_list, "max_seq_len": max_seq_len, "batch_size": batch_size, "k_shot": k_shot,
                       "seed": seed, "limit": limit, "bos": bos, "template": template, "max_gen_len": max_gen_len,
                       "dtype": str(next(model.parameters()).dtype), "device": str(model_device(model)),
                       "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                       "torch": torch.__version__, "started": time.strftime("%Y-%m-%dT%H:%M:%S")},
              "tasks": {}}

    def save():
        result["meta"]["wall_time_s"] = round(time.time() - start, 2)
        if rank0:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(out_path, (json.dumps(result, ensure_ascii=False, indent=2) + "\n").encode())

    for task in task_list:
        t0 = time.time()
        problems: List[str] = []
        if task in MC_TASK_NAMES:
            items = T.load_mc_task(task, data_dir, "dev", problems)[:limit]
            pool = T.load_mc_task(task, data_dir, "train") if k_shot > 0 else []
            questions = [(T.fewshot_context(it, T.draw_shots(pool, k_shot, seed, task, i)), it.choices)
                         for i, it in enumerate(items)]
            bar = _progress(task, sum(len(c) for _, c in questions), progress and rank0)
            scores, truncated = mc_loglikelihoods(model, tok, questions, batch_size=batch_size, bos=bos,
                                                  progress=bar)
            bar.close()
            metrics = dict(mc_metrics(scores, [it.choices for it in items], [it.gold for it in items]),
                           k_shot=k_shot, truncated=truncated)
        elif task in ("bpc", "tokenizer"):
            if not text_files:
                raise EvalError(f"{task} needs text files: --text_files a.txt,b.txt (or ud_ko_*_dev.txt in "
                                f"--data_dir)")
            metrics = {}
            for name, docs in _text_docs(text_files, limit).items():
                if task == "tokenizer":
                    metrics[name] = tokenizer_stats(tokenizer_path, docs)
                else:
                    bar = _progress(f"bpc {name}", 0, progress and rank0)
                    metrics[name] = bits_per_char(model, tok, docs, window=window, stride=stride,
                                                  batch_size=batch_size, progress=bar)
                    bar.close()
        elif task in ("en2ko", "ko2en"):
            sets = T.parallel_sets(data_dir)
            if not sets:
                raise EvalError(f"no parallel/NAME.ko + NAME.en pairs under {data_dir}")
            metrics = {}
            for name, (ko, en) in sets.items():
                pairs = T.read_parallel(en, ko) if task == "en2ko" else T.read_parallel(ko, en)
                pairs = pairs[:limit]
                bar = _progress(f"{task} {name}", len(pairs), progress and rank0)
                hyps = generate_texts(llama, [T.translation_prompt(task, s, template) for s, _ in pairs],
                                      max_gen_len=max_gen_len, batch_size=batch_size,
                                      first_line=template == "plain", progress=bar)
                bar.close()
                metrics[name] = translation_scores(hyps, [r for _, r in pairs], task[-2:])
        else:  # kullm
            rows = T.read_kullm(Path(str(data_dir)) / "kullm_user_oriented_eval.jsonl", problems)[:limit]
            bar = _progress(task, len(rows), progress and rank0)
            answers = generate_texts(llama, [T.instruction_prompt(r["instruction"], r["input"], template)
                                             for r in rows], max_gen_len=max_gen_len, batch_size=batch_size,
                                     progress=bar)
            bar.close()
            shares = [hangul_share(a) for a in answers]
            gen_path = Path(str(gen_out)) if gen_out else out_path.with_name(out_path.stem + ".kullm.jsonl")
            lines = [json.dumps(dict(r, answer=a, hangul_share=s, template=template), ensure_ascii=False)
                     for r, a, s in zip(rows, answers, shares)]
            if rank0:
                gen_path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(gen_path, ("\n".join(lines) + "\n").encode())
            known = [s for s in shares if s is not None]
            metrics = {"hangul_share_mean": sum(known) / len(known) if known else None,
                       "korean_answer_rate": sum(s is not None and s >= 0.5 for s in shares) / max(len(shares), 1),
                       "n": len(rows), "generations": str(gen_path)}
        if problems:
            for p in problems[:MAX_REPORTED_PROBLEMS]:
                print(f"skipped {p}", file=sys.stderr)
            metrics.update(skipped_rows=len(problems), skipped_examples=problems[:MAX_REPORTED_PROBLEMS])
        metrics["wall_time_s"] = round(time.time() - t0, 2)
        result["tasks"][task] = metrics
        print(f"{task}: {_summary(metrics)}")
        save()
    return result


def _summary(metrics: dict) -> str:
    keys = ("acc", "acc_norm", "macro_f1", "bits_per_char", "chrf++", "bleu", "tokens_per_hangul_syllable",
            "korean_answer_rate")
    parts = [f"{k}={v:.4f}" for k, v in metrics.items() if k in keys and isinstance(v, float)]
    for name, sub in metrics.items():
        if isinstance(sub, dict):
            parts.append(f"[{name}] " + " ".join(f"{k}={v:.4f}" for k, v in sub.items()
                                                 if k in keys and isinstance(v, float)))
    return ", ".join(parts)


def main(argv: Optional[List[str]] = None) -> None:
    run_cli(evaluate, argv, "python -m kollama.evaluate", serialize=lambda _: None)


if __name__ == "__main__":
    main()
