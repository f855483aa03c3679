"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") over llama.parallel linears.

``y = W x + scale * B A dropout(x)`` with the base weight W frozen, ``A`` (r x in) kaiming-uniform (a = sqrt 5)
and ``B`` (out x r) zero, so an adapted model starts out identical to its base; ``scale = alpha / r``, or
``alpha / sqrt(r)`` with rsLoRA (Kalajdzievski 2023). Written after torchtune's ``modules/peft/lora.py``.

Model parallelism. A ``ParallelLinear`` runs ``input_collective -> local_forward -> output_collective``; the
LoRA product is added between the last two, on the same input, so it rides the layer's own collectives:

* column-parallel base (wq, wk, wv, w1, w3, output): B is sharded on output rows like W, A is replicated;
* row-parallel base (wo, w2): A is sharded on input columns like W, B is replicated, and this rank's partial
  ``B A_r x_r`` joins the layer's all-reduce, which sums it to ``B A x``.

The replicated factor gets only this rank's share of its gradient, so it is used through
``copy_to_model_parallel_region`` (identity forward, all-reduce backward): its gradient is summed over the
model-parallel group and stays identical on every rank, and so do its optimizer updates. ``A`` is drawn at its
full (global) shape and then sliced, so with equal seeds a model-parallel run starts from exactly the adapter
of a single-process run. The trainer therefore seeds every rank of a model-parallel group identically; that
also makes the dropout masks on a replicated input (column layers) agree across those ranks, which the
replicated A and the all-reduced input gradient rely on. Data-parallel gradient averaging is the trainer's job.

State dict. ``apply_lora`` replaces a target layer in its parent by a ``LoRALinear`` holding it as ``.base``,
so ``model.state_dict()`` has ``layers.0.attention.wq.base.weight``, ``...wq.lora_A`` and ``...wq.lora_B``.
``base_state_dict`` gives the Meta-named base tensors (``.base`` stripped), ``lora_state_dict`` this rank's
adapter tensors; ``save_adapter`` / ``export_peft`` write the full (gathered) adapter and ``load_adapter``
slices it for the local rank, so adapters move between model-parallel sizes.

Merging folds ``scale * B @ A`` into this rank's dense weight and back. Unmerge subtracts the same product
(from the factors kept at merge time), so it restores W to within one rounding of ``W + delta`` in W's dtype,
not bit for bit (|error| <= ulp(W + delta)); keep ``base_state_dict`` from before merging where exact bits
matter. An NF4 (or other quantized) base cannot be merged in place; ``merged_weight`` / ``merged_state_dict``
give the dequantized fp32 weight plus the update.
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from llama.errors import UserError
from llama.files import atomic_write
from llama.hf import hf_name, permute_to_hf
from llama.parallel import (
    ParallelEmbedding,
    ParallelLinear,
    copy_to_model_parallel_region,
    get_model_parallel_group,
    get_model_parallel_rank,
    get_model_parallel_world_size,
)

TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
_LORA_FIELDS = ("r", "alpha", "dropout", "targets", "use_rslora")
RESAVE = ("save the adapter again (kollama.adapters.lora.save_adapter), or copy or download the folder again from "
          "where it came from")


class AdapterError(UserError):
    """An adapter folder whose files cannot be used (damaged, incomplete, not written by save_adapter)."""


class LoRALinear(nn.Module):
    """A frozen base linear plus a trainable low-rank update; see the module docstring for the sharding.

    ``base`` is a ``ColumnParallelLinear`` / ``RowParallelLinear`` (its ``local_linear`` may be an
    ``NF4Linear``) or a plain ``nn.Linear`` (replicated; no collectives). The base is frozen here. LoRA
    parameters are fp32 unless ``dtype`` says otherwise, whatever the base dtype (as peft's default
    ``autocast_adapter_dtype``): tiny, and their optimizer updates are too small for bf16. The LoRA path runs
    in their dtype and its output is cast to the base output's dtype.
    """

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 use_rslora: bool = False, dtype: Optional[torch.dtype] = None):
        super().__init__()
        _check_hparams(r, alpha, dropout)
        if isinstance(base, ParallelLinear):
            self.kind = {0: "column", 1: "row"}.get(base.shard_dim)
            if self.kind is None:
                raise ValueError(f"{type(base).__name__} has shard_dim {base.shard_dim}; LoRA knows 0 and 1")
            ws = get_model_parallel_world_size()
            in_features, out_features = base.in_features, base.out_features
        elif isinstance(base, nn.Linear):
            self.kind, ws = "plain", 1
            in_features, out_features = base.in_features, base.out_features
        else:
            raise TypeError(f"LoRA wraps ColumnParallelLinear, RowParallelLinear or nn.Linear, "
                            f"not {type(base).__name__}")
        local_out, local_in = _local_shape(base)
        expect = {"column": (out_features // ws, in_features), "row": (out_features, in_features // ws),
                  "plain": (out_features, in_features)}[self.kind]
        if (local_out, local_in) != expect:
            raise ValueError(f"{self.kind} base has local weight {(local_out, local_in)}, expected {expect} for "
                             f"{out_features}x{in_features} over {ws} model-parallel ranks")
        device = next(iter(list(base.parameters()) + list(base.buffers())), torch.empty(0)).device
        dtype = dtype or torch.float32

        self.base = base.requires_grad_(False)
        self.r, self.alpha, self.use_rslora = r, float(alpha), use_rslora
        self.dropout_p = float(dropout)
        self.scale = self.alpha / (math.sqrt(r) if use_rslora else r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self._merged_factors = None
        # A is drawn at its global shape (same RNG draws on every rank and at any model parallel size) and sliced.
        full_a = torch.empty(r, in_features, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(full_a, a=math.sqrt(5))
        if self.kind == "row":
            full_a = full_a.chunk(ws, dim=1)[get_model_parallel_rank()]
        self.lora_A = nn.Parameter(full_a.contiguous())
        self.lora_B = nn.Parameter(torch.zeros(local_out, r, device=device, dtype=dtype))

    # Which dim of lora_A / lora_B is split across model-parallel ranks (None = replicated).
    @property
    def shard_dims(self) -> Dict[str, Optional[int]]:
        return {"lora_A": 1 if self.kind == "row" else None, "lora_B": 0 if self.kind == "column" else None}

    def lora_delta(self, a: Optional[torch.Tensor] = None, b: Optional[torch.Tensor] = None) -> torch.Tensor:
        """This rank's ``scale * B @ A`` in fp32, shaped like the local base weight."""
        a = self.lora_A if a is None else a
        b = self.lora_B if b is None else b
        return self.scale * (b.detach().float() @ a.detach().float())

    def _lora(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.lora_A, self.lora_B
        if self.kind == "column":
            a = copy_to_model_parallel_region(a)  # replicated: sum its gradient over the ranks
        elif self.kind == "row":
            b = copy_to_model_parallel_region(b)
        # Same order of operations as peft: B(A(dropout(x))) * scale.
        return F.linear(F.linear(self.dropout(x).to(a.dtype), a), b) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "plain":
            y = self.base(x)
            return y if self.merged else y + self._lora(x).to(y.dtype)
        x = self.base.input_collective(x)
        y = self.base.local_forward(x)
        if not self.merged:
            y = y + self._lora(x).to(y.dtype)  # a row layer's partial sum joins the all-reduce below
        return self.base.output_collective(y)

    def _dense_weight(self, action: str) -> torch.Tensor:
        weight = getattr(self.base, "weight", None)
        if weight is None:
            kind = type(getattr(self.base, "local_linear", None)).__name__
            raise RuntimeError(
                f"cannot {action} LoRA into a {kind} base: its weight is quantized, and writing W + delta back "
                f"would requantize it and lose the update. Use merged_weight() / merged_state_dict() to get the "
                f"dequantized fp32 weight plus the update and write a dense checkpoint instead")
        return weight

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``scale * B @ A`` into the dense local base weight; forward then skips the LoRA path."""
        if self.merged:
            raise RuntimeError("LoRA is already merged into this layer; unmerge() first")
        w = self._dense_weight("merge")
        # Keep the merged factors (r x (in + out) values, not a weight copy): unmerge subtracts exactly the
        # delta that was added even if A or B were changed meanwhile (e.g. an adapter loaded into a merged model).
        self._merged_factors = (self.lora_A.detach().clone(), self.lora_B.detach().clone())
        w.copy_((w.float() + self.lora_delta(*self._merged_factors)).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the update again (exact to one rounding of W + delta in W's dtype, see module docstring)."""
        if not self.merged:
            raise RuntimeError("LoRA is not merged into this layer; nothing to unmerge")
        w = self._dense_weight("unmerge")
        w.copy_((w.float() - self.lora_delta(*self._merged_factors)).to(w.dtype))
        self.merged, self._merged_factors = False, None

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """This rank's base weight plus the update, fp32; an NF4 base is dequantized first (for QLoRA export)."""
        weight = getattr(self.base, "weight", None)
        if weight is not None:
            return weight.float().clone() if self.merged else weight.float() + self.lora_delta()
        local = getattr(self.base, "local_linear", None)
        if local is None or not hasattr(local, "dequantize"):
            raise RuntimeError(f"base {type(self.base).__name__} has neither a dense weight nor dequantize()")
        return local.dequantize(torch.float32) + self.lora_delta()

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, r={self.r}, alpha={self.alpha:g}, scale={self.scale:g}, "
                f"dropout={self.dropout_p:g}, use_rslora={self.use_rslora}, merged={self.merged}")


def _check_hparams(r, alpha, dropout) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"LoRA rank r must be an integer >= 1, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        raise ValueError(f"LoRA alpha must be a positive number, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


def _local_shape(base: nn.Module):
    weight = getattr(base, "weight", None)
    if weight is not None:
        return tuple(weight.shape)
    local = getattr(base, "local_linear", None)
    if local is not None and hasattr(local, "out_features"):
        return local.out_features, local.in_features
    raise ValueError(f"cannot tell the local weight shape of {type(base).__name__}")


def lora_layers(model: nn.Module) -> Dict[str, LoRALinear]:
    """Meta-named paths (``layers.0.attention.wq``) of every LoRALinear in the model, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


# ---------------------------------------------------------------------------------------------------------------
# Applying, freezing, merging
# ---------------------------------------------------------------------------------------------------------------
def apply_lora(model: nn.Module, targets: Sequence[str] = ("wq", "wv"), r: int = 8, alpha: float = 16,
               dropout: float = 0.05, use_rslora: bool = False) -> nn.Module:
    """Wrap every linear named in ``targets`` (in every layer) in a LoRALinear and freeze everything else.

    Uses the global torch RNG for A (seed model-parallel ranks identically). Returns ``model``, changed in place.
    """
    targets = check_targets(targets)
    _check_hparams(r, alpha, dropout)
    if lora_layers(model):
        raise ValueError("the model already has LoRA layers; build a fresh model to apply different settings")
    found = [(name, m) for name, m in model.named_modules()
             if name.rsplit(".", 1)[-1] in targets and isinstance(m, (ParallelLinear, nn.Linear))]
    missing = sorted(set(targets) - {name.rsplit(".", 1)[-1] for name, _ in found})
    if missing:
        raise ValueError(f"LoRA targets {missing} name no linear layer of this {type(model).__name__}")
    model.requires_grad_(False)
    for name, module in found:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        # A new module starts in training mode; follow the layer it replaces so an eval model stays in eval.
        setattr(parent, leaf, LoRALinear(module, r, alpha, dropout, use_rslora).train(module.training))
    return model


def check_targets(targets, valid: Sequence[str] = TARGETS, what: str = "LoRA") -> tuple:
    """Targets as a tuple without repeats, each one of ``valid``; a clear error otherwise."""
    if isinstance(targets, str):  # "wq" would otherwise be read as the targets "w" and "q"
        targets = (targets,)
    targets = tuple(dict.fromkeys(targets))
    unknown = [t for t in targets if t not in valid]
    if unknown or not targets:
        raise ValueError(f"unknown {what} targets {unknown or '(none given)'}; valid targets are {list(valid)}")
    return targets


def lora_config_of(model: nn.Module) -> dict:
    """The LoRA settings of a model (r, alpha, dropout, targets, use_rslora); raises if it has no LoRA."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers; call apply_lora or load_adapter first")
    settings = {(m.r, m.alpha, m.dropout_p, m.use_rslora) for m in layers.values()}
    if len(settings) > 1:
        raise ValueError(f"LoRA layers disagree on (r, alpha, dropout, use_rslora): {sorted(settings)}")
    r, alpha, dropout, use_rslora = settings.pop()
    targets = [t for t in TARGETS if any(n.rsplit(".", 1)[-1] == t for n in layers)]
    return dict(r=r, alpha=alpha, dropout=dropout, targets=targets, use_rslora=use_rslora)


def merge_lora(model: nn.Module) -> nn.Module:
    for m in lora_layers(model).values():
        m.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    for m in lora_layers(model).values():
        m.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its dense base weight and put the plain base layer back in its parent: the model
    is then an ordinary Transformer again (as fast as the base, and quantizable). Not reversible."""
    for name, m in lora_layers(model).items():
        if not m.merged:
            m.merge()
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, m.base)
    return model


# ---------------------------------------------------------------------------------------------------------------
# State dicts and parameter counts
# ---------------------------------------------------------------------------------------------------------------
def lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """This rank's adapter tensors, ``{path}.lora_A`` / ``{path}.lora_B`` (detached, not copied)."""
    return {f"{p}.{k}": getattr(m, k).detach() for p, m in lora_layers(model).items() for k in ("lora_A", "lora_B")}


def base_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``model.state_dict()`` without the adapter, ``.base`` stripped: Meta names (merged weights if merged)."""
    out = {}
    for key, t in model.state_dict().items():
        if key.endswith((".lora_A", ".lora_B")):
            continue
        out[key.replace(".base.", ".").removeprefix("base.")] = t
    return out


def merged_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """This rank's Meta-named dense state dict with the adapter folded in (fp32 for adapted and NF4 layers)."""
    dense = {}  # Meta path of a linear -> the dense fp32 weight that replaces its stored form
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            dense[name] = m.merged_weight()
        elif (isinstance(m, ParallelLinear) and m.weight is None and hasattr(m.local_linear, "dequantize")
              and not name.endswith(".base") and name != "base"):
            dense[name] = m.local_linear.dequantize(torch.float32)
    out = {}
    for key, t in base_state_dict(model).items():
        if ".local_linear." in key and key.split(".local_linear.")[0] in dense:
            path = key.split(".local_linear.")[0]
            out.setdefault(f"{path}.weight", dense[path])  # a quantized layer's buffers collapse to one weight
        elif key.endswith(".weight") and key[: -len(".weight")] in dense:
            out[key] = dense[key[: -len(".weight")]]
        else:
            out[key] = t
    return out


def _gather(t: torch.Tensor, dim: Optional[int]) -> torch.Tensor:
    ws = get_model_parallel_world_size()
    if dim is None or ws == 1:
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(ws)]
    dist.all_gather(parts, t.detach().contiguous(), group=get_model_parallel_group())
    return torch.cat(parts, dim=dim)


def gather_lora_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The full adapter (shards concatenated). Collective: every rank of the model-parallel group calls it."""
    return {f"{p}.{k}": _gather(getattr(m, k), m.shard_dims[k])
            for p, m in lora_layers(model).items() for k in ("lora_A", "lora_B")}


def trainable_parameters(model: nn.Module) -> Dict[str, Union[int, float]]:
    """Trainable and total parameter counts, global (all model-parallel ranks) and local; NF4 weights count."""
    ws = get_model_parallel_world_size()
    seen, counts = set(), dict(trainable=0, total=0, local_trainable=0, local_total=0)

    def add(n_local: int, sharded: bool, trainable: bool) -> None:
        n_global = n_local * ws if sharded else n_local
        counts["total"] += n_global
        counts["local_total"] += n_local
        if trainable:
            counts["trainable"] += n_global
            counts["local_trainable"] += n_local

    for module in model.modules():
        if isinstance(module, LoRALinear):
            for key, dim in module.shard_dims.items():
                p = getattr(module, key)
                seen.add(id(p))
                add(p.numel(), dim is not None, p.requires_grad)
        elif isinstance(module, (ParallelLinear, ParallelEmbedding)):
            params = [p for p in module.parameters() if id(p) not in seen]
            for p in params:
                seen.add(id(p))
                add(p.numel(), True, p.requires_grad)
            local = getattr(module, "local_linear", None)
            if local is not None and not params:  # quantized: the weight lives in buffers
                add(local.out_features * local.in_features, True, False)
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                add(p.numel(), False, p.requires_grad)
    counts["percent"] = 100.0 * counts["trainable"] / max(counts["total"], 1)
    counts["model_parallel_size"] = ws
    return counts


def trainable_parameters_report(model: nn.Module) -> str:
    c = trainable_parameters(model)
    text = f"trainable params: {c['trainable']:,} || all params: {c['total']:,} || trainable%: {c['percent']:.4f}"
    if c["model_parallel_size"] > 1:
        text += (f" (global over {c['model_parallel_size']} model-parallel ranks; this rank holds "
                 f"{c['local_trainable']:,} / {c['local_total']:,})")
    return text


# ---------------------------------------------------------------------------------------------------------------
# Adapter files
# ---------------------------------------------------------------------------------------------------------------
def _is_writer() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _model_args(model: nn.Module) -> Optional[dict]:
    params = getattr(model, "params", None)
    return asdict(params) if is_dataclass(params) else None


def save_adapter(model: nn.Module, out_dir, config: Optional[dict] = None, *, base: Optional[dict] = None,
                 tokenizer_sha256: Optional[str] = None) -> Path:
    """Write ``adapter.safetensors`` (full, gathered adapter) and ``adapter_config.json`` into ``out_dir``.

    ``config`` adds JSON-able facts (e.g. ``{"base_model": ...}``); it may repeat but not contradict the
    model's LoRA settings. ``base`` (``kollama.adapters.fingerprint.base_fingerprint`` of the checkpoint the model was
    loaded from) and ``tokenizer_sha256`` record what the adapter belongs to; ``kollama.adapters.adapter.apply_adapter``
    checks them. ``config["base_quantization"] = "nf4"`` marks a QLoRA adapter (trained over an NF4 base).
    Collective under model parallelism: every rank calls it, global rank 0 writes. Each file is replaced
    atomically, weights first, so the config never describes weights not yet on disk.
    """
    settings = lora_config_of(model)
    meta = dict(config or {})
    meta.update({k: v for k, v in (("base", base), ("tokenizer_sha256", tokenizer_sha256)) if v is not None})
    recorded = meta.get("base")
    if recorded is not None and not (isinstance(recorded, dict) and recorded.get("digest")
                                     and isinstance(recorded.get("params"), dict)):
        raise ValueError(f"base must be kollama.adapters.fingerprint.base_fingerprint(ckpt_dir), a dict with params "
                         f"and digest; got {str(recorded)[:200]}")
    clash = {k: (meta[k], settings[k]) for k in _LORA_FIELDS
             if k in meta and (list(meta[k]) if k == "targets" else meta[k]) != settings[k]}
    if clash:
        raise ValueError(f"config contradicts the model's LoRA settings (given, actual): {clash}")
    meta.update(settings, format="kollama-lora", model_parallel_size=get_model_parallel_world_size())
    if "model_args" not in meta and _model_args(model) is not None:
        meta["model_args"] = _model_args(model)
    state = gather_lora_state_dict(model)
    out_dir = Path(out_dir)
    if _is_writer():
        out_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(meta, indent=2, default=str) + "\n"
        atomic_write(out_dir / ADAPTER_WEIGHTS,
                      lambda p: save_file({k: v.contiguous() for k, v in state.items()}, p, metadata={"format": "pt"}))
        atomic_write(out_dir / ADAPTER_CONFIG, lambda p: Path(p).write_text(text))
    _barrier()
    return out_dir


def read_adapter_config(path) -> dict:
    """The adapter_config.json of an adapter folder written by save_adapter (checked; the weights are not read)."""
    path = Path(path)
    cfg_path, weights_path = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not path.is_dir():
        raise FileNotFoundError(f"adapter folder {path} does not exist (or is not a folder); pass the folder that "
                                f"holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing; an adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}: "
                                    f"{RESAVE}")
    try:
        config = json.loads(cfg_path.read_bytes())  # bytes: json detects UTF-8/16/32, whatever the locale
    except (json.JSONDecodeError, UnicodeDecodeError) as e:  # a half-written file ends mid-value
        raise AdapterError(f"{cfg_path} is damaged or incomplete (not valid JSON: {e}); {RESAVE}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{cfg_path} holds a JSON {type(config).__name__}, not the object save_adapter writes; "
                           f"{RESAVE}")
    missing = [k for k in _LORA_FIELDS if k not in config]
    if missing:
        raise AdapterError(f"{cfg_path} lacks {missing}; was it written by kollama.adapters.lora.save_adapter? "
                           f"{RESAVE}")
    return config


def read_adapter(path) -> tuple:
    """(config dict, full adapter tensors) of an adapter folder written by save_adapter."""
    config = read_adapter_config(path)
    weights = Path(path) / ADAPTER_WEIGHTS
    try:
        with safe_open(str(weights), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:  # e.g. a copy or download cut short: "incomplete metadata, file not fully covered"
        raise AdapterError(f"{weights} is damaged or incomplete ({e}); {RESAVE}") from None
    return config, state


def load_adapter(model: nn.Module, path) -> nn.Module:
    """Load a saved adapter (applying LoRA with its settings first if the model has none); slices for this rank.

    The factors go onto whatever base ``model`` has. To apply an adapter as it was trained (an NF4 base for a
    QLoRA adapter, its recorded base and tokenizer checked), use ``kollama.adapters.adapter.apply_adapter``."""
    config, state = read_adapter(path)
    if not lora_layers(model):
        apply_lora(model, config["targets"], config["r"], config["alpha"], config["dropout"], config["use_rslora"])
    have = lora_config_of(model)
    differ = {k: (config[k], have[k]) for k in _LORA_FIELDS if config[k] != have[k]}
    if differ:
        raise AdapterError(f"adapter {path} was trained with other LoRA settings (file, model): {differ}")
    ws, rank = get_model_parallel_world_size(), get_model_parallel_rank()
    expected = {f"{p}.{k}": (m, k) for p, m in lora_layers(model).items() for k in ("lora_A", "lora_B")}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise AdapterError(f"adapter {path} does not fit this model: missing {missing[:6]}, unexpected "
                           f"{unexpected[:6]}")
    with torch.no_grad():
        for key, (module, attr) in expected.items():
            param, dim, full = getattr(module, attr), module.shard_dims[attr], state[key]
            want = list(param.shape)
            if dim is not None:
                want[dim] *= ws
            if list(full.shape) != want:
                raise AdapterError(f"adapter tensor {key} has shape {tuple(full.shape)} but this model needs "
                                   f"{tuple(want)} (full size); the adapter belongs to another model or rank r")
            param.copy_(full if dim is None else full.chunk(ws, dim=dim)[rank])
    return model


# ---------------------------------------------------------------------------------------------------------------
# peft export
# ---------------------------------------------------------------------------------------------------------------
def _hf_module(path: str) -> str:
    """transformers' module path of a Meta module path (``layers.3.attention.wq`` -> ``model.layers.3.self_attn.
    q_proj``), from the one Meta<->HF name table in llama.hf."""
    return hf_name(path + ".weight").removesuffix(".weight")


def export_peft(adapter_dir_or_model, out_dir, base_model_name_or_path: Optional[str] = None) -> Path:
    """Write the adapter in peft's layout (``adapter_model.safetensors`` + ``adapter_config.json``), loadable
    with ``PeftModel.from_pretrained(hf_llama, out_dir)``. B of wq / wk gets the rotary row permutation that the
    HF conversion applies to q_proj / k_proj. From a model this is collective (rank 0 writes)."""
    if isinstance(adapter_dir_or_model, nn.Module):
        config = dict(lora_config_of(adapter_dir_or_model), model_args=_model_args(adapter_dir_or_model))
        state = gather_lora_state_dict(adapter_dir_or_model)
    else:
        config, state = read_adapter(adapter_dir_or_model)
        if config.get("base_quantization") == "nf4":  # peft's config has no field for it: say it here
            warnings.warn(f"adapter {adapter_dir_or_model} was trained over an NF4-quantized base (QLoRA): peft "
                          f"applies it to whatever base it is given, and it reproduces the trained model only over "
                          f"dequant(NF4(W)), not W. For a dense model use kollama.adapters.adapter.apply_adapter (or "
                          f"the trainer's --merge); bitsandbytes' 4-bit NF4 base rounds the block scales differently "
                          f"from kollama.adapters.nf4", stacklevel=2)
    args = config.get("model_args") or {}
    if "n_heads" not in args and any(t in config["targets"] for t in ("wq", "wk")):
        raise ValueError("exporting wq/wk adapters needs n_heads/n_kv_heads (model_args); save the adapter from "
                         "a llama Transformer so adapter_config.json records them")
    heads = {"wq": args.get("n_heads"), "wk": args.get("n_kv_heads") or args.get("n_heads")}
    tensors, hf_leaf = {}, {}
    for key, t in state.items():
        path, _, factor = key.rpartition(".")
        leaf = path.rsplit(".", 1)[-1]
        if factor == "lora_B" and leaf in heads:
            t = permute_to_hf(t, heads[leaf])  # the row order convert_llama_weights_to_hf gives q_proj / k_proj
        tensors[f"base_model.model.{_hf_module(path)}.{factor}.weight"] = t.contiguous()
        hf_leaf[leaf] = _hf_module(path).rsplit(".", 1)[-1]
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": config["r"], "lora_alpha": config["alpha"],
        "lora_dropout": config["dropout"], "use_rslora": config["use_rslora"], "bias": "none",
        "target_modules": [hf_leaf[t] for t in config["targets"]],
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "base_model_name_or_path": base_model_name_or_path or (
            config.get("base_model") if isinstance(config.get("base_model"), str) else None),
    }
    out_dir = Path(out_dir)
    if _is_writer():
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(out_dir / PEFT_WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
        atomic_write(out_dir / PEFT_CONFIG, lambda p: Path(p).write_text(json.dumps(peft_config, indent=2) + "\n"))
    _barrier()
    return out_dir


__all__ = [
    "LoRALinear", "TARGETS", "apply_lora", "lora_layers", "lora_config_of", "merge_lora", "unmerge_lora",
    "lora_state_dict", "gather_lora_state_dict", "base_state_dict", "merged_state_dict", "trainable_parameters",
    "trainable_parameters_report", "save_adapter", "read_adapter", "read_adapter_config", "load_adapter",
    "export_peft",
]
