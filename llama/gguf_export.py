"""A Meta-layout checkpoint as one GGUF file (architecture ``llama``) that llama.cpp runs:
``python -m llama.convert to_gguf CKPT_DIR OUT.gguf``.

What llama.cpp's own ``convert_hf_to_gguf.py`` (``LlamaModel``) writes, written here from a Meta folder:

* Tensors, one per Meta tensor, renamed through gguf's own table (``gguf.TENSOR_NAMES``): tok_embeddings ->
  ``token_embd``, layers.N.attention.wq/wk/wv/wo -> ``blk.N.attn_q/attn_k/attn_v/attn_output``, feed_forward.w1/w2/w3
  -> ``ffn_gate/ffn_down/ffn_up``, attention_norm/ffn_norm -> ``attn_norm/ffn_norm``, norm -> ``output_norm``,
  output -> ``output``. A (rows, cols) weight is stored as numpy's (rows, cols), i.e. GGUF dims (cols, rows).
* q/k rows: **as Meta stores them.** llama.cpp's ``llama`` architecture rotates adjacent pairs (x[2i], x[2i+1]),
  which is Meta's interleaved layout; its HF converter reorders transformers' half-split rows back to it
  (``LlamaModel.permute`` is ``llama.hf.permute_to_meta``), so from a Meta folder nothing is permuted: the GGUF rows
  equal ``permute_to_meta(permute_to_hf(w))`` = ``w``. (Writing HF's order makes llama.cpp's greedy text diverge from
  ours; tests/test_gguf.py checks llama.cpp's tokens and logits against ``llama``'s.)
* Types (``--outtype``): f32, f16, or q8_0 (``gguf.quants``: blocks of 32 values with one f16 scale). 1-D tensors (the
  norms) stay f32 in every type; under q8_0 a weight whose rows are not a multiple of 32 values is stored f16, as
  llama.cpp's converter does. ``general.file_type`` is the matching ``gguf.LlamaFileType``.
* Hyperparameters: ``llama.context_length`` (llama2c.json's seq_len for a folder converted from llama2.c, else
  params.json's max_seq_len, else 4096, Llama 2's training context: Meta's params.json does not record it),
  embedding_length, block_count, feed_forward_length (the FFN width of the weights), attention.head_count /
  head_count_kv, attention.layer_norm_rms_epsilon, rope.freq_base, rope.dimension_count (the head size), vocab_size.
* The SentencePiece tokenizer (``tokenizer.ggml.model`` = "llama"): every piece of the ``.model`` file with its
  score and type (normal, unknown, control, user-defined, unused, byte: the .model's own types, read from its
  protobuf, since SentencePieceProcessor cannot tell user-defined pieces), bos/eos/unk (and pad) ids, add_bos = true
  and add_eos = false (as ``Llama`` encodes prompts), add_space_prefix from the model's normalizer. A vocabulary
  expanded for Korean comes through whole; an embedding with more rows than the tokenizer has pieces gets
  ``[PADn]`` unused tokens for the rest (as llama.cpp's converter does), fewer rows are refused.

Tensors are read one at a time through ``MetaCheckpoint`` / ``read_slice`` (any shard count) and written straight
to the file: the tensor table is written first from the shapes, then each tensor's data as it is read, so at most
one tensor (and its converted copy) is in memory. The file is written beside OUT and renamed into place
(``llama.files.atomic_write``). The ``gguf`` package is an optional extra (``pip install -e ".[gguf]"``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import numpy as np

from llama.checkpoint import (
    CheckpointError,
    MetaCheckpoint,
    expected_shapes,
    open_shards,
    prepare_destination,
    read_slice,
)
from llama.errors import UserError
from llama.files import atomic_write
from llama.hf import DEFAULT_MAX_POSITIONS, TOKENIZER_FILE
from llama.llama2c import LLAMA2C_INFO, recorded_seq_len
from llama.model import ModelArgs

OUTTYPES = ("f32", "f16", "q8_0")
PAD_SCORE = -10000.0  # the score llama.cpp's converter gives the [PADn] tokens beyond the tokenizer
REOPEN_BYTES = 1 << 30  # reopen the shards after reading this much (see write())

# Meta's names -> gguf.MODEL_TENSOR member names (the GGUF names come from gguf.TENSOR_NAMES)
_GLOBAL_TENSORS = {"tok_embeddings.weight": "TOKEN_EMBD", "norm.weight": "OUTPUT_NORM", "output.weight": "OUTPUT"}
_LAYER_TENSORS = {
    "attention.wq.weight": "ATTN_Q", "attention.wk.weight": "ATTN_K", "attention.wv.weight": "ATTN_V",
    "attention.wo.weight": "ATTN_OUT", "feed_forward.w1.weight": "FFN_GATE", "feed_forward.w2.weight": "FFN_DOWN",
    "feed_forward.w3.weight": "FFN_UP", "attention_norm.weight": "ATTN_NORM", "ffn_norm.weight": "FFN_NORM",
}


class GGUFExportError(UserError):
    """A to_gguf input that cannot be exported as given; the message says what to change."""


def import_gguf():
    """The ``gguf`` package, or one line saying how to install it."""
    try:
        import gguf
    except ImportError as e:
        raise GGUFExportError(f"to_gguf needs the gguf package ({e}); install it with: pip install -e \".[gguf]\" "
                              f"(or pip install gguf)") from e
    return gguf


def gguf_name(meta_name: str) -> str:
    """The GGUF tensor name of a Meta tensor name (``layers.3.attention.wq.weight`` -> ``blk.3.attn_q.weight``)."""
    gguf = import_gguf()
    if meta_name in _GLOBAL_TENSORS:
        return gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[_GLOBAL_TENSORS[meta_name]]] + ".weight"
    parts = meta_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        template = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR[_LAYER_TENSORS[parts[2]]]]
        return template.format(bid=int(parts[1])) + ".weight"
    raise GGUFExportError(f"{meta_name!r} is not a Llama 2 parameter name; GGUF has no name for it")


# ---------------------------------------------------------------------------------------------------------------
# The SentencePiece vocabulary
# ---------------------------------------------------------------------------------------------------------------
class Vocabulary(NamedTuple):
    tokens: List[bytes]
    scores: List[float]
    types: List[int]  # gguf.TokenType values, which are SentencePiece's piece types (NORMAL=1 ... BYTE=6)
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int
    add_space_prefix: bool
    normalization: Optional[str]  # what SentencePiece does to text that llama.cpp does not, or None
    n_pieces: int  # the tokenizer's own pieces; tokens beyond them are [PADn]


def _varint(buf: bytes, i: int) -> Tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes) -> Iterator[Tuple[int, object]]:
    """(field number, value) of each field of a protobuf message: an int for varints, bytes otherwise."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = buf[i:i + size], i + size
        else:
            raise ValueError(f"protobuf wire type {wire}")
        yield field, value


def _model_proto_facts(data: bytes) -> Tuple[List[int], dict]:
    """From a SentencePiece ModelProto (sentencepiece_model.proto): each piece's type (field 1 ``pieces``, its field
    3 ``type``, default NORMAL = 1) and the normalizer spec (field 3: name 1, add_dummy_prefix 3, default true,
    remove_extra_whitespaces 4, default true). Read by hand so that no protobuf runtime is needed."""
    types, normalizer = [], {"name": "", "add_dummy_prefix": True, "remove_extra_whitespaces": True}
    for field, value in _fields(data):
        if field == 1:
            types.append(next((v for f, v in _fields(value) if f == 3), 1))
        elif field == 3:
            for f, v in _fields(value):
                if f == 1:
                    normalizer["name"] = bytes(v).decode("utf-8", "replace")
                elif f == 3:
                    normalizer["add_dummy_prefix"] = bool(v)
                elif f == 4:
                    normalizer["remove_extra_whitespaces"] = bool(v)
    return types, normalizer


def read_vocabulary(path, n_vocab: int) -> Vocabulary:
    """The GGUF vocabulary of the SentencePiece model ``path`` for an embedding of ``n_vocab`` rows."""
    from llama.tokenizer import Tokenizer

    path = Path(path)
    sp = Tokenizer(str(path)).sp_model  # a clear error for a missing or non-SentencePiece file
    n = sp.vocab_size()
    try:
        types, normalizer = _model_proto_facts(path.read_bytes())
    except (ValueError, IndexError) as e:
        raise GGUFExportError(f"{path} could not be read as a SentencePiece model ({e}); pass the tokenizer.model "
                              f"file itself") from e
    if len(types) != n:
        raise GGUFExportError(f"{path} lists {len(types)} pieces but SentencePiece reads {n}; pass an intact "
                              f"tokenizer.model")
    if n > n_vocab:
        raise GGUFExportError(f"the tokenizer {path} has {n} pieces but the model's embedding has only {n_vocab} "
                              f"rows; pass the tokenizer this model was trained with (after expanding a vocabulary, "
                              f"resize the checkpoint first: python -m kollama.vocab resize)")
    tokens = [sp.id_to_piece(i).encode("utf-8") for i in range(n)]
    scores = [float(sp.get_score(i)) for i in range(n)]
    for i in range(n, n_vocab):  # embedding rows beyond the tokenizer (padding to a multiple), as llama.cpp does
        tokens.append(f"[PAD{i}]".encode("utf-8"))
        scores.append(PAD_SCORE)
        types.append(5)  # UNUSED
    changes = []
    if normalizer["name"] not in ("identity", ""):
        changes.append(f"applies the {normalizer['name']!r} normalization")
    if normalizer["remove_extra_whitespaces"]:
        changes.append("collapses repeated spaces")
    return Vocabulary(tokens, scores, types, sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id(),
                      normalizer["add_dummy_prefix"], " and ".join(changes) or None, n)


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------
def context_length(ckpt_dir: Path, params: dict) -> Tuple[int, str]:
    """(llama.context_length, where it came from): llama2c.json's seq_len, else params.json's max_seq_len, else
    Llama 2's 4096."""
    seq_len = recorded_seq_len(ckpt_dir)
    if seq_len is not None:
        return seq_len, f"{LLAMA2C_INFO} seq_len"
    if params.get("max_seq_len"):
        return int(params["max_seq_len"]), "params.json max_seq_len"
    return DEFAULT_MAX_POSITIONS, "Llama 2's training context (params.json does not record one)"


def tensor_type(shape: Tuple[int, ...], outtype: str):
    """The GGMLQuantizationType a tensor is stored as: f32 for 1-D tensors, f16 for a q8_0 weight whose rows are
    not whole blocks, else ``outtype``."""
    gguf = import_gguf()
    q = gguf.GGMLQuantizationType
    if len(shape) == 1 or outtype == "f32":
        return q.F32
    if outtype == "q8_0":
        block = gguf.GGML_QUANT_SIZES[q.Q8_0][0]
        return q.Q8_0 if shape[-1] % block == 0 else q.F16
    return q.F16


def encode_tensor(array: np.ndarray, qtype) -> np.ndarray:
    """``array`` (float32) as the bytes/values GGUF stores for ``qtype``."""
    gguf = import_gguf()
    q = gguf.GGMLQuantizationType
    if qtype == q.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    if qtype == q.F16:
        return np.ascontiguousarray(array, dtype=np.float16)
    return gguf.quants.quantize(array, qtype)


def to_gguf(ckpt_dir, out, *, outtype: str = "f16", tokenizer: Optional[str] = None,
            overwrite: bool = False) -> dict:
    """Write the Meta folder ``ckpt_dir`` (any shard count) as the GGUF file ``out``; see the module docstring.
    Returns a summary: path, outtype, tensors, context_length and where it came from, vocab_size, notes."""
    if not isinstance(outtype, str) or outtype.lower() not in OUTTYPES:
        raise GGUFExportError(f"--outtype {outtype!r} is not supported; use one of {', '.join(OUTTYPES)}")
    outtype = outtype.lower()
    gguf = import_gguf()
    ckpt_dir, out = Path(ckpt_dir), Path(out)
    prepare_destination(out, overwrite, [ckpt_dir])  # before reading anything: never inside CKPT_DIR, no clobbering
    if out.is_dir():
        raise GGUFExportError(f"OUT {out} is a folder; to_gguf writes one file: pass a path like {out}/model.gguf")
    if tokenizer is not None:
        tok_path = Path(str(tokenizer))
        if not tok_path.is_file():
            raise GGUFExportError(f"--tokenizer {tok_path} does not exist; pass the SentencePiece tokenizer.model "
                                  f"this model was trained with")
    elif (ckpt_dir / TOKENIZER_FILE).is_file():
        tok_path = ckpt_dir / TOKENIZER_FILE
    else:
        if not ckpt_dir.is_dir():
            raise CheckpointError(f"checkpoint folder {str(ckpt_dir)!r} does not exist; pass the folder holding "
                                  f"params.json and the consolidated.NN shards")
        others = sorted(p.name for p in ckpt_dir.glob("*.model"))
        example = ckpt_dir / others[0] if others else "path/to/tokenizer.model"
        raise GGUFExportError(f"{ckpt_dir} has no {TOKENIZER_FILE}{f' (it holds {others})' if others else ''}; a "
                              f"GGUF file carries its tokenizer: pass --tokenizer {example}")

    source = MetaCheckpoint(ckpt_dir)  # params.json checked against the shards' shapes
    params, readers, n_vocab = source.params, source.readers, source.vocab_size
    shapes = expected_shapes(params, n_vocab)  # Meta's order: embedding, layers, norm, output
    unexpected = sorted(set(readers[0].keys()) - set(shapes))
    if unexpected:
        raise GGUFExportError(f"{ckpt_dir} holds tensors a Llama 2 model does not have ({unexpected[:5]}); GGUF "
                              f"export would drop them: remove them or export another checkpoint")
    args = ModelArgs(**{**params, "vocab_size": n_vocab})
    vocab = read_vocabulary(tok_path, n_vocab)
    n_ctx, n_ctx_from = context_length(ckpt_dir, params)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name(ckpt_dir.resolve().name)
    writer.add_context_length(n_ctx)
    writer.add_embedding_length(args.dim)
    writer.add_block_count(args.n_layers)
    writer.add_feed_forward_length(shapes["layers.0.feed_forward.w1.weight"][0])  # the width the weights have
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.kv_heads)
    writer.add_layer_norm_rms_eps(float(args.norm_eps))
    writer.add_rope_freq_base(float(args.rope_theta))
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    for add, token_id in ((writer.add_bos_token_id, vocab.bos_id), (writer.add_eos_token_id, vocab.eos_id),
                          (writer.add_unk_token_id, vocab.unk_id), (writer.add_pad_token_id, vocab.pad_id)):
        if token_id >= 0:
            add(token_id)
    writer.add_add_bos_token(vocab.bos_id >= 0)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(vocab.add_space_prefix)

    types: Dict[str, object] = {}
    for name, shape in shapes.items():  # the tensor table, from shapes alone
        qtype = types[name] = tensor_type(shape, outtype)
        if qtype == gguf.GGMLQuantizationType.Q8_0:
            byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(gguf_name(name), byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), qtype)
        else:
            dtype = np.dtype(np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16)
            writer.add_tensor_info(gguf_name(name), shape, dtype, int(np.prod(shape)) * dtype.itemsize)

    def write(tmp: Path) -> None:
        shards, read = readers, 0
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for name in shapes:  # the same order as the table
                tensor = read_slice(shards, name, 0, 1)
                read += tensor.numel() * tensor.element_size()
                writer.write_tensor_data(encode_tensor(tensor.float().numpy(), types[name]))
                if read >= REOPEN_BYTES:
                    # Pages read through a memory-mapped shard stay in this process's RSS while it is open;
                    # reopening now and then lets them go (as meta_to_hf does).
                    shards, read = open_shards(ckpt_dir), 0
        finally:
            writer.close()

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, write)
    notes = []
    fallback = [n for n, t in types.items() if outtype == "q8_0" and t == gguf.GGMLQuantizationType.F16]
    if fallback:
        notes.append(f"{len(fallback)} weights whose rows are not a multiple of 32 values are stored f16, not q8_0 "
                     f"(as llama.cpp's converter does), e.g. {gguf_name(fallback[0])}")
    if vocab.n_pieces < n_vocab:
        notes.append(f"the tokenizer has {vocab.n_pieces} pieces and the embedding {n_vocab} rows: the other "
                     f"{n_vocab - vocab.n_pieces} are [PADn] unused tokens")
    if vocab.normalization:
        notes.append(f"the tokenizer {tok_path} {vocab.normalization}; llama.cpp does not, so text this changes "
                     f"may tokenize differently there")
    return {"path": str(out), "outtype": outtype, "tensors": len(shapes), "context_length": n_ctx,
            "context_length_from": n_ctx_from, "vocab_size": n_vocab, "tokenizer": str(tok_path), "notes": notes}
