"""``Llama``: Meta's build / generate / text_completion / chat_completion, plus streaming and stop strings, all
consuming one token loop.

The data path, top to bottom: prompt (str or Dialog) -> token ids (``tokenizer`` / ``chat_format``) -> a right-padded
``TokenBatch`` -> ``generate_tokens``: the model's one forward (prefill, then one token per step through the KV
cache) -> ``Sampler`` (``llama.sampling``: temperature, top-p; model-parallel rank 0 decides) -> ids written into the
batch -> ``TokenBatch.result`` (ids cut at EOS) or text (``llama.streaming``: UTF-8-safe deltas, stop strings).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, TypedDict, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llama.chat_format import UNSAFE_ERROR, Dialog, Message, encode_dialog_prompt, has_special_tags
from llama.cpu_decode import prepare_inference
from llama.device import select_device
from llama.errors import UserError
from llama.loading import load_model
from llama.model import Transformer
from llama.parallel import init_distributed, initialize_model_parallel
from llama.sampling import Sampler
from llama.streaming import TextStream, cut_at_stop, normalize_stop
from llama.tokenizer import Tokenizer


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


# ---------------------------------------------------------------------------------------------------------------
# The token loop
# ---------------------------------------------------------------------------------------------------------------
class TokenBatch:
    """One batched generation: prompts right-padded into a token buffer of ``total_len`` positions, the
    log-probability of each token when asked for, and the rows a consumer has stopped (a stop string)."""

    PAD = -1  # never fed to the model: only positions < cur_pos are read, and those are all filled

    def __init__(self, prompt_tokens: List[List[int]], total_len: int, max_gen_len: int, logprobs: bool, device):
        self.bsz, self.total_len, self.max_gen_len = len(prompt_tokens), total_len, max_gen_len
        self.lengths = [len(t) for t in prompt_tokens]
        rows = [t + [self.PAD] * (total_len - len(t)) for t in prompt_tokens]
        self.tokens = torch.tensor(rows, dtype=torch.long, device=device)[:, :total_len].contiguous()
        self.prompt_len = torch.tensor(self.lengths, device=device)
        self.token_logprobs = torch.zeros((self.bsz, total_len), device=device) if logprobs else None
        self.stopped = torch.zeros(self.bsz, dtype=torch.bool, device=device)
        self.any_stopped = False
        self.keep: List[Optional[int]] = [None] * self.bsz  # generated tokens kept by a row ended by a stop string

    @property
    def logprobs(self) -> bool:
        return self.token_logprobs is not None

    def stop_row(self, k: int, n_generated: int) -> None:
        """End row ``k`` after its first ``n_generated`` generated tokens (the consumer found a stop string)."""
        self.stopped[k] = True
        self.any_stopped = True
        self.keep[k] = n_generated

    def result(self, eos_id: int, echo: bool) -> Tuple[List[List[int]], Optional[List[List[float]]]]:
        """Per row the generated ids (with the prompt when ``echo``), cut at the first generated EOS or where a stop
        string ended the row, and their log-probabilities when asked for."""
        out_tokens, out_logprobs = [], []
        all_logprobs = self.token_logprobs.tolist() if self.logprobs else None
        for i, toks in enumerate(self.tokens.tolist()):
            n = self.lengths[i]
            start = 0 if echo else n
            end = min(n + self.max_gen_len, self.total_len)
            generated = toks[n:end]
            # EOS counts only where it was generated: a prompt may contain EOS (finished chat turns).
            if self.PAD in generated:
                end = n + generated.index(self.PAD)
                generated = generated[: generated.index(self.PAD)]
            if eos_id in generated:
                end = n + generated.index(eos_id)
            if self.keep[i] is not None:
                end = min(end, n + self.keep[i])
            out_tokens.append(toks[start:end])
            out_logprobs.append(all_logprobs[i][start:end] if self.logprobs else None)
        return out_tokens, (out_logprobs if self.logprobs else None)


def generate_tokens(model: Transformer, batch: TokenBatch, sample: Callable[[torch.Tensor], torch.Tensor],
                    eos_id: int, decode_step: Optional[Callable] = None) -> Iterator[int]:
    """The token loop every way of generating consumes: fill ``batch`` one position at a time and yield each
    position ``cur_pos`` once ``batch.tokens[:, cur_pos]`` (and its log-probability) is written.

    The first call feeds every position up to the shortest prompt (prefill); each later one feeds what was written
    since (one token per row, through the KV cache). Rows still inside their prompt keep their prompt token. The
    consumer may call ``batch.stop_row`` between steps; the loop ends when every row has generated EOS or stopped.
    Per step: the model call, the sampler and one host sync (the all-done check). ``decode_step(tokens, pos)``, a
    compiled static-shape step, replaces single-token calls when given and no log-probabilities are asked for."""
    min_prompt_len, max_prompt_len = min(batch.lengths), max(batch.lengths)
    tokens, pad = batch.tokens, TokenBatch.PAD
    if min_prompt_len == batch.total_len:  # nothing to generate: score the prompts (logit[t] scores token[t+1])
        if batch.logprobs:
            with torch.inference_mode():
                logits = model.forward(tokens, 0)
                batch.token_logprobs[:, 1:] = -F.cross_entropy(
                    logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none", ignore_index=pad)
        return
    eos_reached = torch.zeros(batch.bsz, dtype=torch.bool, device=tokens.device)
    use_step = decode_step is not None and not batch.logprobs
    positions = torch.arange(batch.total_len, device=tokens.device)
    prev_pos = 0
    for cur_pos in range(min_prompt_len, batch.total_len):
        # No inference_mode around the yield: it would stay switched on in the consumer's code between steps.
        with torch.inference_mode():
            if use_step and cur_pos - prev_pos == 1:
                logits = decode_step(tokens[:, prev_pos:cur_pos], positions[prev_pos:cur_pos])
            else:
                h = model.hidden_states(tokens[:, prev_pos:cur_pos], prev_pos)
                # Only the last position is needed to sample; every position only when log-probs are asked for.
                logits = model.output(h if batch.logprobs else h[:, -1:]).float()
                if batch.logprobs:
                    batch.token_logprobs[:, prev_pos + 1 : cur_pos] = -F.cross_entropy(
                        logits[:, :-1].transpose(1, 2), tokens[:, prev_pos + 1 : cur_pos], reduction="none",
                        ignore_index=pad)
                logits = logits[:, -1]
            next_token = sample(logits)
            if cur_pos < max_prompt_len:  # some rows are still reading their prompt: keep those tokens
                in_prompt = batch.prompt_len > cur_pos
                next_token = torch.where(in_prompt, tokens[:, cur_pos], next_token)
                eos_reached |= ~in_prompt & (next_token == eos_id)
            else:
                eos_reached |= next_token == eos_id
            tokens[:, cur_pos] = next_token
            if batch.logprobs:
                batch.token_logprobs[:, cur_pos] = -F.cross_entropy(logits, next_token, reduction="none")
            done = bool(eos_reached.all())  # the one host sync per step
        prev_pos = cur_pos
        yield cur_pos
        if batch.any_stopped:
            done = bool((eos_reached | batch.stopped).all())
        if done:
            break


# ---------------------------------------------------------------------------------------------------------------
# Llama: Meta's interface
# ---------------------------------------------------------------------------------------------------------------
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
        draft: Optional[str] = None,
        speculate_k: int = 4,
    ) -> "Llama":
        """Load a checkpoint (any shard count) onto this process's model-parallel rank and return a generator.

        Starts torch.distributed only under torchrun with more than one process (gloo on CPU, nccl on CUDA).
        ``quantize``: None, "int8" (per-channel weights, CPU and CUDA) or "int4" (groupwise; CUDA, and CPU where
        PyTorch has its int4 CPU kernels), applied to this rank's shard after loading (see ``llama.quantize``).
        ``compile``: torch.compile the single-token decode step (CUDA graphs on GPUs); same outputs as eager.
        ``num_threads``: calls ``torch.set_num_threads`` (process-wide) only when given; by default PyTorch's own
        choice (one thread per physical core, or OMP_NUM_THREADS) is left alone.
        ``draft``: speculative decoding (``llama.speculative``) for one prompt at a time: "int8" (or "int4") drafts
        with a quantized copy of this model, a checkpoint folder with a smaller model of the same tokenizer;
        ``speculate_k`` tokens are proposed per round. Greedy output is unchanged; sampled output has the same
        distribution.
        """
        if num_threads is not None:
            if num_threads < 1:
                raise UserError(f"num_threads must be >= 1, got {num_threads}")
            torch.set_num_threads(num_threads)
        if max_seq_len < 1 or max_batch_size < 1:
            raise UserError(f"max_seq_len ({max_seq_len}) and max_batch_size ({max_batch_size}) must be >= 1")
        device = select_device(device)
        init_distributed("nccl" if device.type == "cuda" else "gloo")
        world = dist.get_world_size() if dist.is_initialized() else 1
        initialize_model_parallel(model_parallel_size or world)
        if dist.is_initialized() and dist.get_rank() > 0:
            sys.stdout = open(os.devnull, "w")  # Meta's behaviour: only rank 0 prints

        start_time = time.time()
        tokenizer = Tokenizer(tokenizer_path)
        model = load_model(ckpt_dir, tokenizer, tokenizer_path, max_seq_len, max_batch_size, device=device,
                           dtype=dtype, quantize=quantize)
        draft_model = None
        if draft is not None:
            from llama.speculative import load_draft

            draft_model = load_draft(draft, model, tokenizer, tokenizer_path, max_seq_len, device)
        print(f"Loaded in {time.time() - start_time:.2f} seconds")
        if compile:  # otherwise the first generation looks hung for the tens of seconds torch.compile takes
            print("compile=True: the decode step is compiled during the first generation (tens of seconds)")
        return Llama(model, tokenizer, seed=seed, compile=compile, draft=draft_model, speculate_k=speculate_k)

    def __init__(self, model: Transformer, tokenizer: Tokenizer, seed: int = 1, compile: bool = False,
                 draft: Optional[Transformer] = None, speculate_k: int = 4):
        self.model = model
        self.tokenizer = tokenizer
        self.draft, self.speculate_k = draft, speculate_k
        for m in (model, draft):
            if m is not None:
                prepare_inference(m)  # CPU: stacked projections, one-call decode; the state_dict is unchanged
        # A private generator: sampling never touches torch's global RNG.
        self.device = model.tok_embeddings.weight.device
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self._decode_step = None
        if compile:
            # Only the single-token step is compiled: its shapes are static (a tensor start_pos, see
            # Transformer.hidden_states), so it is traced once per batch size; prefill stays eager. On CUDA,
            # "reduce-overhead" replays the step as a CUDA graph, removing the per-kernel launch cost that
            # dominates small-batch decode.
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self._decode_step = torch.compile(lambda tokens, pos: model(tokens, pos)[:, -1], mode=mode,
                                              fullgraph=True, dynamic=False)

    # -----------------------------------------------------------------------------------------------------------
    def sampler(self, temperature: float, top_p: float) -> Sampler:
        return Sampler(temperature, top_p, self.generator)

    def tokens(self, batch: TokenBatch, sample: Sampler) -> Iterator[int]:
        """The token loop for ``batch``: speculative with a draft model (one row, no log-probabilities), else
        ``generate_tokens`` over this model and its compiled step."""
        if self.draft is not None and batch.bsz == 1 and not batch.logprobs:
            from llama.speculative import speculative_tokens

            return speculative_tokens(self.model, self.draft, batch, sample, self.tokenizer.eos_id, self.speculate_k)
        return generate_tokens(self.model, batch, sample, self.tokenizer.eos_id, self._decode_step)

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
        sample = self.sampler(temperature, top_p)  # checks the settings before any work
        batch = self.batch(prompt_tokens, max_gen_len, logprobs)
        for _ in self.tokens(batch, sample):
            pass
        return batch.result(self.tokenizer.eos_id, echo)

    def batch(self, prompt_tokens: List[List[int]], max_gen_len: int, logprobs: bool) -> TokenBatch:
        """The prompts as a TokenBatch, after checking they fit this model's cache."""
        params = self.model.params
        check_token_batch(prompt_tokens, params.vocab_size)
        if not prompt_tokens:
            raise UserError("no prompts were given; pass at least one")
        bsz = len(prompt_tokens)
        if bsz > params.max_batch_size:
            raise UserError(
                f"{bsz} prompts were given but max_batch_size is {params.max_batch_size}; "
                f"send at most {params.max_batch_size} at a time or build with a larger max_batch_size"
            )
        lengths = [len(t) for t in prompt_tokens]
        if min(lengths) == 0:
            raise UserError("a prompt encodes to no tokens; every prompt needs at least one token (e.g. BOS)")
        if max(lengths) > params.max_seq_len:
            raise UserError(
                f"a prompt of {max(lengths)} tokens does not fit max_seq_len={params.max_seq_len}; "
                f"shorten the prompt or build with a larger max_seq_len"
            )
        check_max_gen_len(max_gen_len, allow_zero=True)
        total_len = min(params.max_seq_len, max_gen_len + max(lengths))
        return TokenBatch(prompt_tokens, total_len, max_gen_len, logprobs, self.device)

    def _generate_until(self, prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo, stop):
        """generate() that also ends each row at its first stop string; returns (tokens, logprobs, texts).

        ``texts[k]`` is the generated text cut just before the stop string (None without stop strings). The
        tokens of a stopped row end with the token that completed its stop string."""
        stop = normalize_stop(stop)
        sample = self.sampler(temperature, top_p)
        batch = self.batch(prompt_tokens, max_gen_len, logprobs)
        streams = [TextStream(self.tokenizer, stop) for _ in prompt_tokens] if stop else None
        for cur_pos in self.tokens(batch, sample):
            if not streams:
                continue
            new = batch.tokens[:, cur_pos].tolist()  # one host copy per step, only when there are stop strings
            for k, st in enumerate(streams):
                if st.stopped or st.finished or cur_pos < batch.lengths[k]:
                    continue
                if new[k] == self.tokenizer.eos_id:
                    st.finished = True
                    continue
                st.push(new[k])
                if st.stopped:
                    batch.stop_row(k, cur_pos + 1 - batch.lengths[k])
        tokens, lps = batch.result(self.tokenizer.eos_id, echo)
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
            raise UserError("no dialogs were given; pass at least one")
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
        sample = self.sampler(temperature, top_p)
        batch = self.batch([prompt], max_gen_len, False)
        steps = self.tokens(batch, sample)
        try:
            for cur_pos in steps:
                token = int(batch.tokens[0, cur_pos])
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


# ---------------------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------------------
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
