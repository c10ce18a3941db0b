"""Incremental detokenization: generated token ids -> text, with stop strings.

Decoding uses vLLM's prefix_offset/read_offset technique: each step decodes only a short window of
recent tokens (the previous chunk's tokens, for context, plus the new ones) and emits the part of the
window's text past the context's text. That keeps the per-step cost proportional to the new tokens,
and gives decoders that depend on the previous token (sentencepiece's leading-space strip, for
example) the context they need. The window starts in the prompt's tail, so the text is the
*continuation* of the prompt: for a sentencepiece model whose first generated token is "▁Paris" it
is " Paris", as vLLM and `tokenizers.decoders.DecodeStream(ids=prompt)` produce, while
`tokenizer.decode(generated_ids)` alone would strip that leading space. With an empty prompt, and
for byte-level BPE models always, the final text equals `tokenizer.decode(generated_ids)`.

Stop strings are matched only in the text after the first `min_tokens` tokens (vLLM, PR #22014): text
before that point can neither hold a stop string nor the start of one, so it is never held back.

With `skip_special_tokens=False` and `spaces_between_special_tokens=False`, an added token that follows
another one is its bare content, with no separator a decoder may insert (vLLM's fast detokenizer rule).

A window whose text ends with U+FFFD may be an incomplete UTF-8 character that later tokens will
complete: the complete text before it is committed, the trailing U+FFFD are kept pending (left out
of `stable_text` while streaming, and in `text` in case generation ends there).
"""

from __future__ import annotations

from shoal.engine.sampling_params import SamplingParams
from shoal.model.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
# Prompt tokens decoded as context before the first generated token.
_PROMPT_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    """Turns generated token ids into text as they arrive: correct for multi-byte UTF-8 split across
    tokens (never emit a partial character / U+FFFD while more tokens may complete it) and for stop
    strings that span tokens."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self._tokenizer = tokenizer
        self._skip_special_tokens = params.skip_special_tokens
        self._bare_added = (
            None
            if params.skip_special_tokens or params.spaces_between_special_tokens
            else tokenizer.added_token_contents()
        )
        self._stops = [s for s in params.stop if s]
        self._include_stop = params.include_stop_str_in_output
        self._max_stop_len = max((len(s) for s in self._stops), default=0)
        # Token ids: the prompt's tail (context only), then every generated id.
        self._ids: list[int] = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        # Window for the next decode: ids[prefix_offset:]; its text up to read_offset is already emitted.
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        # A prompt that ends inside a UTF-8 character: the character it completes belongs to the output.
        self._prefix_text = self._decode(self._ids).rstrip(_REPLACEMENT)
        self._committed_in_window = 0  # chars of the window's new text already committed
        self._text = ""  # committed text (truncated at a stop string)
        self._pending = ""  # trailing U+FFFD that later tokens may still turn into a character
        self._stop_str: str | None = None
        self.num_tokens = 0  # generated tokens added so far
        self._min_tokens = params.min_tokens
        # Where stop strings may start: the text's length after min_tokens tokens (None: not there yet).
        self._stop_from: int | None = 0 if params.min_tokens == 0 else None

    def _decode(self, ids: list[int]) -> str:
        if self._bare_added:
            return self._decode_bare_added(ids)
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _decode_bare_added(self, ids: list[int]) -> str:
        """Decode runs of ordinary tokens; an added token right after another one is its bare content."""
        parts, run, prev_added = [], [], False
        for token_id in ids:
            added = token_id in self._bare_added
            if added and prev_added:
                if run:
                    parts.append(self._tokenizer.decode(run, skip_special_tokens=False))
                    run = []
                parts.append(self._bare_added[token_id])
            else:
                run.append(token_id)
            prev_added = added
        if run:
            parts.append(self._tokenizer.decode(run, skip_special_tokens=False))
        return "".join(parts)

    @property
    def text(self) -> str:
        """All text decoded so far (after truncation at a stop string)."""
        return self._text + self._pending

    @property
    def stop_str(self) -> str | None:
        """The stop string that ended the text, if one matched."""
        return self._stop_str

    def add_tokens(self, token_ids: list[int]) -> str | None:
        """Append generated tokens. Returns the stop string matched (from params.stop) or None. When one
        matches, the text is truncated at the stop string (kept if params.include_stop_str_in_output)
        and nothing after it is ever emitted: later calls are ignored and return None.

        Where several stop strings occur, the one that is complete first wins (the earliest end; among
        those ending at the same place, the earliest start), so the result does not depend on how the
        tokens were grouped into calls."""
        if self._stop_str is not None or not token_ids:
            return None
        if self._stop_from is None and self.num_tokens + len(token_ids) > self._min_tokens:
            # The call crosses the min_tokens boundary: the tokens before it cannot stop the sequence.
            cut = self._min_tokens - self.num_tokens
            self.add_tokens(token_ids[:cut])
            return self.add_tokens(token_ids[cut:])
        return self._add(token_ids)

    def _add(self, token_ids: list[int]) -> str | None:
        self._ids.extend(token_ids)
        self.num_tokens += len(token_ids)
        window_text = self._decode(self._ids[self._prefix_offset :])
        new_text = window_text[len(self._prefix_text) :]
        done = self._committed_in_window
        if new_text.endswith(_REPLACEMENT):
            # Possibly an incomplete character: commit what precedes it, keep the window open.
            complete = max(len(new_text.rstrip(_REPLACEMENT)), done)
            added = new_text[done:complete]
            self._committed_in_window = complete
            self._pending = new_text[complete:]
        else:
            added = new_text[done:]
            self._pending = ""
            if new_text:  # else (e.g. only skipped special tokens): keep the context, widen the window
                self._prefix_offset = self._read_offset
                self._read_offset = len(self._ids)
                self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
                self._committed_in_window = 0
        self._text += added
        if self._stop_from is None:
            if self.num_tokens >= self._min_tokens:
                self._stop_from = len(self._text)
            return None
        if added and self._stops:
            return self._check_stop(len(self._text) - len(added))
        return None

    def _check_stop(self, new_start: int) -> str | None:
        """Search the text from new_start (minus the longest stop's length - 1) for a stop string."""
        start = max(self._stop_from, new_start - self._max_stop_len + 1)
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            i = self._text.find(stop, start)
            if i >= 0 and (best is None or (i + len(stop), i) < best[:2]):
                best = (i + len(stop), i, stop)
        if best is None:
            return None
        end, begin, stop = best
        self._text = self._text[: end if self._include_stop else begin]
        self._pending = ""
        self._stop_str = stop
        return stop

    def _held_back(self) -> int:
        """Length of the longest suffix of the committed text that is a proper prefix of a stop string."""
        text = self._text
        if self._stop_from is None:
            return 0
        for k in range(min(len(text) - self._stop_from, self._max_stop_len - 1), 0, -1):
            suffix = text[-k:]
            if any(stop.startswith(suffix) for stop in self._stops):
                return k
        return 0

    def stable_text(self, finished: bool) -> str:
        """Text safe to stream now: while not finished, hold back a trailing piece that could be the
        start of a stop string, and any incomplete UTF-8; when finished, all of text."""
        if finished:
            return self.text
        if self._stop_str is not None or not self._stops:
            return self._text
        held = self._held_back()
        return self._text[: len(self._text) - held] if held else self._text
