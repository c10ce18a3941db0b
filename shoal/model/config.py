"""Parse a Hugging Face config.json into the one set of options our decoder implements.

Llama, Mistral, Qwen2 and Qwen3 differ only in a few switches (qkv bias, q/k norm, sliding window,
rope scaling); everything else is shared. Both config spellings seen in the wild are accepted:
`rope_theta`/`rope_scaling` at the top level and transformers 5's `rope_parameters`; `torch_dtype` and `dtype`.
A `quantization_config` (compressed-tensors' layout, or GPTQ's and AWQ's) is validated here by shoal.quant.scheme, so a bad one
fails at start-up with the field named.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from shoal.quant.scheme import QuantizationSpec, parse_quantization_config
from shoal.quant.upstream_config import UpstreamQuantization

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ModelConfigError(ValueError):
    """A config.json the implementation cannot run; the message names the file and the field."""


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    layer_windows: list[int | None] = field(default_factory=list)  # sliding window per layer, None = full
    dtype: str = "float32"  # the checkpoint's dtype
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # from quantization_config (compressed-tensors', or a GPTQ/AWQ layout); None for a 16-bit model
    quantization: QuantizationSpec | UpstreamQuantization | None = None

    @property
    def sliding_window(self) -> int | None:
        windows = {w for w in self.layer_windows if w is not None}
        return max(windows) if windows else None


def _eos_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _rope(raw: dict, where: str) -> tuple[float, dict | None]:
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # per-layer-type form: take full attention's
        params = params["full_attention"]
    scaling = raw.get("rope_scaling")
    theta = raw.get("rope_theta")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        scaling = scaling or params
    if theta is None:
        theta = 10000.0
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelConfigError(
                f"{where}: rope_scaling type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        scaling = None if rope_type == "default" else {**scaling, "rope_type": rope_type}
    return float(theta), scaling


def _layer_windows(raw: dict, num_layers: int, architecture: str) -> list[int | None]:
    window = raw.get("sliding_window")
    if architecture.startswith("Qwen") and not raw.get("use_sliding_window", False):
        window = None  # Qwen configs carry a window that only applies when use_sliding_window is true
    if not window:
        return [None] * num_layers
    layer_types = raw.get("layer_types")
    if layer_types:
        return [window if t == "sliding_attention" else None for t in layer_types]
    if architecture.startswith("Qwen"):
        first = raw.get("max_window_layers", num_layers)
        return [window if i >= first else None for i in range(num_layers)]
    return [int(window)] * num_layers


def parse_config(raw: dict, where: str = "config.json") -> ModelConfig:
    """Validate and normalize a config dict; raises ModelConfigError naming the field."""
    archs = raw.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ModelConfigError(
            f"{where}: architectures={archs!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )

    def need(name: str):
        if raw.get(name) is None:
            raise ModelConfigError(f"{where}: required field {name!r} is missing")
        return raw[name]

    act = raw.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ModelConfigError(f"{where}: hidden_act={act!r} is not supported (only silu)")
    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    head_dim = raw.get("head_dim") or hidden // heads
    num_layers = int(need("num_hidden_layers"))
    theta, scaling = _rope(raw, where)
    is_qwen2 = arch == "Qwen2ForCausalLM"
    quantization = None
    if raw.get("quantization_config") is not None:
        try:
            quantization = parse_quantization_config(raw["quantization_config"])
        except ValueError as e:
            raise ModelConfigError(f"{where}: {e}") from None
    return ModelConfig(
        architecture=arch,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=True if is_qwen2 else bool(raw.get("attention_bias", False)),
        o_bias=False if is_qwen2 else bool(raw.get("attention_bias", False)),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        qk_norm=arch == "Qwen3ForCausalLM",
        layer_windows=_layer_windows(raw, num_layers, arch),
        dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "float32").replace("torch.", ""),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_list(raw.get("eos_token_id")),
        quantization=quantization,
    )


def load_config(model_dir: str | Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: config.json is missing; is {model_dir} a Hugging Face model directory?"
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"{path}: not valid JSON ({e})") from e
    return parse_config(raw, str(path))


def load_generation_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "generation_config.json"
    return json.loads(path.read_text()) if path.exists() else {}
