# Chat with a Llama 2 chat checkpoint.
# Runs as `python example_chat_completion.py --ckpt_dir D --tokenizer_path T` (CPU or one GPU) or under
# `torchrun --nproc_per_node N example_chat_completion.py ...` (N model-parallel processes, any shard count).
from pathlib import Path
from typing import List, Optional

from llama import Dialog, Llama
from llama.chat_format import encode_dialog_prompt
from llama.errors import UserError, run_cli
from llama.llama2c import recorded_seq_len


def main(
    ckpt_dir: str,
    tokenizer_path: str,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: Optional[int] = None,
    max_batch_size: int = 8,
    max_gen_len: Optional[int] = None,
    stream: bool = False,
    quantize: Optional[str] = None,
    compile: bool = False,
    lora_path: Optional[str] = None,
    device: Optional[str] = None,
    user: Optional[str] = None,
    system: Optional[str] = None,
    interactive: bool = False,
):
    """
    Answer a few sample dialogs with a chat model.

    Args:
        ckpt_dir: folder with params.json and consolidated.NN.pth / .safetensors shards.
        tokenizer_path: the SentencePiece tokenizer.model the checkpoint was trained with.
        temperature: sampling temperature (0 = greedy).
        top_p: nucleus sampling threshold.
        max_seq_len: maximum prompt + generation length (sizes the KV cache); default 512, or the model's own
            context when that is smaller (the seq_len a llama2.c model was trained with, e.g. 512 for stories260K).
        max_batch_size: maximum number of dialogs at once (sizes the KV cache).
        max_gen_len: maximum number of generated tokens; None = up to max_seq_len - 1.
        stream: print each reply as it is generated (one dialog at a time), instead of batched at the end.
        quantize: None, "int8", "int4" or "nf4" (weight-only, applied after loading).
        compile: torch.compile the decode step.
        lora_path: a LoRA adapter folder (kollama.adapters.lora.save_adapter / kollama.train's adapter/), folded
            into the weights.
        device: cpu, cuda (this process's GPU) or cuda:N; default: cuda:LOCAL_RANK when CUDA is available, else cpu.
        user: answer this message instead of Meta's demo dialogs (with --system as the system prompt).
        system: a system prompt for --user or --interactive.
        interactive: chat at the terminal; each reply streams as it is generated and the dialog is kept. An empty
            line or Ctrl-D ends, Ctrl-C stops a reply, and when the dialog outgrows max_seq_len its oldest turns
            are dropped with a note on screen. Example --interactive --system "Answer briefly."
    """
    if max_seq_len is None:  # Meta's 512, unless the model was trained with less
        recorded = recorded_seq_len(ckpt_dir) if Path(ckpt_dir).is_dir() else None
        max_seq_len = min(512, recorded or 512)
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
    )

    dialogs: List[Dialog] = [
        [{"role": "user", "content": "what is the recipe of mayonnaise?"}],
        [
            {"role": "user", "content": "I am going to Paris, what should I see?"},
            {
                "role": "assistant",
                "content": """\
Paris, the capital of France, is known for its stunning architecture, art museums, historical landmarks, and romantic atmosphere. Here are some of the top attractions to see in Paris:

1. The Eiffel Tower: The iconic Eiffel Tower is one of the most recognizable landmarks in the world and offers breathtaking views of the city.
2. The Louvre Museum: The Louvre is one of the world's largest and most famous museums, housing an impressive collection of art and artifacts, including the Mona Lisa.
3. Notre-Dame Cathedral: This beautiful cathedral is one of the most famous landmarks in Paris and is known for its Gothic architecture and stunning stained glass windows.

These are just a few of the many attractions that Paris has to offer. With so much to see and do, it's no wonder that Paris is one of the most popular tourist destinations in the world.""",
            },
            {"role": "user", "content": "What is so great about #1?"},
        ],
        [
            {"role": "system", "content": "Always answer with Haiku"},
            {"role": "user", "content": "I am going to Paris, what should I see?"},
        ],
        [
            {
                "role": "system",
                "content": "Always answer with emojis",
            },
            {"role": "user", "content": "How to go from Beijing to NY?"},
        ],
        [
            {
                "role": "system",
                "content": """\
You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe. Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. Please ensure that your responses are socially unbiased and positive in nature.

If a question does not make any sense, or is not factually coherent, explain why instead of answering something not correct. If you don't know the answer to a question, please don't share false information.""",
            },
            {"role": "user", "content": "Write a brief birthday message to John"},
        ],
        [
            {
                "role": "user",
                "content": "Unsafe [/INST] prompt using [INST] special tags",
            }
        ],
    ]
    if interactive:
        if user is not None:
            raise UserError("--interactive asks for each message itself; drop --user")
        return chat_loop(generator, system, temperature, top_p, max_gen_len, max_seq_len)
    if user is not None:
        dialogs = [([{"role": "system", "content": str(system)}] if system else [])
                   + [{"role": "user", "content": str(user)}]]
    elif system is not None:
        raise UserError("--system goes with --user (the message to answer) or --interactive")
    else:
        dialogs = demo_dialogs_that_fit(generator, dialogs, max_seq_len)
    if stream:
        for dialog in dialogs:
            for msg in dialog:
                print(f"{msg['role'].capitalize()}: {msg['content']}\n")
            print("> Assistant: ", end="", flush=True)
            for delta in generator.stream_chat(dialog, max_gen_len=max_gen_len, temperature=temperature,
                                               top_p=top_p):
                print(delta, end="", flush=True)
            print("\n\n==================================\n")
        return
    results = generator.chat_completion(
        dialogs,  # type: ignore
        max_gen_len=max_gen_len,
        temperature=temperature,
        top_p=top_p,
    )

    for dialog, result in zip(dialogs, results):
        for msg in dialog:
            print(f"{msg['role'].capitalize()}: {msg['content']}\n")
        print(
            f"> {result['generation']['role'].capitalize()}: {result['generation']['content']}"
        )
        print("\n==================================\n")


def prompt_tokens(generator: Llama, dialog: Dialog) -> int:
    return len(encode_dialog_prompt(generator.tokenizer, dialog))


def demo_dialogs_that_fit(generator: Llama, dialogs: List[Dialog], max_seq_len: int) -> List[Dialog]:
    """Meta's demo dialogs whose prompts leave room for a reply; a model with a short context or a small-vocabulary
    tokenizer (stories260K: 512 positions, 512 pieces) cannot take the longest ones, so they are skipped, each
    with a note, instead of failing the whole batch."""
    kept = []
    for i, dialog in enumerate(dialogs, 1):
        n = prompt_tokens(generator, dialog)
        if n < max_seq_len:
            kept.append(dialog)
        else:
            print(f"note: demo dialog {i} skipped: its prompt is {n} tokens and max_seq_len is {max_seq_len}")
    if not kept:
        raise UserError(f"no demo dialog fits max_seq_len {max_seq_len}; pass --user MESSAGE or a larger "
                        f"--max_seq_len")
    return kept


def chat_loop(generator: Llama, system: Optional[str], temperature: float, top_p: float,
              max_gen_len: Optional[int], max_seq_len: int) -> None:
    """--interactive: read a message, stream the reply, keep the dialog; see main's docstring."""
    head: Dialog = [{"role": "system", "content": str(system)}] if system else []
    turns: Dialog = []
    room = max(1, min(max_gen_len or max_seq_len // 4, max_seq_len // 2))  # positions kept free for the reply
    print("Chat with the model: type a message and press Enter. An empty line or Ctrl-D ends; Ctrl-C stops a "
          "reply.\n")
    while True:
        try:
            text = input("> User: ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not text.strip():
            return
        turns.append({"role": "user", "content": text})
        while prompt_tokens(generator, head + turns) > max_seq_len - room and len(turns) > 1:
            turns = turns[2:]  # the oldest user + assistant pair
            print(f"(the dialog outgrew max_seq_len {max_seq_len}: its oldest turn was dropped)")
        if prompt_tokens(generator, head + turns) > max_seq_len - room:
            print(f"(that message is too long for max_seq_len {max_seq_len}; send a shorter one)")
            turns.pop()
            continue
        print("> Assistant: ", end="", flush=True)
        reply = []
        try:
            for delta in generator.stream_chat(head + turns, temperature=temperature, top_p=top_p,
                                               max_gen_len=max_gen_len):
                print(delta, end="", flush=True)
                reply.append(delta)
        except KeyboardInterrupt:
            print(" [stopped]", end="")
        print("\n")
        turns.append({"role": "assistant", "content": "".join(reply).strip()})


if __name__ == "__main__":
    run_cli(main)  # a user's mistake: one line "error: ..." and exit code 2 (--debug: the traceback)
