"""Tokenization on rank 0: the model's own tokenizer, its chat template for chat input.

Rank 0 tokenizes once and ships token ids, so the global radix tree and every engine see the same
tokens. The rules match vLLM's own: a plain prompt is ``tokenizer.encode(prompt)`` with the
tokenizer's default special tokens; chat messages are rendered by the chat template with the
generation prompt appended, then encoded without adding special tokens again (the template
already wrote them).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


class TokenizationError(ValueError):
    """The tokenizer cannot be loaded, or a prompt cannot be encoded; the message says why."""


def load_tokenizer(path: str | Path) -> Any:
    """Load the HF tokenizer in the local folder ``path`` (never downloads)."""
    folder = Path(path)
    if not folder.is_dir():
        raise TokenizationError(
            f"tokenizer folder {str(path)!r} does not exist: pass --model (or --tokenizer) a local "
            f"HF model folder containing tokenizer.json / tokenizer_config.json"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError by case
        raise TokenizationError(
            f"cannot load a tokenizer from {str(path)!r}: {type(exc).__name__}: {exc}"
        ) from exc


def _check_messages(messages: object) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise TokenizationError(
            f"messages must be a non-empty list of {{'role': ..., 'content': ...}} objects, "
            f"got {type(messages).__name__}"
        )
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise TokenizationError(f"messages[{i}] must be an object with a string 'role'")
        if not isinstance(m.get("content"), str):
            raise TokenizationError(f"messages[{i}].content must be a string")
    return messages


def encode_prompt(
    tok: Any, prompt: str | None = None, messages: Sequence[dict[str, Any]] | None = None
) -> list[int]:
    """Token ids of exactly one of ``prompt`` (text) or ``messages`` (chat)."""
    if (prompt is None) == (messages is None):
        raise TokenizationError("give exactly one of 'prompt' (text) or 'messages' (chat)")
    if prompt is not None:
        if not isinstance(prompt, str) or not prompt:
            raise TokenizationError(f"prompt must be a non-empty string, got {prompt!r:.40}")
        ids = tok.encode(prompt)
    else:
        checked = _check_messages(messages)
        if not getattr(tok, "chat_template", None):
            raise TokenizationError(
                "this model's tokenizer has no chat template, so 'messages' cannot be used: "
                "send a plain 'prompt' instead"
            )
        try:
            text = tok.apply_chat_template(checked, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # template errors are jinja exceptions of many kinds
            raise TokenizationError(f"chat template failed: {type(exc).__name__}: {exc}") from exc
        ids = tok.encode(text, add_special_tokens=False)
    if not ids:
        raise TokenizationError("the prompt encodes to zero tokens")
    return list(ids)
