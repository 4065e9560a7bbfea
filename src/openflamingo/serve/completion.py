"""One answer (an OpenAI "choice") as it is generated: its tokens, the text that may be sent, and why it ended.

Text is decoded from all tokens so far (a token can be half of a UTF-8 character, or of a word the tokenizer joins),
and text that could still turn into a stop sequence is held back, so a streamed answer never shows a stop sequence
or a broken character that a later token would change.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what decoding yields for an incomplete UTF-8 sequence


class Completion:
    def __init__(self, tokenizer, stop: list[str], stop_token_ids: set[int], max_tokens: int):
        self.tokenizer = tokenizer
        self.stop = stop
        self.stop_token_ids = stop_token_ids
        self.max_tokens = max_tokens
        self.tokens: list[int] = []
        self.sent = ""  # text already handed out
        self.finish_reason: str | None = None  # "stop" | "length" once finished

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int) -> str:
        """Record a generated token; returns the text that became final with it (maybe "")."""
        self.tokens.append(token)
        text = self._text()
        # Only the new tail can hold a new match: search from where each stop could start; the earliest wins.
        starts = [text.find(stop, max(0, len(self.sent) - len(stop))) for stop in self.stop]
        if any(start >= 0 for start in starts):
            self.finish_reason = "stop"
            return self._release(text[: min(start for start in starts if start >= 0)], final=True)
        if token in self.stop_token_ids:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.max_tokens:
            self.finish_reason = "length"
        return self._release(text, final=self.finished)

    def _text(self) -> str:
        # The stop token itself is special and dropped, and so is leading whitespace (the space a prompt format puts
        # before its answers, "Short answer: circle"), as `openflamingo generate` drops both. Once a visible character
        # has come the stripped prefix no longer changes, so text already sent stays a prefix of the answer.
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True).lstrip()

    def _release(self, text: str, final: bool) -> str:
        end = len(text)
        if not final:
            if text.endswith(REPLACEMENT):
                end -= 1
            end -= max(
                (k for s in self.stop for k in range(1, len(s)) if text[:end].endswith(s[:k])), default=0
            )
        if end <= len(self.sent):
            return ""
        delta = text[len(self.sent) : end]
        self.sent += delta
        return delta
