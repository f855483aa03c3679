"""kollama.eval.evaluate / kollama.eval.tasks: log-likelihoods against independent references, bits per character,
sliding windows, metrics, k-shot determinism, data readers and the CLI end to end.

Reference for multiple choice: lm-evaluation-harness's HFLM on the transformers model built from the same weights
(tests/helpers.hf_model), with the requests built from lm-eval's own kobest prompts (the BoolQ yaml template rendered
by lm-eval's `apply_template`; COPA's `copa_doc_to_text` from lm-eval's kobest/utils.py, executed without its
`datasets`/`sklearn` imports, which it does not use). When lm-eval is not installed the reference is transformers
directly, with lm-eval's request construction (`_encode_pair`) re-implemented below.
"""
import csv
import io
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from conftest import need
from helpers import hf_model, random_model, save_meta, tiny_args
from kollama.eval import evaluate as E
from kollama.eval import tasks as T
from llama.tokenizer import Tokenizer

BOOLQ_ROWS = [  # (paragraph, question, answer)
    ("서울은 대한민국의 수도이며 가장 큰 도시이다. 한강이 도시를 가로지른다.", "서울은 대한민국의 수도인가?", "True"),
    ("고양이는 물을 싫어하는 경우가 많지만 어떤 고양이는 수영을 즐긴다.", "모든 고양이는 수영을 좋아하는가?", "False"),
    ("김치는 배추와 고춧가루로 만드는 발효 음식이다.  오래 두면 신맛이 강해진다.", "김치는 발효 음식인가?", "True"),
]
COPA_ROWS = [  # (premise, question, alternative 1, alternative 2, 1-based answer)
    ("전쟁이 시작되었다.", "결과", "병사들이 집으로 돌아왔다.", "병사들이 전투에 파견되었다.", "2"),
    ("남자는 토스트가 타는 냄새를 맡았다.", "결과", "남자는 토스트기를 구입했다.", "남자는 토스트기 전원을 껐다.", "2"),
    ("아이가 울었다.", "원인", "아이가 넘어졌다.", "아이가 사탕을 받았다.", "1"),
]
KO_TEXT = ["오늘은 날씨가 맑고 바람이 시원하다.", "나는 아침에 커피를 마시고 학교에 갔다.",
           "한국어 문장을 토큰으로 나누면 길이가 달라진다.", "짧은 문장", "가"]


# ------------------------------------------------------------------------------------------------ fixtures

def _train_korean_spm(path: Path, sentences, vocab_size: int = 400) -> Path:
    import sentencepiece as spm

    buf = io.BytesIO()
    # byte_fallback like Llama 2, so Hangul outside the learned pieces becomes <0xNN> pieces instead of <unk>.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(sentences) * 10), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, minloglevel=2, num_threads=1, remove_extra_whitespaces=False)
    path.write_bytes(buf.getvalue())
    return path


def _hand_sentences():
    out = list(KO_TEXT)
    for p, q, _ in BOOLQ_ROWS:
        out += [p, q]
    for r in COPA_ROWS:
        out += list(r[:4])
    return out + ["질문 답변 아니오 예 왜냐하면 그래서 문장 긍부정 부정 긍정"]


@pytest.fixture(scope="module")
def ko_setup(tmp_path_factory):
    """A Korean byte-fallback tokenizer, a random model over its vocabulary, and the transformers twin."""
    tmp = tmp_path_factory.mktemp("ko")
    spm_path = _train_korean_spm(tmp / "tokenizer.model", _hand_sentences())
    tok = Tokenizer(spm_path)
    args = tiny_args(vocab_size=tok.n_words, max_seq_len=128, max_batch_size=4)
    model = random_model(args, seed=3)
    ref = hf_model(model.state_dict(), args, args.ffn_hidden_dim)
    return {"dir": tmp, "spm": spm_path, "tok": tok, "args": args, "model": model, "ref": ref}


def _hf_tokenizer(spm_path: Path, tmp: Path):
    """transformers' tokenizer converted from the SentencePiece model (transformers 5 converts tokenizer.model in a
    folder; LlamaTokenizer(vocab_file=...) encodes to nothing there)."""
    from transformers import AutoTokenizer

    d = tmp / "hf_tok"
    d.mkdir(exist_ok=True)
    (d / "tokenizer.model").write_bytes(Path(spm_path).read_bytes())
    return AutoTokenizer.from_pretrained(str(d), add_bos_token=True)


# ------------------------------------------------------------------------------------------------ references

def lm_eval_prompts():
    """(boolq_doc_to_text, copa_doc_to_text) taken from the installed lm-eval's kobest task files, or None."""
    try:
        import lm_eval
        import yaml
        from lm_eval.utils import apply_template
    except ImportError:
        return None
    root = Path(lm_eval.__file__).parent / "tasks" / "kobest"

    class _Loader(yaml.SafeLoader):  # the yaml has !function tags; only doc_to_text is needed here
        pass
    _Loader.add_constructor("!function", lambda loader, node: None)
    boolq = yaml.load((root / "kobest_boolq.yaml").read_text(encoding="utf-8"), Loader=_Loader)
    src = (root / "utils.py").read_text(encoding="utf-8")
    src = "\n".join(l for l in src.splitlines() if not re.match(r"(from|import) (datasets|sklearn)", l))
    ns: dict = {"Dataset": object, "f1_score": None}  # names the dropped imports provided (annotations only)
    exec(compile(src, str(root / "utils.py"), "exec"), ns)
    return (lambda doc: apply_template(boolq["doc_to_text"], doc)), ns["copa_doc_to_text"]


def reimplemented_prompts():
    def boolq(doc):
        return f"{doc['paragraph']} 질문: {doc['question']} 답변: "

    def copa(doc):
        connector = {"원인": " 왜냐하면", "결과": " 그래서"}[doc["question"].strip()]
        return f"{doc['premise']} {connector}"
    return boolq, copa


def reference_loglikelihoods(ref, hf_tok, requests, max_length):
    """log P(continuation | context) per (context, continuation) request: lm-eval's HFLM when installed, else
    transformers with lm-eval's _encode_pair re-implemented."""
    try:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        HFLM = None
    if HFLM is not None:
        lm = HFLM(pretrained=ref, tokenizer=hf_tok, add_bos_token=True, device="cpu", batch_size=4,
                  max_length=max_length)
        inst = [Instance("loglikelihood", {}, req, i) for i, req in enumerate(requests)]
        return [ll for ll, _ in lm.loglikelihood(inst, disable_tqdm=True)], "lm-eval HFLM"
    out = []
    for context, continuation in requests:
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole = hf_tok.encode(context + continuation)
        ctx = hf_tok.encode(context)
        cont = whole[len(ctx):]
        with torch.no_grad():
            logits = ref(torch.tensor([whole[:-1]])).logits[0].float()
        lp = torch.log_softmax(logits, -1)[len(ctx) - 1:]
        out.append(float(lp.gather(-1, torch.tensor(cont)[:, None]).sum()))
    return out, "transformers"


def _write_tsv(path: Path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(["\t".join(header)] + ["\t".join(r) for r in rows]), encoding="utf-8")
    return path


def _compare_mc(setup, boolq_docs, copa_docs, boolq_items, copa_items):
    boolq_text, copa_text = lm_eval_prompts() or reimplemented_prompts()
    requests, ours_q = [], []
    for doc, item in zip(boolq_docs, boolq_items):
        requests += [(boolq_text(doc), " " + c) for c in ["아니오", "예"]]  # lm-eval: target_delimiter + choice
        assert item.context == boolq_text(doc)
        ours_q.append((item.context, item.choices))
    for doc, item in zip(copa_docs, copa_items):
        requests += [(copa_text(doc), " " + c) for c in [doc["alternative_1"], doc["alternative_2"]]]
        assert item.context == copa_text(doc)
        ours_q.append((item.context, item.choices))
    hf_tok = _hf_tokenizer(setup["spm"], setup["dir"])
    for ctx, cont in requests:  # precondition: both tokenizers split these texts identically
        assert hf_tok.encode(ctx + cont) == setup["tok"].encode(ctx + cont, bos=True, eos=False)
    ref, how = reference_loglikelihoods(setup["ref"], hf_tok, requests, setup["args"].max_seq_len)
    ours, truncated = E.mc_loglikelihoods(setup["model"], setup["tok"], ours_q, batch_size=3)
    flat = [x for s in ours for x in s]
    diff = max(abs(a - b) for a, b in zip(flat, ref))
    print(f"max |log-likelihood - {how}| = {diff:.3e} over {len(flat)} requests")
    assert truncated == 0 and len(flat) == len(ref)
    assert diff < 1e-3, (how, flat, ref)
    return diff


# ------------------------------------------------------------------------------------------------ MC vs reference

def test_mc_loglikelihoods_match_reference_hand_made(ko_setup, tmp_path):
    boolq_path = _write_tsv(tmp_path / "BoolQ.tsv", ["ID", "Text", "Question", "Answer"],
                            [(str(i), p, q, a) for i, (p, q, a) in enumerate(BOOLQ_ROWS)])
    copa_path = _write_tsv(tmp_path / "COPA.tsv", ["ID", "sentence", "question", "1", "2", "Answer"],
                           [(str(i),) + r for i, r in enumerate(COPA_ROWS)])
    problems = []
    boolq_items = T.read_kobest(boolq_path, T.boolq_item, problems)
    copa_items = T.read_kobest(copa_path, T.copa_item, problems)
    assert not problems
    boolq_docs = [{"paragraph": p, "question": q, "label": int(a == "True")} for p, q, a in BOOLQ_ROWS]
    copa_docs = [{"premise": r[0], "question": r[1], "alternative_1": r[2], "alternative_2": r[3],
                  "label": int(r[4]) - 1} for r in COPA_ROWS]
    assert [it.gold for it in boolq_items] == [d["label"] for d in boolq_docs]
    assert [it.gold for it in copa_items] == [d["label"] for d in copa_docs]
    _compare_mc(ko_setup, boolq_docs, copa_docs, boolq_items, copa_items)


def test_mc_loglikelihoods_match_reference_real_rows(test_data, tmp_path):
    """Real KoBEST rows with the real Llama 2 tokenizer (byte-fallback Hangul) on a tiny random model."""
    spm_path, boolq_path, copa_path = need(test_data, "tokenizer.model", "korean/kobest/BoolQ/dev.tsv",
                                           "korean/kobest/COPA/dev.tsv")
    tok = Tokenizer(spm_path)
    args = tiny_args(vocab_size=tok.n_words, dim=32, n_heads=4, n_kv_heads=2, max_seq_len=1024, max_batch_size=4)
    model = random_model(args, seed=5)
    setup = {"dir": tmp_path, "spm": spm_path, "tok": tok, "args": args, "model": model,
             "ref": hf_model(model.state_dict(), args, args.ffn_hidden_dim)}

    def raw(path, n):  # the TSV rows read independently of kollama.eval.tasks (csv, literal tabs)
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:n]
    bq = raw(boolq_path, 2)
    cp = raw(copa_path, 3)
    boolq_docs = [{"paragraph": r["Text"], "question": r["Question"], "label": int(r["Answer"].lower() == "true")}
                  for r in bq]
    copa_docs = [{"premise": r["sentence"], "question": r["question"], "alternative_1": r["1"],
                  "alternative_2": r["2"], "label": int(r["Answer"]) - 1} for r in cp]
    problems = []
    boolq_items = T.read_kobest(boolq_path, T.boolq_item, problems)[:2]
    copa_items = T.read_kobest(copa_path, T.copa_item, problems)[:3]
    _compare_mc(setup, boolq_docs, copa_docs, boolq_items, copa_items)


# ------------------------------------------------------------------------------------------------ bits per character

def _hf_token_logprobs(ref, ids):
    with torch.no_grad():
        lp = torch.log_softmax(ref(torch.tensor([ids[:-1]])).logits[0].double(), -1)
    return lp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_bits_per_char_matches_transformers_single_window(ko_setup):
    tok, ref = ko_setup["tok"], ko_setup["ref"]
    got = E.bits_per_char(ko_setup["model"], tok, KO_TEXT, window=128, stride=64, batch_size=2)
    nll = 0.0
    for text in KO_TEXT:
        nll -= float(_hf_token_logprobs(ref, tok.encode(text, bos=True, eos=False)).sum())
    chars = sum(len(t) for t in KO_TEXT)
    expect = nll / (math.log(2) * chars)
    print(f"bits/char {got['bits_per_char']:.6f} vs transformers {expect:.6f}: "
          f"diff {abs(got['bits_per_char'] - expect):.3e}")
    assert got["chars"] == chars and got["bytes"] == sum(len(t.encode()) for t in KO_TEXT)
    assert got["bits_per_char"] == pytest.approx(expect, abs=1e-5)
    assert got["bits_per_byte"] == pytest.approx(nll / (math.log(2) * got["bytes"]), abs=1e-5)
    assert got["token_ppl"] == pytest.approx(math.exp(nll / got["tokens"]), rel=1e-5)


@pytest.mark.parametrize("n,window,stride", [(1, 4, 2), (2, 4, 2), (5, 8, 3), (9, 8, 3), (10, 8, 3), (30, 8, 8),
                                             (30, 8, 1), (31, 7, 5), (64, 16, 16)])
def test_rolling_windows_score_each_token_once(n, window, stride):
    scored = []
    for a, b, k in E.rolling_windows(n, window, stride):
        assert b - 1 - a <= window and 1 <= k <= b - 1 - a + 0 + 1
        scored += range(b - k, b)
    assert scored == list(range(1, n))


def _context_start(i: int, n: int, window: int, stride: int) -> int:
    """The documented rule, written independently: targets 1..window are scored in the first window from BOS on;
    afterwards the window ends advance by `stride` and a target sees the `window` tokens before its window's end."""
    if i <= window:
        return 0
    end = window + 1
    while end < i + 1:
        end = min(n, end + stride)
    return end - 1 - window


# ~70 tokens per repeat (most Hangul falls back to bytes): shorter than the window, exactly one window,
# stride = window, stride < window, stride 1.
@pytest.mark.parametrize("text_repeat,window,stride", [(1, 100, 50), (1, None, 5), (2, 16, 16), (2, 16, 5),
                                                       (1, 16, 1)])
def test_sliding_window_equals_brute_force(ko_setup, text_repeat, window, stride):
    tok, ref = ko_setup["tok"], ko_setup["ref"]
    text = " ".join(KO_TEXT[:3] * text_repeat)
    ids = tok.encode(text, bos=True, eos=False)
    n = len(ids)
    if window is None:  # exactly one window: the document's predictions fill it
        window = n - 1
    assert len(E.rolling_windows(n, window, stride)) == (1 if window >= n - 1 else 2 + (n - 2 - window) // stride)
    got = E.bits_per_char(ko_setup["model"], tok, [text], window=window, stride=stride, batch_size=4)
    nll, by_start = 0.0, {}
    for i in range(1, n):  # brute force: log P(ids[i] | ids[a:i]) per token, with the context rule above
        a = _context_start(i, n, window, stride)
        assert i - a <= window
        # The model is causal, so one transformers forward over ids[a:] gives P(ids[i] | ids[a:i]) for every i:
        # cache it per start instead of running one forward per token (the test runs on 2 shared cores).
        if a not in by_start:
            by_start[a] = _hf_token_logprobs(ref, ids[a:])
        nll -= float(by_start[a][i - a - 1])
    assert got["tokens"] == n - 1
    assert got["nll_nats"] == pytest.approx(nll, abs=2e-4)


def test_window_and_stride_are_checked(ko_setup):
    with pytest.raises(E.EvalError, match="stride"):
        E.rolling_windows(10, 4, 5)
    with pytest.raises(E.EvalError, match="max_seq_len"):
        E.bits_per_char(ko_setup["model"], ko_setup["tok"], ["가나다"], window=1000, stride=10)


# ------------------------------------------------------------------------------------------------ metrics, k-shot

def test_mc_metrics_on_hand_made_scores():
    scores = [[-1.0, -2.0], [-5.0, -6.0], [-3.0, -1.0, -2.0], [-4.0, -4.0]]
    choices = [["아니오", "예"], ["가", "나다라마바"], ["a", "b", "c"], ["x", "y"]]
    golds = [0, 1, 1, 1]
    m = E.mc_metrics(scores, choices, golds)
    # acc preds [0, 0, 1, 0 (tie: first)]; acc_norm: item 2 -> -5/1 vs -6/5 = -1.2 picks 1
    assert m["acc"] == pytest.approx(2 / 4)
    norm_preds = [0, 1, 1, 0]  # item 0: -1/3 vs -2/1 -> 0
    assert m["acc_norm"] == pytest.approx(sum(p == g for p, g in zip(norm_preds, golds)) / 4)
    assert m["n"] == 4


def test_macro_f1_by_hand():
    golds, preds = [0, 0, 1, 1, 2], [0, 1, 1, 1, 0]
    # class 0: TP 1, FP 1, FN 1 -> 2/4; class 1: TP 2, FP 1, FN 0 -> 4/5; class 2: TP 0 -> 0
    assert E.macro_f1(golds, preds) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert E.macro_f1([1, 1], [1, 1]) == 1.0
    try:
        from sklearn.metrics import f1_score
    except ImportError:
        return
    assert E.macro_f1(golds, preds) == pytest.approx(f1_score(golds, preds, average="macro"))


def test_kshot_is_deterministic_by_seed():
    pool = [T.MCItem(f"문장 {i}", ["부정", "긍정"], i % 2) for i in range(50)]
    a = [T.draw_shots(pool, 3, 1234, "nsmc", i) for i in range(10)]
    b = [T.draw_shots(pool, 3, 1234, "nsmc", i) for i in range(10)]
    c = [T.draw_shots(pool, 3, 99, "nsmc", i) for i in range(10)]
    assert a == b and a != c
    assert T.draw_shots(pool, 3, 1234, "nsmc", 7) == a[7]  # independent of how many items came before (--limit)
    assert T.draw_shots(pool, 0, 1234, "nsmc", 0) == []
    ctx = T.fewshot_context(T.MCItem("문장 Q", ["부정", "긍정"], 0), a[0])
    assert ctx.split("\n\n")[-1] == "문장 Q" and ctx.count("\n\n") == 3
    assert ctx.split("\n\n")[0] == f"{a[0][0].context} {a[0][0].choices[a[0][0].gold]}"
    with pytest.raises(T.DataError, match="only 50"):
        T.draw_shots(pool, 51, 1, "nsmc", 0)


# ------------------------------------------------------------------------------------------------ readers

KOBEST_LABELS = {"kobest_boolq": {0, 1}, "kobest_copa": {0, 1}, "kobest_hellaswag": {0, 1, 2, 3},
                 "kobest_sentineg": {0, 1}, "kobest_wic": {0, 1}}


@pytest.mark.parametrize("task", sorted(KOBEST_LABELS))
@pytest.mark.parametrize("split", ["train", "dev"])
def test_kobest_readers_on_real_files(test_data, task, split):
    rel = T.MC_TASKS[task][1 if split == "dev" else 2]
    (path,) = need(test_data, "korean/" + rel)
    problems = []
    items = T.load_mc_task(task, test_data / "korean", split, problems)
    data_rows = sum(1 for line in path.read_text(encoding="utf-8").splitlines()[1:] if line.strip())
    assert not problems and len(items) == data_rows > 0
    assert {it.gold for it in items} == KOBEST_LABELS[task]
    assert all(len(it.choices) == len(KOBEST_LABELS[task]) and all(it.choices) for it in items)


def test_klue_nli_and_nsmc_on_real_files(test_data):
    need(test_data, "korean/klue_nli_dev.json", "korean/nsmc_dev.jsonl")
    problems = []
    nli = T.load_mc_task("klue_nli", test_data / "korean", "dev", problems)
    assert len(nli) == 3000 and {it.gold for it in nli} == {0, 1, 2} and not problems
    nsmc = T.load_mc_task("nsmc", test_data / "korean", "dev", problems)
    ratings = [json.loads(l)["rating"] for l in (test_data / "korean/nsmc_dev.jsonl").read_text().splitlines()]
    assert len(nsmc) == sum(r <= 4 or r >= 9 for r in ratings) > 0
    assert {it.gold for it in nsmc} == {0, 1} and not problems


def test_bad_rows_are_reported_with_file_and_line(tmp_path):
    path = _write_tsv(tmp_path / "kobest/COPA/dev.tsv", ["ID", "sentence", "question", "1", "2", "Answer"],
                      [("1", "비가 왔다.", "결과", "땅이 젖었다.", "해가 떴다.", "1"),
                       ("2", "too", "few"),
                       ("3", "비가 왔다.", "이유", "a", "b", "1"),
                       ("4", "비가 왔다.", "결과", "a", "b", "3")])
    problems = []
    items = T.load_mc_task("kobest_copa", tmp_path, "dev", problems)
    assert len(items) == 1 and items[0].where == f"{path}:2"
    assert [p.split(": ")[0] for p in problems] == [f"{path}:3", f"{path}:4", f"{path}:5"]
    assert "3 tab-separated fields" in problems[0] and "outside 1..2" in problems[2]
    nsmc = tmp_path / "nsmc_dev.jsonl"
    nsmc.write_text('{"text": "좋다", "rating": 10}\n{broken\n{"text": "별로", "rating": "x"}\n', encoding="utf-8")
    problems = []
    assert len(T.read_nsmc(nsmc, problems)) == 1
    assert problems[0].startswith(f"{nsmc}:2: not valid JSON") and problems[1].startswith(f"{nsmc}:3:")
    _write_tsv(tmp_path / "kobest/WiC/dev.tsv", ["ID", "Target"], [("1", "x", "extra")])
    with pytest.raises(T.DataError, match=r"no usable rows .*dev.tsv:2"):
        T.load_mc_task("kobest_wic", tmp_path, "dev")


# ------------------------------------------------------------------------------------------------ end to end

def _data_dir(root: Path) -> Path:
    _write_tsv(root / "kobest/COPA/dev.tsv", ["ID", "sentence", "question", "1", "2", "Answer"],
               [(str(i),) + r for i, r in enumerate(COPA_ROWS)])
    _write_tsv(root / "kobest/COPA/train.tsv", ["ID", "sentence", "question", "1", "2", "Answer"],
               [(str(i),) + r for i, r in enumerate(COPA_ROWS)])
    (root / "ud_ko_tiny_dev.txt").write_text("\n".join(KO_TEXT) + "\n\n", encoding="utf-8")
    (root / "parallel").mkdir()
    (root / "parallel/tiny_dev.ko").write_text("\n".join(KO_TEXT[:2]) + "\n", encoding="utf-8")
    (root / "parallel/tiny_dev.en").write_text("The weather is clear.\nI drank coffee.\n", encoding="utf-8")
    (root / "kullm_user_oriented_eval.jsonl").write_text(
        json.dumps({"id": "t0", "instruction": "문장을 요약하세요.", "instances": [{"input": KO_TEXT[0], "output": "x"}]},
                   ensure_ascii=False) + "\n", encoding="utf-8")
    return root


def test_cli_end_to_end(ko_setup, tmp_path, capsys):
    ckpt = save_meta(ko_setup["model"], tmp_path / "ckpt")
    data = _data_dir(tmp_path / "data")
    out = tmp_path / "run" / "results.json"
    tasks = "kobest_copa,bpc,tokenizer,kullm"
    try:
        import sacrebleu  # noqa: F401
        tasks += ",translation"
    except ImportError:
        pass
    E.main(["--ckpt_dir", str(ckpt), "--tokenizer_path", str(ko_setup["spm"]), "--data_dir", str(data),
            "--tasks", tasks, "--out", str(out), "--max_seq_len", "128", "--batch_size", "4", "--k_shot", "1",
            "--max_gen_len", "8", "--template", "kullm", "--dtype", "fp32", "--device", "cpu",
            "--progress", "False"])
    res = json.loads(out.read_text(encoding="utf-8"))
    t = res["tasks"]
    assert t["kobest_copa"]["n"] == 3 and 0 <= t["kobest_copa"]["acc"] <= 1 and t["kobest_copa"]["k_shot"] == 1
    assert t["bpc"]["ud_ko_tiny_dev"]["docs"] == len(KO_TEXT) and t["bpc"]["ud_ko_tiny_dev"]["bits_per_char"] > 0
    assert t["tokenizer"]["ud_ko_tiny_dev"]["tokens_per_hangul_syllable"] > 0
    gens = [json.loads(l) for l in (tmp_path / "run/results.kullm.jsonl").read_text().splitlines()]
    assert gens[0]["id"] == "t0" and "answer" in gens[0] and t["kullm"]["n"] == 1
    if "translation" in tasks:
        assert set(t["en2ko"]["tiny_dev"]) >= {"chrf++", "bleu"} and t["ko2en"]["tiny_dev"]["n"] == 2
    # the same MC numbers as the library call
    items = T.load_mc_task("kobest_copa", data)
    pool = T.load_mc_task("kobest_copa", data, "train")
    qs = [(T.fewshot_context(it, T.draw_shots(pool, 1, 1234, "kobest_copa", i)), it.choices)
          for i, it in enumerate(items)]
    scores, _ = E.mc_loglikelihoods(ko_setup["model"], ko_setup["tok"], qs, batch_size=2)
    assert E.mc_metrics(scores, [i.choices for i in items], [i.gold for i in items])["acc"] == t["kobest_copa"]["acc"]


def test_cli_errors(ko_setup, tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        E.main(["--ckpt_dir", str(tmp_path), "--tokenizer_path", str(ko_setup["spm"]), "--tasks", "nope"])
    assert e.value.code == 2 and "unknown task 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        E.main(["--ckpt_dir", str(tmp_path), "--tokenizer_path", str(ko_setup["spm"]), "--tasks", "kobest"])
    assert "--data_dir" in capsys.readouterr().err


def test_hangul_share():
    assert E.hangul_share("안녕 hi") == pytest.approx(2 / 4)
    assert E.hangul_share("123 !!") is None
    assert E.hangul_share("한국어로 답합니다.") == 1.0
