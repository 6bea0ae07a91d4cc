"""Chat formats: a dialog (list of {"role", "content"}) to prompt token ids."""
from __future__ import annotations

from typing import Sequence, TypedDict

from .base import Tokenizer


class Message(TypedDict):
    role: str  # "system" | "user" | "assistant"
    content: str


Dialog = Sequence[Message]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def check_dialog(dialog: Dialog) -> None:
    roles = [m["role"] for m in dialog if m["role"] != "system"]
    if not roles or roles[-1] != "user" or any(r != ("user" if i % 2 == 0 else "assistant")
                                               for i, r in enumerate(roles)):
        raise ValueError("A dialog is an optional system message, then user/assistant turns alternating, "
                         f"ending with a user turn; got roles {[m['role'] for m in dialog]}.")


def encode_llama2_dialog(dialog: Dialog, tokenizer: Tokenizer) -> list[int]:
    """Meta's Llama 2 chat format: each exchange `<s>[INST] user [/INST] answer </s>`, system folded into turn 1."""
    check_dialog(dialog)
    messages = list(dialog)
    if messages[0]["role"] == "system":
        messages = [{"role": "user", "content": B_SYS + messages[0]["content"] + E_SYS + messages[1]["content"]}] \
            + messages[2:]
    ids: list[int] = []
    for user, answer in zip(messages[::2], messages[1::2]):
        ids += tokenizer.encode(f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} ",
                                bos=True, eos=True)
    ids += tokenizer.encode(f"{B_INST} {messages[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
    return ids
