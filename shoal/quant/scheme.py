"""The `quantization_config` of config.json, in compressed-tensors' layout: validate it, build it, and say
which scheme a layer has. No torch here: the model config reads it in every process.

The layout is what compressed-tensors 0.20 writes (`QuantizationConfig.model_dump()` in
quantization/quant_config.py, `QuantizationArgs` in quant_args.py):
    {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
     "config_groups": {"group_0": {"targets": [...], "weights": {"num_bits": 4, "type": "int",
         "symmetric": true, "group_size": 128, "strategy": "group", "dynamic": false},
         "input_activations": null, "output_activations": null, "format": "pack-quantized"}, ...},
     "ignore": ["lm_head", ...], "kv_cache_scheme": null, ...}
A target is an exact module name, `re:<regex>` (matched from the start of the name, as compressed-tensors'
`match_name` does), or the class name `Linear`. shoal writes one group per group size, targeting layers by
exact name, so the per-layer choice of `--group-size auto` is recorded in the config.

shoal serves the weight-only `pack-quantized` format with 4- or 8-bit integer weights, per group or per
channel; anything else is a ValueError naming the field (the W8A8 and FP8 formats come later in issue 18).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

QUANT_METHOD = "compressed-tensors"
PACK_QUANTIZED = "pack-quantized"
SUPPORTED_FORMATS = (PACK_QUANTIZED,)
SUPPORTED_BITS = (4, 8)
LINEAR_CLASS_TARGET = "Linear"


@dataclass(frozen=True)
class LayerScheme:
    """How one linear's weight is stored: bits, group size (0: per channel) and symmetry."""

    bits: int
    group_size: int
    symmetric: bool


@dataclass
class QuantizationSpec:
    """A validated quantization_config: (targets, scheme) per group, in file order, and ignored layers."""

    groups: list[tuple[list[str], LayerScheme]]
    ignore: list[str] = field(default_factory=list)
    format: str = PACK_QUANTIZED

    def scheme_for(self, module: str) -> LayerScheme | None:
        """The scheme of a linear named as in the checkpoint (e.g. model.layers.0.mlp.down_proj), or None
        when it is ignored or no group targets it (then it is stored 16-bit)."""
        if any(_matches(module, t) for t in self.ignore):
            return None
        for targets, scheme in self.groups:
            if any(_matches(module, t) for t in targets):
                return scheme
        return None


def _matches(module: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == module or target == LINEAR_CLASS_TARGET


def _need(raw: dict, key: str, path: str):
    if key not in raw:
        raise ValueError(f"quantization_config.{path}{key} is missing")
    return raw[key]


def _weights(raw, path: str) -> LayerScheme:
    if not isinstance(raw, dict):
        raise ValueError(f"quantization_config.{path} must be an object, got {raw!r}")
    bits = _need(raw, "num_bits", f"{path}.")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"quantization_config.{path}.num_bits={bits!r} is not supported (supported: 4, 8)")
    if raw.get("type", "int") != "int":
        raise ValueError(f"quantization_config.{path}.type={raw.get('type')!r}: only int weights are served")
    if raw.get("dynamic", False):
        raise ValueError(f"quantization_config.{path}.dynamic must be false for weights")
    strategy = raw.get("strategy")
    group_size = raw.get("group_size")
    if strategy == "group":
        if not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(
                f"quantization_config.{path}.group_size={group_size!r}: strategy 'group' needs a positive size"
            )
    elif strategy == "channel":
        if group_size not in (None, -1):
            raise ValueError(
                f"quantization_config.{path}.group_size={group_size!r} is inconsistent with strategy 'channel'"
            )
        group_size = 0
    else:
        raise ValueError(
            f"quantization_config.{path}.strategy={strategy!r} is not supported (supported: group, channel)"
        )
    symmetric = raw.get("symmetric", True)
    if not isinstance(symmetric, bool):
        raise ValueError(f"quantization_config.{path}.symmetric must be true or false, got {symmetric!r}")
    return LayerScheme(bits, group_size, symmetric)


def parse_quantization_config(raw) -> QuantizationSpec:
    """Validate a quantization_config dict; ValueError naming the field (quantization_config.<path>)."""
    if not isinstance(raw, dict):
        raise ValueError(f"quantization_config must be an object, got {type(raw).__name__}")
    method = raw.get("quant_method")
    if method != QUANT_METHOD:
        raise ValueError(
            f"quantization_config.quant_method={method!r} is not supported (supported: {QUANT_METHOD!r})"
        )
    fmt = raw.get("format")
    if fmt not in SUPPORTED_FORMATS:
        raise ValueError(
            f"quantization_config.format={fmt!r} is not supported (supported: {', '.join(SUPPORTED_FORMATS)})"
        )
    status = raw.get("quantization_status", "compressed")
    if status != "compressed":
        raise ValueError(
            f"quantization_config.quantization_status={status!r}: shoal loads compressed checkpoints"
        )
    groups_raw = raw.get("config_groups")
    if not isinstance(groups_raw, dict) or not groups_raw:
        raise ValueError("quantization_config.config_groups must be a non-empty object")
    groups = []
    for name, group in groups_raw.items():
        path = f"config_groups.{name}"
        if not isinstance(group, dict):
            raise ValueError(f"quantization_config.{path} must be an object")
        targets = group.get("targets")
        if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
            raise ValueError(f"quantization_config.{path}.targets must be a non-empty list of names")
        if group.get("input_activations") or group.get("output_activations"):
            raise ValueError(
                f"quantization_config.{path}.input_activations: activation quantization is not served yet "
                f"(format {fmt!r} is weight-only)"
            )
        if group.get("format") not in (None, fmt):
            raise ValueError(
                f"quantization_config.{path}.format={group['format']!r} differs from format={fmt!r}"
            )
        groups.append((list(targets), _weights(_need(group, "weights", f"{path}."), f"{path}.weights")))
    ignore = raw.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
        raise ValueError("quantization_config.ignore must be a list of module names")
    return QuantizationSpec(groups, list(ignore), fmt)


def build_quantization_config(schemes: dict[str, LayerScheme], ignore: list[str]) -> dict:
    """The quantization_config for layers quantized by shoal: one group per distinct scheme, targets by exact
    module name (checkpoint names, e.g. model.layers.0.self_attn.q_proj), in compressed-tensors' layout."""
    by_scheme: dict[LayerScheme, list[str]] = {}
    for module, scheme in schemes.items():
        by_scheme.setdefault(scheme, []).append(module)
    groups = {}
    for i, (scheme, targets) in enumerate(sorted(by_scheme.items(), key=lambda kv: -kv[0].group_size)):
        weights = {
            "num_bits": scheme.bits,
            "type": "int",
            "symmetric": scheme.symmetric,
            "group_size": scheme.group_size or None,
            "strategy": "group" if scheme.group_size else "channel",
            "dynamic": False,
        }
        groups[f"group_{i}"] = {
            "targets": targets,
            "weights": weights,
            "input_activations": None,
            "output_activations": None,
            "format": PACK_QUANTIZED,
        }
    return {
        "config_groups": groups,
        "quant_method": QUANT_METHOD,
        "kv_cache_scheme": None,
        "format": PACK_QUANTIZED,
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "ignore": list(ignore),
    }
