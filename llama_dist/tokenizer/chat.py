"""Chat templates: a dialog (list of {"role", "content"}) to prompt token ids.

Every format is a Jinja template, the built-in ones (Llama 2, Llama 3, ChatML) and the
`chat_template` text a GGUF or HF model ships; all are rendered in a sandboxed environment,
then tokenized with special tokens written in the text mapped to their ids.
"""
from __future__ import annotations

from datetime import datetime
from functools import lru_cache
from typing import Sequence, TypedDict

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .base import Tokenizer


class Message(TypedDict):
    role: str  # "system" | "user" | "assistant"
    content: str


Dialog = Sequence[Message]

TEMPLATES = {
    # Meta's Llama 2 chat format: system prompt folded into the first user turn.
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}"
        "{% set sys = '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' %}{% set messages = messages[1:] %}"
        "{% else %}{% set sys = '' %}{% endif %}"
        "{% for m in messages %}{% if m['role'] == 'user' %}"
        "{{ bos_token }}[INST] {{ ((sys if loop.first else '') + m['content']) | trim }} [/INST]"
        "{% else %} {{ m['content'] | trim }} {{ eos_token }}{% endif %}{% endfor %}"),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}"
        "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    "chatml": (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
}


def check_dialog(dialog: Dialog) -> None:
    roles = [m.get("role") for m in dialog]
    turns = [r for r in roles if r != "system"]
    if (not turns or turns[-1] != "user" or "system" in roles[1:]
            or any(r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(turns))
            or not all(isinstance(m.get("content"), str) for m in dialog)):
        raise ValueError("A dialog is an optional system message, then user/assistant turns alternating, "
                         f"ending with a user turn, each with string content; got roles {roles}.")


ROLES = ("system", "user", "assistant")


def check_messages(dialog: Dialog) -> None:
    """What OpenAI-compatible servers accept: any order of system/user/assistant messages with text content;
    the template lays them out. A final assistant message is continued rather than answered, so two cannot end
    the list (llama.cpp refuses that too)."""
    if not dialog or not all(isinstance(m.get("content"), str) and m.get("role") in ROLES for m in dialog):
        raise ValueError(f"Messages need a role ({', '.join(ROLES)}) and text content; got "
                         f"{[m.get('role') for m in dialog] or 'none'}.")
    if len(dialog) > 1 and dialog[-1]["role"] == dialog[-2]["role"] == "assistant":
        raise ValueError("Two assistant messages end the list: only the last message can be continued.")


def default_template(tokenizer: Tokenizer) -> str:
    """The model's own template if it ships one; else the format its tokenizer implies."""
    if tokenizer.chat_template:
        return tokenizer.chat_template
    if tokenizer.kind == "tiktoken":
        return TEMPLATES["llama3"]
    if tokenizer.encode("<|im_start|>", bos=False) == [_id_of(tokenizer, "<|im_start|>")]:
        return TEMPLATES["chatml"]
    return TEMPLATES["llama2"]


def _id_of(tokenizer: Tokenizer, text: str) -> int | None:
    ids = tokenizer.encode(text, bos=False)
    return ids[0] if len(ids) == 1 and tokenizer.token_text(ids[0]) == text else None


@lru_cache(maxsize=16)
def _compile(template: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str):
        raise TemplateError(message)

    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(template)


def render_dialog(dialog: Dialog, tokenizer: Tokenizer, template: str | None = None, strict: bool = True,
                  continue_final: bool = True) -> str:
    """The prompt text. strict: Meta's dialog rules (check_dialog); else any order (check_messages), and a final
    assistant message is continued: the text stops right after its content (llama.cpp's assistant prefill), unless
    continue_final is False (vLLM's continue_final_message), when the assistant's next turn follows it."""
    check_dialog(dialog) if strict else check_messages(dialog)
    template = TEMPLATES.get(template, template) if template else default_template(tokenizer)
    prefill = continue_final and dialog[-1]["role"] == "assistant"
    text = _compile(template).render(messages=list(dialog), add_generation_prompt=not prefill,
                                     bos_token=tokenizer.token_text(tokenizer.bos_id),
                                     eos_token=tokenizer.token_text(tokenizer.eos_id))
    if prefill:
        final = dialog[-1]["content"].strip()
        at = text.rfind(final)
        if not final or at < 0:
            raise ValueError("The final assistant message cannot be continued: the chat template does not show it.")
        text = text[:at + len(final)]
    return text


def encode_dialog(dialog: Dialog, tokenizer: Tokenizer, template: str | None = None, strict: bool = True,
                  continue_final: bool = True) -> list[int]:
    """Prompt ids for the assistant's next turn (or the rest of a final assistant message, as render_dialog).
    `template`: a TEMPLATES name, Jinja text, or None (the model's)."""
    ids = tokenizer.encode(render_dialog(dialog, tokenizer, template, strict, continue_final), bos=False)
    if tokenizer.add_bos and ids[:1] != [tokenizer.bos_id]:
        ids = [tokenizer.bos_id] + ids
    return ids
