"""Llama 2 chat format: dialogs of {role, content} messages to token ids, exactly as Meta's ``chat_completion``.

Each finished (user, assistant) turn is encoded on its own as ``BOS [INST] {user} [/INST] {assistant} EOS``; the
open last turn as ``BOS [INST] {user} [/INST]``. A system message is folded into the first user message between
``<<SYS>>`` tags. ``kollama`` formats chat training data with the same functions, so training and inference agree.
"""
from __future__ import annotations

from typing import List, Literal, Optional, Tuple, TypedDict

from llama.errors import UserError

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


Dialog = List[Message]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."

ROLE_ORDER_ERROR = (
    "model only supports 'system', 'user' and 'assistant' roles, "
    "starting with 'system', then 'user' and alternating (u/a/u/a/u...)"
)


def has_special_tags(dialog: Dialog) -> bool:
    """True when any message contains a tag that would let the user forge turns."""
    return any(tag in msg["content"] for tag in SPECIAL_TAGS for msg in dialog)


def merge_system_message(dialog: Dialog) -> Dialog:
    """Fold a leading system message into the first user message, as Meta does."""
    if dialog and dialog[0]["role"] == "system":
        if len(dialog) < 2:
            raise UserError(ROLE_ORDER_ERROR)
        merged = B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]
        return [{"role": dialog[1]["role"], "content": merged}] + list(dialog[2:])
    return list(dialog)


def check_roles(dialog: Dialog, last_role: Optional[Role] = "user") -> None:
    """Roles must alternate user/assistant starting with user; ``last_role`` is required of the final message."""
    if not dialog:
        raise UserError("a dialog needs at least one message")
    if not (all(m["role"] == "user" for m in dialog[::2]) and all(m["role"] == "assistant" for m in dialog[1::2])):
        raise UserError(ROLE_ORDER_ERROR)
    if last_role is not None and dialog[-1]["role"] != last_role:
        raise UserError(f"Last message must be from {last_role}, got {dialog[-1]['role']}")


def turn_texts(dialog: Dialog, last_role: Optional[Role] = "user") -> Tuple[List[Tuple[str, str]], Optional[str]]:
    """Split a dialog into finished (prompt, answer) text pairs and the open final prompt (None if it ends
    with an assistant message). Prompts are ``[INST] {user} [/INST]``, answers `` {assistant} ``."""
    dialog = merge_system_message(dialog)
    check_roles(dialog, last_role)
    pairs = [
        (f"{B_INST} {user['content'].strip()} {E_INST}", f" {answer['content'].strip()} ")
        for user, answer in zip(dialog[::2], dialog[1::2])
    ]
    last = f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}" if dialog[-1]["role"] == "user" else None
    return pairs, last


def encode_dialog_prompt(tokenizer, dialog: Dialog) -> List[int]:
    """Token ids of a dialog ending with a user message, ready for the assistant's reply."""
    pairs, last = turn_texts(dialog, last_role="user")
    tokens: List[int] = []
    for prompt, answer in pairs:
        tokens += tokenizer.encode(prompt + answer, bos=True, eos=True)
    tokens += tokenizer.encode(last, bos=True, eos=False)
    return tokens


def encode_dialog_turns(tokenizer, dialog: Dialog) -> List[Tuple[List[int], List[int]]]:
    """(prompt_ids, answer_ids) per turn for training, the concatenation equal to how inference encodes the turn.

    The whole turn is encoded as one string (so ids match ``encode_dialog_prompt``) and split where the prompt's
    own encoding ends; answer_ids ends with EOS. A dialog must end with an assistant message.
    """
    pairs, _ = turn_texts(dialog, last_role="assistant")
    out = []
    for prompt, answer in pairs:
        full = tokenizer.encode(prompt + answer, bos=True, eos=True)
        head = tokenizer.encode(prompt, bos=True, eos=False)
        if full[: len(head)] != head:
            raise UserError(f"tokenizer merges across the [/INST] boundary; cannot split turn {prompt!r}")
        out.append((head, full[len(head):]))
    return out
