"""Incremental detokenization and stop strings for one output sequence.

Decoding token by token is wrong in two ways: a byte-level BPE token can hold part of a UTF-8
character (it decodes to U+FFFD until the rest arrives), and sentencepiece-style decoders drop
the leading space of whatever token comes first in the list they are given. So we decode a small
window: the tokens already emitted since the previous step (the "prefix") plus the new ones, and
keep only the text beyond what the prefix alone decodes to. Each step costs a few tokens of
decoding, however long the output gets.
"""

from __future__ import annotations

from keel.tokenizer import Tokenizer

# Prompt tokens decoded in front of the first output tokens, so that the first generated token
# is decoded in context (e.g. gets the leading space it has after the prompt).
_PROMPT_CONTEXT_TOKENS = 5
# A UTF-8 character has at most 4 bytes, so a window that still ends in U+FFFD after this many
# unread tokens is invalid byte soup, not a character in progress; emit it rather than hold
# (and re-decode) it forever.
_MAX_UNREAD_TOKENS = 16

_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        *,
        skip_special_tokens: bool = True,
        stop: list[str] = (),
        include_stop_str_in_output: bool = False,
    ):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        # Skipped special tokens decode to nothing; dropping them up front keeps them out of the
        # window (which would otherwise grow while they produce no text).
        self._skipped_ids = frozenset(tokenizer.all_special_ids) if skip_special_tokens else frozenset()
        self._stops = [s for s in dict.fromkeys(stop) if s]  # "" would match everywhere
        self._max_stop_len = max(map(len, self._stops), default=0)
        self._include_stop = include_stop_str_in_output

        # Window of token ids: [0:_read] were emitted already (context), the rest are unread.
        self._window = [int(t) for t in prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:]]
        self._read = len(self._window)
        self._prefix_text = self._decode(self._window)
        if self._prefix_text.endswith(_REPLACEMENT_CHAR):
            # The prompt ends inside a character; the output then completes it, and the text
            # cannot be split at the prompt boundary. Decode the output on its own.
            self._window, self._read, self._prefix_text = [], 0, ""

        self._chunks: list[str] = []  # all text decoded so far (joined lazily; see output_text)
        self._length = 0
        self._tail = ""  # last _max_stop_len - 1 characters, where a stop string may have begun
        self._unsent: list[str] = []  # text not yet returned by get_delta
        self._finished = False
        self.stop_str: str | None = None  # the stop string that ended the output, if any

    @property
    def output_text(self) -> str:
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    @property
    def finished(self) -> bool:
        return self._finished or self.stop_str is not None

    def update(self, new_token_ids: list[int]) -> str | None:
        """Append generated tokens. Returns the stop string if one is now complete."""
        if self.finished:
            return None  # tokens after a stop string (e.g. a batch step) are not part of the output
        pieces = []
        for token_id in new_token_ids:
            token_id = int(token_id)
            if token_id in self._skipped_ids:
                continue
            self._window.append(token_id)
            pieces.append(self._read_window(force=len(self._window) - self._read > _MAX_UNREAD_TOKENS))
        return self._add_text("".join(pieces))

    def finish(self) -> None:
        """No more tokens will come: flush text held back for an incomplete character."""
        if not self.finished:
            self._add_text(self._read_window(force=True))
        self._finished = True

    def get_delta(self) -> str:
        """Text not returned by earlier calls. While generating, it holds back any ending that
        could still grow into a stop string, so stop strings never reach the client in part."""
        pending = "".join(self._unsent)
        hold = 0 if self.finished else self._partial_stop_len(pending)
        self._unsent = [pending[len(pending) - hold :]] if hold else []
        return pending[: len(pending) - hold]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def _read_window(self, force: bool) -> str:
        if self._read == len(self._window):
            return ""
        text = self._decode(self._window)
        # Ending in U+FFFD means the last token stops inside a character: wait for the rest.
        # No new text (e.g. a token that decodes to nothing) also waits, so that the next token
        # is still decoded after real context.
        if not force and (text.endswith(_REPLACEMENT_CHAR) or len(text) <= len(self._prefix_text)):
            return ""
        new_text = text[len(self._prefix_text) :]
        # The tokens just read become the context for the next ones.
        self._window = self._window[self._read :]
        self._read = len(self._window)
        self._prefix_text = self._decode(self._window)
        return new_text

    def _add_text(self, text: str) -> str | None:
        if not text:
            return None
        old_length = self._length
        self._chunks.append(text)
        self._unsent.append(text)
        self._length += len(text)
        if not self._stops:
            return None

        # Only occurrences that end inside the new text are new; they can begin up to
        # len(stop) - 1 characters earlier, which is what _tail keeps.
        region = self._tail + text
        region_start = old_length - len(self._tail)
        found = None
        for stop in self._stops:
            i = region.find(stop, max(0, len(self._tail) - len(stop) + 1))
            if i != -1 and (found is None or i < found[0]):
                found = (i, stop)
        keep = self._max_stop_len - 1
        self._tail = region[max(0, len(region) - keep) :] if keep else ""
        if found is None:
            return None

        i, stop = found
        cut = region_start + i + (len(stop) if self._include_stop else 0)
        text = self.output_text[:cut]
        sent = self._length - sum(map(len, self._unsent))  # characters already returned
        self._chunks, self._length = [text], cut
        self._unsent = [text[sent:]]
        self.stop_str = stop
        return stop

    def _partial_stop_len(self, pending: str) -> int:
        """Length of the longest ending of `pending` that is the start of some stop string."""
        for n in range(min(self._max_stop_len - 1, len(pending)), 0, -1):
            ending = pending[len(pending) - n :]
            if any(stop.startswith(ending) for stop in self._stops):
                return n
        return 0
