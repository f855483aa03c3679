"""Llama.build and generation, with Meta's signatures and semantics.

The data path, top to bottom: prompt (str or Dialog) -> token ids (``tokenizer`` / ``chat_format``) -> a right-padded
batch -> ``Transformer`` (prefill, then one token per step through the KV cache) -> logits -> sampler (temperature,
top-p; model-parallel rank 0 decides and broadcasts) -> ids -> text.
"""
from __future__ import annotations

import math
import numbers
import os
import sys
import time
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, TypedDict, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llama.chat_format import UNSAFE_ERROR, Dialog, Message, encode_dialog_prompt, has_special_tags
from llama.checkpoint import CheckpointError, open_checkpoint
from llama.device import select_device
from llama.errors import UserError
from llama.files import sha256_file
from llama.model import ModelArgs, Transformer
from llama.parallel import (
    get_model_parallel_group,
    get_model_parallel_rank,
    get_model_parallel_src_rank,
    get_model_parallel_world_size,
    init_distributed,
    initialize_model_parallel,
)
from llama.tokenizer import IncrementalDecoder, Tokenizer


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


def default_dtype(device: torch.device) -> torch.dtype:
    # CPUs here have no fast bf16 matmul, so fp32 there; bf16 on GPUs that support it, else fp16.
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class Llama:
    @staticmethod
    def build(
        ckpt_dir: str,
        tokenizer_path: str,
        max_seq_len: int,
        max_batch_size: int,
        model_parallel_size: Optional[int] = None,
        seed: int = 1,
        *,
        device: Union[None, str, torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        quantize: Optional[str] = None,
        compile: bool = False,
        num_threads: Optional[int] = None,
    ) -> "Llama":
        """Load a checkpoint (any shard count) onto this process's model-parallel rank and return a generator.

        Starts torch.distributed only under torchrun with more than one process (gloo on CPU, nccl on CUDA).
        ``quantize``: None, "int8" (per-channel weights, CPU and CUDA) or "int4" (groupwise; CUDA, and CPU where
        PyTorch has its int4 CPU kernels), applied to this rank's shard after loading (see ``llama.quantize``).
        ``compile``: torch.compile the single-token decode step (CUDA graphs on GPUs); same outputs as eager.
        ``num_threads``: calls ``torch.set_num_threads`` (process-wide) only when given; by default PyTorch's own
        choice (one thread per physical core, or OMP_NUM_THREADS) is left alone.
        """
        if num_threads is not None:
            if num_threads < 1:
                raise ValueError(f"num_threads must be >= 1, got {num_threads}")
            torch.set_num_threads(num_threads)
        if max_seq_len < 1 or max_batch_size < 1:
            raise ValueError(f"max_seq_len ({max_seq_len}) and max_batch_size ({max_batch_size}) must be >= 1")
        device = select_device(device)
        init_distributed("nccl" if device.type == "cuda" else "gloo")
        world = dist.get_world_size() if dist.is_initialized() else 1
        initialize_model_parallel(model_parallel_size or world)
        if dist.is_initialized() and dist.get_rank() > 0:
            sys.stdout = open(os.devnull, "w")  # Meta's behaviour: only rank 0 prints
        dtype = dtype or default_dtype(device)

        start_time = time.time()
        checkpoint = open_checkpoint(ckpt_dir)
        tokenizer = Tokenizer(tokenizer_path)
        if tokenizer.n_words != checkpoint.vocab_size:
            raise CheckpointError(
                f"the tokenizer {tokenizer_path} has {tokenizer.n_words} pieces but the checkpoint has "
                f"{checkpoint.vocab_size} embedding rows; pass the tokenizer this model was trained with"
            )
        check_saved_tokenizer(ckpt_dir, tokenizer_path)
        params = {**checkpoint.params, "max_seq_len": max_seq_len, "max_batch_size": max_batch_size,
                  "vocab_size": checkpoint.vocab_size}
        model_args = ModelArgs(**params)
        check_kv_cache_fits(model_args, get_model_parallel_world_size(), dtype, device)
        # Build on the meta device (no memory, no init) and adopt the loaded tensors.
        model = Transformer(model_args, device="meta", dtype=dtype)
        state = checkpoint.local_state_dict(model.state_dict(), get_model_parallel_rank(),
                                            get_model_parallel_world_size())
        state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
        model.init_buffers(device, dtype)
        model.requires_grad_(False).eval()
        if quantize is not None:
            from llama.quantize import quantize_model

            quantize_model(model, quantize)
        print(f"Loaded in {time.time() - start_time:.2f} seconds")
        return Llama(model, tokenizer, seed=seed, compile=compile)

    def __init__(self, model: Transformer, tokenizer: Tokenizer, seed: int = 1, compile: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        # A private generator: sampling never touches torch's global RNG.
        self.device = model.tok_embeddings.weight.device
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self._decode_step = None
        if compile:
            # Only the single-token step is compiled: its shapes are static (a tensor start_pos, see
            # Transformer.hidden_states), so it
            # is traced once per batch size; prefill stays eager. On CUDA, "reduce-overhead" replays the step as a
            # CUDA graph, removing the per-kernel launch cost that dominates small-batch decode.
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self._decode_step = torch.compile(lambda tokens, pos: model(tokens, pos)[:, -1], mode=mode,
                                              fullgraph=True, dynamic=False)

    # -----------------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: List[List[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
    ) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Continue each prompt. Returns the generated ids (with the prompt when ``echo``), cut at the first
        generated EOS, and optionally the log-probability of each returned token given the ones before it."""
        run = self._start(prompt_tokens, max_gen_len, temperature, top_p, logprobs)
        for _ in self._steps(run):
            pass
        return self._finish(run, echo)

    def _start(self, prompt_tokens, max_gen_len, temperature, top_p, logprobs) -> "_Run":
        params = self.model.params
        check_sampling(temperature, top_p)
        check_token_batch(prompt_tokens, self.model.params.vocab_size)
        if not prompt_tokens:
            raise ValueError("no prompts were given; pass at least one")
        bsz = len(prompt_tokens)
        if bsz > params.max_batch_size:
            raise ValueError(
                f"{bsz} prompts were given but max_batch_size is {params.max_batch_size}; "
                f"send at most {params.max_batch_size} at a time or build with a larger max_batch_size"
            )
        lengths = [len(t) for t in prompt_tokens]
        if min(lengths) == 0:
            raise ValueError("a prompt encodes to no tokens; every prompt needs at least one token (e.g. BOS)")
        if max(lengths) > params.max_seq_len:
            raise ValueError(
                f"a prompt of {max(lengths)} tokens does not fit max_seq_len={params.max_seq_len}; "
                f"shorten the prompt or build with a larger max_seq_len"
            )
        if isinstance(max_gen_len, bool) or not isinstance(max_gen_len, int) or max_gen_len < 0:
            raise UserError(f"max_gen_len must be a whole number >= 0, got {max_gen_len!r}")
        return _Run(prompt_tokens, lengths, min(params.max_seq_len, max_gen_len + max(lengths)), max_gen_len,
                    temperature, top_p, logprobs, self.device)

    def _steps(self, run: "_Run"):
        """Decode ``run`` one position at a time, yielding each position after its tokens are written.

        The consumer may set ``run.stopped[k] = True`` (a stop string was found) to end row k early; the loop ends
        when every row has generated EOS or stopped. Per step this costs the model call, the sampler and one
        host sync (the all-done check); rows still inside their prompt are only special-cased while there are any.
        """
        min_prompt_len, max_prompt_len = min(run.lengths), max(run.lengths)
        if min_prompt_len == run.total_len:  # nothing to generate: score the prompts (logit[t] scores token[t+1])
            if run.logprobs:
                tokens, pad = run.tokens, _Run.PAD
                with torch.inference_mode():
                    logits = self.model.forward(tokens, 0)
                    run.token_logprobs[:, 1:] = -F.cross_entropy(
                        logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none", ignore_index=pad
                    )
            return
        eos_reached = torch.zeros(run.bsz, dtype=torch.bool, device=self.device)
        use_step = self._decode_step is not None and not run.logprobs
        positions = torch.arange(run.total_len, device=self.device)
        prev_pos = 0
        for cur_pos in range(min_prompt_len, run.total_len):
            with torch.inference_mode():
                done = self._step(run, cur_pos, prev_pos, eos_reached, positions, use_step, max_prompt_len)
            prev_pos = cur_pos
            yield cur_pos
            if run.any_stopped:
                done = bool((eos_reached | run.stopped).all())
            if done:
                break

    def _step(self, run, cur_pos, prev_pos, eos_reached, positions, use_step, max_prompt_len) -> bool:
        """Feed tokens[prev_pos:cur_pos], sample tokens[:, cur_pos]; True when every row has generated EOS."""
        tokens, pad, eos = run.tokens, _Run.PAD, self.tokenizer.eos_id
        if use_step and cur_pos - prev_pos == 1:
            logits = self._decode_step(tokens[:, prev_pos:cur_pos], positions[prev_pos:cur_pos])
        else:
            h = self.model.hidden_states(tokens[:, prev_pos:cur_pos], prev_pos)
            # Only the last position is needed to sample; every position only when log-probs are asked for.
            logits = self.model.output(h if run.logprobs else h[:, -1:]).float()
            if run.logprobs:
                run.token_logprobs[:, prev_pos + 1 : cur_pos] = -F.cross_entropy(
                    logits[:, :-1].transpose(1, 2), tokens[:, prev_pos + 1 : cur_pos], reduction="none",
                    ignore_index=pad)
            logits = logits[:, -1]
        next_token = self.sample(logits, run.temperature, run.top_p)
        if cur_pos < max_prompt_len:  # some rows are still reading their prompt: keep those tokens
            in_prompt = run.prompt_len > cur_pos
            next_token = torch.where(in_prompt, tokens[:, cur_pos], next_token)
            eos_reached |= ~in_prompt & (next_token == eos)
        else:
            eos_reached |= next_token == eos
        tokens[:, cur_pos] = next_token
        if run.logprobs:
            run.token_logprobs[:, cur_pos] = -F.cross_entropy(logits, next_token, reduction="none")
        return bool(eos_reached.all())  # the one host sync per step

    def _finish(self, run: "_Run", echo: bool) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        out_tokens, out_logprobs = [], []
        all_logprobs = run.token_logprobs.tolist() if run.logprobs else None
        pad, eos = _Run.PAD, self.tokenizer.eos_id
        for i, toks in enumerate(run.tokens.tolist()):
            n = run.lengths[i]
            start = 0 if echo else n
            end = min(n + run.max_gen_len, run.total_len)
            generated = toks[n:end]
            # EOS counts only where it was generated: a prompt may contain EOS (finished chat turns).
            if pad in generated:
                end = n + generated.index(pad)
                generated = generated[: generated.index(pad)]
            if eos in generated:
                end = n + generated.index(eos)
            if run.keep[i] is not None:  # a stop string ended this row
                end = min(end, n + run.keep[i])
            out_tokens.append(toks[start:end])
            out_logprobs.append(all_logprobs[i][start:end] if run.logprobs else None)
        return out_tokens, (out_logprobs if run.logprobs else None)

    def _generate_until(self, prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, stop):
        """generate() that also ends each row at its first stop string; returns (tokens, logprobs, texts).

        ``texts[k]`` is the generated text cut just before the stop string (None without stop strings). The
        tokens of a stopped row end with the token that completed its stop string."""
        stop = normalize_stop(stop)
        run = self._start(prompt_tokens, max_gen_len, temperature, top_p, logprobs)
        streams = [TextStream(self.tokenizer, stop) for _ in prompt_tokens] if stop else None
        for cur_pos in self._steps(run):
            if not streams:
                continue
            new = run.tokens[:, cur_pos].tolist()  # one host copy per step, only when there are stop strings
            for k, st in enumerate(streams):
                if st.stopped or st.finished or cur_pos < run.lengths[k]:
                    continue
                if new[k] == self.tokenizer.eos_id:
                    st.finished = True
                    continue
                st.push(new[k])
                if st.stopped:
                    run.stop_row(k, cur_pos + 1 - run.lengths[k])
        tokens, lps = self._finish(run, echo)
        texts = None
        if stop:
            texts = []
            for k, t in enumerate(tokens):
                text = self.tokenizer.decode(t)
                # With echo only the generated part is searched (decoded together with the prompt, as Meta's echo).
                start = len(self.tokenizer.decode(prompt_tokens[k])) if echo else 0
                texts.append(text[:start] + cut_at_stop(text[start:], stop))
        return tokens, lps, texts

    # -----------------------------------------------------------------------------------------------------------
    def stream_text(self, prompt: str, temperature: float = 0.6, top_p: float = 0.9,
                    max_gen_len: Optional[int] = None, stop: Optional[Sequence[str]] = None) -> Iterator[str]:
        """Yield the completion of ``prompt`` as text deltas (whole UTF-8 characters), ending before the first
        stop string. ``"".join(stream_text(...))`` equals ``text_completion([prompt], ...)[0]["generation"]``."""
        if not isinstance(prompt, str):
            raise TypeError(f"stream_text takes one prompt string, got a {type(prompt).__name__}")
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        check_max_gen_len(max_gen_len)
        yield from self._stream(self.tokenizer.encode(prompt, bos=True, eos=False), temperature, top_p,
                                max_gen_len, stop)

    def stream_chat(self, dialog: Dialog, temperature: float = 0.6, top_p: float = 0.9,
                    max_gen_len: Optional[int] = None, stop: Optional[Sequence[str]] = None) -> Iterator[str]:
        """Yield the assistant's reply to ``dialog`` as text deltas; the same text as ``chat_completion``."""
        check_list_of(dialog, dict, "dialog", "one dialog: a list of {'role', 'content'} messages")
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        check_max_gen_len(max_gen_len)
        if has_special_tags(dialog):
            yield UNSAFE_ERROR
            return
        yield from self._stream(encode_dialog_prompt(self.tokenizer, dialog), temperature, top_p, max_gen_len,
                                stop)

    def _stream(self, prompt: List[int], temperature, top_p, max_gen_len, stop) -> Iterator[str]:
        stream = TextStream(self.tokenizer, normalize_stop(stop))
        # No inference_mode around the yields: it would stay switched on in the consumer's code between deltas.
        # _steps enters it around each model call instead.
        run = self._start([prompt], max_gen_len, temperature, top_p, False)
        steps = self._steps(run)
        try:
            for cur_pos in steps:
                token = int(run.tokens[0, cur_pos])
                if token == self.tokenizer.eos_id:
                    break
                delta = stream.push(token)
                if delta:
                    yield delta
                if stream.stopped:
                    break
        finally:
            steps.close()  # stop decoding now: a consumer that breaks out of the stream costs no more steps
        rest = stream.flush()
        if rest:
            yield rest

    def sample(self, logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
        """One token per row: argmax at temperature 0, else top-p sampling of softmax(logits / temperature).
        Under model parallelism rank 0 of the group decides and the others receive its tokens."""
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            next_token = sample_top_p(probs, top_p, self.generator)
        else:
            next_token = torch.argmax(logits, dim=-1)
        next_token = next_token.reshape(-1)
        if get_model_parallel_world_size() > 1:
            dist.broadcast(next_token, src=get_model_parallel_src_rank(), group=get_model_parallel_group())
        return next_token

    # -----------------------------------------------------------------------------------------------------------
    def text_completion(
        self,
        prompts: List[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        echo: bool = False,
        stop: Optional[Sequence[str]] = None,
    ) -> List[CompletionPrediction]:
        """Meta's text_completion, plus ``stop``: strings that end a generation, cut just before the first one to
        complete (with ``echo`` the prompt text is not searched)."""
        check_list_of(prompts, str, "prompts", "a list of strings: text_completion([prompt])")
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        check_max_gen_len(max_gen_len, allow_zero=echo)  # 0 with echo: the prompt's own log-probabilities
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        generation_tokens, generation_logprobs, texts = self._generate_until(
            prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, stop)
        if texts is None:
            texts = [self.tokenizer.decode(t) for t in generation_tokens]
        if logprobs:
            return [
                {"generation": text, "tokens": [self.tokenizer.decode([x]) for x in t], "logprobs": lp}
                for text, t, lp in zip(texts, generation_tokens, generation_logprobs)
            ]
        return [{"generation": text} for text in texts]

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
        stop: Optional[Sequence[str]] = None,
    ) -> List[ChatPrediction]:
        if isinstance(dialogs, (list, tuple)) and dialogs and isinstance(dialogs[0], dict):
            raise TypeError("dialogs must be a list of dialogs (each a list of messages); for one dialog pass "
                            "chat_completion([dialog])")
        check_list_of(dialogs, (list, tuple), "dialogs", "a list of dialogs: chat_completion([dialog])")
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        check_max_gen_len(max_gen_len)
        if not dialogs:
            raise ValueError("no dialogs were given; pass at least one")
        # Dialogs that smuggle in [INST] or <<SYS>> get the error message instead of a generation (Meta's rule).
        unsafe = [has_special_tags(d) for d in dialogs]
        prompts = [encode_dialog_prompt(self.tokenizer, d) for d, bad in zip(dialogs, unsafe) if not bad]
        tokens, lps, texts = (self._generate_until(prompts, max_gen_len, temperature, top_p, logprobs, False, stop)
                              if prompts else ([], None, None))
        results: List[ChatPrediction] = []
        k = 0
        for bad in unsafe:
            if bad:
                result: ChatPrediction = {"generation": {"role": "assistant", "content": UNSAFE_ERROR}}
                if logprobs:
                    result.update(tokens=[], logprobs=[])
            else:
                text = texts[k] if texts is not None else self.tokenizer.decode(tokens[k])
                result = {"generation": {"role": "assistant", "content": text}}
                if logprobs:
                    result.update(tokens=[self.tokenizer.decode([x]) for x in tokens[k]], logprobs=lps[k])
                k += 1
            results.append(result)
        return results


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_sampling(temperature: float, top_p: float) -> None:
    """temperature: a finite number >= 0 (0 = greedy). top_p: in [0, 1] when sampling (0 keeps only the most
    likely token, as in Meta's sample_top_p); ignored at temperature 0, as Meta's code does."""
    if not _is_number(temperature) or not 0 <= temperature < math.inf:
        raise UserError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if temperature > 0 and (not _is_number(top_p) or not 0 <= top_p <= 1):
        raise UserError(f"top_p must be a number in [0, 1], got {top_p!r}")


def check_max_gen_len(max_gen_len, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(max_gen_len, bool) or not isinstance(max_gen_len, int) or max_gen_len < low:
        raise UserError(f"max_gen_len must be a whole number >= {low} (or None: up to max_seq_len), got "
                        f"{max_gen_len!r}")


def check_list_of(items, kind, name: str, hint: str) -> None:
    """A str is a sequence of str, so text_completion("Hi") would complete "H" and "i" separately: refuse it."""
    if isinstance(items, (str, bytes, dict)) or not isinstance(items, (list, tuple)):
        raise TypeError(f"{name} must be {hint}; got a {type(items).__name__}")
    for i, x in enumerate(items):
        if not isinstance(x, kind):
            raise TypeError(f"{name}[{i}] is a {type(x).__name__}; {name} must be {hint}")


def check_token_batch(prompt_tokens, vocab_size: int) -> None:
    """A list of lists of token ids in [0, vocab_size): an id outside would index past the embedding table."""
    check_list_of(prompt_tokens, (list, tuple), "prompt_tokens", "a list of token-id lists: generate([ids])")
    for i, row in enumerate(prompt_tokens):
        for t in row:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
                raise UserError(f"prompt_tokens[{i}] holds {t!r}, not a token id of this model's vocabulary "
                                f"(0..{vocab_size - 1}); encode text with this model's tokenizer")


def check_saved_tokenizer(ckpt_dir, tokenizer_path) -> None:
    """A checkpoint folder that carries its own SentencePiece model (the converters and the trainer copy it there)
    must be paired with it: a tokenizer of the same size but other pieces would load and silently give nonsense."""
    saved = sorted(Path(ckpt_dir).glob("*.model")) if Path(ckpt_dir).is_dir() else []
    if not saved or sha256_file(tokenizer_path) in {sha256_file(p) for p in saved}:
        return
    raise CheckpointError(f"the tokenizer {tokenizer_path} differs from {', '.join(map(str, saved))}, saved with this "
                          f"checkpoint (same size, other pieces); pass --tokenizer_path {saved[0]}")


def check_kv_cache_fits(args: ModelArgs, model_parallel_size: int, dtype: torch.dtype, device: torch.device) -> None:
    """The KV cache (max_batch_size x max_seq_len per layer, this rank's kv heads) is allocated up front; say so
    when it cannot fit, instead of failing inside the allocator."""
    n_kv = (args.n_kv_heads or args.n_heads) // model_parallel_size
    nbytes = (2 * args.n_layers * args.max_batch_size * args.max_seq_len * n_kv * (args.dim // args.n_heads)
              * torch.empty((), dtype=dtype).element_size())
    free = available_memory(device)
    if free is not None and nbytes > free:
        raise UserError(f"the KV cache needs {nbytes / 2**30:.1f} GiB (max_seq_len {args.max_seq_len} x "
                        f"max_batch_size {args.max_batch_size} x {args.n_layers} layers) but {device} has "
                        f"{free / 2**30:.1f} GiB free; build with a smaller max_seq_len or max_batch_size")


def available_memory(device: torch.device) -> Optional[int]:
    """Free bytes on ``device`` (None where unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def sample_top_p(probs: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Sample from the smallest set of most likely tokens whose mass reaches p: a token is dropped when the
    mass of the tokens ranked before it already exceeds p."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    probs_sum = torch.cumsum(probs_sort, dim=-1)
    mask = probs_sum - probs_sort > p
    probs_sort = probs_sort.masked_fill(mask, 0.0)
    probs_sort = probs_sort / probs_sort.sum(dim=-1, keepdim=True)
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)


# ---------------------------------------------------------------------------------------------------------------
# Decoding state and stop strings
# ---------------------------------------------------------------------------------------------------------------
class _Run:
    """The state of one batched generation: a right-padded token buffer and which rows are finished."""

    PAD = -1  # never fed to the model: only positions < cur_pos are read, and those are all filled

    def __init__(self, prompt_tokens, lengths, total_len, max_gen_len, temperature, top_p, logprobs, device):
        self.bsz, self.lengths, self.total_len, self.max_gen_len = len(prompt_tokens), lengths, total_len, max_gen_len
        self.temperature, self.top_p, self.logprobs = temperature, top_p, logprobs
        rows = [t + [self.PAD] * (total_len - len(t)) for t in prompt_tokens]
        self.tokens = torch.tensor(rows, dtype=torch.long, device=device)[:, :total_len].contiguous()
        self.prompt_len = torch.tensor(lengths, device=device)
        self.token_logprobs = torch.zeros((self.bsz, total_len), device=device) if logprobs else None
        self.stopped = torch.zeros(self.bsz, dtype=torch.bool, device=device)
        self.any_stopped = False
        self.keep: List[Optional[int]] = [None] * self.bsz  # generated tokens kept by a row ended by a stop string

    def stop_row(self, k: int, n_generated: int) -> None:
        self.stopped[k] = True
        self.any_stopped = True
        self.keep[k] = n_generated


def normalize_stop(stop: Union[None, str, Sequence[str]]) -> List[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    stop = list(stop)
    if any(not isinstance(s, str) or not s for s in stop):
        raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
    return stop


def first_stop(text: str, stop: Sequence[str]) -> Optional[int]:
    """Start of the stop string that completes first in ``text`` (earliest end; on a tie, the longer one)."""
    best = None
    for s in stop:
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < (best[0], best[1])):
            best = (i + len(s), i)
    return None if best is None else best[1]


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) its first stop string; the whole text when there is none."""
    i = first_stop(text, stop)
    return text if i is None else text[:i]


class TextStream:
    """Token ids in, text deltas out: UTF-8-safe (``IncrementalDecoder``) and cut before the first stop string.

    Text that might be the start of a stop string is held back until it is known not to be, so the deltas never
    contain any part of a stop string and their concatenation is ``cut_at_stop(decode(ids), stop)``. Only the held
    text and the new delta are searched, so each step costs O(new text + stop lengths), not O(text so far).
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop = list(stop)
        self.held = ""
        self.stopped = False  # a stop string was found: nothing more will be emitted
        self.finished = False  # EOS was generated (set by the caller)

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        return self._emit(self.decoder.push([token_id]), final=False)

    def flush(self) -> str:
        if self.stopped:
            return ""
        return self._emit(self.decoder.flush(), final=True)

    def _emit(self, delta: str, final: bool) -> str:
        if not self.stop:
            return delta
        # A stop string cannot start in text already emitted: any suffix of it that begins a stop string is held.
        buf = self.held + delta
        i = first_stop(buf, self.stop)
        if i is not None:
            self.stopped, self.held = True, ""
            return buf[:i]
        keep = 0 if final else max((k for s in self.stop for k in range(1, len(s)) if buf.endswith(s[:k])),
                                   default=0)
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep]
