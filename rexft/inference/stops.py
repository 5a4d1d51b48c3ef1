"""Where generated text ends: EOS, stop strings, a row's token limit.

``new_text`` and ``cut_at_stops`` make a finished row's text (one decode per row). ``StopWatch`` tells a
decoding loop when a row is done while it decodes, decoding only the tail that can hold a new stop string:
a stop string of n characters is at most 4n bytes, so at most 4n tokens, and any occurrence not seen in an
earlier check ends among the tokens added since or starts at most that many tokens before them.
``TextStream`` hands a stream its text as tokens arrive, decoding only the tokens since the last complete
character (vLLM's incremental detokenizing, in short), held back where a stop string may still be forming.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def before_eos(tokenizer, tokens: list[int]) -> list[int]:
    """Generated tokens up to the first EOS."""
    eos = tokenizer.eos_token_id
    return tokens[: tokens.index(eos)] if eos is not None and eos in tokens else tokens


def new_text(tokenizer, tokens: list[int], stop) -> str:
    """Generated tokens up to the first EOS, as text cut before the first stop string."""
    return cut_at_stops(tokenizer.decode(before_eos(tokenizer, tokens), skip_special_tokens=True), stop)


def cut_at_stops(text: str, stop) -> str:
    """``text`` before the first of the ``stop`` strings."""
    for marker in stop:
        text = text.split(marker, 1)[0]
    return text


@dataclass
class StopWatch:
    """One row's tokens as they are generated, and whether they end it (EOS, ``limit`` tokens, a stop string)."""

    tokenizer: object
    limit: int
    stop: tuple[str, ...] = ()
    tokens: list[int] = field(default_factory=list)
    checked: int = 0  # tokens already searched for stop strings

    def add(self, new: list[int]) -> bool:
        """Append ``new`` tokens (cut after an EOS and at the limit); whether the row is finished."""
        eos = self.tokenizer.eos_token_id
        ended = eos in new
        self.tokens = (self.tokens + (new[: new.index(eos) + 1] if ended else new))[: self.limit]
        return ended or len(self.tokens) >= self.limit or self._stopped()

    def _stopped(self) -> bool:
        if not self.stop:
            return False
        lookback = 4 * max(map(len, self.stop)) + 4  # + 4: the tail may open inside a character
        tail = self.tokenizer.decode(self.tokens[max(0, self.checked - lookback):], skip_special_tokens=True)
        self.checked = len(self.tokens)
        return any(marker in tail for marker in self.stop)


@dataclass
class TextStream:
    """A streamed row's text so far, from its tokens as they arrive (each call passes all of them). Decodes
    the new tokens with a few before them (``start``: where that context begins; a tokenizer may render a
    token differently at the start of a text), so a long answer is not decoded whole every chunk."""

    tokenizer: object
    stop: tuple[str, ...] = ()
    text: str = ""  # the text of tokens[:read]
    start: int = 0
    read: int = 0

    def safe(self, tokens: list[int]) -> str:
        """The text a stream may hand out now: up to EOS, before any stop string, less the characters a stop
        string could still be forming with (and a character still incomplete)."""
        tokens = before_eos(self.tokenizer, tokens)
        if len(tokens) > self.read:
            before = self.tokenizer.decode(tokens[self.start:self.read], skip_special_tokens=True)
            after = self.tokenizer.decode(tokens[self.start:], skip_special_tokens=True)
            if len(after) > len(before) and not after.endswith("\ufffd"):  # new characters, all complete
                self.text += after[len(before):]
                self.start, self.read = self.read, len(tokens)
        text = cut_at_stops(self.text, self.stop)
        if len(text) == len(self.text):  # no stop string yet: hold back one that may be forming
            hold = max((len(s) - 1 for s in self.stop), default=0)
            text = text[: max(0, len(text) - hold)]
        return text
