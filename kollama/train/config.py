"""``TrainConfig``: every option of ``python -m kollama.train``, with its type, default and one line of meaning.

It is the single source of truth: the command line (``--lr 1e-4``), a config file (``--config run.yaml`` or
``.json``, flat keys named like the flags; flags given beside it override it) and ``kollama.train.train(**kwargs)``
all map onto it, and ``python -m kollama.train --help`` prints it. Values are checked here, before any work
(a one-line ``ConfigError`` naming the option and the fix).

Resume rules: the resolved config is saved with every checkpoint. On ``--resume`` the fields marked *fixed* (they
decide the data order, the model being trained or the update rule) must be unchanged; the others may change (the
learning rate, the schedule's length, eval/save/log intervals, clipping, ...), and each change is logged.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from llama.errors import UserError

log = logging.getLogger("kollama.train")

METHODS = ("lora", "qlora", "full")
TASKS = ("sft", "pretrain")
TRAINABLE = ("lora", "lora+embeddings", "embeddings", "full")
DTYPE_NAMES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
GROUPS = ("data", "model", "optimization", "schedule", "checkpointing", "logging", "distributed")


class ConfigError(UserError):
    """An option with a wrong type or value; the message names the option and what to change."""


def option(default: Any = None, help: str = "", group: str = "data", fixed: bool = False, factory=None):
    """A config field: ``help`` is its one line in --help; ``fixed`` = must not change on --resume."""
    meta = {"help": help, "group": group, "fixed": fixed}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # ---- data ----
    data: Optional[List[str]] = option(None, "training files (.jsonl/.json/.txt), comma-separated")
    dev_data: Optional[List[str]] = option(None, "dev files; without them --dev_fraction of --data is held out")
    dev_fraction: float = option(0.05, "share of the examples held out as the dev set when --dev_data is not given",
                                 fixed=True)
    template: str = option("kullm", "prompt template: kullm | alpaca | llama2-chat | text", fixed=True)
    text_field: str = option("text", "JSON field that holds plain text (template text)", fixed=True)
    encoding: str = option("utf-8", "text encoding of the data files (e.g. cp949 for older Korean data)")
    train_on_inputs: bool = option(False, "also train on prompt tokens (default: only the response)", fixed=True)
    cutoff_len: int = option(512, "examples are truncated to this many tokens", fixed=True)
    packing: bool = option(False, "pack several examples into each row of --block_size tokens", fixed=True)
    block_size: Optional[int] = option(None, "packed row length (default: --cutoff_len)", fixed=True)
    task: str = option("sft", "sft (instructions) | pretrain (plain text, packed, long documents split)", fixed=True)
    curriculum: Union[bool, str, list, None] = option(
        None, "stage file (JSON/YAML), or the list of stages itself in a config file; True = --data is the stage "
              "file (its stages and data are checked on resume, not its path)")
    heldout_text: Optional[str] = option(None, "text file scored in bits per character at every evaluation")
    heldout_limit: Optional[int] = option(None, "score only the first N documents of --heldout_text")
    # ---- model ----
    ckpt_dir: Optional[str] = option(None, "base model folder (Meta or Hugging Face layout)", group="model")
    tokenizer_path: Optional[str] = option(None, "SentencePiece tokenizer.model of the base", group="model")
    method: str = option("lora", "lora | qlora (LoRA over an NF4 base) | full", group="model", fixed=True)
    trainable: Optional[str] = option(None, "lora | lora+embeddings | embeddings (new rows only) | full",
                                      group="model", fixed=True)
    new_rows_from: Optional[int] = option(None, "--trainable embeddings: first new row (the old vocabulary size)",
                                          group="model", fixed=True)
    lora_r: int = option(8, "LoRA rank", group="model", fixed=True)
    lora_alpha: float = option(16, "LoRA alpha; the update is scaled by alpha / r", group="model", fixed=True)
    lora_dropout: float = option(0.05, "dropout on the LoRA input", group="model", fixed=True)
    lora_targets: List[str] = option(None, "linears that get LoRA: wq,wk,wv,wo,w1,w2,w3,output", group="model",
                                     fixed=True, factory=lambda: ["wq", "wv"])
    use_rslora: bool = option(False, "scale by alpha / sqrt(r) (rsLoRA) instead of alpha / r", group="model",
                              fixed=True)
    dtype: Optional[str] = option(None, "dtype of the frozen base: float32 | bfloat16 | float16 (default fp32 on "
                                        "CPU, bf16 for LoRA on CUDA)", group="model")
    activation_checkpointing: bool = option(False, "recompute each block in backward (less memory, more time)",
                                            group="model")
    allow_base_mismatch: bool = option(False, "resume although the base model or tokenizer differs from the "
                                              "checkpoint's (a warning instead of an error)", group="model")
    # ---- optimization ----
    lr: float = option(3e-4, "peak learning rate (AdamW)", group="optimization")
    weight_decay: float = option(0.0, "AdamW decoupled weight decay on matrices (never on norms)",
                                 group="optimization", fixed=True)
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this (0 = no clipping)",
                                  group="optimization")
    micro_batch_size: int = option(4, "rows per forward/backward", group="optimization", fixed=True)
    gradient_accumulation_steps: int = option(1, "micro batches per optimizer step", group="optimization",
                                              fixed=True)
    seed: int = option(42, "seed of data order, LoRA init and dropout", group="optimization", fixed=True)
    divergence_factor: float = option(
        4.0, "stop when a step's loss exceeds this factor x the mean of the previous --divergence_window losses of "
             "its stage (0 = stop only on NaN/inf)", group="optimization")
    divergence_window: int = option(20, "losses averaged for --divergence_factor; checked once that many exist",
                                    group="optimization")
    # ---- schedule ----
    epochs: float = option(1.0, "passes over the training data (ignored with --max_steps)", group="schedule")
    max_steps: Optional[int] = option(None, "optimizer steps (overrides --epochs)", group="schedule")
    warmup_steps: int = option(0, "linear warmup steps: step s < warmup gets lr * (s + 1) / warmup",
                               group="schedule")
    min_lr_ratio: float = option(0.0, "cosine decay ends at lr * min_lr_ratio", group="schedule")
    # ---- checkpointing ----
    out_dir: Optional[str] = option(None, "run folder: config, metrics, checkpoints, outputs", group="checkpointing")
    resume: Union[bool, str] = option(False, "continue the run in --out_dir (True = newest intact checkpoint, or "
                                             "a checkpoints/step-NNNNNN path)", group="checkpointing")
    overwrite: bool = option(False, "start over in an --out_dir that holds a run: the old run is moved aside "
                                    "to OUT_DIR.replaced-TIME, not deleted", group="checkpointing")
    save_every: int = option(100, "checkpoint every N steps (0 = never)", group="checkpointing")
    save_total_limit: int = option(2, "keep the newest N intact checkpoints (0 = all)", group="checkpointing")
    stop_at_step: Optional[int] = option(None, "stop after this step, checkpointed, without final outputs",
                                         group="checkpointing")
    merge: bool = option(False, "LoRA/QLoRA: also write merged/ (the adapter folded into the base)",
                         group="checkpointing")
    # ---- logging ----
    eval_every: int = option(50, "dev loss every N steps, and at the end (0 = never)", group="logging")
    log_every: int = option(1, "a metrics.jsonl record every N steps", group="logging")
    progress: bool = option(True, "progress bar (tqdm when installed)", group="logging")
    # ---- distributed ----
    model_parallel_size: int = option(1, "processes that split each layer; world = data x model parallel",
                                      group="distributed", fixed=True)
    fsdp: bool = option(False, "full fine-tuning with weights, grads and AdamW state sharded (FSDP2)",
                        group="distributed", fixed=True)
    device: Optional[str] = option(None, "cpu | cuda | cuda:N (default: cuda:LOCAL_RANK when available, else cpu)",
                                   group="distributed")

    # ------------------------------------------------------------------------------------------- building
    @classmethod
    def from_dict(cls, values: Dict[str, Any], where: str = "option") -> "TrainConfig":
        """A checked config from ``values`` (flag names as keys); unknown keys and bad values raise ConfigError."""
        known = {f.name: f for f in fields(cls)}
        unknown = [k for k in values if k not in known]
        if unknown:
            k = unknown[0]
            close = difflib.get_close_matches(k, known, n=1)
            raise ConfigError(f"unknown {where} {k!r}" + (f"; did you mean {close[0]!r}?" if close else
                                                          "; see python -m kollama.train --help"))
        cfg = cls(**{k: _coerce(known[k], v) for k, v in values.items()})
        cfg.validate()
        return cfg

    @classmethod
    def load(cls, config_file: Optional[str] = None, **overrides) -> "TrainConfig":
        """``config_file`` (YAML or JSON, flat keys) with ``overrides`` on top. Inline curriculum stages in the file
        keep their dataset paths relative to the file's folder."""
        values: Dict[str, Any] = {}
        if config_file:
            values = read_config_file(config_file)
            if isinstance(values.get("curriculum"), list):
                values["curriculum"] = {"stages": values["curriculum"], "base_dir": str(Path(config_file).parent)}
        values.update(overrides)
        return cls.from_dict(values, "option")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------------------------------- checking
    def validate(self) -> None:
        """Every check that needs no file read; raises ConfigError naming the option."""
        def need(ok: bool, name: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"--{name} {message}, got {getattr(self, name)!r}")

        for name in ("ckpt_dir", "tokenizer_path", "out_dir"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required ({_help(name)})")
        if not self.data and not self.curriculum:
            raise ConfigError("--data is required (training files), or --curriculum with a stage file")
        need(self.method in METHODS, "method", f"must be one of {', '.join(METHODS)}")
        need(self.task in TASKS, "task", f"must be one of {', '.join(TASKS)}")
        need(self.trainable is None or self.trainable in TRAINABLE, "trainable",
             f"must be one of {', '.join(TRAINABLE)}")
        from kollama.data.rows import TEMPLATES  # light module; the check belongs with the templates' list

        need(self.template in TEMPLATES, "template", f"must be one of {', '.join(TEMPLATES)}")
        need(self.dtype is None or self.dtype in DTYPE_NAMES, "dtype", f"must be one of {', '.join(DTYPE_NAMES)}")
        need(self.lr > 0 and math.isfinite(self.lr), "lr", "must be a positive number")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 = no clipping)")
        need(self.epochs > 0 and math.isfinite(self.epochs), "epochs", "must be > 0 (or give --max_steps)")
        need(self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        need(self.micro_batch_size >= 1, "micro_batch_size", "must be >= 1")
        need(self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1")
        need(self.cutoff_len >= 2, "cutoff_len", "must be >= 2 tokens")
        need(self.block_size is None or self.block_size >= 2, "block_size", "must be >= 2 tokens")
        need(0 <= self.dev_fraction < 1, "dev_fraction", "must be in [0, 1)")
        need(self.lora_r >= 1, "lora_r", "must be >= 1")
        need(self.lora_alpha > 0, "lora_alpha", "must be > 0")
        need(0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
        from kollama.adapters.lora import TARGETS

        bad = [t for t in self.lora_targets if t not in TARGETS]
        if bad or not self.lora_targets:
            raise ConfigError(f"--lora_targets: unknown target(s) {bad or '(none given)'}; use a comma-separated "
                              f"list of {', '.join(TARGETS)}")
        need(self.divergence_factor == 0 or self.divergence_factor > 1, "divergence_factor",
             "must be 0 (off) or > 1")
        need(self.divergence_window >= 1, "divergence_window", "must be >= 1")
        for name in ("save_every", "save_total_limit", "eval_every", "log_every"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        need(self.stop_at_step is None or self.stop_at_step >= 1, "stop_at_step", "must be >= 1")
        need(self.heldout_limit is None or self.heldout_limit >= 1, "heldout_limit", "must be >= 1")
        need(self.new_rows_from is None or self.new_rows_from >= 1, "new_rows_from", "must be >= 1")
        need(self.model_parallel_size >= 1, "model_parallel_size", "must be >= 1")
        if self.merge and self.method == "full":
            raise ConfigError("--merge only applies to --method lora or qlora (full fine-tuning already writes model/)")
        if self.curriculum and self.max_steps:
            raise ConfigError("--curriculum: set steps per stage in the stage file, not --max_steps")
        if self.curriculum is True and not self.data:
            raise ConfigError("--curriculum True reads the stage file from --data; give --data STAGES.json")
        if self.resume and self.overwrite:
            raise ConfigError("--resume continues the run in --out_dir and --overwrite replaces it; give one")


def _help(name: str) -> str:
    return next(f.metadata["help"] for f in fields(TrainConfig) if f.name == name)


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    """``value`` (from fire, YAML or JSON) as the field's type, or a ConfigError naming the option."""
    kind, name = str(f.type), f.name
    if value is None:
        if kind.startswith("Optional") or "None" in kind:
            return None
        raise ConfigError(f"--{name} needs a value ({f.metadata['help']})")
    if name == "curriculum":
        if isinstance(value, (bool, str, dict)):
            return value
        if isinstance(value, list):
            return {"stages": value, "base_dir": "."}
        raise ConfigError(f"--curriculum must be a stage file path or a list of stages, got {value!r}")
    if name == "resume":
        if isinstance(value, (bool, str)):
            return value
        raise ConfigError(f"--resume must be True or a checkpoint path, got {value!r}")
    if "List[str]" in kind:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, (str, Path)) for v in items):
            raise ConfigError(f"--{name} must be a comma-separated list of strings, got {value!r}")
        return [str(v) for v in items if str(v)]
    if "bool" in kind:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"--{name} must be True or False, got {value!r}")
    if "int" in kind:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
            raise ConfigError(f"--{name} must be an integer, got {value!r}")
        return int(value)
    if "float" in kind:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"--{name} must be a number, got {value!r}")
        return float(value)
    if "str" in kind:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"--{name} must be a string, got {value!r}")
        return str(value)
    return value


def read_config_file(path) -> Dict[str, Any]:
    """A flat mapping of option names from a .yaml/.yml (needs PyYAML) or .json file."""
    path = Path(str(path))
    if not path.is_file():
        raise ConfigError(f"--config {path}: file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"--config {path}: YAML needs PyYAML (pip install pyyaml), or write the file as "
                              f"JSON") from None
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values")
    return values


def help_text() -> str:
    """``python -m kollama.train --help``: every option by group, with type, default and meaning."""
    lines = ["usage: python -m kollama.train [--config run.yaml] --data FILES --ckpt_dir DIR --tokenizer_path "
             "T.model --out_dir RUN [options]",
             "       torchrun --nproc_per_node N -m kollama.train ...   (world = data x model parallel)", "",
             "--config FILE   YAML or JSON file of options (keys as below); flags given beside it override it", ""]
    for group in GROUPS:
        lines.append(f"{group}:")
        for f in fields(TrainConfig):
            if f.metadata["group"] != group:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            default = ",".join(default) if isinstance(default, list) else default
            kind = str(f.type).replace("Optional[", "").replace("]", "").replace("List[str", "list").replace(
                "Union[bool, str, list, None", "file|list").replace("Union[bool, str", "bool|path")
            fixed = "  [fixed on resume]" if f.metadata["fixed"] else ""
            lines.append(f"  --{f.name:<28} {kind:<10} default {default!s:<10} {f.metadata['help']}{fixed}")
        lines.append("")
    lines.append("Example: python -m kollama.train --data kullm-v2.jsonl --ckpt_dir llama-2-7b --tokenizer_path "
                 "tokenizer.model --out_dir runs/lora --method lora --lr 2e-4 --max_steps 1000")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- resume rules
FIXED = tuple(f.name for f in fields(TrainConfig) if f.metadata["fixed"])
# Derived values saved beside the options that a resume must also find unchanged.
FIXED_DERIVED = ("global_batch", "world_size")


def resume_differences(saved: Dict[str, Any], now: Dict[str, Any]):
    """(fixed fields that differ: {name: (saved, now)}, changeable ones that differ). Values are compared after a
    JSON round trip (that is how they were saved); a field missing from an older checkpoint is not compared."""
    def plain(v):
        return json.loads(json.dumps(v, default=str))

    fixed, changed = {}, {}
    skip = {"resume", "overwrite", "stop_at_step", "progress"}  # per invocation, never part of the run's identity
    for key in sorted(set(saved) & set(now)):
        if key in skip or plain(saved[key]) == plain(now[key]):
            continue
        if key in FIXED or key in FIXED_DERIVED:
            fixed[key] = (saved[key], now[key])
        elif key in {f.name for f in fields(TrainConfig)}:
            changed[key] = (saved[key], now[key])
    return fixed, changed
