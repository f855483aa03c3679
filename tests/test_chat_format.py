"""Chat format: the exact strings of Meta's chat_completion, then exact ids with the real Llama 2 tokenizer."""
import pytest

from conftest import need
from llama.chat_format import UNSAFE_ERROR, encode_dialog_prompt, encode_dialog_turns, has_special_tags


class StringTokenizer:
    """Encodes a string as itself, so tests read the exact text each BOS..EOS segment holds."""

    bos_id, eos_id = "<s>", "</s>"

    def encode(self, s, bos, eos):
        return [self.bos_id] * bos + [s] + [self.eos_id] * eos


def test_system_and_user():
    dialog = [{"role": "system", "content": "Always answer with Haiku"},
              {"role": "user", "content": "  I am going to Paris, what should I see? "}]
    # Meta strips the merged system + user text, so the user's leading spaces after <</SYS>> survive.
    assert encode_dialog_prompt(StringTokenizer(), dialog) == [
        "<s>", "[INST] <<SYS>>\nAlways answer with Haiku\n<</SYS>>\n\n  I am going to Paris, what should I see? [/INST]"]


def test_multi_turn_each_finished_turn_has_bos_and_eos():
    dialog = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " hello! "},
              {"role": "user", "content": "and?"}]
    assert encode_dialog_prompt(StringTokenizer(), dialog) == [
        "<s>", "[INST] hi [/INST] hello! ", "</s>", "<s>", "[INST] and? [/INST]"]


@pytest.mark.parametrize("dialog,message", [
    ([{"role": "assistant", "content": "x"}], "starting with 'system', then 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "alternating"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "Last message must be from user"),
    ([{"role": "system", "content": "only a system message"}], "starting with 'system'"),
    ([], "at least one message"),
])
def test_wrong_roles_raise_metas_messages(dialog, message):
    with pytest.raises(ValueError, match=message):
        encode_dialog_prompt(StringTokenizer(), dialog)


def test_special_tags_detected():
    assert has_special_tags([{"role": "user", "content": "Unsafe [/INST] prompt using [INST] special tags"}])
    assert has_special_tags([{"role": "system", "content": "<<SYS>>"}, {"role": "user", "content": "x"}])
    assert not has_special_tags([{"role": "user", "content": "[INST without closing"}])
    assert UNSAFE_ERROR == "Error: special tags are not allowed as part of the prompt."


class CharTokenizer(StringTokenizer):
    def encode(self, s, bos, eos):
        return [self.bos_id] * bos + list(s) + [self.eos_id] * eos


def test_training_turns_split_prompt_and_answer():
    dialog = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
              {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"},
              {"role": "assistant", "content": "ok"}]
    assert encode_dialog_turns(CharTokenizer(), dialog) == [
        (["<s>", *"[INST] <<SYS>>\nS\n<</SYS>>\n\nhi [/INST]"], [*" hello ", "</s>"]),
        (["<s>", *"[INST] more [/INST]"], [*" ok ", "</s>"]),
    ]
    with pytest.raises(ValueError, match="Last message must be from assistant"):
        encode_dialog_turns(CharTokenizer(), dialog[:4])


def test_exact_ids_with_the_real_llama2_tokenizer(test_data):
    from sentencepiece import SentencePieceProcessor

    from llama.tokenizer import Tokenizer

    (path,) = need(test_data, "tokenizer.model")
    tok, sp = Tokenizer(path), SentencePieceProcessor(model_file=str(path))
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "안녕하세요?"},
              {"role": "assistant", "content": "네, 안녕하세요."}, {"role": "user", "content": "What is 2+2?"}]
    expected = ([1] + sp.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n안녕하세요? [/INST] 네, 안녕하세요. ") + [2]
                + [1] + sp.encode("[INST] What is 2+2? [/INST]"))
    assert encode_dialog_prompt(tok, dialog) == expected
    turns = encode_dialog_turns(tok, dialog[:3])
    assert len(turns) == 1 and turns[0][0] + turns[0][1] == expected[: len(turns[0][0]) + len(turns[0][1])]
    assert turns[0][1][-1] == 2 and tok.decode(turns[0][1][:-1]) == "네, 안녕하세요. "
