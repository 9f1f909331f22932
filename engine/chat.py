"""Chat messages to a prompt, with the tokenizer's own chat template."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from engine.sampling import InvalidRequestError

CHAT_ROLES = ("system", "developer", "user", "assistant")


@dataclass(frozen=True)
class ChatPrompt:
    text: str  # the rendered template, for logs and request history
    token_ids: tuple[int, ...]  # what the model sees: the template's own special tokens, none added


def build_chat_prompt(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> ChatPrompt:
    """Render OpenAI-style messages with the generation prompt appended.

    Content may be a string or a list of text parts; anything else is an InvalidRequestError, as is
    a tokenizer without a chat template (a base model: use /v1/completions instead).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError(
            param="messages",
            message="this model's tokenizer has no chat template; use /v1/completions with a plain prompt",
            code="chat_template_missing",
        )
    if not messages:
        raise InvalidRequestError(param="messages", message="messages must contain at least one message")
    conversation = [_plain_message(i, m) for i, m in enumerate(messages)]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    except TemplateError as exc:  # the template's own raise_exception(), e.g. "roles must alternate"
        raise InvalidRequestError(
            param="messages", message=f"the chat template rejected these messages: {exc}"
        ) from exc
    # The template already holds BOS and the role markers: adding special tokens would double BOS.
    token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ChatPrompt(text=text, token_ids=tuple(token_ids))


def _plain_message(index: int, message: Mapping[str, Any]) -> dict[str, str]:
    param = f"messages[{index}]"
    if not isinstance(message, Mapping):
        raise InvalidRequestError(param=param, message="each message must be an object with role and content")
    role = message.get("role")
    if role not in CHAT_ROLES:
        raise InvalidRequestError(
            param=f"{param}.role", message=f"role must be one of {', '.join(CHAT_ROLES)}"
        )
    content = message.get("content")
    if content is None:
        content = ""
    elif isinstance(content, list):
        texts = []
        for part in content:
            if (
                not isinstance(part, Mapping)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise InvalidRequestError(
                    param=f"{param}.content", message="only text content parts are supported"
                )
            texts.append(part["text"])
        content = "".join(texts)
    elif not isinstance(content, str):
        raise InvalidRequestError(
            param=f"{param}.content", message="content must be a string or a list of text parts"
        )
    # "developer" is OpenAI's newer name for "system"; templates know only the latter.
    return {"role": "system" if role == "developer" else role, "content": content}
