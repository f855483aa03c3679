"""kollama.data.rows: template layouts (ids and labels from hand-written prompt strings encoded with sentencepiece
directly), bad-row reporting, packing with a block-diagonal mask, batching, deterministic shuffling."""
import io
import json
import logging

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F

from helpers import ENGLISH, random_model, tiny_args
from kollama.data import rows as D
from llama.tokenizer import Tokenizer

KOREAN = ["아래는 작업을 설명하는 명령어입니다. 요청을 적절히 완료하는 응답을 작성하세요.",
          "추가 컨텍스트를 제공하는 입력이 짝을 이루는 예제입니다. 명령어 입력 응답",
          "영화가 정말 재미있었어요. 배우들의 연기가 좋았습니다.", "한국어 문장을 번역하세요."]
# Written out by hand from KULLM's templates/kullm.json and Stanford Alpaca's train.py (not imported from kollama).
KULLM_NO_INPUT = ("아래는 작업을 설명하는 명령어입니다. 요청을 적절히 완료하는 응답을 작성하세요.\n\n"
                  "### 명령어:\n{instruction}\n\n### 응답:\n")
KULLM_INPUT = ("아래는 작업을 설명하는 명령어와 추가 컨텍스트를 제공하는 입력이 짝을 이루는 예제입니다. 요청을 적절히 "
               "완료하는 응답을 작성하세요.\n\n### 명령어:\n{instruction}\n\n### 입력:\n{input}\n\n### 응답:\n")
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
                "### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    """A Llama-like BPE tokenizer (byte fallback, identity normalization: '\\n' survives) on Korean and English."""
    path = tmp_path_factory.mktemp("tok") / "ko.model"
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter((KOREAN + ENGLISH) * 20), model_writer=buf, vocab_size=400, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2, num_threads=1)
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture(scope="module")
def tok(tok_path):
    return Tokenizer(str(tok_path))


@pytest.fixture(scope="module")
def sp(tok_path):
    return spm.SentencePieceProcessor(model_file=str(tok_path))


def expected(sp, prompt, response, train_on_inputs=False):
    """BOS + sp(prompt + response) + EOS; labels -100 on BOS + the prompt's own pieces."""
    ids = [1] + sp.encode(prompt + response) + [2]
    n_prompt = 1 + len(sp.encode(prompt))
    labels = ([-100] + ids[1:n_prompt] if train_on_inputs else [-100] * n_prompt) + ids[n_prompt:]
    return ids, labels


def encode(tok, template, record, **kw):
    (kind, value), = D.parse_record(record)
    ex = D.encode_row(D.Row("x:1", kind, value), tok, template, **kw)
    return ex.input_ids, ex.labels


@pytest.mark.parametrize("template,with_input", [("kullm", False), ("kullm", True), ("alpaca", False),
                                                  ("alpaca", True)])
def test_instruction_templates_exact(tok, sp, template, with_input):
    inst, inp, out = "영화 리뷰를 한 문장으로 요약하세요.", "배우들의 연기가 좋았습니다." if with_input else "", "좋은 영화입니다."
    hand = {("kullm", False): KULLM_NO_INPUT, ("kullm", True): KULLM_INPUT, ("alpaca", False): ALPACA_NO_INPUT,
            ("alpaca", True): ALPACA_INPUT}[template, with_input]
    prompt = hand.format(instruction=inst, input=inp)
    assert encode(tok, template, {"instruction": inst, "input": inp, "output": out}) == expected(sp, prompt, out)
    assert encode(tok, template, {"instruction": inst, "input": inp, "output": out}, train_on_inputs=True) == \
        expected(sp, prompt, out, train_on_inputs=True)


def test_llama2_chat_multi_turn_exact(tok, sp):
    dialog = [{"role": "system", "content": "친절하게 답하세요."}, {"role": "user", "content": "안녕하세요?"},
              {"role": "assistant", "content": "반갑습니다."}, {"role": "user", "content": "영화 추천해 주세요."},
              {"role": "assistant", "content": "좋은 영화입니다."}]
    p1 = "[INST] <<SYS>>\n친절하게 답하세요.\n<</SYS>>\n\n안녕하세요? [/INST]"
    p2 = "[INST] 영화 추천해 주세요. [/INST]"
    ids1, lab1 = expected(sp, p1, " 반갑습니다. ")
    ids2, lab2 = expected(sp, p2, " 좋은 영화입니다. ")
    assert encode(tok, "llama2-chat", {"messages": dialog}) == (ids1 + ids2, lab1 + lab2)
    # ShareGPT spelling of the same dialog
    share = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
             for m in dialog]
    assert encode(tok, "llama2-chat", {"conversations": share}) == (ids1 + ids2, lab1 + lab2)
    # An instruction row becomes one turn: user = instruction + "\n\n" + input
    got = encode(tok, "llama2-chat", {"instruction": "요약하세요.", "input": "좋은 영화", "output": "좋다"})
    assert got == expected(sp, "[INST] 요약하세요.\n\n좋은 영화 [/INST]", " 좋다 ")


def test_text_template(tok, sp):
    ids, labels = encode(tok, "text", {"text": "영화가 정말 재미있었어요."})
    assert ids == [1] + sp.encode("영화가 정말 재미있었어요.") + [2]
    assert labels == [-100] + ids[1:]


def test_bad_rows_reported_with_file_and_line(tmp_path, tok, caplog):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"instruction": "a", "output": "b"}),  # 1 ok
             "{not json",  # 2
             json.dumps({"instruction": "a"}),  # 3 no output
             "",  # 4 blank: ignored
             json.dumps(["a list"]),  # 5 not an object
             json.dumps({"messages": [{"role": "robot", "content": "x"}]}),  # 6 unknown role
             json.dumps({"instruction": "a", "input": 3, "output": "b"}),  # 7 input not a string
             json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),  # 8
             json.dumps({"instruction": "c", "output": "d"})]  # 9 ok
    path.write_text("\n".join(lines) + "\n")
    stats = D.DataStats()
    with caplog.at_level(logging.WARNING, logger="kollama.data"):
        ex = D.load_examples([path], tok, "kullm", 512, stats=stats)
    assert len(ex) == 2 and stats.rows == 8
    # line 8 is a valid chat row but the kullm template needs instruction rows
    assert [s.split(": ")[0] for s in stats.skipped] == [f"{path}:{n}" for n in (2, 3, 5, 6, 7, 8)]
    assert "'output' is missing" in stats.skipped[1] and "--template llama2-chat" in stats.skipped[5]
    assert f"{path}:2" in caplog.text and "6 malformed rows skipped" in stats.summary()


def test_json_array_line_numbers_and_kullm_instances(tmp_path, tok):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a"},\n'
                    '  {"instruction": "q", "instances": [{"input": "x", "output": "y"}, {"input": "", "output": "z"}]}'
                    '\n]\n')
    stats = D.DataStats()
    rows = D.read_rows(path, stats=stats)
    assert [r.source for r in rows] == [f"{path}:2", f"{path}:4", f"{path}:4"]
    assert stats.skipped == [f"{path}:3: field 'output' is missing"]
    assert rows[1].value == {"instruction": "q", "input": "x", "output": "y"}


def test_zero_usable_rows_is_an_error(tmp_path, tok):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}))
    with pytest.raises(D.DataError, match="no usable training examples.*--template llama2-chat"):
        D.load_examples(path, tok, "alpaca", 512)
    with pytest.raises(D.DataError, match="not found"):
        D.load_examples(tmp_path / "missing.jsonl", tok, "alpaca", 512)


def test_cutoff_truncates_and_counts(tmp_path, tok):
    path = tmp_path / "d.txt"
    path.write_text("\n".join(ENGLISH) + "\n\n")
    stats = D.DataStats()
    ex = D.load_examples(path, tok, "text", 8, stats=stats)
    assert len(ex) == 5 and stats.truncated == 5 and all(len(e) == 8 for e in ex)
    # A prompt longer than the cutoff leaves no target: dropped and counted, not trained on
    inst = tmp_path / "i.jsonl"
    inst.write_text(json.dumps({"instruction": ENGLISH[0], "output": "ok"}) + "\n" +
                    json.dumps({"instruction": "a", "output": "b"}) + "\n")
    short = len(encode(tok, "alpaca", {"instruction": "a", "output": "b"})[0])
    stats = D.DataStats()
    assert len(D.load_examples(inst, tok, "alpaca", short, stats=stats)) == 1
    assert stats.no_target == 1 and stats.truncated == 1


def test_deterministic_shuffle_and_dev_split():
    items = list(range(50))
    assert D.shuffled(items, 3) == D.shuffled(items, 3) != D.shuffled(items, 4)
    assert sorted(D.shuffled(items, 3)) == items
    exs = [D.Example([1, i], [-100, i]) for i in range(20)]
    train, dev = D.split_dev(exs, 0.1, seed=7)
    assert len(dev) == 2 and len(train) == 18
    assert [e.input_ids for e in D.split_dev(exs, 0.1, seed=7)[1]] == [e.input_ids for e in dev]
    with pytest.raises(D.DataError, match="dev_fraction"):
        D.split_dev(exs, 1.5, 0)


def _ex(n, start):
    ids = list(range(start, start + n))
    return D.Example(ids, [-100] + ids[1:])


def test_packing_blocks_segments_and_mask():
    exs = [_ex(5, 10), _ex(7, 20), _ex(4, 30), _ex(9, 40), _ex(3, 50)]
    rows = D.pack(exs, 12)
    assert [len(r) for r in rows] == [12, 4, 12]
    assert rows[0].segments == [0] * 5 + [1] * 7 and rows[2].segments == [0] * 9 + [1] * 3
    assert rows[0].input_ids == exs[0].input_ids + exs[1].input_ids
    assert rows[0].labels == exs[0].labels + exs[1].labels  # each example's first label stays -100
    batch = D.collate(rows)
    assert batch["tokens"].shape == (3, 12) and batch["tokens"][1, 4:].eq(D.PAD_ID).all()
    assert batch["labels"][1, 4:].eq(-100).all()
    m = batch["mask"][0, 0]
    assert m[:5, :5].equal(torch.ones(5, 5, dtype=torch.bool).tril()) and not m[5:, :5].any() and not m[:5, 5:].any()
    assert m[5:, 5:].equal(torch.ones(7, 7, dtype=torch.bool).tril())
    assert batch["mask"][1, 0].diagonal().all()  # padded queries see themselves: no all-False row (NaN)
    unpacked = D.collate([_ex(3, 1), _ex(5, 1)])
    assert unpacked["mask"] is None and unpacked["labels"][0, 3:].eq(-100).all()
    assert D.count_targets(rows) == sum(n - 1 for n in (5, 7, 4, 9, 3))


def test_packed_logits_and_loss_equal_unpacked():
    """No attention across examples; rotary positions are absolute in the packed row, which RoPE's relative
    property makes equal (to rounding) to restarting at 0 for each example."""
    torch.manual_seed(0)
    model = random_model(tiny_args(max_seq_len=64), seed=3)
    exs = [D.Example(t, [-100] + t[1:]) for t in
           (torch.randint(3, 128, (n,)).tolist() for n in (9, 14, 6, 11))]
    rows = D.pack(exs, 32)
    assert len(rows) == 2
    packed = D.collate(rows)
    with torch.no_grad():
        logits = model(packed["tokens"], 0, use_cache=False, mask=packed["mask"])
        offsets = {}
        for r, row in enumerate(rows):
            for i, s in enumerate(row.segments):
                offsets.setdefault((r, s), i)
        k = 0
        for r, row in enumerate(rows):
            for s in sorted(set(row.segments)):
                alone = model(torch.tensor([exs[k].input_ids]), 0, use_cache=False)[0]
                o = offsets[r, s]
                assert (logits[r, o:o + len(exs[k])] - alone).abs().max().item() < 1e-4
                k += 1
        loss_packed = F.cross_entropy(logits[:, :-1].flatten(0, 1), packed["labels"][:, 1:].flatten(), reduction="sum")
        single = D.collate(exs)
        logits2 = model(single["tokens"], 0, use_cache=False)
        loss_single = F.cross_entropy(logits2[:, :-1].flatten(0, 1), single["labels"][:, 1:].flatten(), reduction="sum")
    assert abs(loss_packed.item() - loss_single.item()) < 1e-3
