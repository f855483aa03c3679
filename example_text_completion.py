# Text completion with a pretrained Llama 2 (or any converted Llama-architecture) checkpoint.
# Runs as `python example_text_completion.py --ckpt_dir D --tokenizer_path T` (CPU or one GPU) or under
# `torchrun --nproc_per_node N example_text_completion.py ...` (N model-parallel processes, any shard count).
from typing import List, Optional

from llama import Llama
from llama.errors import run_cli


def main(
    ckpt_dir: str,
    tokenizer_path: str,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 128,
    max_gen_len: int = 64,
    max_batch_size: int = 4,
    stream: bool = False,
    quantize: Optional[str] = None,
    compile: bool = False,
    lora_path: Optional[str] = None,
    device: Optional[str] = None,
    prompt: Optional[str] = None,
    draft: Optional[str] = None,
):
    """
    Generate continuations of a few sample prompts.

    Args:
        ckpt_dir: folder with params.json and consolidated.NN.pth / .safetensors shards.
        tokenizer_path: the SentencePiece tokenizer.model the checkpoint was trained with.
        temperature: sampling temperature (0 = greedy).
        top_p: nucleus sampling threshold.
        max_seq_len: maximum prompt + generation length (sizes the KV cache).
        max_gen_len: maximum number of generated tokens.
        max_batch_size: maximum number of prompts at once (sizes the KV cache).
        stream: print each completion as it is generated (one prompt at a time), instead of batched at the end.
        quantize: None, "int8", "int4" or "nf4" (weight-only, applied after loading).
        compile: torch.compile the decode step.
        lora_path: a LoRA adapter folder (kollama.adapters.lora.save_adapter / kollama.train's adapter/), folded
            into the weights.
        device: cpu, cuda (this process's GPU) or cuda:N; default: cuda:LOCAL_RANK when CUDA is available, else cpu.
        prompt: continue this text instead of Meta's four demo prompts.
        draft: speculative decoding with "int8" (the model's own int8 copy) or a smaller checkpoint folder; used when
            one prompt is generated at a time (--prompt, or --stream).
    """
    build = Llama.build
    extra = {}
    if lora_path or quantize == "nf4":
        from kollama.inference import build  # adapters and NF4 live in kollama; llama itself never imports it

        extra = {"lora_path": lora_path}
    generator = build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        quantize=quantize,
        compile=compile,
        device=device,
        **extra,
        **({"draft": draft} if draft else {}),
    )

    prompts: List[str] = [
        # For these prompts, the expected answer is the natural continuation of the prompt
        "I believe the meaning of life is",
        "Simply put, the theory of relativity states that ",
        """A brief message congratulating the team on the launch:

        Hi everyone,
        
        I just """,
        # Few shot prompt (providing a few examples before asking model to complete more);
        """Translate English to French:
        
        sea otter => loutre de mer
        peppermint => menthe poivrée
        plush girafe => girafe peluche
        cheese =>""",
    ]
    if prompt is not None:
        prompts = [str(prompt)]  # fire turns a numeric-looking argument into a number
    if stream:
        for prompt in prompts:
            print(prompt)
            print("> ", end="", flush=True)
            for delta in generator.stream_text(prompt, max_gen_len=max_gen_len, temperature=temperature,
                                               top_p=top_p):
                print(delta, end="", flush=True)
            print("\n\n==================================\n")
        return
    results = generator.text_completion(
        prompts,
        max_gen_len=max_gen_len,
        temperature=temperature,
        top_p=top_p,
    )
    for prompt, result in zip(prompts, results):
        print(prompt)
        print(f"> {result['generation']}")
        print("\n==================================\n")


if __name__ == "__main__":
    run_cli(main)  # a user's mistake: one line "error: ..." and exit code 2 (--debug: the traceback)
