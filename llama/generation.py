"""Llama.build and generation, with Meta's signatures and semantics.

The data path, top to bottom: prompt (str or Dialog) -> token ids (``tokenizer`` / ``chat_format``) -> a right-padded
batch -> ``Transformer`` (prefill, then one token per step through the KV cache) -> logits -> sampler (temperature,
top-p; model-parallel rank 0 decides and broadcasts) -> ids -> text.
"""
from __future__ import annotations

import os
import sys
import time
from typing import List, Optional, Tuple, TypedDict

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llama.chat_format import UNSAFE_ERROR, Dialog, Message, encode_dialog_prompt, has_special_tags
from llama.checkpoint import CheckpointError, open_checkpoint
from llama.model import ModelArgs, Transformer
from llama.parallel import (
    get_model_parallel_group,
    get_model_parallel_rank,
    get_model_parallel_src_rank,
    get_model_parallel_world_size,
    init_distributed,
    initialize_model_parallel,
)
from llama.tokenizer import Tokenizer


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: List[str]  # not required
    logprobs: List[float]  # not required


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


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
        device: Optional[str] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> "Llama":
        """Load a checkpoint (any shard count) onto this process's model-parallel rank and return a generator.

        Starts torch.distributed only under torchrun with more than one process (gloo on CPU, nccl on CUDA).
        """
        if max_seq_len < 1 or max_batch_size < 1:
            raise ValueError(f"max_seq_len ({max_seq_len}) and max_batch_size ({max_batch_size}) must be >= 1")
        device = torch.device(device) if device is not None else default_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
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
        params = {**checkpoint.params, "max_seq_len": max_seq_len, "max_batch_size": max_batch_size,
                  "vocab_size": checkpoint.vocab_size}
        model_args = ModelArgs(**params)
        # Build on the meta device (no memory, no init) and adopt the loaded tensors.
        model = Transformer(model_args, device="meta", dtype=dtype)
        state = checkpoint.local_state_dict(model.state_dict(), get_model_parallel_rank(),
                                            get_model_parallel_world_size())
        state = {k: v.to(device=device, dtype=dtype) for k, v in state.items()}
        model.load_state_dict(state, strict=True, assign=True)
        model.init_buffers(device, dtype)
        model.requires_grad_(False).eval()
        print(f"Loaded in {time.time() - start_time:.2f} seconds")
        return Llama(model, tokenizer, seed=seed)

    def __init__(self, model: Transformer, tokenizer: Tokenizer, seed: int = 1):
        self.model = model
        self.tokenizer = tokenizer
        # A private generator: sampling never touches torch's global RNG.
        self.device = model.tok_embeddings.weight.device
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

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
        params = self.model.params
        check_sampling(temperature, top_p)
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
        if max_gen_len < 0:
            raise ValueError(f"max_gen_len must be >= 0, got {max_gen_len}")
        min_prompt_len, max_prompt_len = min(lengths), max(lengths)
        total_len = min(params.max_seq_len, max_gen_len + max_prompt_len)

        pad = -1  # never fed to the model: only positions < cur_pos are read, and those are all filled
        tokens = torch.full((bsz, total_len), pad, dtype=torch.long, device=self.device)
        for k, t in enumerate(prompt_tokens):
            tokens[k, : len(t)] = torch.tensor(t, dtype=torch.long, device=self.device)
        positions = torch.arange(total_len, device=self.device)
        prompt_len = torch.tensor(lengths, device=self.device)
        input_text_mask = positions[None, :] < prompt_len[:, None]
        token_logprobs = torch.zeros((bsz, total_len), dtype=torch.float, device=self.device) if logprobs else None

        eos_reached = torch.zeros(bsz, dtype=torch.bool, device=self.device)
        prev_pos = 0
        if min_prompt_len == total_len:  # nothing to generate: score the prompts (logit[t] scores token[t+1])
            logits = self.model.forward(tokens, 0)
            if logprobs:
                token_logprobs[:, 1:] = -F.cross_entropy(
                    logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none", ignore_index=pad
                )
        for cur_pos in range(min_prompt_len, total_len):
            h = self.model.hidden_states(tokens[:, prev_pos:cur_pos], prev_pos)
            # Only the last position is needed to sample; every position only when log-probs are asked for.
            logits = self.model.output(h if logprobs else h[:, -1:]).float()
            next_token = self.sample(logits[:, -1], temperature, top_p)
            next_token = torch.where(input_text_mask[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            if logprobs:
                token_logprobs[:, prev_pos + 1 : cur_pos + 1] = -F.cross_entropy(
                    logits.transpose(1, 2), tokens[:, prev_pos + 1 : cur_pos + 1], reduction="none", ignore_index=pad
                )
            eos_reached |= (~input_text_mask[:, cur_pos]) & (next_token == self.tokenizer.eos_id)
            prev_pos = cur_pos
            if bool(eos_reached.all()):
                break

        out_tokens, out_logprobs = [], []
        all_logprobs = token_logprobs.tolist() if logprobs else None
        for i, toks in enumerate(tokens.tolist()):
            start = 0 if echo else lengths[i]
            end = min(lengths[i] + max_gen_len, total_len)
            generated = toks[lengths[i] : end]
            # EOS counts only where it was generated: a prompt may contain EOS (finished chat turns).
            if pad in generated:
                end = lengths[i] + generated.index(pad)
                generated = generated[: generated.index(pad)]
            if self.tokenizer.eos_id in generated:
                end = lengths[i] + generated.index(self.tokenizer.eos_id)
            out_tokens.append(toks[start:end])
            out_logprobs.append(all_logprobs[i][start:end] if logprobs else None)
        return out_tokens, (out_logprobs if logprobs else None)

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
    ) -> List[CompletionPrediction]:
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        prompt_tokens = [self.tokenizer.encode(x, bos=True, eos=False) for x in prompts]
        generation_tokens, generation_logprobs = self.generate(
            prompt_tokens, max_gen_len, temperature=temperature, top_p=top_p, logprobs=logprobs, echo=echo
        )
        if logprobs:
            return [
                {"generation": self.tokenizer.decode(t), "tokens": [self.tokenizer.decode([x]) for x in t],
                 "logprobs": lp}
                for t, lp in zip(generation_tokens, generation_logprobs)
            ]
        return [{"generation": self.tokenizer.decode(t)} for t in generation_tokens]

    def chat_completion(
        self,
        dialogs: List[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: Optional[int] = None,
        logprobs: bool = False,
    ) -> List[ChatPrediction]:
        if max_gen_len is None:
            max_gen_len = self.model.params.max_seq_len - 1
        if not dialogs:
            raise ValueError("no dialogs were given; pass at least one")
        # Dialogs that smuggle in [INST] or <<SYS>> get the error message instead of a generation (Meta's rule).
        unsafe = [has_special_tags(d) for d in dialogs]
        prompts = [encode_dialog_prompt(self.tokenizer, d) for d, bad in zip(dialogs, unsafe) if not bad]
        tokens, lps = self.generate(prompts, max_gen_len, temperature, top_p, logprobs) if prompts else ([], None)
        results: List[ChatPrediction] = []
        k = 0
        for bad in unsafe:
            if bad:
                result: ChatPrediction = {"generation": {"role": "assistant", "content": UNSAFE_ERROR}}
                if logprobs:
                    result.update(tokens=[], logprobs=[])
            else:
                result = {"generation": {"role": "assistant", "content": self.tokenizer.decode(tokens[k])}}
                if logprobs:
                    result.update(tokens=[self.tokenizer.decode([x]) for x in tokens[k]], logprobs=lps[k])
                k += 1
            results.append(result)
        return results


def check_sampling(temperature: float, top_p: float) -> None:
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


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
