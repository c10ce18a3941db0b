"""IncrementalDetokenizer on the real tokenizers of the test models (byte-level BPE and sentencepiece-style)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from shoal.engine.detokenizer import IncrementalDetokenizer
from shoal.engine.sampling_params import SamplingParams
from shoal.model.tokenizer import Tokenizer

MODELS = Path(__file__).resolve().parent.parent / "models"
SMOL = "SmolLM2-135M-Instruct"  # byte-level BPE (GPT-2 style)
STORIES = "stories260K"  # sentencepiece-style: Metaspace, byte fallback, leading-space strip

TEXTS = [
    "Once upon a time, there was a little dog.",
    "Emoji: 😀👍🏽 and a family 👨\u200d👩\u200d👧 here!",
    "日本語のテキストと中文字符，还有한국어.",
    "Accents: café, naïve, Ωmega, Straße, ñandú, €5.",
    "mixed 日本 café 😀 text\nwith a newline and   spaces",
]

_tokenizers: dict[str, Tokenizer] = {}


def tok(name: str) -> Tokenizer:
    if name not in _tokenizers:
        _tokenizers[name] = Tokenizer(MODELS / name)
    return _tokenizers[name]


def stream(
    tokenizer: Tokenizer,
    ids: list[int],
    params: SamplingParams | None = None,
    prompt: list[int] | None = None,
    chunk: int = 1,
) -> tuple[IncrementalDetokenizer, list[str], str | None]:
    """Feed ids `chunk` at a time until a stop string matches; return the detokenizer, the stable_text
    after every step, and the matched stop string."""
    detok = IncrementalDetokenizer(tokenizer, prompt or [], params or SamplingParams())
    streamed = []
    for i in range(0, len(ids), chunk):
        stop = detok.add_tokens(ids[i : i + chunk])
        streamed.append(detok.stable_text(finished=False))
        if stop is not None:
            return detok, streamed, stop
    return detok, streamed, None


def assert_streaming_invariants(final: str, streamed: list[str], source_has_fffd: bool = False) -> None:
    previous = ""
    for piece in streamed:
        assert final.startswith(piece), (piece, final)
        assert piece.startswith(previous)  # never retracts what was shown
        if not source_has_fffd:
            assert "\ufffd" not in piece, piece
        previous = piece


@pytest.mark.parametrize("model", [SMOL, STORIES])
@pytest.mark.parametrize("chunk", [1, 3])
def test_streamed_text_matches_decode(model, chunk):
    tokenizer = tok(model)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        detok, streamed, stop = stream(tokenizer, ids, chunk=chunk)
        assert stop is None
        assert detok.text == tokenizer.decode(ids) == detok.stable_text(finished=True)
        assert_streaming_invariants(detok.text, streamed)
        assert detok.num_tokens == len(ids)


def test_multibyte_characters_are_split_across_tokens():
    """The texts above really exercise partial UTF-8: some tokens decode to U+FFFD on their own."""
    for model in (SMOL, STORIES):
        tokenizer = tok(model)
        ids = tokenizer.encode(TEXTS[1] + TEXTS[2], add_special_tokens=False)
        assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


@pytest.mark.parametrize("model", [SMOL, STORIES])
def test_prompt_context_gives_the_continuation(model):
    """With a prompt, the text is what follows the prompt's text (sentencepiece: keeps the first word's
    leading space, as vLLM and tokenizers' DecodeStream(ids=prompt) do)."""
    tokenizer = tok(model)
    prompt = tokenizer.encode("The story begins:")
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        detok, streamed, _ = stream(tokenizer, ids, prompt=prompt)
        prompt_text = tokenizer.decode(prompt)
        assert detok.text == tokenizer.decode(prompt + ids)[len(prompt_text) :]
        assert_streaming_invariants(detok.text, streamed)
        if model == SMOL:  # byte-level BPE decodes without context dependence
            assert detok.text == tokenizer.decode(ids)
        else:
            assert detok.text == " " + tokenizer.decode(ids)


def test_matches_tokenizers_decode_stream():
    from tokenizers.decoders import DecodeStream

    for model in (SMOL, STORIES):
        tokenizer = tok(model)
        prompt = tokenizer.encode("Hello there")
        for text in TEXTS:
            ids = tokenizer.encode(text, add_special_tokens=False)
            decode_stream = DecodeStream(ids=prompt, skip_special_tokens=True)
            chunks = [decode_stream.step(tokenizer._tok, i) for i in ids]
            detok, _, _ = stream(tokenizer, ids, prompt=prompt)
            assert detok.text == "".join(c for c in chunks if c is not None)


def test_chat_prompt_context():
    tokenizer = tok(SMOL)
    prompt_text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    prompt = tokenizer.encode(prompt_text, add_special_tokens=False)
    ids = tokenizer.encode("Hello! 😀 How can I help?", add_special_tokens=False)
    for skip in (True, False):
        detok, streamed, _ = stream(tokenizer, ids, SamplingParams(skip_special_tokens=skip), prompt=prompt)
        assert detok.text == "Hello! 😀 How can I help?"
        assert_streaming_invariants(detok.text, streamed)


def test_prompt_ending_inside_a_character():
    """Prompt ids that stop mid-character (e.g. continuing a cut-off generation): the completing bytes
    produce the character in the output, and nothing of the prompt is repeated."""
    tokenizer = tok(SMOL)
    ids = tokenizer.encode("Once upon a time, 日本 café", add_special_tokens=False)
    cut = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    detok, streamed, _ = stream(tokenizer, ids[cut:], prompt=ids[:cut])
    assert detok.text.startswith(("日", "本"))
    assert (tokenizer.decode(ids[:cut]).rstrip("\ufffd") + detok.text) == tokenizer.decode(ids)
    assert_streaming_invariants(detok.text, streamed)


@pytest.mark.parametrize("model", [SMOL, STORIES])
def test_incomplete_character_at_the_end(model):
    """Generation that stops inside a character: held back while streaming, in the final text."""
    tokenizer = tok(model)
    ids = tokenizer.encode("ok 😀", add_special_tokens=False)[:-1]
    detok, streamed, _ = stream(tokenizer, ids)
    assert streamed[-1] == tokenizer.decode(ids).rstrip("\ufffd")
    assert detok.stable_text(finished=True) == detok.text == tokenizer.decode(ids)
    assert detok.text.endswith("\ufffd")
    assert_streaming_invariants(detok.text, streamed)


@pytest.mark.parametrize("model", [SMOL, STORIES])
def test_genuine_replacement_character(model):
    tokenizer = tok(model)
    ids = tokenizer.encode("bad \ufffd byte\ufffd", add_special_tokens=False)
    detok, streamed, _ = stream(tokenizer, ids)
    assert detok.text == tokenizer.decode(ids)
    assert_streaming_invariants(detok.text, streamed, source_has_fffd=True)


def test_stop_string_spanning_tokens():
    tokenizer = tok(SMOL)
    text = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(tokenizer.encode(" brown fox", add_special_tokens=False)) >= 2
    for include, expected in ((False, "The quick"), (True, "The quick brown fox")):
        params = SamplingParams(stop=[" brown fox"], include_stop_str_in_output=include)
        detok, streamed, stop = stream(tokenizer, ids, params)
        assert stop == " brown fox"
        assert detok.text == detok.stable_text(True) == detok.stable_text(False) == expected
        assert detok.stop_str == " brown fox"
        assert_streaming_invariants(expected, streamed)
        # nothing after the stop string is ever emitted
        assert detok.add_tokens(tokenizer.encode(" more text", add_special_tokens=False)) is None
        assert detok.text == expected


def test_stop_string_inside_one_token_and_batched_tokens():
    tokenizer = tok(SMOL)
    ids = tokenizer.encode("The quick brown fox jumps.", add_special_tokens=False)
    for chunk in (1, 2, len(ids)):
        detok, _, stop = stream(tokenizer, ids, SamplingParams(stop=["ick"]), chunk=chunk)
        assert (stop, detok.text) == ("ick", "The qu")
        detok, _, stop = stream(
            tokenizer, ids, SamplingParams(stop=["ick"], include_stop_str_in_output=True), chunk=chunk
        )
        assert (stop, detok.text) == ("ick", "The quick")


@pytest.mark.parametrize("model", [SMOL, STORIES])
def test_multibyte_stop_string(model):
    """A stop string made of characters that are themselves split across several tokens."""
    tokenizer = tok(model)
    ids = tokenizer.encode("Look: 日本 and 😀 then more", add_special_tokens=False)
    for stop_str, expected in (("日本", "Look: "), ("😀 t", "Look: 日本 and ")):
        detok, streamed, stop = stream(tokenizer, ids, SamplingParams(stop=[stop_str]))
        assert stop == stop_str
        assert detok.text == expected
        assert_streaming_invariants(expected, streamed)


def test_earliest_stop_string_wins():
    tokenizer = tok(SMOL)
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)
    for chunk in (1, len(ids)):
        detok, _, stop = stream(tokenizer, ids, SamplingParams(stop=["lazy", "over", "quick"]), chunk=chunk)
        assert (stop, detok.text) == ("quick", "The ")
        # one stop string contains another: the one complete first wins, however tokens are grouped
        detok, _, stop = stream(tokenizer, ids, SamplingParams(stop=["brown fox jumps", "fox"]), chunk=chunk)
        assert (stop, detok.text) == ("fox", "The quick brown ")
        detok, _, stop = stream(
            tokenizer,
            ids,
            SamplingParams(stop=["n fox", "brown fox"], include_stop_str_in_output=True),
            chunk=chunk,
        )
        assert (stop, detok.text) == ("brown fox", "The quick brown fox")


def test_partial_stop_string_is_held_back_then_released():
    tokenizer = tok(SMOL)
    ids = tokenizer.encode("The quick brown fox jumps over", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=[" fox trot"]))
    seen = []
    for token_id in ids:
        assert detok.add_tokens([token_id]) is None
        seen.append((detok.text, detok.stable_text(finished=False)))
    assert ("The quick brown fox", "The quick brown") in seen  # " fox" could start " fox trot"
    assert ("The quick brown fox jumps", "The quick brown fox jumps") in seen  # it did not
    assert detok.stable_text(finished=False) == detok.text == "The quick brown fox jumps over"

    # held back at the end of the stream, then everything once finished
    detok, streamed, stop = stream(
        tokenizer, tokenizer.encode("a red fox", add_special_tokens=False), SamplingParams(stop=[" fox trot"])
    )
    assert stop is None
    assert streamed[-1] == "a red"
    assert detok.stable_text(finished=True) == "a red fox"


def test_held_back_stop_prefix_of_multiple_stops():
    tokenizer = tok(SMOL)
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["END", "\n\nUser:"]))
    detok.add_tokens(tokenizer.encode("Answer is 4.\n\nUs", add_special_tokens=False))
    assert detok.stable_text(False) == "Answer is 4."
    detok.add_tokens(tokenizer.encode("ually E", add_special_tokens=False))
    assert detok.stable_text(False) == "Answer is 4.\n\nUsually "
    assert detok.add_tokens(tokenizer.encode("ND", add_special_tokens=False)) == "END"
    assert detok.stable_text(False) == detok.text == "Answer is 4.\n\nUsually "


def test_skip_special_tokens_byte_level():
    tokenizer = tok(SMOL)
    im_end = tokenizer.token_to_id("<|im_end|>")
    assert im_end == 2 and im_end in tokenizer.special_ids
    ids = tokenizer.encode("Hello 😀", add_special_tokens=False) + [im_end]
    ids += tokenizer.encode(" world", add_special_tokens=False)
    for skip, expected in ((True, "Hello 😀 world"), (False, "Hello 😀<|im_end|> world")):
        detok, streamed, _ = stream(tokenizer, ids, SamplingParams(skip_special_tokens=skip))
        assert detok.text == tokenizer.decode(ids, skip_special_tokens=skip) == expected
        assert_streaming_invariants(expected, streamed)
    # a special token's text can be a stop string when it is not skipped
    params = SamplingParams(skip_special_tokens=False, stop=["<|im_end|>"])
    detok, _, stop = stream(tokenizer, ids, params)
    assert (stop, detok.text) == ("<|im_end|>", "Hello 😀")
    # ... and is invisible to stop strings when skipped
    params = SamplingParams(skip_special_tokens=True, stop=["<|im_end|>"])
    detok, _, stop = stream(tokenizer, ids, params)
    assert (stop, detok.text) == (None, "Hello 😀 world")


def test_skip_special_tokens_sentencepiece():
    tokenizer = tok(STORIES)
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    ids = tokenizer.encode("Once upon", add_special_tokens=False) + [eos, bos]
    ids += tokenizer.encode("a time", add_special_tokens=False)
    for skip in (True, False):
        detok, streamed, _ = stream(tokenizer, ids, SamplingParams(skip_special_tokens=skip))
        assert detok.text == tokenizer.decode(ids, skip_special_tokens=skip)
        assert_streaming_invariants(detok.text, streamed)
    assert detok.text == "Once upon</s><s> a time"
    # skipped special tokens between words keep the following word's leading space
    detok, _, _ = stream(tokenizer, ids, SamplingParams(skip_special_tokens=True))
    assert detok.text == "Once upon a time"


@pytest.mark.parametrize("model", [SMOL, STORIES])
def test_random_texts_and_stop_strings(model):
    """Random mixes of ASCII, accented, CJK and emoji text, random token grouping and stop strings,
    against a reference computed on the whole decoded text."""
    tokenizer = tok(model)
    rng = random.Random(1234)
    alphabet = list("abc xyz,.\n") + list("éüñß€日本語中文한국😀👍🏽") + ["\u200d"]
    for _ in range(150):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 25)))
        ids = tokenizer.encode(text, add_special_tokens=False)
        full = tokenizer.decode(ids)
        stops = []
        for _ in range(rng.randint(0, 3)):
            if full and rng.random() < 0.7:
                start = rng.randrange(len(full))
                stops.append(full[start : start + rng.randint(1, 4)])
            else:
                stops.append(rng.choice(alphabet) + rng.choice(alphabet))
        include = rng.random() < 0.5
        expected, expected_stop = full, None
        matches = [(full.find(s) + len(s), full.find(s), s) for s in stops if s in full]
        if matches:
            end, begin, expected_stop = min(matches)
            expected = full[: end if include else begin]
        params = SamplingParams(stop=stops, include_stop_str_in_output=include)
        detok, streamed, stop = stream(tokenizer, ids, params, chunk=rng.randint(1, 3))
        assert (stop, detok.stable_text(finished=True)) == (expected_stop, expected), (full, stops)
        assert_streaming_invariants(expected, streamed)


class _CountingTokenizer:
    """Records how many ids each decode call gets."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self.lengths: list[int] = []

    def decode(self, ids, skip_special_tokens=True):
        self.lengths.append(len(ids))
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("model", [SMOL, STORIES])
def test_per_step_cost_does_not_grow_with_output(model):
    tokenizer = tok(model)
    counting = _CountingTokenizer(tokenizer)
    ids = tokenizer.encode(" ".join(TEXTS * 20), add_special_tokens=False)
    prompt = tokenizer.encode("A long prompt " * 50)
    detok = IncrementalDetokenizer(counting, prompt, SamplingParams(stop=["never appears"]))
    for token_id in ids:
        assert detok.add_tokens([token_id]) is None
        detok.stable_text(finished=False)
    assert len(ids) > 500
    assert detok.text == " " * (model == STORIES) + tokenizer.decode(ids)
    assert max(counting.lengths) <= 16  # a short window, never the whole output or prompt
    assert len(counting.lengths) <= 2 * len(ids) + 1
