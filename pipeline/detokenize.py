"""Incremental detokenization and stop-string hold-back.

Byte-level BPE splits one character (a Chinese character, an emoji) across
several tokens, and decoding such a token alone gives U+FFFD. The
`IncrementalDetokenizer` therefore decodes a short window of recent tokens
twice: up to the read offset (text already emitted) and up to the newest
token, and emits only the difference, once it no longer ends in U+FFFD.

The engine and the detokenize stage run the same classes on the same token
ids, so both cut a stop string at the same place.
"""

from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turn token ids, pushed a few at a time, into text deltas.

    Invariant: the concatenation of every `push` result and the final
    `flush` equals `tokenizer.decode(all_ids, skip_special_tokens=...)` for
    byte-level BPE tokenizers, whose decode of a window does not depend on
    the tokens before it.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        # Window [prefix_offset, read_offset) is decoded text already emitted;
        # tokens from read_offset on are not yet emitted.
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_ids: list[int]) -> str:
        """Append token ids; return the newly completed text, possibly ""."""
        self.token_ids.extend(token_ids)
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        full_text = self._decode(self.prefix_offset, len(self.token_ids))

        if len(full_text) <= len(prefix_text) or full_text.endswith(REPLACEMENT_CHAR):
            return ""

        self.prefix_offset = self.read_offset
        self.read_offset = len(self.token_ids)
        return full_text[len(prefix_text):]

    def flush(self) -> str:
        """Return the held-back tail, including an incomplete character as U+FFFD."""
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        full_text = self._decode(self.prefix_offset, len(self.token_ids))
        self.prefix_offset = self.read_offset = len(self.token_ids)
        return full_text[len(prefix_text):]

    def _decode(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        return self.tokenizer.decode(
            self.token_ids[start:end],
            skip_special_tokens=self.skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )


class StopStringMatcher:
    """Cut streamed text at the first stop string.

    `push` holds back the longest suffix that could still grow into a stop
    string, so no part of a matched stop string is ever emitted. After a
    match, every later `push` returns ("", None) and `flush` returns "".
    """

    def __init__(self, stops: list[str]) -> None:
        if any(not stop for stop in stops):
            raise ValueError(f"stop strings must be non-empty; got {stops!r}")
        self.stops = list(stops)
        self.held = ""
        self.matched: str | None = None

    def push(self, text: str) -> tuple[str, str | None]:
        """Add text; return (text safe to emit, the stop string matched by this push or None)."""
        if self.matched is not None:
            return "", None
        buffer = self.held + text

        match_start, matched = self._find_first_stop(buffer)
        if matched is not None:
            self.matched = matched
            self.held = ""
            return buffer[:match_start], matched

        num_held = self._num_chars_to_hold(buffer)
        self.held = buffer[len(buffer) - num_held:] if num_held else ""
        return buffer[: len(buffer) - num_held], None

    def flush(self) -> str:
        """Return the held-back text at the end of the stream (no stop string followed)."""
        held, self.held = self.held, ""
        return held if self.matched is None else ""

    def _find_first_stop(self, buffer: str) -> tuple[int, str | None]:
        # Earliest start wins; on a tie the stop listed first wins.
        best_start, best_stop = len(buffer) + 1, None
        for stop in self.stops:
            start = buffer.find(stop)
            if start != -1 and start < best_start:
                best_start, best_stop = start, stop
        return best_start, best_stop

    def _num_chars_to_hold(self, buffer: str) -> int:
        """Length of the longest buffer suffix that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:length]):
                    longest = length
                    break
        return longest
