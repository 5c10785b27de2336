"""Render a conversation with the model's own chat template and tokenize it safely.

The template's markup (`<|im_start|>user` and the like) must become special
tokens, but message text must not: a user who types "<|im_start|>system"
would otherwise open a system turn of their own. So the template is
rendered with a placeholder in place of each message's content, which
locates every content span in the rendered text. The whole text is then
tokenized as usual. If a special token overlaps a content span, the text is
tokenized again piece by piece. Template pieces get special tokens
recognised, and content pieces get `split_special_tokens=True`, which turns
special-token strings into ordinary text tokens. Ordinary prompts thus get
exactly the tokens `apply_chat_template(tokenize=True)` gives, because
tokenizing in pieces merges differently across piece boundaries.

NOTE: added tokens that are not special, such as Qwen2.5's `<tool_call>`,
are kept as single tokens even in content, since `split_special_tokens` only
splits special ones. They cannot open or close a turn.

Every message's string content is treated as untrusted, assistant content
included, because API clients send the whole history. Tool calls made by the
model belong in an assistant message's `tool_calls` field, where the
template renders them as markup, not in its content.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

import structlog

log = structlog.get_logger(__name__)


@dataclass
class _Piece:
    text: str
    is_content: bool  # message text, tokenized with special-token strings split


def render_prompt(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> str:
    """Render messages with the tokenizer's chat template, ending with the assistant turn's opening."""
    return "".join(piece.text for piece in _render_pieces(tokenizer, messages, tools))


def encode_prompt(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Tokenize the rendered prompt; special-token strings inside message content stay plain text.

    The rendered template already contains every special token the model
    expects (SmolLM2's BOS is its first `<|im_start|>`), so nothing is added.
    """
    pieces = _render_pieces(tokenizer, messages, tools)
    text = "".join(piece.text for piece in pieces)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    if not _special_token_in_content(tokenizer, ids, encoded["offset_mapping"], _content_spans(pieces)):
        return ids

    log.info("prompt_special_tokens_split", num_pieces=len(pieces))
    ids = []
    for piece in pieces:
        if piece.text:
            ids.extend(tokenizer(piece.text, add_special_tokens=False,
                                 split_special_tokens=piece.is_content)["input_ids"])
    return ids


def count_prompt_tokens(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> int:
    return len(encode_prompt(tokenizer, messages, tools))


def _render_pieces(tokenizer, messages: list[dict], tools: list[dict] | None) -> list[_Piece]:
    """Render the template around placeholders and split it into template and content pieces."""
    # A random tag cannot occur in a template or in user text by accident.
    tag = f"CHATPIPE{secrets.token_hex(8)}"
    placeholder = re.compile(rf"{tag}_(\d+)_")

    contents: list[str] = []
    templated: list[dict] = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            message = {**message, "content": f"{tag}_{len(contents)}_"}
            contents.append(content)
        templated.append(message)

    rendered = tokenizer.apply_chat_template(
        templated, tools=tools or None, tokenize=False, add_generation_prompt=True
    )

    pieces: list[_Piece] = []
    position = 0
    for match in placeholder.finditer(rendered):
        pieces.append(_Piece(rendered[position:match.start()], is_content=False))
        pieces.append(_Piece(contents[int(match.group(1))], is_content=True))
        position = match.end()
    pieces.append(_Piece(rendered[position:], is_content=False))
    return pieces


def _content_spans(pieces: list[_Piece]) -> list[tuple[int, int]]:
    """Return the [start, end) character spans of the content pieces in the joined text."""
    spans = []
    position = 0
    for piece in pieces:
        end = position + len(piece.text)
        if piece.is_content and piece.text:
            spans.append((position, end))
        position = end
    return spans


def _special_token_in_content(tokenizer, ids: list[int], offsets, spans: list[tuple[int, int]]) -> bool:
    special_ids = {token_id for token_id, token in tokenizer.added_tokens_decoder.items() if token.special}
    for token_id, (start, end) in zip(ids, offsets):
        if token_id not in special_ids:
            continue
        # A special token that overlaps content, even partly, came from user text.
        if any(start < span_end and span_start < end for span_start, span_end in spans):
            return True
    return False
