"""The training recipe: setup → data → model → optimizer → resume or start → loop (step, log, evaluate, save) →
finish (outputs, summary). One ``TrainRecipe`` method per phase; ``train(**options)`` runs them in order.

One optimizer step consumes ``micro_batch_size * gradient_accumulation_steps * data_parallel_size`` rows (examples,
or packed blocks with ``--packing``). The loss is the mean over every target token of that global batch
(kollama/train/optim.py), so N processes give the same update as one process with the same global batch. Gradients
are summed over the data-parallel group by an explicit bucketed all-reduce (not DDP): it composes with model
parallelism and LoRA's frozen base without wrapping the model. Under ``--fsdp`` (kollama/train/fsdp.py) FSDP2 shards
weights, gradients and AdamW state over the data-parallel group instead.

The run folder (kollama/train/run_folder.py): ``config.json``, ``metrics.jsonl``, ``checkpoints/step-NNNNNN/``
(trainable weights per model-parallel rank, optimizer, every rank's RNG, a manifest of checksums; written to a
temporary folder and renamed), ``summary.json``, and at the end ``adapter/`` (LoRA), ``model/`` (full fine-tuning,
Meta layout) or ``merged/`` (LoRA merged into the base, with ``--merge``). The data order is a function of (seed,
step), so the checkpoint's step *is* the data position and ``--resume`` reproduces an uninterrupted run bit for bit
on CPU.

``--method qlora``: LoRA over an NF4 base (kollama/adapters/qlora.py): every transformer-block linear of this rank's
shard is quantized after loading; quantization is deterministic, so checkpoints hold only the adapter and optimizer.
``--merge`` then writes dequant(NF4(W)) + B A, the weight the adapter was trained against.

Divergence: a non-finite loss or gradient norm, or a loss above ``--divergence_factor`` x the mean of the previous
``--divergence_window`` losses of the stage, stops the run before the update. The checkpoint holding the weights
that produced that loss (if one was saved at the previous step) is moved aside to ``diverged-step-NNNNNN``, so
``--resume`` (with a lower ``--lr``) continues from the last good one.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from collections import deque
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist

from kollama.adapters.fingerprint import FingerprintMismatch, base_record, check_same_base
from kollama.data import rows as D
from kollama.train import optim
from kollama.train import pretrain as P
from kollama.train.checkpointing import (STATE, TrainingDiverged, config_hash, files_to_read, find_resumable,
                                         load_trainer_state, quarantine_checkpoint, save_trainer_state, write_outputs)
from kollama.train.config import ConfigError, TrainConfig, resume_differences
from kollama.train.distributed import all_reduce, all_reduce_grads, clip_grad_norm, is_model_parallel_sharded, local
from kollama.train.loading import NF4_METRICS, load_model, load_qlora_model, trainable_named_parameters
from kollama.train.plan import build_epoch_plan
from kollama.train.progress import Progress
from kollama.train.run_folder import RunLog, prepare_out_dir
from kollama.train.stages import build_plan
from llama.device import select_device
from llama.parallel import (destroy_model_parallel, get_data_parallel_group, get_data_parallel_rank,
                            get_data_parallel_world_size, get_model_parallel_group, get_model_parallel_rank,
                            init_distributed, initialize_model_parallel)

log = logging.getLogger("kollama.train")
REQUESTED = ("method", "template", "packing", "merge", "trainable", "new_rows_from")  # config.json: resolved values


def train(data=None, ckpt_dir=None, tokenizer_path=None, out_dir=None, *, config: Optional[str] = None,
          **options) -> dict:
    """Train and return a summary dict (steps, losses, dev losses, output paths). ``config``: a YAML/JSON file of
    options; keyword options override it. Every option is a ``TrainConfig`` field (``--help`` lists them)."""
    given = {k: v for k, v in dict(data=data, ckpt_dir=ckpt_dir, tokenizer_path=tokenizer_path,
                                   out_dir=out_dir).items() if v is not None}
    return TrainRecipe(TrainConfig.load(config, **given, **options)).run()


class TrainRecipe:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def run(self) -> dict:
        self.setup_runtime()
        try:
            self.prepare_run_folder()
            self.load_data()
            self.load_model()
            self.setup_optimizer()
            self.resume_or_start()
            self.train_loop()
            return self.finish()
        finally:
            if self.started_group:
                destroy_model_parallel()
                dist.destroy_process_group()

    # ------------------------------------------------------------------------------------------------ setup
    def setup_runtime(self) -> None:
        cfg = self.cfg
        self.device = select_device(cfg.device or None)
        self.started_group = not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        init_distributed("nccl" if self.device.type == "cuda" else "gloo")
        initialize_model_parallel(cfg.model_parallel_size)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.dp_rank, self.dp_size = get_data_parallel_rank(), get_data_parallel_world_size()
        self.dp_group, self.mp_rank = get_data_parallel_group(), get_model_parallel_rank()
        self.is_main = self.rank == 0
        if cfg.fsdp:
            from kollama.train.fsdp import check_supported

            check_supported(cfg.method, cfg.trainable, self.dp_size, cfg.model_parallel_size)
        self.method, self.merge = P.resolve(cfg.trainable, cfg.method, cfg.merge)
        self.rows_per_rank = cfg.micro_batch_size * cfg.gradient_accumulation_steps
        self.global_batch = self.rows_per_rank * self.dp_size
        self.block_size = cfg.block_size or cfg.cutoff_len
        # pretrain = plain text, packed, long documents split into blocks instead of truncated
        self.template, self.packing = ("text", True) if cfg.task == "pretrain" else (cfg.template, cfg.packing)
        self.cutoff_len = min(cfg.cutoff_len, self.block_size) if self.packing else cfg.cutoff_len
        self.seq_len = self.block_size if self.packing else self.cutoff_len
        self.out = Path(cfg.out_dir)
        self.progress = Progress(0, 0, False)  # replaced by the loop's bar; say() writes through it

    def say(self, message: str) -> None:
        if self.is_main:
            self.progress.write(message)

    def prepare_run_folder(self) -> None:
        """Refuse to start over a previous run unless --resume or --overwrite (which moves it aside); on --resume,
        refuse a changed fixed option now, before minutes of loading (the checkpoint is checked again later)."""
        moved = prepare_out_dir(self.out, bool(self.cfg.resume), self.cfg.overwrite, self.is_main)
        if moved:
            self.say(f"--overwrite: moved the previous run in {self.out} to {moved}")
        self.runlog = RunLog(self.out, self.is_main)
        saved_file = self.out / "config.json"
        if self.cfg.resume and saved_file.is_file():
            saved = json.loads(saved_file.read_text())
            # config.json holds resolved values for these (e.g. template "text" for pretraining); compare what
            # was asked for (recorded since this version) instead
            options = {**{k: v for k, v in saved.items() if k not in REQUESTED}, **saved.get("requested", {})}
            fixed, _ = resume_differences(options, self.cfg.to_dict())
            if fixed:
                raise ConfigError(f"cannot resume the run in {self.out}: these settings differ from its "
                                  f"config.json (saved, now): {fixed}; rerun with the saved values or start a new "
                                  f"--out_dir")

    def load_data(self) -> None:
        """Every rank reads all the data: the order is a pure function of seed and step."""
        from llama.tokenizer import Tokenizer

        cfg = self.cfg
        self.tokenizer = Tokenizer(cfg.tokenizer_path)
        stats = D.DataStats()
        common = dict(template=self.template, text_field=cfg.text_field, encoding=cfg.encoding,
                      cutoff_len=self.cutoff_len, packing=self.packing, block_size=self.block_size,
                      train_on_inputs=cfg.train_on_inputs, split_long=cfg.task == "pretrain",
                      global_batch=self.global_batch, seed=cfg.seed, dev_fraction=cfg.dev_fraction, stats=stats)
        if cfg.curriculum:  # the stages decide rows, steps and the lr factor of every step
            stage_source = cfg.data[0] if cfg.curriculum is True else cfg.curriculum
            self.plan = build_plan(stage_source, self.tokenizer, dev_data=cfg.dev_data or [], **common)
        else:
            self.plan = build_epoch_plan(self.tokenizer, cfg.data, cfg.dev_data, epochs=cfg.epochs,
                                         max_steps=cfg.max_steps, **common)
        self.stats, self.total_steps = stats, self.plan.total_steps
        self.say(f"data: {stats.summary()}; {self.plan.summary()}")
        if cfg.warmup_steps >= self.total_steps:
            log.warning("--warmup_steps %d >= the run's %d steps: the learning rate never reaches --lr",
                        cfg.warmup_steps, self.total_steps)
        self.heldout_docs = P.read_heldout(cfg.heldout_text, cfg.heldout_limit) if cfg.heldout_text else None

    def load_model(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # identical init (LoRA factors) on every rank, so replicas agree
        self.nf4_report = None
        if self.method == "qlora":  # NF4 base on each rank's local shard, then LoRA as below
            from kollama.adapters import qlora as Q

            model, self.base_params, self.nf4_report = load_qlora_model(cfg.ckpt_dir, self.tokenizer, self.seq_len,
                                                                        self.device, cfg.dtype)
            self.say(Q.nf4_summary(self.nf4_report))
        else:
            model, self.base_params = load_model(cfg.ckpt_dir, self.tokenizer, self.seq_len, self.device, cfg.dtype,
                                                 self.method, fsdp=cfg.fsdp)
        if self.method in ("lora", "qlora"):
            from kollama.adapters import lora as L

            model = L.apply_lora(model, targets=tuple(cfg.lora_targets), r=cfg.lora_r, alpha=cfg.lora_alpha,
                                 dropout=cfg.lora_dropout, use_rslora=cfg.use_rslora)
        self.trainable_info = P.set_trainable(model, cfg.trainable, cfg.new_rows_from, cfg.ckpt_dir)
        self.named = trainable_named_parameters(model)
        if self.method in ("lora", "qlora"):
            self.say(L.trainable_parameters_report(model))
        if cfg.activation_checkpointing:
            from torch.utils.checkpoint import checkpoint

            for layer in model.layers:  # per-instance forward: parameter names (the state_dict) stay Meta's
                layer.forward = (lambda f: lambda *a, **k: checkpoint(f, *a, use_reentrant=False, **k))(layer.forward)
        self.model = model
        self.params = [p for _, p in self.named]
        self.sharded_flags = [is_model_parallel_sharded(model, n, p) for n, p in self.named]
        # What the checkpoints and adapter record about the base, checked on --resume.
        self.base_record = base_record(cfg.ckpt_dir, cfg.tokenizer_path)
        self.base = {k: self.base_record[k] for k in ("base", "tokenizer_sha256")}

    def setup_optimizer(self) -> None:
        cfg = self.cfg
        self.optimizer = optim.build_optimizer(self.named, cfg.lr, cfg.weight_decay, self.device)
        self.lr_factor = self.plan.lr_lambda(cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        self.run_config = {**cfg.to_dict(), **self.trainable_info, "method": self.method, "merge": self.merge,
                           "template": self.template, "packing": self.packing, "total_steps": self.total_steps,
                           "global_batch": self.global_batch,
                           "world_size": self.dp_size * cfg.model_parallel_size,
                           "stages": self.plan.describe(), **self.base,
                           "requested": {k: getattr(cfg, k) for k in REQUESTED}}
        if self.nf4_report is not None:
            self.run_config["nf4"] = self.nf4_report  # bits per base parameter etc. (derived from the base)

    def resume_or_start(self) -> None:
        cfg = self.cfg
        self.step, self.resumed_from = 0, None
        self.totals = {"train_tokens": 0, "target_tokens": 0, "train_time_s": 0.0}
        ckpt_root = self.out / "checkpoints"
        if cfg.resume:
            path = self._checkpoint_to_resume(ckpt_root)
            if (path / STATE).is_file():  # check the settings before loading tensors whose shapes they decide
                self._check_resume(path, json.loads((path / STATE).read_text()))
            state = load_trainer_state(path, self.model, self.named, self.optimizer, self.rank, self.mp_rank,
                                       self.dp_rank, cfg.fsdp)
            self.step, self.resumed_from = int(state["step"]), path
            self.totals.update(state.get("totals", {}))
            notice = self.runlog.repair_metrics(self.step)
            if notice:
                self.say(notice)
            self.say(f"resumed from {path} at step {self.step}")
        else:
            torch.manual_seed(cfg.seed + 1 + self.dp_rank)  # dropout: same on model-parallel peers, new per shard
            random.seed(cfg.seed + 1 + self.dp_rank)
        self.runlog.write_json("config.json", self.run_config)
        if self.nf4_report is not None and self.step == 0:
            self.runlog.append_metrics({"step": 0, "event": "nf4", **{k: self.nf4_report[k] for k in NF4_METRICS}})

    def _checkpoint_to_resume(self, ckpt_root: Path) -> Path:
        if self.cfg.resume is not True:
            path = Path(self.cfg.resume)
            if not path.is_dir():
                raise ConfigError(f"--resume {path}: no such checkpoint folder; pass --resume alone for the newest "
                                  f"intact checkpoint in {ckpt_root}, or an existing checkpoints/step-NNNNNN folder")
            return path
        path, damaged = find_resumable(ckpt_root, self.files_to_read())
        for bad, why in damaged:
            self.say(f"--resume: skipping damaged checkpoint {bad} ({why}); it is left on disk")
        if path is None:
            raise FileNotFoundError(f"--resume: no intact checkpoint in {ckpt_root}; run without --resume to start "
                                    f"(with --overwrite if {self.out} holds files)")
        return path

    def files_to_read(self) -> List[str]:
        return files_to_read(self.rank, self.mp_rank, self.dp_rank, self.cfg.fsdp)

    def _check_resume(self, path: Path, state: dict) -> None:
        """Fixed settings and the data must be unchanged; the base and tokenizer too unless allowed."""
        saved = state.get("config", {})
        fixed, changed = resume_differences(saved, self.run_config)
        if fixed:
            raise ConfigError(f"cannot resume from {path}: these settings differ from the checkpoint's (saved, now): "
                              f"{fixed}; rerun with the saved values or start a new --out_dir")
        if list(state.get("fingerprint", self.plan.fingerprint)) != list(_plain(self.plan.fingerprint)):
            raise ConfigError(f"cannot resume from {path}: the training data differ (rows, tokens, dev rows "
                              f"{state['fingerprint']} saved vs {self.plan.fingerprint} now); resume with the same "
                              f"--data")
        try:
            check_same_base(state, self.base_record, f"checkpoint {path}", "--allow_base_mismatch")
        except FingerprintMismatch as e:
            if not self.cfg.allow_base_mismatch:
                raise
            log.warning("--allow_base_mismatch: %s", e)
        for key, (before, now) in changed.items():
            self.say(f"resume: --{key} changed from {before!r} to {now!r}")

    # ------------------------------------------------------------------------------------------------ loop
    def train_loop(self) -> None:
        cfg = self.cfg
        self.history = {"dev_loss": [], "loss": [], "heldout_bpc": []}
        self.progress = Progress(self.total_steps, self.step, cfg.progress and self.is_main)
        if self.step == 0 and cfg.eval_every:
            self.evaluate(0)
        self.model.train()
        recent: deque = deque(maxlen=cfg.divergence_window)  # losses of the current stage, for the spike check
        while self.step < self.total_steps:
            stage = self.plan.stage_at(self.step)
            if stage is not None and self.step == stage.start:  # start of a curriculum stage
                recent.clear()
                self.runlog.append_metrics({"step": self.step + 1, "event": "stage", "stage": stage.name,
                                            "stage_index": stage.index, "stage_steps": stage.steps})
                self.say(f"stage {stage.name!r}: steps {stage.start + 1}-{stage.end}")
            t0 = time.perf_counter()
            lr = cfg.lr * self.lr_factor(self.step)
            loss, grad_norm, n_tokens, n_targets = self.forward_backward(self.rows_of(self.step))
            self.check_divergence(loss, grad_norm, recent)
            optim.set_lr(self.optimizer, lr)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            recent.append(loss)
            elapsed = time.perf_counter() - t0
            self.totals["train_tokens"] += n_tokens
            self.totals["target_tokens"] += n_targets
            self.totals["train_time_s"] += elapsed
            self.history["loss"].append((self.step, loss))
            if cfg.log_every and self.step % cfg.log_every == 0:
                self.runlog.append_metrics({"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                                            "tokens_per_s": n_tokens / elapsed, "memory_mb": _memory_mb(self.device),
                                            **({"stage": stage.name} if stage is not None else {})})
            if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == self.total_steps
                                   or self.plan.is_stage_end(self.step)):
                self.evaluate(self.step)
            self.progress.update(1, loss)
            if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == cfg.stop_at_step:
                self.save()
            if self.step == cfg.stop_at_step:
                break
        self.progress.close()

    def rows_of(self, step: int) -> List[D.Example]:
        return self.plan.rows_of(step, self.dp_rank, self.rows_per_rank)

    def forward_backward(self, rows: List[D.Example]):
        """Gradients of the step's mean token loss in every trainable parameter, summed over the data-parallel
        group and clipped; returns (loss, gradient norm before clipping, tokens, target tokens) of the step."""
        cfg = self.cfg
        counts = torch.tensor([D.count_targets(rows), sum(map(len, rows))], dtype=torch.float64, device=self.device)
        n_targets, n_tokens = all_reduce(counts, self.dp_group).tolist()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i in range(0, len(rows), cfg.micro_batch_size):
            loss = self.forward_loss(rows[i:i + cfg.micro_batch_size], max(1, int(n_targets)))
            loss.backward()
            loss_sum += loss.detach().double()
        for p in self.params:
            if p.grad is None:  # unused this step: zeros keep the collectives aligned across ranks
                p.grad = torch.zeros_like(p)
        if not cfg.fsdp:  # FSDP has already reduce-scattered (summed) them during backward
            all_reduce_grads(self.params, self.dp_group)
        loss_value = all_reduce(loss_sum, self.dp_group).item()
        grad_norm = clip_grad_norm(self.params, self.sharded_flags, cfg.max_grad_norm,
                                   data_sharded_group=self.dp_group if cfg.fsdp else None).item()
        return loss_value, grad_norm, int(n_tokens), int(n_targets)

    def forward_loss(self, rows: List[D.Example], denominator: int) -> torch.Tensor:
        batch = D.collate(rows)
        mask = batch["mask"].to(self.device) if batch["mask"] is not None else None
        with self.autocast():
            logits = self.model(batch["tokens"].to(self.device), 0, use_cache=False, mask=mask)
        return optim.token_loss(logits, batch["labels"].to(self.device), denominator)

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def check_divergence(self, loss: float, grad_norm: float, recent: deque) -> None:
        """Stop before the update on a non-finite loss/gradient or a spike; see the module docstring."""
        cfg, step = self.cfg, self.step + 1
        if math.isfinite(loss) and math.isfinite(grad_norm):
            if not (cfg.divergence_factor and len(recent) == recent.maxlen):
                return
            mean = sum(recent) / len(recent)
            if loss <= cfg.divergence_factor * mean:
                return
            why = (f"loss {loss:.4g} is more than --divergence_factor {cfg.divergence_factor:g} x the mean "
                   f"{mean:.4g} of the previous {len(recent)} steps")
        else:
            why = f"loss is {loss}, gradient norm {grad_norm}"
        self.runlog.append_metrics({"step": step, "event": "diverged", "loss": loss, "grad_norm": grad_norm})
        ckpt_root = self.out / "checkpoints"
        moved = quarantine_checkpoint(ckpt_root, self.step)  # collective: every rank learns where it went
        good, _ = find_resumable(ckpt_root, self.files_to_read())
        self.runlog.sync()
        raise TrainingDiverged(
            f"step {step}: {why}; training stopped before the update"
            + (f", and the checkpoint of step {self.step} that produced it was moved to {moved}" if moved else "")
            + f". The last good checkpoint is {good or 'none (none was saved yet)'}. "
            + (f"Continue from it with a lower learning rate: add --resume --lr {cfg.lr / 2:g} to the same command "
               f"(or raise --warmup_steps, check the data)" if good else
               "Start again with a lower --lr (and --overwrite), more --warmup_steps, or check the data"))

    def evaluate(self, step: int) -> None:
        dev = self.dev_loss()
        record = {"step": step, "dev_loss": dev}
        self.history["dev_loss"].append((step, dev))
        if self.heldout_docs:  # bits per character: comparable across tokenizers; every rank scores all docs
            bpc = P.heldout_bits_per_char(self.model, self.tokenizer, self.heldout_docs, self.seq_len,
                                          self.cfg.micro_batch_size, self.autocast)
            self.history["heldout_bpc"].append((step, bpc))
            record["heldout_bpc"] = bpc
        self.runlog.append_metrics(record)
        self.say(f"step {step}: dev loss {dev}")

    def dev_loss(self) -> Optional[float]:
        dev_rows, mbs = self.plan.dev_rows, self.cfg.micro_batch_size
        if not dev_rows:
            return None
        self.model.eval()
        mine = dev_rows[self.dp_rank::self.dp_size]
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        # Under FSDP every forward is collective (it gathers the weights), so every rank runs as many as rank 0,
        # which has the most rows; a rank out of rows scores one row and throws the result away.
        n_chunks = math.ceil(len(dev_rows[0::self.dp_size] if self.cfg.fsdp else mine) / mbs)
        with torch.no_grad():
            for i in range(0, n_chunks * mbs, mbs):
                chunk = mine[i:i + mbs]
                if not chunk:
                    self.forward_loss(dev_rows[:1], 1)
                    continue
                sums[0] += self.forward_loss(chunk, 1).double()
                sums[1] += D.count_targets(chunk)
        self.model.train()
        sums = all_reduce(sums, self.dp_group)
        return (sums[0] / sums[1]).item()

    def save(self) -> None:
        self.runlog.sync()
        save_trainer_state(self.out / "checkpoints", self.step, self.model, self.named, self.optimizer,
                           self.run_config, self.rank, self.mp_rank, self.dp_rank, self.cfg.save_total_limit,
                           self.cfg.fsdp, protect=[self.resumed_from] if self.resumed_from else [],
                           extra_state={"fingerprint": self.plan.fingerprint, "totals": dict(self.totals),
                                        **self.base})

    # ------------------------------------------------------------------------------------------------ finish
    def finish(self) -> dict:
        outputs = {}
        if self.step == self.total_steps:
            outputs = write_outputs(self.out, self.method, self.merge, self.model, self.base_params,
                                    self.cfg.ckpt_dir, self.cfg.tokenizer_path, self.run_config, self.dp_rank,
                                    self.cfg.fsdp)
        summary = {"step": self.step, "total_steps": self.total_steps, "loss": self.history["loss"],
                   "dev_loss": self.history["dev_loss"], "outputs": outputs, "skipped_rows": len(self.stats.skipped),
                   "truncated": self.stats.truncated, "heldout_bpc": self.history["heldout_bpc"],
                   "stages": self.plan.describe()}
        run_summary = self.run_summary(outputs)
        self.runlog.write_json("summary.json", run_summary)
        self.runlog.sync()
        summary["summary"] = run_summary
        return summary

    def run_summary(self, outputs: dict) -> dict:
        """summary.json: what kollama.report's training table shows, over the whole run (resumes included)."""
        records = self.runlog.read_metrics()
        losses = [r["loss"] for r in records if "loss" in r and "event" not in r]
        devs = [(r["step"], r["dev_loss"]) for r in records if r.get("dev_loss") is not None]
        t = self.totals
        best = min(devs, key=lambda x: x[1]) if devs else (None, None)
        return {"finished": self.step == self.total_steps, "step": self.step, "total_steps": self.total_steps,
                "method": self.method, "trainable_params": self.count_trainable(), "train_tokens": t["train_tokens"],
                "target_tokens": t["target_tokens"], "train_wall_time_s": round(t["train_time_s"], 3),
                "tokens_per_s": t["train_tokens"] / t["train_time_s"] if t["train_time_s"] else None,
                "peak_memory_mb": _memory_mb(self.device), "first_loss": losses[0] if losses else None,
                "last_loss": losses[-1] if losses else None, "min_loss": min(losses) if losses else None,
                "last_dev_loss": devs[-1][1] if devs else None, "best_dev_loss": best[1], "best_dev_step": best[0],
                "config_hash": config_hash(self.run_config), "outputs": outputs}

    def count_trainable(self) -> int:
        """Trainable parameters of the whole model (sharded tensors summed over the model-parallel group)."""
        if self.cfg.fsdp:
            return sum(p.numel() for p in self.params)  # a DTensor's numel is the global one
        counts = torch.tensor([0, 0], dtype=torch.float64)
        for p, sharded in zip(self.params, self.sharded_flags):
            counts[0 if sharded else 1] += local(p).numel()
        group = get_model_parallel_group()
        if group is not None:
            sharded = counts[:1].to(self.device)
            dist.all_reduce(sharded, group=group)
            counts[0] = sharded.item()
        return int(counts.sum().item())


def _plain(value):
    return json.loads(json.dumps(value, default=str))


def _memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
