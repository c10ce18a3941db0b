"""Content filtering on input and output: keyword and regex rules built in, plug-ins by import path.

A blocked prompt is a 400 with code `content_filter`. A blocked output ends at the start of the match
with `finish_reason: "content_filter"` (OpenAI's reason); nothing of the blocked text is ever sent: while
a choice is generating, its last `holdback` characters are held back (the longest a match can be), the
way the detokenizer holds back a stop string that may still be forming.

Config (policy file, section `content_filter`):

    content_filter:
      input: true                     # check prompts and messages
      output: true                    # check generated text
      keywords: ["forbidden phrase"]  # case-insensitive substrings
      patterns: ["\\bsecret-[0-9]+"]  # Python regular expressions
      max_match_chars: 64             # the longest text a pattern may match (the hold-back)
      plugins: ["mypackage.filters:make_filter"]  # callables returning a TextFilter

A plug-in (e.g. a classifier such as detoxify, whose weights must be present locally) is a callable
taking no argument and returning an object with `find(text) -> FilterMatch | None` and `holdback: int`.
Output filtering needs the visible text to be cut between tokens it can account for, so requests for
`logprobs` are refused while output filtering is on (their token strings would show the held-back text).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator


@dataclass(frozen=True)
class FilterMatch:
    start: int  # character offset of the match in the checked text
    rule: str  # what matched, for logs (never sent to the client)


class TextFilter(Protocol):
    holdback: int

    def find(self, text: str) -> FilterMatch | None: ...


class ContentFilterPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: bool = True
    output: bool = True
    keywords: list[str] = Field(default_factory=list)
    patterns: list[str] = Field(default_factory=list)
    max_match_chars: int = Field(64, ge=1, le=4096)
    plugins: list[str] = Field(default_factory=list)

    @field_validator("patterns")
    @classmethod
    def _patterns_compile(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"pattern {pattern!r} does not compile: {e}") from e
        return patterns

    @field_validator("keywords")
    @classmethod
    def _keywords_not_empty(cls, keywords: list[str]) -> list[str]:
        if any(not k for k in keywords):
            raise ValueError("keywords must not be empty strings")
        return keywords


class RuleFilter:
    """Keywords (case-insensitive) and regexes; the earliest match wins."""

    def __init__(self, keywords: list[str], patterns: list[str], max_match_chars: int):
        self._keywords = [k.casefold() for k in keywords]
        self._patterns = [re.compile(p) for p in patterns]
        longest_keyword = max((len(k) for k in keywords), default=0)
        self.holdback = max(longest_keyword, max_match_chars if patterns else 0, 1) - 1

    def find(self, text: str) -> FilterMatch | None:
        folded = text.casefold()  # same length as text for the scripts keywords are written in
        hits = [FilterMatch(i, f"keyword:{k}") for k in self._keywords if (i := folded.find(k)) >= 0]
        hits += [
            FilterMatch(m.start(), f"pattern:{p.pattern}") for p in self._patterns if (m := p.search(text))
        ]
        return min(hits, key=lambda h: h.start, default=None)


class ContentFilter:
    """The configured filters together; `holdback` is the largest of theirs."""

    def __init__(self, policy: ContentFilterPolicy):
        self.policy = policy
        self._filters: list[TextFilter] = [
            RuleFilter(policy.keywords, policy.patterns, policy.max_match_chars)
        ]
        self._filters += [_load_plugin(path) for path in policy.plugins]
        self.holdback = max(0, *(f.holdback for f in self._filters))

    def find(self, text: str) -> FilterMatch | None:
        hits = [m for f in self._filters if (m := f.find(text)) is not None]
        return min(hits, key=lambda h: h.start, default=None)


class OutputGuard:
    """The visible part of one choice's growing text: held back while generating, cut at a match.

    `visible(text, finished)` returns (text to show, blocked); the shown text only ever grows."""

    def __init__(self, content_filter: ContentFilter):
        self._filter = content_filter
        self._shown = 0
        self.blocked: str | None = None  # the text shown when it was blocked

    def visible(self, text: str, finished: bool) -> tuple[str, bool]:
        if self.blocked is not None:
            return self.blocked, True
        match = self._filter.find(text)
        if match is not None:
            self.blocked = text[: max(match.start, self._shown)]
            return self.blocked, True
        shown = text if finished else text[: max(self._shown, len(text) - self._filter.holdback)]
        self._shown = len(shown)
        return shown, False


def _load_plugin(path: str) -> TextFilter:
    """ "module.path:callable" -> the filter it returns (ValueError naming the path if it cannot load)."""
    module_name, _, attr = path.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
        return factory()
    except (ImportError, AttributeError, ValueError, TypeError) as e:
        raise ValueError(f"content filter plug-in {path!r} cannot be loaded: {e}") from e
