"""Curriculum stages: the stage list (a file, or a list inside the run's config), and the plan that says which rows
every global step trains on and at what learning-rate factor.

Stage list (JSON/YAML): ``{"stages": [...]}`` or a bare list; relative dataset paths are relative to the file that
holds the list (the stage file, or the ``--config`` file for an inline list).

    {"stages": [
      {"name": "en2ko", "datasets": [{"path": "park.jsonl", "template": "alpaca"}], "epochs": 1, "lr": 1e-4},
      {"name": "sft", "datasets": [{"path": "kullm.jsonl", "template": "kullm", "weight": 3},
                                   {"path": "chat.jsonl", "template": "llama2-chat", "weight": 1}], "steps": 200}
    ]}

A dataset has ``path``, optional ``template`` and ``field`` (default: the run's ``--template`` / ``--text_field``) and
optional ``weight`` (default 1). A stage has ``datasets``, ``epochs`` (default 1) or ``steps``, and optional ``lr``,
``warmup_steps``, ``min_lr_ratio`` (default: the run's). Rows are examples, or packed blocks with ``--packing``
(each dataset packed on its own).

Mixing: a stage "epoch" has as many rows as its datasets together (N = sum of their sizes); dataset i fills the share
weight_i / sum(weights) of them (largest-remainder rounding), read from an endless stream of its rows that is
reshuffled every pass (a row comes back only after the whole dataset went by once). The epoch's rows are then
shuffled together, and step k of the epoch takes rows [k*B, (k+1)*B) (B = the global batch). With weights
proportional to the sizes (or one dataset) an epoch is one pass over the data.
Learning rate: each stage runs the trainer's schedule (linear warmup, then cosine to min_lr_ratio) over its own
steps, scaled to its ``lr``. Everything is a pure function of (seed, step): the checkpoint's step is the position,
so ``--resume`` lands in the right stage at the right row, bit-exactly on CPU like the plain trainer.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from kollama.data import rows as D
from kollama.train.optim import lr_lambda
from llama.errors import UserError

STAGE_KEYS = {"name", "datasets", "epochs", "steps", "lr", "warmup_steps", "min_lr_ratio"}
DATASET_KEYS = {"path", "template", "field", "weight"}


class CurriculumError(UserError):
    """A stage list or parallel corpus that cannot be used; the message names the place and the fix."""


# ---------------------------------------------------------------------------------------------------- stage file

@dataclass
class DatasetSpec:
    path: str
    template: Optional[str] = None
    field: Optional[str] = None
    weight: float = 1.0


@dataclass
class StageSpec:
    name: str
    datasets: List[DatasetSpec]
    epochs: Optional[float] = None
    steps: Optional[int] = None
    lr: Optional[float] = None
    warmup_steps: Optional[int] = None
    min_lr_ratio: Optional[float] = None


def _number(where: str, key: str, value, kind=float, positive: bool = True):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise CurriculumError(f"{where}: {key!r} must be a{'n integer' if kind is int else ' number'}, got {value!r}")
    if (value <= 0) if positive else (value < 0):
        raise CurriculumError(f"{where}: {key!r} must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return kind(value)


def _read_stage_file(path: Path):
    if not path.is_file():
        raise CurriculumError(f"stage file {path} not found")
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise CurriculumError(f"{path}: YAML stage files need pyyaml (not installed); write the stages as JSON")
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    else:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise CurriculumError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
    return doc.get("stages") if isinstance(doc, dict) else doc


def read_stages(source) -> List[StageSpec]:
    """Parse and check a stage list; dataset paths come back absolute. ``source`` is a stage file, or
    ``{"stages": [...], "base_dir": folder}`` (a list written inline in a ``--config`` file)."""
    if isinstance(source, dict) and "base_dir" in source:
        raw, path, base = source.get("stages"), "--config curriculum", Path(source["base_dir"])
    else:
        raw, path, base = _read_stage_file(Path(str(source))), Path(str(source)), Path(str(source)).parent
    if not isinstance(raw, list) or not raw:
        raise CurriculumError(f"{path}: expected {{\"stages\": [...]}} or a list of stages, with at least one stage")
    stages, names = [], set()
    for i, st in enumerate(raw):
        where = f"{path}: stage {i + 1}"
        if not isinstance(st, dict):
            raise CurriculumError(f"{where} is a {type(st).__name__}, not an object")
        unknown = set(st) - STAGE_KEYS
        if unknown:
            raise CurriculumError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(STAGE_KEYS)}")
        name = str(st.get("name", f"stage{i + 1}"))
        if name in names:
            raise CurriculumError(f"{where}: the name {name!r} is used twice; stage names must be unique")
        names.add(name)
        where = f"{path}: stage {name!r}"
        if "epochs" in st and "steps" in st:
            raise CurriculumError(f"{where}: give 'epochs' or 'steps', not both")
        ds = st.get("datasets")
        if not isinstance(ds, list) or not ds:
            raise CurriculumError(f"{where}: 'datasets' must be a non-empty list of {{path, template, field, weight}}")
        specs = []
        for d in ds:
            d = {"path": d} if isinstance(d, str) else d
            if not isinstance(d, dict) or "path" not in d:
                raise CurriculumError(f"{where}: each dataset needs a 'path'")
            if set(d) - DATASET_KEYS:
                raise CurriculumError(f"{where}: unknown dataset keys {sorted(set(d) - DATASET_KEYS)}; "
                                      f"allowed: {sorted(DATASET_KEYS)}")
            p = Path(str(d["path"]))
            p = p if p.is_absolute() else base / p
            if not p.is_file():
                raise CurriculumError(f"{where}: data file {p} not found")
            template = d.get("template")
            if template is not None and template not in D.TEMPLATES:
                raise CurriculumError(f"{where}: unknown template {template!r}; use one of {', '.join(D.TEMPLATES)}")
            specs.append(DatasetSpec(str(p), template, d.get("field"),
                                     _number(where, "weight", d.get("weight", 1.0))))
        stages.append(StageSpec(
            name, specs,
            epochs=_number(where, "epochs", st["epochs"]) if "epochs" in st else None,
            steps=_number(where, "steps", st["steps"], int) if "steps" in st else None,
            lr=_number(where, "lr", st["lr"]) if "lr" in st else None,
            warmup_steps=_number(where, "warmup_steps", st["warmup_steps"], int, False)
            if "warmup_steps" in st else None,
            min_lr_ratio=_number(where, "min_lr_ratio", st["min_lr_ratio"], float, False)
            if "min_lr_ratio" in st else None))
    return stages


# ---------------------------------------------------------------------------------------------------- the plan

def _seed(*parts) -> int:
    """A stable integer seed from parts (Python's hash() of str is salted per process, so it cannot be used)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def shares(n: int, weights: Sequence[float]) -> List[int]:
    """``n`` split in proportion to ``weights`` by largest remainder (ties: the earlier dataset); sums to n."""
    total = float(sum(weights))
    exact = [n * w / total for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))[: n - sum(counts)]:
        counts[i] += 1
    return counts


@dataclass
class Stage:
    name: str
    index: int
    start: int  # global step before this stage's first step
    steps: int
    steps_per_epoch: int
    sources: List[List[D.Example]]  # rows of each dataset
    counts: List[int]  # rows each dataset gives per stage epoch
    lr: Optional[float]
    warmup_steps: Optional[int]
    min_lr_ratio: Optional[float]
    datasets: List[dict] = field(default_factory=list)

    @property
    def end(self) -> int:
        return self.start + self.steps


class CurriculumPlan:
    """Which rows every global step uses, the per-stage learning-rate factor, and what a resume must match."""

    def __init__(self, stages: List[Stage], dev_rows: List[D.Example], global_batch: int, seed: int):
        self.stages, self.dev_rows, self.global_batch, self.seed = stages, dev_rows, global_batch, seed
        self.total_steps = stages[-1].end
        self._pool: Dict[Tuple[int, int], list] = {}

    def stage_at(self, step: int) -> Stage:
        """The stage that runs global step ``step`` + 1 (steps past the end count as the last stage)."""
        for st in self.stages:
            if step < st.end:
                return st
        return self.stages[-1]

    def is_stage_end(self, step: int) -> bool:
        return any(step == st.end for st in self.stages)

    def _epoch_pool(self, st: Stage, epoch: int) -> list:
        key = (st.index, epoch)
        if key not in self._pool:
            pool = []
            for i, (rows, n) in enumerate(zip(st.sources, st.counts)):
                perms: Dict[int, list] = {}
                for p in range(epoch * n, (epoch + 1) * n):
                    cycle, j = divmod(p, len(rows))
                    if cycle not in perms:
                        perms[cycle] = D.shuffled(range(len(rows)), _seed(self.seed, st.index, i, cycle))
                    pool.append((i, perms[cycle][j]))
            self._pool = {key: D.shuffled(pool, _seed(self.seed, st.index, "epoch", epoch))}  # keep one epoch
        return self._pool[key]

    def rows_of(self, step: int, dp_rank: int, rows_per_rank: int) -> List[D.Example]:
        """This data-parallel rank's rows of global step ``step`` + 1."""
        st = self.stage_at(step)
        epoch, k = divmod(step - st.start, st.steps_per_epoch)
        glob = self._epoch_pool(st, epoch)[k * self.global_batch:(k + 1) * self.global_batch]
        mine = glob[dp_rank * rows_per_rank:(dp_rank + 1) * rows_per_rank]
        return [st.sources[i][j] for i, j in mine]

    def lr_lambda(self, base_lr: float, warmup_steps: int, min_lr_ratio: float):
        """The factor of --lr at a global step: the trainer's warmup + cosine over each stage, times stage lr / --lr."""
        per_stage = [lr_lambda(st.warmup_steps if st.warmup_steps is not None else warmup_steps, st.steps,
                               st.min_lr_ratio if st.min_lr_ratio is not None else min_lr_ratio)
                     for st in self.stages]

        def f(step: int) -> float:
            st = self.stage_at(step)
            scale = (st.lr / base_lr) if st.lr is not None else 1.0
            return scale * per_stage[st.index](step - st.start)
        return f

    def describe(self) -> List[dict]:
        """The stages as config.json records them."""
        return [{"name": st.name, "start": st.start, "steps": st.steps, "steps_per_epoch": st.steps_per_epoch,
                 "lr": st.lr, "warmup_steps": st.warmup_steps, "min_lr_ratio": st.min_lr_ratio,
                 "datasets": st.datasets} for st in self.stages]

    @property
    def fingerprint(self) -> list:
        """What a resume must find unchanged (JSON-plain: it is compared after a round trip through JSON)."""
        return [[st.name, st.steps, st.counts, [len(r) for r in st.sources], [sum(map(len, r)) for r in st.sources],
                 st.lr, st.warmup_steps, st.min_lr_ratio] for st in self.stages] + [len(self.dev_rows)]

    def summary(self) -> str:
        stages = "; ".join(f"stage {st.name}: steps {st.start + 1}-{st.end} ({st.steps_per_epoch} per epoch, rows "
                           f"per epoch {'+'.join(map(str, st.counts))})" for st in self.stages)
        return f"{stages}; {len(self.dev_rows)} dev rows"


def build_plan(stage_file, tokenizer, *, template: str, text_field: str, cutoff_len: int, packing: bool,
               block_size: int, train_on_inputs: bool, split_long: bool, global_batch: int, seed: int,
               dev_fraction: float, dev_data=None, stats: Optional[D.DataStats] = None,
               encoding: str = "utf-8") -> CurriculumPlan:
    """Load every dataset of the stage file once and lay the stages out on the global step axis. The dev rows are
    ``dev_data`` (with --template) or, without it, the dev split of every distinct dataset."""
    specs = read_stages(stage_file)
    cache: Dict[tuple, List[D.Example]] = {}
    dev_ex: List[D.Example] = []
    stages, start = [], 0
    for index, spec in enumerate(specs):
        sources, described = [], []
        for ds in spec.datasets:
            key = (ds.path, ds.template or template, ds.field or text_field)
            if key not in cache:
                file_stats = D.DataStats()  # per file, so each file's log line gives its own counts
                ex = D.load_examples([ds.path], tokenizer, key[1], cutoff_len, train_on_inputs=train_on_inputs,
                                     text_field=key[2], stats=file_stats, split_long=split_long,
                                     encoding=encoding)
                if stats is not None:
                    stats.add(file_stats)
                train_ex, dev_part = (ex, []) if dev_data else D.split_dev(ex, dev_fraction, seed)
                dev_ex += dev_part
                cache[key] = D.pack(D.shuffled(train_ex, seed), block_size) if packing else train_ex
            sources.append(cache[key])
            described.append({"path": ds.path, "template": key[1], "field": key[2], "weight": ds.weight,
                              "rows": len(cache[key])})
        n_rows = sum(len(r) for r in sources)
        steps_per_epoch = n_rows // global_batch
        if steps_per_epoch == 0:
            raise D.DataError(f"stage {spec.name!r}: {n_rows} rows are fewer than one global batch of {global_batch};"
                              f" add data to the stage or use a smaller batch")
        steps = spec.steps or max(1, int((spec.epochs or 1.0) * steps_per_epoch))
        counts = shares(n_rows, [d.weight for d in spec.datasets])
        stages.append(Stage(spec.name, index, start, steps, steps_per_epoch, sources, counts, spec.lr,
                            spec.warmup_steps, spec.min_lr_ratio, described))
        start += steps
    if dev_data:
        dev_ex = D.load_examples(list(dev_data), tokenizer, template, cutoff_len, train_on_inputs=train_on_inputs,
                                 text_field=text_field, split_long=split_long, encoding=encoding)
    return CurriculumPlan(stages, D.pack(dev_ex, block_size) if packing else dev_ex, global_batch, seed)


