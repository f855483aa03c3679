"""Test the trainer's tests: apply one deliberate bug at a time to a throw-away copy of the code and check that the
training tests fail on each (issue: "a test that only compares the code with itself proves little").

    python scripts/train_mutants.py [--only NAME,...] [--tests tests/test_train_numerics.py,...]

Each mutant is (name, file, exact old text, new text); the old text must occur exactly once, so a refactor that
moves the code makes this script fail loudly instead of testing nothing. The copy is a ``git worktree`` of HEAD
plus the working tree's changes against HEAD, staged or not (changed, new and removed files; not ignored ones), under
a temporary folder; the repository is never edited.
Prints one line per mutant: KILLED (with the first failing test) or SURVIVED. Exit code 1 if any survived.
Needs LLAMA_TEST_DATA for the real-data reference test (tests/test_train_reference.py).
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE, OPTIM = "kollama/train/recipe.py", "kollama/train/optim.py"
DATA, LORA = "kollama/data/rows.py", "kollama/adapters/lora.py"

MUTANTS = [
    ("no cosine decay", OPTIM,
     "return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))",
     "return 1.0"),
    ("no clipping", RECIPE, "self.sharded_flags, cfg.max_grad_norm,", "self.sharded_flags, 0.0,"),
    ("logged loss / 3", RECIPE, "loss_value = all_reduce(loss_sum, self.dp_group).item()",
     "loss_value = all_reduce(loss_sum, self.dp_group).item() / 3"),
    ("backward loss / 3", RECIPE, "            loss.backward()\n", "            (loss / 3).backward()\n"),
    ("accumulation not averaged (per-micro-batch mean)", RECIPE,
     "loss = self.forward_loss(rows[i:i + cfg.micro_batch_size], max(1, int(n_targets)))",
     "loss = self.forward_loss(rows[i:i + cfg.micro_batch_size], "
     "max(1, D.count_targets(rows[i:i + cfg.micro_batch_size])))"),
    ("schedule stepped before the optimizer", RECIPE, "lr = cfg.lr * self.lr_factor(self.step)",
     "lr = cfg.lr * self.lr_factor(self.step + 1)"),
    ("AdamW betas 0.8/0.99", OPTIM, "lr=lr, foreach=", "lr=lr, betas=(0.8, 0.99), foreach="),
    ("weight decay on norm weights", OPTIM, "return p.ndim >= 2 and not getattr(p, \"no_weight_decay\", False)",
     "return not getattr(p, \"no_weight_decay\", False)"),
    ("no weight decay at all", OPTIM, "\"weight_decay\": weight_decay}", "\"weight_decay\": 0.0}"),
    ("LoRA scale alpha / sqrt(r)", LORA, "self.scale = self.alpha / (math.sqrt(r) if use_rslora else r)",
     "self.scale = self.alpha / math.sqrt(r)"),
    ("prompt masking off", DATA,
     "labels += (head if train_on_inputs else [IGNORE_INDEX] * len(head)) + answer",
     "labels += head + answer"),
    ("padding trained", DATA, "labels = torch.full((len(rows), s), IGNORE_INDEX, dtype=torch.long)",
     "labels = torch.full((len(rows), s), pad_id, dtype=torch.long)"),
    ("packed examples attend across boundaries", DATA,
     "\"mask\": block_causal_mask(segments) if packed else None}", "\"mask\": None}"),
    ("resume skips a batch", RECIPE, "return self.plan.rows_of(step, self.dp_rank, self.rows_per_rank)",
     "return self.plan.rows_of(step + (self.resumed_from is not None), self.dp_rank, self.rows_per_rank)"),
    ("resume repeats a batch", RECIPE, "return self.plan.rows_of(step, self.dp_rank, self.rows_per_rank)",
     "return self.plan.rows_of(step - (self.resumed_from is not None), self.dp_rank, self.rows_per_rank)"),
    ("divergence guard off", RECIPE, "        if math.isfinite(loss) and math.isfinite(grad_norm):\n",
     "        return\n        if math.isfinite(loss) and math.isfinite(grad_norm):\n"),
]

TESTS = ["tests/test_train_numerics.py", "tests/test_train_reference.py", "tests/test_train.py",
         "tests/test_train_safety.py", "tests/test_data.py", "tests/test_lora.py"]


def apply(tree: Path, path: str, old: str, new: str) -> None:
    file = tree / path
    text = file.read_text()
    if text.count(old) != 1:
        raise SystemExit(f"mutant text not found exactly once in {path}: {old!r} (found {text.count(old)}); update "
                         f"scripts/train_mutants.py to the code")
    file.write_text(text.replace(old, new))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated mutant names (default: all)")
    ap.add_argument("--tests", default=",".join(TESTS), help="comma-separated test files to run per mutant")
    a = ap.parse_args()
    chosen = [m for m in MUTANTS if not a.only or m[0] in a.only.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="kollama-mutants-"))
    tree = tmp / "tree"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), "HEAD"], cwd=ROOT, check=True)
    survived = []
    try:
        changed = [rel for cmd in (["diff", "--name-only", "--no-renames", "HEAD"],  # staged or not; a move is
                                   ["ls-files", "--others", "--exclude-standard"])  # two paths: removed + added
                   for rel in subprocess.run(["git", *cmd], cwd=ROOT, check=True, capture_output=True,
                                             text=True).stdout.splitlines()]
        for rel in changed:  # the working tree's current versions of changed and new files; removed ones removed
            if (ROOT / rel).is_file():
                (tree / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / rel, tree / rel)
            elif (tree / rel).is_file():
                (tree / rel).unlink()
        for name, path, old, new in chosen:
            original = (tree / path).read_text()
            apply(tree, path, old, new)
            env = {**os.environ, "PYTHONPATH": str(tree), "KOLLAMA_ROOT": str(tree)}
            proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                   *a.tests.split(",")], cwd=tree, env=env, capture_output=True, text=True)
            failed = re.findall(r"^FAILED (\S+)", proc.stdout, re.M)
            verdict = f"KILLED by {failed[0]}" if proc.returncode != 0 and failed else (
                "SURVIVED" if proc.returncode == 0 else f"ERROR (exit {proc.returncode})")
            if proc.returncode == 0:
                survived.append(name)
            print(f"{name:<50} {verdict}", flush=True)
            (tree / path).write_text(original)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT)
        shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(1 if survived else 0)


if __name__ == "__main__":
    main()
