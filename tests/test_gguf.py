"""``python -m llama.convert to_gguf``: the GGUF file read back with gguf's own reader (every tensor, the
hyperparameters, the tokenizer against the SentencePiece model itself) for 1 and 2 shards and each --outtype; then
llama.cpp (llama-cpp-python, when installed) running the file: logits of a random model equal ours, and stories260K's
greedy continuations are our tokens. Bad input: one line, exit code 2, nothing written."""
import io
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from helpers import ENGLISH, random_model, save_meta, tiny_args, train_tiny_tokenizer
from llama.gguf_export import GGUFExportError, gguf_name, to_gguf

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install -e \".[test]\")")

ROOT = Path(__file__).resolve().parents[1]
Q = gguf.GGMLQuantizationType
# dim 64 and a 192-wide FFN: every weight's rows are whole q8_0 blocks of 32
ARGS = tiny_args(dim=64, n_heads=4, n_kv_heads=2, multiple_of=32)
KOREAN = ["한국어", "토크나이저", "영화", "정말", "재미있다", "배우", "서울", "날씨", "좋다", "오늘", "친구", "음식"]
GGML_TYPE_F32 = 0  # llama.cpp's KV cache is f16 unless asked otherwise; f32 makes its logits comparable to 1e-4


def field(reader, key):
    """A metadata value as Python: str, int/float/bool, or a list (bytes for a list of strings)."""
    f = reader.fields[key]
    kind = f.types[0]
    if kind == gguf.GGUFValueType.ARRAY:
        if f.types[1] == gguf.GGUFValueType.STRING:
            return [bytes(f.parts[i]) for i in f.data]
        return [f.parts[i].tolist()[0] for i in f.data]
    if kind == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8")
    return f.parts[f.data[0]].tolist()[0]


def tensors(reader):
    return {t.name: t for t in reader.tensors}


def expected_types(sp_path):
    """gguf token types from the SentencePiece model: its processor's predicates, and the protobuf for
    user-defined pieces (which the processor cannot tell)."""
    from sentencepiece import sentencepiece_model_pb2 as pb2

    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    proto = pb2.ModelProto()
    proto.ParseFromString(Path(sp_path).read_bytes())
    types = []
    for i in range(sp.vocab_size()):
        t = gguf.TokenType.NORMAL
        if sp.is_unknown(i):
            t = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            t = gguf.TokenType.CONTROL
        elif sp.is_byte(i):
            t = gguf.TokenType.BYTE
        elif sp.is_unused(i):
            t = gguf.TokenType.UNUSED
        elif proto.pieces[i].type == pb2.ModelProto.SentencePiece.USER_DEFINED:
            t = gguf.TokenType.USER_DEFINED
        types.append(int(t))
    return types


def check_tokenizer(reader, sp_path, n_vocab):
    sp = spm.SentencePieceProcessor(model_file=str(sp_path))
    n = sp.vocab_size()
    assert field(reader, "tokenizer.ggml.model") == "llama"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == n_vocab == field(reader, "llama.vocab_size")
    assert tokens[:n] == [sp.id_to_piece(i).encode("utf-8") for i in range(n)]
    assert tokens[n:] == [f"[PAD{i}]".encode() for i in range(n, n_vocab)]
    assert np.array_equal(np.float32(field(reader, "tokenizer.ggml.scores")[:n]),
                          np.float32([sp.get_score(i) for i in range(n)]))
    assert field(reader, "tokenizer.ggml.token_type") == expected_types(sp_path) + [5] * (n_vocab - n)
    assert field(reader, "tokenizer.ggml.bos_token_id") == sp.bos_id()
    assert field(reader, "tokenizer.ggml.eos_token_id") == sp.eos_id()
    assert field(reader, "tokenizer.ggml.unknown_token_id") == sp.unk_id()
    assert ("tokenizer.ggml.padding_token_id" in reader.fields) == (sp.pad_id() >= 0)
    assert field(reader, "tokenizer.ggml.add_bos_token") is True
    assert field(reader, "tokenizer.ggml.add_eos_token") is False


def check_q8_0(block_bytes, reference):
    """q8_0 blocks dequantize to ``reference`` within half a step, plus the f16 rounding of the step (relative
    2**-11, times up to 127 steps: 0.062 of a step)."""
    values = gguf.quants.dequantize(block_bytes, Q.Q8_0)
    assert values.shape == reference.shape
    blocks = reference.reshape(-1, 32)
    step = np.abs(blocks).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(values.reshape(-1, 32) - blocks) <= step * 0.57 + 1e-8)
    assert np.array_equal(block_bytes, gguf.quants.quantize(reference, Q.Q8_0))  # and it is gguf's own encoding


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model")


@pytest.fixture(scope="module")
def model():
    return random_model(ARGS, seed=3)


@pytest.mark.parametrize("mp", [1, 2])
@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_tensors_metadata_and_tokenizer(tmp_path, model, tokenizer, mp, outtype):
    ckpt = save_meta(model, tmp_path / "ckpt", mp=mp, fmt="safetensors" if mp == 1 else "pth",
                     extra_files=[tokenizer])
    out = tmp_path / "out" / "model.gguf"  # the folder is created
    info = to_gguf(ckpt, out, outtype=outtype)
    assert info["context_length"] == 4096 and "Llama 2" in info["context_length_from"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.gguf"]  # no temporary file left
    reader = gguf.GGUFReader(out)

    state = model.state_dict()
    got = tensors(reader)
    assert sorted(got) == sorted(gguf_name(n) for n in state)
    assert len(got) == 2 + 9 * ARGS.n_layers + 1
    for name, ref in state.items():
        t = got[gguf_name(name)]
        ref = ref.numpy()  # GGUF holds q/k rows as Meta stores them (llama.cpp's rope rotates adjacent pairs)
        assert [int(d) for d in t.shape] == list(reversed(ref.shape)), name  # GGUF dims are (cols, rows)
        if ref.ndim == 1 or outtype == "f32":
            assert t.tensor_type == Q.F32 and np.array_equal(t.data, ref), name
        elif outtype == "f16":
            assert t.tensor_type == Q.F16 and np.array_equal(t.data, ref.astype(np.float16)), name
        else:
            assert t.tensor_type == Q.Q8_0, name
            check_q8_0(np.asarray(t.data), ref)

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    expected = {"general.architecture": "llama", "general.file_type": int(file_type),
                "llama.context_length": 4096, "llama.embedding_length": ARGS.dim, "llama.block_count": ARGS.n_layers,
                "llama.feed_forward_length": ARGS.ffn_hidden_dim, "llama.attention.head_count": ARGS.n_heads,
                "llama.attention.head_count_kv": ARGS.n_kv_heads, "llama.rope.dimension_count": ARGS.head_dim,
                "llama.rope.freq_base": ARGS.rope_theta, "llama.vocab_size": ARGS.vocab_size,
                "general.quantization_version": gguf.GGML_QUANT_VERSION}
    assert {k: field(reader, k) for k in expected} == expected
    assert field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(ARGS.norm_eps, rel=1e-6)
    check_tokenizer(reader, tokenizer, ARGS.vocab_size)


def test_q8_0_keeps_partial_blocks_f16(tmp_path, tokenizer):
    """dim 48 is not a whole number of 32-value blocks: those weights are f16 (as llama.cpp's converter does);
    w2, whose rows are 128 wide, is q8_0."""
    args = tiny_args()
    model = random_model(args, seed=5)
    ckpt = save_meta(model, tmp_path / "ckpt", extra_files=[tokenizer])
    info = to_gguf(ckpt, tmp_path / "m.gguf", outtype="q8_0")
    assert any("stored f16" in n for n in info["notes"])
    got = tensors(gguf.GGUFReader(tmp_path / "m.gguf"))
    for name, ref in model.state_dict().items():
        t, ref = got[gguf_name(name)], ref.numpy()
        if ref.ndim == 1:
            assert t.tensor_type == Q.F32
        elif ref.shape[1] % 32:
            assert t.tensor_type == Q.F16 and np.array_equal(t.data, ref.astype(np.float16)), name
        else:
            assert t.tensor_type == Q.Q8_0, name
            check_q8_0(np.asarray(t.data), ref)


def _korean_lines(n=300, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choices(KOREAN, k=6)) for _ in range(n)]


def _train(path, lines, vocab_size, **options):
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size,
                                   model_type="bpe", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2, num_threads=1, **options)
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture(scope="module")
def korean_tokenizers(tmp_path_factory):
    """A Korean vocabulary merged into the tiny English one (kollama.vocab merge: Hangul pieces appended below
    every base score, then unused padding pieces), and a tokenizer with user-defined pieces and byte fallback."""
    root = tmp_path_factory.mktemp("ko")
    ko = _train(root / "ko.model", _korean_lines(), 80)
    from kollama.vocab.merge import merge

    merged = root / "merged.model"
    merge(train_tiny_tokenizer(root / "base.model"), ko, merged, pad_multiple=16)
    user = _train(root / "user.model", ENGLISH * 20 + _korean_lines(100), 400, byte_fallback=True,
                  user_defined_symbols=["<sep>", "한국어"], hard_vocab_limit=False)
    return {"merged": merged, "user_defined": user}


@pytest.mark.parametrize("kind", ["merged", "user_defined"])
def test_expanded_vocabularies_come_through(tmp_path, korean_tokenizers, kind):
    tok = korean_tokenizers[kind]
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    args = tiny_args(vocab_size=sp.vocab_size())
    ckpt = save_meta(random_model(args, seed=7), tmp_path / "ckpt")
    to_gguf(ckpt, tmp_path / "m.gguf", outtype="f16", tokenizer=str(tok))
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    check_tokenizer(reader, tok, sp.vocab_size())
    types = field(reader, "tokenizer.ggml.token_type")
    tokens = field(reader, "tokenizer.ggml.tokens")
    hangul = [t for t, ty in zip(tokens, types)
              if ty == gguf.TokenType.NORMAL and any("\uac00" <= c <= "\ud7a3" for c in t.decode())]
    assert len(hangul) >= 10, "the Korean pieces are in the vocabulary"
    if kind == "merged":
        assert types.count(gguf.TokenType.UNUSED) > 0  # the merge's padding pieces
    else:
        assert [t for t, ty in zip(tokens, types) if ty == gguf.TokenType.USER_DEFINED] == [b"<sep>", "한국어".encode()]
        assert types.count(gguf.TokenType.BYTE) == 256


def test_embedding_rows_beyond_the_tokenizer_are_padding(tmp_path, tokenizer):
    args = tiny_args(vocab_size=136)  # 8 rows more than the 128 pieces
    ckpt = save_meta(random_model(args), tmp_path / "ckpt")
    info = to_gguf(ckpt, tmp_path / "m.gguf", outtype="f32", tokenizer=str(tokenizer))
    assert any("[PADn]" in n for n in info["notes"])
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    check_tokenizer(reader, tokenizer, 136)
    assert field(reader, "tokenizer.ggml.scores")[128:] == [-10000.0] * 8


def test_a_tokenizer_larger_than_the_embedding_is_refused(tmp_path, tokenizer):
    ckpt = save_meta(random_model(tiny_args(vocab_size=120)), tmp_path / "ckpt", extra_files=[tokenizer])
    with pytest.raises(GGUFExportError, match="128 pieces but the model's embedding has only 120 rows"):
        to_gguf(ckpt, tmp_path / "m.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_context_length_from_params_json(tmp_path, tokenizer):
    ckpt = save_meta(random_model(tiny_args()), tmp_path / "ckpt", extra_files=[tokenizer])
    text = (ckpt / "params.json").read_text()
    (ckpt / "params.json").write_text(text.replace('"dim"', '"max_seq_len": 777, "dim"'))
    info = to_gguf(ckpt, tmp_path / "m.gguf")
    assert (info["context_length"], info["context_length_from"]) == (777, "params.json max_seq_len")
    assert field(gguf.GGUFReader(tmp_path / "m.gguf"), "llama.context_length") == 777


def test_failed_write_leaves_the_old_file(tmp_path, tokenizer, monkeypatch):
    import llama.gguf_export as export

    ckpt = save_meta(random_model(tiny_args()), tmp_path / "ckpt", extra_files=[tokenizer])
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    calls = []

    def fail_on_third(array, qtype):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(array, qtype)

    real = export.encode_tensor
    monkeypatch.setattr(export, "encode_tensor", fail_on_third)
    with pytest.raises(KeyboardInterrupt):
        to_gguf(ckpt, out, overwrite=True)
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "m.gguf"]


# ---------------------------------------------------------------------------------------------------------------
# Bad input through the command line
# ---------------------------------------------------------------------------------------------------------------
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, model, tokenizer, monkeypatch, capsys):
    from llama import convert

    monkeypatch.delenv("LLAMA_DEBUG", raising=False)
    bare = save_meta(model, tmp_path / "bare")  # no tokenizer.model inside
    with_tok = save_meta(model, tmp_path / "with_tok", extra_files=[tokenizer])
    existing = tmp_path / "existing.gguf"
    existing.write_bytes(b"keep me")
    cases = [
        ([bare, tmp_path / "a.gguf"], "has no tokenizer.model", "--tokenizer"),
        ([bare, tmp_path / "a.gguf", "--tokenizer", tmp_path / "nope.model"], "does not exist", "--tokenizer"),
        ([with_tok, existing], "exists", "--overwrite"),
        ([with_tok, with_tok / "inside.gguf"], "is inside the source", "outside"),
        ([with_tok, tmp_path / "a.gguf", "--outtype", "q4_k"], "--outtype 'q4_k' is not supported", "q8_0"),
        ([tmp_path / "missing", tmp_path / "a.gguf"], "does not exist", "params.json"),
        ([with_tok, tmp_path / "a.gguf", "--out_type", "f32"], "unknown option --out_type", "--outtype"),
        ([with_tok, tmp_path / "a.gguf"], "needs the gguf package", 'pip install -e ".[gguf]"'),  # last: no gguf
    ]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    for i, (args, problem, fix) in enumerate(cases):
        if i == len(cases) - 1:
            monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
        monkeypatch.setattr(sys, "argv", ["llama.convert", "to_gguf", *map(str, args)])
        with pytest.raises(SystemExit) as exit_:
            convert.main()
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2, (args, err)
        assert len(err) == 1 and err[0].startswith("error: ") and problem in err[0] and fix in err[0], err
    monkeypatch.setitem(sys.modules, "gguf", gguf)  # the real package again
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written, nothing left behind
    assert existing.read_bytes() == b"keep me"

    # the real command line, under python -m (its module is imported twice there: see llama/errors.py)
    env = {**{k: v for k, v in os.environ.items() if k != "LLAMA_DEBUG"}, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "llama.convert", "to_gguf", str(bare), str(existing)]
    proc = subprocess.run(command + ["--overwrite"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {bare} has no tokenizer.model; a GGUF file carries its "
                                                f"tokenizer: pass --tokenizer path/to/tokenizer.model"]
    proc = subprocess.run(command + ["--overwrite", "--outtype", "f32", "--tokenizer", str(tokenizer)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and f"wrote {existing} (f32, " in proc.stdout, proc.stderr
    assert field(gguf.GGUFReader(existing), "general.file_type") == int(gguf.LlamaFileType.ALL_F32)


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp runs the file
# ---------------------------------------------------------------------------------------------------------------
def llama_cpp():
    return pytest.importorskip("llama_cpp", exc_type=ImportError,  # also skip a build that fails to import
                               reason="llama-cpp-python cannot be imported (pip install -e \".[bench]\"); the "
                                      "llama.cpp comparisons are skipped")


def test_llama_cpp_logits_equal_ours(tmp_path, model, tokenizer):
    """A random model makes any layout mistake visible: q/k rows in HF's order, say, move the logits by O(1)."""
    lc = llama_cpp()
    ckpt = save_meta(model, tmp_path / "ckpt", mp=2, extra_files=[tokenizer])
    ids = [1] + np.random.RandomState(0).randint(3, ARGS.vocab_size, size=24).tolist()
    with torch.no_grad():
        ours = model(torch.tensor([ids]), 0)[0].numpy()
    for outtype, atol in (("f32", 1e-4), ("f16", 0.1), ("q8_0", 1.0)):
        to_gguf(ckpt, tmp_path / f"{outtype}.gguf", outtype=outtype)
        runner = lc.Llama(model_path=str(tmp_path / f"{outtype}.gguf"), n_ctx=64, logits_all=True, verbose=False,
                          seed=0, n_threads=1, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
        runner.eval(ids)
        theirs = np.asarray(runner.scores[:len(ids)])
        assert np.abs(theirs - ours).max() < atol, outtype
        assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= (1.0 if outtype == "f32" else 0.8), outtype
        text = "Once upon a time there was a little girl"
        assert runner.tokenize(text.encode(), add_bos=True) == [1] + spm.SentencePieceProcessor(
            model_file=str(tokenizer)).encode(text)
        del runner


def test_llama_cpp_tokenizes_a_merged_korean_vocabulary_like_sentencepiece(tmp_path, korean_tokenizers):
    lc = llama_cpp()
    tok = korean_tokenizers["merged"]
    sp = spm.SentencePieceProcessor(model_file=str(tok))
    ckpt = save_meta(random_model(tiny_args(vocab_size=sp.vocab_size())), tmp_path / "ckpt")
    to_gguf(ckpt, tmp_path / "m.gguf", outtype="f16", tokenizer=str(tok))
    runner = lc.Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    for text in ["오늘 서울 날씨 좋다", "한국어 토크나이저 정말 재미있다", "the park 친구 음식"]:
        assert runner.tokenize(text.encode(), add_bos=True) == [sp.bos_id()] + sp.encode(text), text


def _greedy_llama_cpp(runner, prompt_ids, n):
    """llama.cpp's own greedy continuation: argmax over its logits after each evaluated token."""
    runner.reset()
    runner.eval(prompt_ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(runner.scores[runner.n_tokens - 1]))
        if token == runner.token_eos():
            break
        out.append(token)
        runner.eval([token])
    return out


@pytest.fixture(scope="module")
def stories(tmp_path_factory, test_data):
    """stories260K converted from llama2.c into a Meta folder, and exported f32 (tokenizer tok512.model)."""
    from conftest import need
    from llama import convert

    bin_path, tok = need(test_data, "stories260K.bin", "tok512.model")
    root = tmp_path_factory.mktemp("stories")
    convert.llama2c(str(bin_path), str(root / "ckpt"), tokenizer=str(tok))
    info = to_gguf(root / "ckpt", root / "s.f32.gguf", outtype="f32", tokenizer=str(tok))
    return root, tok, info


PROMPTS = ["Once upon a time", "The little dog", "Lily and Tom went to the park."]


def test_stories260k_greedy_in_llama_cpp_equals_ours(stories):
    from llama import Llama

    root, tok, info = stories
    assert info["context_length"] == 512 and info["context_length_from"] == "llama2c.json seq_len"
    reader = gguf.GGUFReader(root / "s.f32.gguf")
    assert field(reader, "llama.context_length") == 512 and field(reader, "llama.attention.head_count_kv") == 4
    check_tokenizer(reader, tok, 512)
    lc = llama_cpp()
    ours = Llama.build(ckpt_dir=str(root / "ckpt"), tokenizer_path=str(tok), max_seq_len=128, max_batch_size=1,
                       device="cpu")
    # logits_all: llama-cpp-python keeps the logits in runner.scores only then (else its sampler reads them)
    runner = lc.Llama(model_path=str(root / "s.f32.gguf"), n_ctx=128, logits_all=True, verbose=False, seed=0,
                      n_threads=1, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    for prompt in PROMPTS:
        prompt_ids = ours.tokenizer.encode(prompt, bos=True, eos=False)
        assert runner.tokenize(prompt.encode(), add_bos=True) == prompt_ids  # BOS and the dummy prefix alike
        generated, _ = ours.generate([prompt_ids], max_gen_len=30, temperature=0)
        theirs = _greedy_llama_cpp(runner, prompt_ids, 30)
        assert theirs == generated[0], (prompt, ours.tokenizer.decode(theirs), ours.tokenizer.decode(generated[0]))
        text = ours.text_completion([prompt], temperature=0, max_gen_len=30)[0]["generation"]
        # llama.cpp keeps the leading space of the first generated piece; SentencePiece's decode drops it
        assert runner.detokenize(theirs).decode("utf-8").lstrip(" ") == text
        completion = runner.create_completion(prompt, max_tokens=30, temperature=0, top_k=1, repeat_penalty=1.0)
        assert completion["choices"][0]["text"].lstrip(" ") == text  # llama.cpp's own sampler and detokenizer
        print(f"\nllama.cpp greedy = ours (stories260K f32, {len(theirs)} tokens): {prompt!r} -> {text!r}")


def test_stories260k_q8_0_runs_in_llama_cpp(stories):
    root, tok, _ = stories
    info = to_gguf(root / "ckpt", root / "s.q8_0.gguf", outtype="q8_0", tokenizer=str(tok))
    assert any("stored f16" in n for n in info["notes"])  # w2's rows are 172 values wide
    assert (root / "s.q8_0.gguf").stat().st_size < 0.4 * (root / "s.f32.gguf").stat().st_size
    lc = llama_cpp()
    runner = lc.Llama(model_path=str(root / "s.q8_0.gguf"), n_ctx=128, logits_all=False, verbose=False, seed=0,
                      n_threads=1)
    text = runner.create_completion(PROMPTS[0], max_tokens=30, temperature=0, top_k=1)["choices"][0]["text"]
    words = text.split()
    assert len(words) >= 10 and sum(w.strip(".,!").isalpha() for w in words) >= 0.8 * len(words), text
    print(f"\nllama.cpp greedy (stories260K q8_0): {PROMPTS[0]!r} -> {text!r}")
