"""Fine-tune Llama 2 (LoRA, QLoRA or full) on instruction, chat or plain-text data: ``python -m kollama.train``.

  python -m kollama.train --ckpt_dir llama-2-7b --tokenizer_path tokenizer.model --data kullm-v2.jsonl \\
      --template kullm --method lora --out_dir runs/kullm-lora
  torchrun --nproc_per_node 4 -m kollama.train ... [--model_parallel_size 2]   # world = data x model parallel

One optimizer step consumes ``micro_batch_size * gradient_accumulation_steps * data_parallel_size`` rows (examples,
or packed blocks with ``--packing``). The loss is the mean over every target token of that global batch, so N
processes give the same update as one process with the same global batch. Gradients are summed over the
data-parallel group by an explicit bucketed all-reduce (not DDP): it composes with model parallelism and LoRA's
frozen base without wrapping the model. The data order is a function of (seed, step), so the checkpoint's step
*is* the data position, and ``--resume`` reproduces an uninterrupted run bit for bit on CPU.

Output folder: ``config.json``, ``metrics.jsonl``, ``checkpoints/step-NNNNNN/`` (trainable weights per
model-parallel rank, optimizer, scheduler, every rank's RNG; written to a temporary folder and renamed), and at
the end ``adapter/`` (LoRA, loadable with ``kollama.lora.load_adapter``), ``model/`` (full fine-tuning, Meta
layout) or ``merged/`` (LoRA merged into the base, Meta layout, with ``--merge``).

``--method qlora``: as lora, over an NF4 base: every transformer-block linear (wq wk wv wo w1 w2 w3) of this rank's
shard is quantized after loading (kollama/qlora.py; embedding, norms and output stay dense). Quantization is
deterministic, so checkpoints hold only the adapter and optimizer and resume stays exact. ``config.json["nf4"]``
and the first ``metrics.jsonl`` record give the stored bits per base parameter (~4.127 for large layers) and the
NF4 error. ``--merge`` writes dequant(NF4(W)) + B A, the weight the adapter was trained against, not W + B A.

``--fsdp`` (full fine-tuning of a model that does not fit one device, kollama/fsdp.py): PyTorch FSDP2 shards the
weights, gradients and AdamW state over the data-parallel group (each of N processes holds 1/N), composing with
``--model_parallel_size``. The update equals the unsharded run's; checkpoints hold one shard per process, so
``--resume`` needs the same world; ``model/`` is gathered tensor by tensor.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from kollama import data as D
from kollama import qlora as Q
from kollama.distributed import all_reduce, all_reduce_grads, clip_grad_norm, is_model_parallel_sharded
from kollama.loading import NF4_METRICS, load_model, load_qlora_model, trainable_named_parameters
from kollama.checkpointing import (TrainingDiverged, latest_checkpoint, load_trainer_state, log_metrics,
                                   save_trainer_state, truncate_metrics, write_json, write_outputs)
from llama.parallel import (destroy_model_parallel, get_data_parallel_group, get_data_parallel_rank,
                            get_data_parallel_world_size, get_model_parallel_rank, init_distributed,
                            initialize_model_parallel)

log = logging.getLogger("kollama.train")


def token_loss(logits: torch.Tensor, labels: torch.Tensor, denominator: int) -> torch.Tensor:
    """Summed next-token cross-entropy over target tokens, divided by the global batch's target count.

    The labels are shifted, not the logits: slicing ``logits[:, :-1]`` would copy the (batch, seq, vocab) tensor
    and zero-fill a gradient of the same size (~8 % of a small model's step); the last position is ignored."""
    targets = F.pad(labels[:, 1:], (0, 1), value=D.IGNORE_INDEX)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=D.IGNORE_INDEX,
                           reduction="sum") / denominator


def lr_lambda(warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """Linear warmup over ``warmup_steps`` (the first step already gets lr/warmup), then cosine to min_lr_ratio."""
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def _as_list(x) -> List[str]:
    if x is None:
        return []
    if isinstance(x, (list, tuple)):
        return [str(v) for v in x]
    return [s for s in str(x).split(",") if s]


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def train(
    data,
    ckpt_dir: str,
    tokenizer_path: str,
    out_dir: str,
    method: str = "lora",
    template: str = "kullm",
    dev_data=None,
    dev_fraction: float = 0.05,
    text_field: str = "text",
    train_on_inputs: bool = False,
    cutoff_len: int = 512,
    packing: bool = False,
    block_size: Optional[int] = None,
    micro_batch_size: int = 4,
    gradient_accumulation_steps: int = 1,
    epochs: float = 1.0,
    max_steps: Optional[int] = None,
    lr: float = 3e-4,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    max_grad_norm: float = 1.0,
    lora_r: int = 8,
    lora_alpha: float = 16,
    lora_dropout: float = 0.05,
    lora_targets="wq,wv",
    use_rslora: bool = False,
    model_parallel_size: int = 1,
    fsdp: bool = False,
    activation_checkpointing: bool = False,
    dtype: Optional[str] = None,
    device: Optional[str] = None,
    seed: int = 42,
    eval_every: int = 50,
    save_every: int = 100,
    save_total_limit: int = 2,
    log_every: int = 1,
    resume=False,
    stop_at_step: Optional[int] = None,
    merge: bool = False,
    task: str = "sft",
    trainable: Optional[str] = None,
    new_rows_from: Optional[int] = None,
    heldout_text: Optional[str] = None,
    heldout_limit: Optional[int] = None,
    curriculum=None,
    progress: bool = True,
) -> dict:
    """Train and return a summary dict (steps, last loss, dev losses, output paths). See the module docstring.

    ``resume``: True continues from the newest checkpoint in ``out_dir/checkpoints``, a path from that one.
    ``stop_at_step``: end after that step (its checkpoint written) without final outputs, e.g. for time-limited
    job slots; a later ``--resume`` continues. ``dtype``: of the frozen base weights (default fp32 on CPU, bf16
    for LoRA on CUDA); trainable weights are always fp32, and CUDA runs under bf16 autocast.
    Continued pretraining (kollama/pretrain.py): ``task="pretrain"`` = ``template="text"`` + packing, long documents
    split into blocks instead of truncated; ``trainable`` = lora | lora+embeddings | embeddings (only rows >=
    ``new_rows_from``) | full; ``heldout_text``: bits per character of that file (first ``heldout_limit`` lines) at
    every eval, logged as ``heldout_bpc``. ``curriculum``: a stage file (kollama/curriculum.py; ``True`` = ``data``
    is the stage file): stages run in order, metrics carry the stage name.
    """
    from kollama import pretrain as P

    if task not in P.TASKS:
        raise ValueError(f"--task must be one of {', '.join(P.TASKS)}, got {task!r}")
    if task == "pretrain":  # plain text, packed; every token is a target
        template, packing = "text", True
    method, merge = P.resolve(trainable, method, merge)
    if method not in ("lora", "qlora", "full"):
        raise ValueError(f"--method must be 'lora', 'qlora' or 'full', got {method!r}")
    if merge and method not in ("lora", "qlora"):
        raise ValueError("--merge only applies to --method lora or qlora (full fine-tuning already writes model/)")
    if micro_batch_size < 1 or gradient_accumulation_steps < 1:
        raise ValueError("--micro_batch_size and --gradient_accumulation_steps must be >= 1")
    block_size = block_size or cutoff_len
    cutoff_len = min(cutoff_len, block_size) if packing else cutoff_len
    seq_len = block_size if packing else cutoff_len

    dev = torch.device(device) if device else (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else
        torch.device("cpu"))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    started_group = not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    init_distributed("nccl" if dev.type == "cuda" else "gloo")
    initialize_model_parallel(model_parallel_size)
    rank = dist.get_rank() if dist.is_initialized() else 0
    dp_rank, dp_size, dp_group = get_data_parallel_rank(), get_data_parallel_world_size(), get_data_parallel_group()
    mp_rank = get_model_parallel_rank()
    if fsdp:
        from kollama.fsdp import check_supported

        check_supported(method, trainable, dp_size, model_parallel_size)
    is_main = rank == 0
    say = print if is_main else (lambda *a, **k: None)
    out = Path(out_dir)
    try:
        # ---- data (every rank reads it all: the order is a pure function of seed and step) ----
        from llama.tokenizer import Tokenizer

        tokenizer = Tokenizer(tokenizer_path)
        stats = D.DataStats()
        rows_per_rank = micro_batch_size * gradient_accumulation_steps
        global_batch = rows_per_rank * dp_size
        split_long = task == "pretrain"
        plan = None
        if curriculum:  # kollama/curriculum.py: the stages decide rows, steps and the lr factor of every step
            from kollama.curriculum import build_plan

            if (curriculum is True) == (data is None) or max_steps:
                raise ValueError("--curriculum: give the stage file once (--curriculum FILE, or --curriculum with "
                                 "--data FILE) and set steps per stage in it, not --max_steps")
            plan = build_plan(data if curriculum is True else curriculum, tokenizer, template=template,
                              text_field=text_field, cutoff_len=cutoff_len, packing=packing, block_size=block_size,
                              train_on_inputs=train_on_inputs, split_long=split_long, global_batch=global_batch,
                              seed=seed, dev_fraction=dev_fraction, dev_data=_as_list(dev_data), stats=stats)
            dev_rows, total_steps, fingerprint = plan.dev_rows, plan.total_steps, plan.fingerprint
            say(f"data: {stats.summary()}; {plan.summary()}; {len(dev_rows)} dev rows")
        else:
            examples = D.load_examples(_as_list(data), tokenizer, template, cutoff_len,
                                       train_on_inputs=train_on_inputs, text_field=text_field, stats=stats,
                                       split_long=split_long)
            if dev_data:
                train_ex = examples
                dev_ex = D.load_examples(_as_list(dev_data), tokenizer, template, cutoff_len,
                                         train_on_inputs=train_on_inputs, text_field=text_field,
                                         split_long=split_long)
            else:
                train_ex, dev_ex = D.split_dev(examples, dev_fraction, seed)
            train_rows = D.pack(D.shuffled(train_ex, seed), block_size) if packing else train_ex
            dev_rows = D.pack(dev_ex, block_size) if packing else dev_ex
            say(f"data: {stats.summary()}; {len(train_ex)} train / {len(dev_ex)} dev examples"
                + (f" packed into {len(train_rows)} blocks of <= {block_size} tokens" if packing else ""))
            steps_per_epoch = len(train_rows) // global_batch
            if steps_per_epoch == 0:
                raise D.DataError(f"{len(train_rows)} training rows are fewer than one global batch of {global_batch} "
                                  f"(micro_batch_size x gradient_accumulation_steps x data-parallel size); "
                                  f"use more data or a smaller batch")
            total_steps = int(max_steps) if max_steps else max(1, int(epochs * steps_per_epoch))
            fingerprint = [len(train_rows), sum(map(len, train_rows)), len(dev_rows)]

        # ---- model ----
        torch.manual_seed(seed)  # identical init (LoRA factors) on every rank, so replicas agree
        if method == "qlora":  # NF4 base on each rank's local shard, then LoRA as below
            model, base_params, nf4_report = load_qlora_model(ckpt_dir, tokenizer, seq_len, dev, dtype)
            say(Q.nf4_summary(nf4_report))
        else:
            model, base_params = load_model(ckpt_dir, tokenizer, seq_len, dev, dtype, method, fsdp=fsdp)
        if method in ("lora", "qlora"):
            from kollama import lora as L

            model = L.apply_lora(model, targets=tuple(_as_list(lora_targets)), r=lora_r, alpha=lora_alpha,
                                 dropout=lora_dropout, use_rslora=use_rslora)
        trainable_info = P.set_trainable(model, trainable, new_rows_from, ckpt_dir)  # before the optimizer sees them
        named = trainable_named_parameters(model)
        if method in ("lora", "qlora"):
            say(L.trainable_parameters_report(model))
        if activation_checkpointing:
            from torch.utils.checkpoint import checkpoint

            for layer in model.layers:  # per-instance forward: parameter names (the state_dict) stay Meta's
                layer.forward = (lambda f: lambda *a, **k: checkpoint(f, *a, use_reentrant=False, **k))(layer.forward)
        # no_weight_decay: row-masked embeddings (kollama/pretrain.py), whose frozen rows decay would move
        decay = [p for n, p in named if p.ndim >= 2 and not getattr(p, "no_weight_decay", False)]
        no_decay = [p for n, p in named if p.ndim < 2 or getattr(p, "no_weight_decay", False)]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=lr,
                                      foreach=dev.type == "cuda", fused=False)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, plan.lr_lambda(lr, warmup_steps, min_lr_ratio)
                                                      if plan else lr_lambda(warmup_steps, total_steps, min_lr_ratio))
        config = {k: v for k, v in locals().items() if k in TRAIN_ARGS}
        config.update(data=_as_list(data), dev_data=_as_list(dev_data), lora_targets=_as_list(lora_targets),
                      total_steps=total_steps, global_batch=global_batch, world_size=dp_size * model_parallel_size)
        config.update(trainable_info, curriculum=str(curriculum) if curriculum else None,
                      stages=plan.describe() if plan else None)
        if method == "qlora":
            config["nf4"] = nf4_report  # bits per base parameter etc.; not in MUST_MATCH (derived from the base)

        # ---- resume or start ----
        ckpt_root = out / "checkpoints"
        step = 0
        if resume:
            path = latest_checkpoint(ckpt_root) if resume is True else Path(resume)
            if path is None:
                raise FileNotFoundError(f"--resume: no checkpoint in {ckpt_root}; run without --resume to start")
            P.check_resume(path, config)  # the trainable set and row mask, which MUST_MATCH does not cover
            step = load_trainer_state(path, model, named, optimizer, scheduler, config, fingerprint, rank, mp_rank,
                                      dp_rank, fsdp)
            say(f"resumed from {path} at step {step}")
        else:
            torch.manual_seed(seed + 1 + dp_rank)  # dropout: same on model-parallel peers, new per data shard
            random.seed(seed + 1 + dp_rank)
        if is_main:
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / "config.json", config)
            truncate_metrics(out / "metrics.jsonl", step)
        if method == "qlora" and step == 0:
            log_metrics(out, is_main, {"step": 0, "event": "nf4", **{k: nf4_report[k] for k in NF4_METRICS}})

        # ---- loop ----
        def rows_of(step_: int) -> List[D.Example]:
            if plan is not None:
                return plan.rows_of(step_, dp_rank, rows_per_rank)
            epoch, k = divmod(step_, steps_per_epoch)
            order = D.shuffled(range(len(train_rows)), seed + epoch)
            glob = order[k * global_batch:(k + 1) * global_batch]
            return [train_rows[i] for i in glob[dp_rank * rows_per_rank:(dp_rank + 1) * rows_per_rank]]

        autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev.type == "cuda" else \
            contextlib.nullcontext

        def forward_loss(rows, denominator):
            batch = D.collate(rows)
            mask = batch["mask"].to(dev) if batch["mask"] is not None else None
            with autocast():
                logits = model(batch["tokens"].to(dev), 0, use_cache=False, mask=mask)
            return token_loss(logits, batch["labels"].to(dev), denominator)

        def dev_loss() -> Optional[float]:
            if not dev_rows:
                return None
            model.eval()
            mine = dev_rows[dp_rank::dp_size]
            sums = torch.zeros(2, dtype=torch.float64, device=dev)
            # Under FSDP every forward is collective (it gathers the weights), so every rank runs as many as
            # rank 0, which has the most rows; a rank out of rows scores one row and throws the result away.
            n_chunks = math.ceil(len(dev_rows[0::dp_size]) / micro_batch_size) if fsdp else \
                math.ceil(len(mine) / micro_batch_size)
            with torch.no_grad():
                for i in range(0, n_chunks * micro_batch_size, micro_batch_size):
                    chunk = mine[i:i + micro_batch_size]
                    if not chunk:
                        forward_loss(dev_rows[:1], 1)
                        continue
                    sums[0] += forward_loss(chunk, 1).double()
                    sums[1] += D.count_targets(chunk)
            model.train()
            sums = all_reduce(sums, dp_group)
            return (sums[0] / sums[1]).item()

        heldout_docs = P.read_heldout(heldout_text, heldout_limit) if heldout_text else None

        def heldout(step_: int) -> dict:
            """Held-out bits/char (comparable across tokenizers); every rank scores all docs (model parallel)."""
            if not heldout_docs:
                return {}
            history["heldout_bpc"].append((step_, P.heldout_bits_per_char(model, tokenizer, heldout_docs, seq_len,
                                                                          micro_batch_size, autocast)))
            return {"heldout_bpc": history["heldout_bpc"][-1][1]}

        bar = _progress(total_steps, step, progress and is_main)
        history = {"dev_loss": [], "loss": [], "heldout_bpc": []}
        if step == 0 and eval_every:
            history["dev_loss"].append((0, dev_loss()))
            log_metrics(out, is_main, {"step": 0, "dev_loss": history["dev_loss"][-1][1], **heldout(0)})
            say(f"step 0: dev loss {history['dev_loss'][-1][1]}")
        model.train()
        params = [p for _, p in named]
        sharded_flags = [is_model_parallel_sharded(model, n, p) for n, p in named]
        while step < total_steps:
            t0 = time.perf_counter()
            if plan is not None and step == plan.stage_at(step).start:  # start of a curriculum stage
                st = plan.stage_at(step)
                log_metrics(out, is_main, {"step": step + 1, "event": "stage", "stage": st.name,
                                            "stage_index": st.index, "stage_steps": st.steps})
                say(f"stage {st.name!r}: steps {st.start + 1}-{st.end}")
            rows = rows_of(step)
            counts = torch.tensor([D.count_targets(rows), sum(map(len, rows))], dtype=torch.float64, device=dev)
            n_targets, n_tokens = all_reduce(counts, dp_group).tolist()
            loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
            for i in range(0, len(rows), micro_batch_size):
                loss = forward_loss(rows[i:i + micro_batch_size], max(1, int(n_targets)))
                loss.backward()
                loss_sum += loss.detach().double()
            for p in params:
                if p.grad is None:  # unused this step: zeros keep the collectives aligned across ranks
                    p.grad = torch.zeros_like(p)
            if not fsdp:  # FSDP has already reduce-scattered (summed) them during backward
                all_reduce_grads(params, dp_group)
            loss_value = all_reduce(loss_sum, dp_group).item()
            grad_norm = clip_grad_norm(params, sharded_flags, max_grad_norm,
                                       data_sharded_group=dp_group if fsdp else None).item()
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                last = latest_checkpoint(ckpt_root)
                log_metrics(out, is_main, {"step": step + 1, "event": "diverged", "loss": loss_value,
                                            "grad_norm": grad_norm})
                raise TrainingDiverged(
                    f"step {step + 1}: loss is {loss_value}, gradient norm {grad_norm}; training stopped before "
                    f"the update. The last good checkpoint is {last or 'none (none was saved yet)'}; lower --lr, "
                    f"raise --warmup_steps or --max_grad_norm's strictness, check the data, then --resume")
            current_lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.perf_counter() - t0
            history["loss"].append((step, loss_value))
            if log_every and step % log_every == 0:
                log_metrics(out, is_main, {"step": step, "loss": loss_value, "lr": current_lr,
                                            "grad_norm": grad_norm, "tokens_per_s": n_tokens / elapsed,
                                            "memory_mb": _memory_mb(dev),
                                            **({"stage": plan.stage_at(step - 1).name} if plan else {})})
            if eval_every and (step % eval_every == 0 or step == total_steps or (plan and plan.is_stage_end(step))):
                history["dev_loss"].append((step, dev_loss()))
                log_metrics(out, is_main, {"step": step, "dev_loss": history["dev_loss"][-1][1], **heldout(step)})
                say(f"step {step}: dev loss {history['dev_loss'][-1][1]}")
            bar.update(1, loss_value)
            if (save_every and step % save_every == 0) or step == stop_at_step:
                save_trainer_state(ckpt_root, step, model, named, optimizer, scheduler, config, fingerprint,
                                   rank, mp_rank, dp_rank, save_total_limit, fsdp)
            if step == stop_at_step:
                break
        bar.close()

        # ---- outputs ----
        outputs = {}
        if step == total_steps:
            outputs = write_outputs(out, method, merge, model, base_params, ckpt_dir, tokenizer_path, config,
                                     dp_rank, fsdp)
        summary = {"step": step, "total_steps": total_steps, "loss": history["loss"],
                   "dev_loss": history["dev_loss"], "outputs": outputs, "skipped_rows": len(stats.skipped),
                   "truncated": stats.truncated, "heldout_bpc": history["heldout_bpc"],
                   "stages": plan.describe() if plan else None}
        return summary
    finally:
        if started_group:
            destroy_model_parallel()
            dist.destroy_process_group()


TRAIN_ARGS = set(train.__code__.co_varnames[:train.__code__.co_argcount]) - {"progress"}


class _progress:
    """tqdm when installed and wanted, else a plain line every 10 %."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.total, self.n, self.enabled, self.bar = total, initial, enabled, None
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, n: int, loss: float) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(loss=f"{loss:.4f}")
        elif self.enabled and (self.n == self.total or self.n % max(1, self.total // 10) == 0):
            print(f"step {self.n}/{self.total} loss {loss:.4f}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@functools.wraps(train)
def cli(*args, **kwargs) -> None:
    """``train`` for the command line: one summary line from rank 0 instead of fire printing the dict per rank."""
    s = train(*args, **kwargs)
    if int(os.environ.get("RANK", "0")) == 0:
        last = s["loss"][-1][1] if s["loss"] else None
        dev = s["dev_loss"][-1][1] if s["dev_loss"] else None
        print(f"done: step {s['step']}/{s['total_steps']}, loss {last}, dev loss {dev}, outputs {s['outputs']}")


def main():
    import fire

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    fire.Fire(cli)


if __name__ == "__main__":
    main()
