"""A generation's tokens as text: whole characters only, cut before a stop string."""

from __future__ import annotations

# Tokens a window may hold while its text still ends in an incomplete character. A character is at most 4
# bytes and every token carries at least one, so by then the bytes are invalid (or a pathological tokenizer
# splits characters across every token): the text is taken as it decodes, replacement characters and all,
# and each decode stays this short instead of growing with the output.
MAX_WAITING_TOKENS = 8


class TextStream:
    """A generation's token ids → the text that is final.

    Decodes incrementally over a window (the tokens since the previous emission, after the one before: as vLLM
    does, so tokenizers that drop a leading space decode each piece as they decode the whole), and emits only
    whole characters: a multi-byte character split over tokens waits for its last token. The text is cut before
    the first stop string; :meth:`take` holds back a tail that may still grow into one.
    """

    def __init__(self, tokenizer, stop: list[str] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.prefix = self.read = 0  # the window: ids[prefix:] decodes to ids[prefix:read]'s text + new text
        self.text, self.sent, self.stopped = "", 0, False

    def push(self, token: int) -> bool:
        """Add one token; True once a stop string has appeared (the text now ends before it)."""
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> None:
        """The generation ended: text left waiting for a character's last byte is final as it is."""
        self._advance(final=True)

    def take(self, final: bool = False) -> str:
        """The final text not handed out yet."""
        end = len(self.text) if final or self.stopped else len(self.text) - held_back(self.text, self.stop)
        delta, self.sent = self.text[self.sent:end], max(self.sent, end)
        return delta

    def _advance(self, final: bool) -> bool:
        if self.stopped:
            return True
        head = self._decode(self.prefix, self.read)
        window = self._decode(self.prefix, len(self.ids))
        final = final or len(self.ids) - self.read >= MAX_WAITING_TOKENS
        if len(window) > len(head) and (final or not window.endswith("\ufffd")):
            checked = len(self.text)
            self.text += window[len(head):]
            self.prefix, self.read = self.read, len(self.ids)
            start = max(0, checked - max(map(len, self.stop), default=1) + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[:min(hits)], True
        return self.stopped

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self.ids[start:end], skip_special_tokens=True) if end > start else ""


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string (what may still grow
    into one). Knuth-Morris-Pratt over the last ``len(stop) - 1`` characters: linear in the stop strings."""
    held = 0
    for stop in stops:
        failure = [0] * len(stop)  # failure[i]: longest proper prefix of stop[:i + 1] that is also its suffix
        for i in range(1, len(stop)):
            k = failure[i - 1]
            while k and stop[i] != stop[k]:
                k = failure[k - 1]
            failure[i] = k + (stop[i] == stop[k])
        matched = 0
        for char in text[max(0, len(text) - len(stop) + 1):] if len(stop) > 1 else "":
            while matched and char != stop[matched]:
                matched = failure[matched - 1]
            matched += char == stop[matched]
        held = max(held, matched)
    return held
