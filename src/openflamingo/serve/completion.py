"""One answer (an OpenAI "choice") as it is generated: its tokens, the text that may be sent, and why it ended.

Each new token costs time in proportion to the text it adds, never to the answer so far: it is decoded together with
the few tokens before it (a token can be half of a UTF-8 character, or of a word the tokenizer joins, so its text is
only final once decoding it in context no longer ends in a broken character), and stop sequences are searched only
where they could newly end. Text that could still turn into a stop sequence is held back, so a streamed answer never
shows a stop sequence or a broken character that a later token would change.
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
        self.text = ""  # the answer's final text so far (leading whitespace dropped)
        self.sent = 0  # characters of `text` already handed out
        self.finish_reason: str | None = None  # "stop" | "length" once finished
        # tokens[context:pending] are decoded only as context of the tokens from `pending` on, whose text is final
        # except for a broken character at its end; `taken` characters of that text are in `text` already.
        self._context = 0
        self._pending = 0
        self._taken = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int) -> str:
        """Record a generated token; returns the text that became final with it (maybe "")."""
        self.tokens.append(token)
        if token in self.stop_token_ids:
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.max_tokens:
            self.finish_reason = "length"
        searched_from = len(self.text)
        self._decode_new(final=self.finished)
        stop_at = self._stop_in_new_text(searched_from)
        if stop_at is not None:
            self.finish_reason = "stop"
            self.text = self.text[:stop_at]
        return self._release()

    def _decode_new(self, final: bool) -> None:
        # The stop token itself is special and dropped, and so is leading whitespace (the space a prompt format puts
        # before its answers, "Short answer: circle"), as `openflamingo generate` drops both.
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        before = decode(self.tokens[self._context : self._pending])
        through = decode(self.tokens[self._context :])
        new = through[len(before) + self._taken :]
        complete = final or not new.endswith(REPLACEMENT)
        if not complete:
            # Bytes that may still become one character decode to one replacement character, the last: held back.
            new = new[:-1]
        self.text = (self.text + new) if self.text else new.lstrip()
        self._taken += len(new)
        if complete:
            self._context, self._pending, self._taken = self._pending, len(self.tokens), 0

    def _stop_in_new_text(self, searched_from: int) -> int | None:
        """Where the earliest stop sequence that ends in the text added since `searched_from` starts."""
        starts = [self.text.find(stop, max(0, searched_from - len(stop) + 1)) for stop in self.stop]
        found = [start for start in starts if start >= 0]
        return min(found) if found else None

    def _release(self) -> str:
        end = len(self.text)
        if not self.finished:
            end -= max((_partial_stop(self.text, stop) for stop in self.stop), default=0)
        if end <= self.sent:
            return ""
        delta = self.text[self.sent : end]
        self.sent = end
        return delta


def _partial_stop(text: str, stop: str) -> int:
    """The length of the longest start of `stop` (shorter than `stop`) that `text` ends with. Only starts whose last
    character is the text's last character can match, so few are compared."""
    if not text:
        return 0
    k = min(len(stop) - 1, len(text))
    while (k := stop.rfind(text[-1], 0, k) + 1) > 0:
        if text.endswith(stop[:k]):
            return k
        k -= 1
    return 0
