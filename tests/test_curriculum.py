"""kollama.train.stages and kollama.data.curriculum: stages run in order in one run, resume mid-stage is
bit-exact, mixing follows the weights, and the translation builder writes both directions deterministically."""
import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import WORDS, short_lines, tiny_training_base
from kollama import train as T
from kollama.data import curriculum as C
from kollama.data import rows as D
from kollama.train import stages as S



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("curriculum")
    tok, base, _ = tiny_training_base(root)
    text = short_lines(40)
    (root / "text.txt").write_text("\n".join(text) + "\n")
    inst = [{"instruction": " ".join(WORDS[i % 20:][:3]), "input": "", "output": " ".join(WORDS[(3 * i) % 30:][:4])}
            for i in range(30)]
    (root / "inst.jsonl").write_text("".join(json.dumps(r) + "\n" for r in inst))
    stages = {"stages": [
        {"name": "warm", "datasets": [{"path": "text.txt", "template": "text"}], "steps": 3, "lr": 1e-3},
        {"name": "sft", "datasets": [{"path": "inst.jsonl", "template": "llama2-chat", "weight": 2},
                                     {"path": "text.txt", "template": "text", "weight": 1}], "epochs": 1},
    ]}
    (root / "stages.json").write_text(json.dumps(stages))
    return dict(root=root, tok=str(tok), base=str(base), stages=str(root / "stages.json"))


def run(setup, out, **kw):
    kw = {"method": "lora", "cutoff_len": 48, "micro_batch_size": 4, "lr": 3e-3, "eval_every": 0, "save_every": 0,
          "progress": False, "dev_fraction": 0.1, "seed": 5, "lora_targets": "wq,wv,w2", **kw}
    return T.train(None, setup["base"], setup["tok"], str(setup["root"] / out), curriculum=setup["stages"], **kw)


def metrics(setup, out):
    return [json.loads(x) for x in (setup["root"] / out / "metrics.jsonl").read_text().splitlines()]


def test_stages_run_in_order_with_their_steps_and_lr(setup):
    s = run(setup, "order", eval_every=100, warmup_steps=0, min_lr_ratio=1.0)
    (warm, sft) = s["stages"]
    # sft: (27 chat + 36 text) train rows = 63 per epoch, 15 steps of 4
    assert (warm["name"], warm["steps"], sft["name"], sft["start"]) == ("warm", 3, "sft", 3)
    assert sft["steps"] == 63 // 4 and s["total_steps"] == 3 + sft["steps"]
    m = metrics(setup, "order")
    losses = [r for r in m if "loss" in r]
    assert [r["stage"] for r in losses] == ["warm"] * 3 + ["sft"] * sft["steps"]
    assert [(r["step"], r["stage"], r["stage_steps"]) for r in m if r.get("event") == "stage"] == \
        [(1, "warm", 3), (4, "sft", sft["steps"])]
    assert {r["lr"] for r in losses if r["stage"] == "warm"} == {1e-3}  # the stage's lr, flat (min_lr_ratio 1)
    assert {r["lr"] for r in losses if r["stage"] == "sft"} == {3e-3}  # the run's lr
    assert [st for st, _ in s["dev_loss"]] == [0, 3, s["total_steps"]]  # evaluated at every stage end too
    config = json.loads((setup["root"] / "order" / "config.json").read_text())
    assert [st["name"] for st in config["stages"]] == ["warm", "sft"]


def test_mixing_follows_the_weights_and_cycles_without_repeats():
    assert S.shares(10, [2, 1]) == [7, 3] and S.shares(9, [1, 1, 1]) == [3, 3, 3] and sum(S.shares(7, [.3, .3])) == 7
    ex = lambda i: D.Example([1, i], [-100, i])  # noqa: E731
    a, b = [ex(i) for i in range(6)], [ex(100 + i) for i in range(30)]
    st = S.Stage("s", 0, 0, 27, 9, [a, b], S.shares(36, [1, 1]), None, None, None)
    plan = S.CurriculumPlan([st], [], global_batch=4, seed=0)
    epoch = [r.input_ids[1] for k in range(9) for r in plan.rows_of(k, 0, 4)]
    assert sum(x < 100 for x in epoch) == 18  # weights 1:1 -> 18 rows from the 6-row dataset, each 3 times
    assert Counter(x for x in epoch if x < 100) == {i: 3 for i in range(6)}
    seen_b = [x for k in range(45) for r in plan.rows_of(k, 0, 4) for x in [r.input_ids[1]] if x >= 100]
    assert Counter(seen_b) == {100 + i: 3 for i in range(30)}  # 5 epochs x 18 rows = 3 passes, each row 3 times
    # data-parallel ranks split the global batch
    assert plan.rows_of(5, 0, 2) + plan.rows_of(5, 1, 2) == plan.rows_of(5, 0, 4)


def test_resume_mid_stage_equals_an_uninterrupted_run(setup):
    kw = dict(lora_dropout=0.1, packing=True, block_size=48, micro_batch_size=2, gradient_accumulation_steps=2,
              warmup_steps=1, max_grad_norm=0.05, save_every=100)
    straight = run(setup, "straight", **kw)
    total = straight["total_steps"]
    first = run(setup, "resumed", stop_at_step=5, **kw)  # stage "sft" began after step 3
    assert first["step"] == 5 and first["outputs"] == {}
    second = run(setup, "resumed", resume=True, **kw)
    assert second["step"] == total
    for name in ("adapter/adapter.safetensors",):
        a, b = (load_file(str(setup["root"] / d / name)) for d in ("straight", "resumed"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "memory_mb")} for r in rows]  # noqa
    assert strip(metrics(setup, "resumed")) == strip(metrics(setup, "straight"))
    # a changed stage file is refused
    stages = json.loads(Path(setup["stages"]).read_text())
    stages["stages"][1]["datasets"][0]["weight"] = 1  # same steps, other mix
    other = setup["root"] / "other.json"
    other.write_text(json.dumps(stages))
    with pytest.raises(ValueError, match="training data differ"):
        T.train(None, setup["base"], setup["tok"], str(setup["root"] / "resumed"), curriculum=str(other),
                resume=str(setup["root"] / "resumed/checkpoints/step-000005"),
                **{"method": "lora", "cutoff_len": 48, "lr": 3e-3, "eval_every": 0, "progress": False,
                   "dev_fraction": 0.1, "seed": 5, "lora_targets": "wq,wv,w2", **kw})


def test_stage_file_errors(tmp_path):
    (tmp_path / "d.txt").write_text("a b\n")
    cases = [({"stages": []}, "at least one stage"),
             ([{"name": "x", "datasets": [{"path": "d.txt"}], "epoch": 1}], "unknown keys"),
             ([{"datasets": [{"path": "missing.txt"}]}], "not found"),
             ([{"datasets": [{"path": "d.txt"}], "steps": 2, "epochs": 1}], "not both"),
             ([{"datasets": [{"path": "d.txt", "weight": 0}]}], "weight"),
             ([{"datasets": [{"path": "d.txt", "template": "chatml"}]}], "unknown template"),
             ([{"name": "a", "datasets": ["d.txt"]}, {"name": "a", "datasets": ["d.txt"]}], "used twice")]
    for doc, message in cases:
        (tmp_path / "s.json").write_text(json.dumps(doc))
        with pytest.raises(C.CurriculumError, match=message):
            S.read_stages(tmp_path / "s.json")
    (tmp_path / "s.json").write_text(json.dumps([{"datasets": ["d.txt"], "steps": 2}]))
    (spec,) = S.read_stages(tmp_path / "s.json")
    assert spec.datasets[0].path == str(tmp_path / "d.txt") and spec.steps == 2 and spec.name == "stage1"


def test_build_translation_both_directions(tmp_path, capsys):
    ko, en = tmp_path / "p.ko", tmp_path / "p.en"
    ko.write_text("안녕하세요.\n\n고양이가 잔다.\n", encoding="utf-8")
    en.write_text("Hello.\nBlank on the other side.\nThe cat sleeps.\n", encoding="utf-8")
    C.main(["build_translation", str(ko), str(en), str(tmp_path / "t.jsonl"), "--seed", "3"])
    assert "wrote 4 rows from 3 pairs (1 skipped)" in capsys.readouterr().out
    rows = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text(encoding="utf-8").splitlines()]
    rng = random.Random(3)  # one draw per row, EN->KO first
    expected = [
        {"instruction": rng.choice(C.PHRASINGS["en2ko"]), "input": "Hello.", "output": "안녕하세요."},
        {"instruction": rng.choice(C.PHRASINGS["ko2en"]), "input": "안녕하세요.", "output": "Hello."},
        {"instruction": rng.choice(C.PHRASINGS["en2ko"]), "input": "The cat sleeps.", "output": "고양이가 잔다."},
        {"instruction": rng.choice(C.PHRASINGS["ko2en"]), "input": "고양이가 잔다.", "output": "The cat sleeps."},
    ]
    assert rows == expected
    # phrasing: deterministic per seed, varies with it, Korean and English phrasings both used
    kos, ens = [f"문장 {i}" for i in range(40)], [f"sentence {i}" for i in range(40)]
    a, b, c = (C.translation_rows(kos, ens, seed=s) for s in (0, 0, 1))
    assert a == b and a != c
    assert {r["instruction"] for r in a} == set(C.PHRASINGS["en2ko"] + C.PHRASINGS["ko2en"])
    assert [r["input"] for r in C.translation_rows(kos, ens, directions="en2ko")] == ens
    # the rows are training data for the instruction templates
    ex = D.read_rows(tmp_path / "t.jsonl")
    assert [r.kind for r in ex] == ["instruction"] * 4


def test_build_translation_mismatched_lines(tmp_path):
    (tmp_path / "a.ko").write_text("하나\n둘\n", encoding="utf-8")
    (tmp_path / "a.en").write_text("one\n", encoding="utf-8")
    with pytest.raises(C.CurriculumError, match=r"a.ko has 2 lines but .*a.en has 1"):
        C.build_translation(tmp_path / "a.ko", tmp_path / "a.en", tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()
