"""The model's tokenizer (`tokenizers`) and chat template (jinja2, rendered like transformers does).

Kept free of `transformers` so that the engine runs where only torch, safetensors and tokenizers exist.
"""

from __future__ import annotations

import json
import re
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer


class ChatTemplateError(ValueError):
    """The model has no chat template, or the template rejected the messages."""


_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable character table, inverted (as `tokenizers`' ByteLevel decoder uses it)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _decoder_kinds(spec: dict | None) -> set[str]:
    """The decoder types of tokenizer.json's "decoder" (flattening a Sequence), e.g. {"ByteLevel"}."""
    if not spec:
        return set()
    if spec.get("type") == "Sequence":
        return set().union(*(_decoder_kinds(d) for d in spec.get("decoders", [])))
    kind = spec.get("type", "")
    if kind == "Replace" and spec.get("pattern", {}).get("String") == "\u2581":
        return {"Metaspace"}  # sentencepiece's "▁" -> " ", as the Metaspace decoder does
    return {kind}


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Encode/decode plus the special tokens and chat template a server needs."""

    def __init__(self, model_dir: str | Path, chat_template: str | None = None):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: tokenizer.json is missing (shoal needs a fast tokenizer file)")
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise ValueError(f"{path}: cannot load tokenizer: {e}") from e
        config_path = model_dir / "tokenizer_config.json"
        self.config: dict = json.loads(config_path.read_text()) if config_path.exists() else {}
        self.bos_token = _token_content(self.config.get("bos_token"))
        self.eos_token = _token_content(self.config.get("eos_token"))
        self.chat_template = chat_template or self._find_chat_template(model_dir)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        added = self._tok.get_added_tokens_decoder()
        self.special_ids = {i for i, t in added.items() if t.special}
        self._added_contents = {i: t.content for i, t in added.items()}
        self._decoders = _decoder_kinds(json.loads(path.read_text(encoding="utf-8")).get("decoder"))

    def _find_chat_template(self, model_dir: Path) -> str | None:
        jinja = model_dir / "chat_template.jinja"
        if jinja.exists():
            return jinja.read_text()
        chat_json = model_dir / "chat_template.json"
        if chat_json.exists():
            return json.loads(chat_json.read_text()).get("chat_template")
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return template

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token) if self.eos_token else None

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token) if self.bos_token else None

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def added_token_contents(self) -> dict[int, str]:
        """id -> content of every added token (special or not)."""
        return dict(self._added_contents)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw UTF-8 bytes token_id contributes to a text (where it is not the first token).

        A token may hold part of a character (an emoji's first bytes under byte-level BPE, or one
        `<0xF0>` byte-fallback piece of sentencepiece): those are its bytes, not U+FFFD. Read off the
        vocabulary through the tokenizer's decoder kind: ByteLevel maps GPT-2's printable characters back
        to bytes (openai/gpt-2 encoder.py `bytes_to_unicode`); sentencepiece writes "▁" for a space and
        `<0xNN>` for byte fallback. Added tokens are their content. Other decoders: the decoded text.
        Raises IndexError for an id outside the vocabulary."""
        return _token_bytes(self, token_id)

    def convert_ids_to_tokens(self, token_ids: list[int]) -> list[str]:
        return [self._tok.id_to_token(i) or "" for i in token_ids]

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template)

    @cached_property
    def _compiled_template(self):
        from jinja2 import TemplateError  # noqa: F401 - imported here so the engine path needs no jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str):
            raise ChatTemplateError(message)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii
        )
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        **kwargs,
    ) -> str:
        """Render messages to the prompt text; encode it with add_special_tokens=False (the template has them).

        continue_final_message cuts the text right after the final message's content, so that the model
        continues it instead of starting a new turn (transformers' apply_chat_template does the same).
        kwargs are extra template variables. Raises ChatTemplateError."""
        text = self._render(messages, add_generation_prompt, continue_final_message, **kwargs)
        if not continue_final_message:
            return text
        final = messages[-1].get("content") or ""
        for needle in (final, final.strip()):
            if needle and needle in text:
                return text[: text.rindex(needle) + len(needle)]
        raise ChatTemplateError("continue_final_message: the chat template does not show the final message")

    def _render(
        self, messages: list[dict], add_generation_prompt: bool, continue_final_message: bool, **kwargs
    ):
        if not self.chat_template:
            raise ChatTemplateError(
                "this model has no chat template; use /v1/completions or start the server with --chat-template FILE"
            )
        from jinja2 import TemplateError

        try:
            return self._compiled_template.render(
                **kwargs,
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from e


@lru_cache(maxsize=1 << 17)
def _token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    if token_id in tokenizer._added_contents:
        return tokenizer._added_contents[token_id].encode("utf-8")
    piece = tokenizer.id_to_token(token_id)
    if piece is None:
        raise IndexError(f"token id {token_id} is outside the vocabulary (size {tokenizer.vocab_size})")
    if "ByteLevel" in tokenizer._decoders:
        table = _byte_level_decoder()
        if all(c in table for c in piece):
            return bytes(table[c] for c in piece)
    if "ByteFallback" in tokenizer._decoders and (m := _BYTE_FALLBACK.match(piece)):
        return bytes([int(m.group(1), 16)])
    if "Metaspace" in tokenizer._decoders:
        return piece.replace("\u2581", " ").encode("utf-8")
    return tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")
