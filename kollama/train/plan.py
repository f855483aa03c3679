"""Which rows each optimizer step trains on, for a run without curriculum: epochs over one shuffled row list.

The order is a pure function of (seed, step), so the checkpoint's step *is* the data position and ``--resume``
reproduces an uninterrupted run. A curriculum run uses ``kollama.train.stages.CurriculumPlan``, which has the same
members (rows_of, lr_lambda, stage_at, is_stage_end, fingerprint, describe)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from kollama.data import rows as D
from kollama.train.optim import lr_lambda


@dataclass
class EpochPlan:
    train_rows: List[D.Example]
    dev_rows: List[D.Example]
    global_batch: int
    seed: int
    total_steps: int
    examples: Tuple[int, int] = (0, 0)  # train / dev examples before packing, for the summary line
    block_size: Optional[int] = None  # when packed

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_rows) // self.global_batch

    def rows_of(self, step: int, dp_rank: int, rows_per_rank: int) -> List[D.Example]:
        """This data-parallel rank's rows of global step ``step`` + 1: epoch e is the rows shuffled by seed + e."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = D.shuffled(range(len(self.train_rows)), self.seed + epoch)
        glob = order[k * self.global_batch:(k + 1) * self.global_batch]
        return [self.train_rows[i] for i in glob[dp_rank * rows_per_rank:(dp_rank + 1) * rows_per_rank]]

    def lr_lambda(self, base_lr: float, warmup_steps: int, min_lr_ratio: float):
        return lr_lambda(warmup_steps, self.total_steps, min_lr_ratio)

    def stage_at(self, step: int) -> None:
        return None  # one implicit stage

    def is_stage_end(self, step: int) -> bool:
        return False

    def describe(self) -> Optional[list]:
        return None

    def summary(self) -> str:
        packed = f" packed into {len(self.train_rows)} blocks of <= {self.block_size} tokens" if self.block_size \
            else ""
        return f"{self.examples[0]} train / {self.examples[1]} dev examples{packed}"

    @property
    def fingerprint(self) -> list:
        """What a resume must find unchanged: rows, tokens and dev rows (the total steps may change)."""
        return [len(self.train_rows), sum(map(len, self.train_rows)), len(self.dev_rows)]


def build_epoch_plan(tokenizer, data, dev_data, *, template: str, text_field: str, encoding: str, cutoff_len: int,
                     packing: bool, block_size: int, train_on_inputs: bool, split_long: bool, global_batch: int,
                     seed: int, dev_fraction: float, epochs: float, max_steps: Optional[int],
                     stats: D.DataStats) -> EpochPlan:
    """Read ``data`` (and ``dev_data``, or split ``dev_fraction`` off), pack if asked, and size the run."""
    def load(paths, stats_=None):
        return D.load_examples(paths, tokenizer, template, cutoff_len, train_on_inputs=train_on_inputs,
                               text_field=text_field, stats=stats_, split_long=split_long, encoding=encoding)

    examples = load(data, stats)
    if dev_data:
        train_ex, dev_ex = examples, load(dev_data)
    else:
        train_ex, dev_ex = D.split_dev(examples, dev_fraction, seed)
    train_rows = D.pack(D.shuffled(train_ex, seed), block_size) if packing else train_ex
    dev_rows = D.pack(dev_ex, block_size) if packing else dev_ex
    steps_per_epoch = len(train_rows) // global_batch
    if steps_per_epoch == 0:
        raise D.DataError(f"{len(train_rows)} training rows are fewer than one global batch of {global_batch} "
                          f"(micro_batch_size x gradient_accumulation_steps x data-parallel size); "
                          f"use more data or a smaller batch")
    total = int(max_steps) if max_steps else max(1, int(epochs * steps_per_epoch))
    return EpochPlan(train_rows, dev_rows, global_batch, seed, total, (len(train_ex), len(dev_ex)),
                     block_size if packing else None)
