"""Checkpoint conversion: ``python -m llama.convert COMMAND ...``.

  llama2c IN.bin OUT_DIR [--tokenizer T.model] [--fmt safetensors|pth] [--mp N]   llama2.c legacy .bin -> Meta folder
  to_llama2c CKPT_DIR OUT.bin [--seq_len N] [--overwrite]                          Meta folder -> llama2.c .bin
  reshard SRC DST --mp N [--fmt ...] [--overwrite]                                 any shard count -> N shards
  hf_to_meta SRC DST [--mp N] [--fmt safetensors|pth] [--overwrite]                HF folder -> Meta folder
  meta_to_hf SRC DST [--dtype float32|bfloat16|float16] [--max_shard_size 5GB]    Meta folder -> HF folder
             [--tokenizer T.model] [--max_position_embeddings 4096] [--overwrite]
  to_gguf CKPT_DIR OUT.gguf [--outtype f32|f16|q8_0] [--tokenizer T.model] [--overwrite]   Meta folder -> llama.cpp
(hf-to-meta and meta-to-hf are the same commands.) Conversions stream one tensor at a time and write to a temporary
folder beside DST that is renamed into place when complete; --overwrite replaces an existing DST only then. DST may
never be, hold or lie inside SRC (reshard into a new folder and rename it). to_gguf writes one file the same way (a
temporary file beside it) and needs the gguf package (pip install -e ".[gguf]"). A mistake in the input is one line
``error: ...`` on stderr with exit status 2 (``--debug`` shows the traceback).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Optional

from llama import checkpoint as ckpt
from llama import hf
from llama.errors import run_cli
from llama.llama2c import LLAMA2C_INFO, llama2c_seq_len, read_llama2c, recorded_seq_len, write_llama2c


def llama2c(src: str, dst: str, tokenizer: Optional[str] = None, fmt: str = "safetensors", mp: int = 1,
            overwrite: bool = False) -> str:
    """Convert a llama2.c legacy checkpoint (e.g. stories260K.bin) into a Meta-layout folder.

    Args:
        src (str): the llama2.c legacy .bin file (fp32, as written by llama2.c's export), e.g. stories260K.bin
        dst (str): the Meta folder to write (params.json, consolidated.NN.<fmt>, checklist.chk), never inside SRC,
            e.g. stories260K/
        tokenizer (str, default None): a SentencePiece .model to copy into DST under its own name (the one the
            checkpoint was trained with); None writes no tokenizer, e.g. --tokenizer tok512.model
        fmt (str, default "safetensors"): shard file format, "safetensors" or "pth" (torch.save, Meta's own), e.g.
            --fmt pth
        mp (int, default 1): number of model-parallel shards to write (must divide the attention and kv head counts),
            e.g. --mp 2
        overwrite (bool, default False): replace an existing DST once the new folder is complete, e.g. --overwrite
    """
    ckpt.prepare_destination(dst, overwrite, [src])  # before reading anything
    if tokenizer and not Path(tokenizer).is_file():
        raise ckpt.CheckpointError(f"--tokenizer {tokenizer} does not exist; pass the SentencePiece model this "
                                   f"checkpoint was trained with (stories260K: tok512.model), or leave it out")
    params, state = read_llama2c(src)
    ckpt.check_model_parallel_size(params, mp)
    shards = [[] for _ in range(mp)]
    for name, tensor in state.items():
        for rank, piece in enumerate(ckpt.split_tensor(name, tensor, mp)):
            shards[rank].append((name, piece))
    with tempfile.TemporaryDirectory() as tmp:
        # llama2.c's seq_len (the length of its stored rotary tables) is not a Meta params.json key (Meta's
        # Llama.build passes max_seq_len itself), so it travels in a side file that to_llama2c reads back.
        sidecar = Path(tmp) / LLAMA2C_INFO
        sidecar.write_text(json.dumps({"seq_len": llama2c_seq_len(src)}) + "\n")
        extras = [sidecar] + ([Path(tokenizer)] if tokenizer else [])
        out = ckpt.write_checkpoint(dst, params, (iter(s) for s in shards), fmt=fmt, overwrite=overwrite,
                                    extra_files=extras, sources=[src])
    print(f"wrote {out} ({mp} shard{'s' if mp > 1 else ''}, {fmt})")
    return str(out)


def to_llama2c(src: str, dst: str, seq_len: Optional[int] = None, overwrite: bool = False) -> str:
    """Convert a Meta-layout folder (any shard count) into a llama2.c legacy fp32 .bin. ``seq_len`` (the rotary
    tables' length) defaults to the one recorded when the folder was converted from llama2.c, so the file
    round-trips byte for byte; else 2048.

    Args:
        src (str): the Meta folder, params.json + consolidated.NN.pth or .safetensors (any number of shards), e.g.
            stories260K/
        dst (str): the llama2.c .bin file to write (a file path, not a folder), e.g. stories260K.bin
        seq_len (int, default None): length of the rotary tables stored in the file, in tokens (llama2.c's seq_len);
            None takes the one recorded in SRC/llama2c.json, else 2048, e.g. --seq_len 512
        overwrite (bool, default False): replace an existing DST once the new file is complete, e.g. --overwrite
    """
    ckpt.prepare_destination(dst, overwrite, [src])
    if Path(dst).is_dir():
        raise ckpt.CheckpointError(f"{dst} is a folder; to_llama2c writes one file: pass a path like {dst}/model.bin")
    source = ckpt.MetaCheckpoint(src)  # params.json checked against the shards' shapes
    params, readers = source.params, source.readers
    state = {name: ckpt.read_slice(readers, name, 0, 1) for name in readers[0].keys()}
    if seq_len is None:
        seq_len = recorded_seq_len(src)
    write_llama2c(dst, params, state, seq_len=seq_len or 2048)
    print(f"wrote {dst}")
    return dst


def reshard(src: str, dst: str, mp: int, fmt: Optional[str] = None, overwrite: bool = False) -> str:
    """Rewrite a Meta checkpoint with any number of shards as ``mp`` shards (with checklist.chk).

    Args:
        src (str): the Meta folder to read (params.json + consolidated.NN.pth or .safetensors, any shard count)
        dst (str): the new Meta folder to write, never SRC itself nor inside it (reshard into a new folder, then
            rename it), e.g. llama-2-7b-mp2/
        mp (int): number of model-parallel shards to write (must divide the attention and kv head counts), e.g. 2
        fmt (str, default None): shard file format, "safetensors" or "pth"; None keeps the format of SRC's shards,
            e.g. --fmt safetensors
        overwrite (bool, default False): replace an existing DST once the new folder is complete, e.g. --overwrite
    """
    out = ckpt.reshard(src, dst, mp, fmt=fmt, overwrite=overwrite)
    print(f"wrote {out} ({mp} shards)")
    return str(out)


def hf_to_meta(src: str, dst: str, mp: int = 1, fmt: str = "safetensors", overwrite: bool = False) -> str:
    """Convert a Hugging Face Llama folder (config.json + safetensors) into a Meta folder of ``mp`` shards.

    Args:
        src (str): the Hugging Face folder (config.json + model*.safetensors, tokenizer.model if any), e.g.
            Llama-2-7b-hf/
        dst (str): the Meta folder to write (params.json, consolidated.NN.<fmt>, checklist.chk), never inside SRC,
            e.g. llama-2-7b/
        mp (int, default 1): number of model-parallel shards to write (must divide the attention and kv head counts),
            e.g. --mp 2
        fmt (str, default "safetensors"): shard file format, "safetensors" or "pth" (torch.save, Meta's own), e.g.
            --fmt pth
        overwrite (bool, default False): replace an existing DST once the new folder is complete, e.g. --overwrite
    """
    out = hf.hf_to_meta(src, dst, mp=mp, fmt=fmt, overwrite=overwrite)
    print(f"wrote {out} ({mp} shard{'s' if mp > 1 else ''}, {fmt})")
    return str(out)


def meta_to_hf(src: str, dst: str, dtype: Optional[str] = None, max_shard_size: str = "5GB",
               overwrite: bool = False, tokenizer: Optional[str] = None,
               max_position_embeddings: int = hf.DEFAULT_MAX_POSITIONS) -> str:
    """Convert a Meta folder (any shard count) into a Hugging Face folder loadable by LlamaForCausalLM.

    Args:
        src (str): the Meta folder, params.json + consolidated.NN.pth or .safetensors (any number of shards), e.g.
            llama-2-7b/
        dst (str): the Hugging Face folder to write (config.json, model*.safetensors, tokenizer files), never inside
            SRC, e.g. Llama-2-7b-hf/
        dtype (str, default None): tensor type written, "float32", "bfloat16" or "float16"; None keeps the type
            stored in SRC, e.g. --dtype bfloat16
        max_shard_size (str, default "5GB"): largest safetensors file before a new one starts (KB/MB/GB are powers
            of 10, KiB/MiB/GiB of 2, a bare number is bytes); one bigger tensor gets a file of its own, e.g.
            --max_shard_size 500MB
        overwrite (bool, default False): replace an existing DST once the new folder is complete, e.g. --overwrite
        tokenizer (str, default SRC/tokenizer.model if present): the SentencePiece .model to include (its BOS/EOS
            ids go into config.json); without one DST has no tokenizer, e.g. --tokenizer tokenizer.model
        max_position_embeddings (int, default 4096): config.json's max_position_embeddings, the context length in
            tokens that Hugging Face tools assume (params.json does not record it), e.g. --max_position_embeddings 2048
    """
    out = hf.meta_to_hf(src, dst, dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
                        tokenizer=tokenizer, max_position_embeddings=max_position_embeddings)
    if not (out / hf.TOKENIZER_FILE).is_file():
        print(f"note: no tokenizer.model in {src}; pass --tokenizer to include one")
    print(f"wrote {out}")
    return str(out)


def to_gguf(ckpt_dir: str, out: str, outtype: str = "f16", tokenizer: Optional[str] = None,
            overwrite: bool = False) -> str:
    """Export a Meta folder (any shard count) as one GGUF file for llama.cpp (architecture "llama", tokenizer inside).

    Needs the gguf package: pip install -e ".[gguf]". The context length written is llama2c.json's seq_len (a folder
    converted from llama2.c), else params.json's max_seq_len, else 4096 (Llama 2's); the command prints which.
    Example: python -m llama.convert to_gguf llama-2-7b-ko/ llama-2-7b-ko.gguf --outtype q8_0

    Args:
        ckpt_dir (str): the Meta folder, params.json + consolidated.NN.pth or .safetensors (any number of
            shards), e.g. stories260K/
        out (str): the GGUF file to write, never inside CKPT_DIR (a missing folder is created), e.g. stories260K.gguf
        outtype (str, default "f16"): tensor type, "f32" (exact), "f16" (half the size, llama.cpp's default) or
            "q8_0" (8-bit blocks of 32 values with an f16 scale, about 27 % of f32; a weight whose rows are not
            whole blocks stays f16); norms stay f32 in every type, e.g. --outtype q8_0
        tokenizer (str, default CKPT_DIR/tokenizer.model): the SentencePiece .model the model was trained with (an
            expanded Korean vocabulary included), required when CKPT_DIR has no tokenizer.model, e.g. --tokenizer
            tok512.model
        overwrite (bool, default False): replace an existing OUT once the new file is complete, e.g. --overwrite
    """
    from llama.gguf_export import to_gguf as export

    info = export(ckpt_dir, out, outtype=outtype, tokenizer=tokenizer, overwrite=overwrite)
    for note in info["notes"]:
        print(f"note: {note}")
    print(f"wrote {info['path']} ({info['outtype']}, {info['tensors']} tensors, vocabulary {info['vocab_size']}, "
          f"context_length {info['context_length']} from {info['context_length_from']})")
    return info["path"]


COMMANDS = {"llama2c": llama2c, "to_llama2c": to_llama2c, "reshard": reshard, "hf_to_meta": hf_to_meta,
            "hf-to-meta": hf_to_meta, "meta_to_hf": meta_to_hf, "meta-to-hf": meta_to_hf, "to_gguf": to_gguf}


def main():
    run_cli(COMMANDS, name="python -m llama.convert")


if __name__ == "__main__":
    main()
