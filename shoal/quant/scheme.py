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

shoal serves three formats (compressed-tensors' `CompressionFormat` names):
- `pack-quantized`: weight-only, 4- or 8-bit integer weights, per group or per channel;
- `int-quantized` (W8A8): int8 symmetric per-channel weights stored unpacked, with `input_activations`
  int8, either dynamic per token (`"dynamic": true, "strategy": "token"`) or static per tensor
  (`"dynamic": false, "strategy": "tensor"`, an `input_scale` tensor a layer), symmetric or asymmetric
  (`"symmetric": false`: static scales then come with an `input_zero_point` tensor a layer);
- `float-quantized` (FP8): float8_e4m3fn per-channel weights (`"type": "float"`), activations none or
  float8 dynamic per token.
Anything else is a ValueError naming the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from shoal.quant.upstream_config import UPSTREAM_METHODS, UpstreamQuantization, parse_upstream_config

QUANT_METHOD = "compressed-tensors"
PACK_QUANTIZED = "pack-quantized"
INT_QUANTIZED = "int-quantized"
FLOAT_QUANTIZED = "float-quantized"
SUPPORTED_FORMATS = (PACK_QUANTIZED, INT_QUANTIZED, FLOAT_QUANTIZED)
WEIGHT_TYPE = {PACK_QUANTIZED: "int", INT_QUANTIZED: "int", FLOAT_QUANTIZED: "float"}
SUPPORTED_BITS = (4, 8)
LINEAR_CLASS_TARGET = "Linear"


@dataclass(frozen=True)
class ActivationScheme:
    """How a linear's input is quantized at run time: 8-bit `type` ("int" or "float"), dynamic per token
    (a scale a row, computed on the fly) or static per tensor (the checkpoint's `input_scale`), symmetric
    or asymmetric (int only: a zero point too, the checkpoint's `input_zero_point` when static)."""

    type: str = "int"
    dynamic: bool = True
    symmetric: bool = True

    @property
    def strategy(self) -> str:
        return "token" if self.dynamic else "tensor"


@dataclass(frozen=True)
class LayerScheme:
    """How one linear's weight is stored: bits, group size (0: per channel), symmetry, the weight's type
    ("int", or "float" for FP8 E4M3) and its input activations' scheme (None: weight-only)."""

    bits: int
    group_size: int
    symmetric: bool
    type: str = "int"
    activations: ActivationScheme | None = None


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


def _weights(raw, path: str, fmt: str = PACK_QUANTIZED) -> LayerScheme:
    if not isinstance(raw, dict):
        raise ValueError(f"quantization_config.{path} must be an object, got {raw!r}")
    bits = _need(raw, "num_bits", f"{path}.")
    allowed_bits = SUPPORTED_BITS if fmt == PACK_QUANTIZED else (8,)
    if bits not in allowed_bits:
        raise ValueError(
            f"quantization_config.{path}.num_bits={bits!r} is not supported by format {fmt!r} "
            f"(supported: {', '.join(map(str, allowed_bits))})"
        )
    wtype = raw.get("type", "int")
    if wtype != WEIGHT_TYPE[fmt]:
        raise ValueError(
            f"quantization_config.{path}.type={wtype!r}: format {fmt!r} stores {WEIGHT_TYPE[fmt]} weights"
        )
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
    if fmt != PACK_QUANTIZED and (group_size != 0 or not symmetric):
        raise ValueError(
            f"quantization_config.{path}: format {fmt!r} is served with symmetric per-channel weights "
            f"(strategy 'channel', symmetric true)"
        )
    return LayerScheme(bits, group_size, symmetric, wtype)


def _activations(raw, path: str, fmt: str) -> ActivationScheme | None:
    """The input_activations of a group: None, or 8-bit dynamic-per-token / static-per-tensor of the
    format's type, symmetric (or asymmetric for int). ValueError naming the field otherwise."""
    if not raw:
        return None
    if fmt == PACK_QUANTIZED:
        raise ValueError(
            f"quantization_config.{path}: activation quantization needs format 'int-quantized' or "
            f"'float-quantized' (format {fmt!r} is weight-only)"
        )
    if not isinstance(raw, dict):
        raise ValueError(f"quantization_config.{path} must be an object, got {raw!r}")
    if raw.get("num_bits") != 8:
        raise ValueError(f"quantization_config.{path}.num_bits={raw.get('num_bits')!r}: only 8 is served")
    atype = raw.get("type", "int")
    if atype != WEIGHT_TYPE[fmt]:
        raise ValueError(
            f"quantization_config.{path}.type={atype!r}: format {fmt!r} needs {WEIGHT_TYPE[fmt]!r}"
        )
    symmetric = raw.get("symmetric", True)
    if not isinstance(symmetric, bool):
        raise ValueError(f"quantization_config.{path}.symmetric={symmetric!r}: must be true or false")
    if not symmetric and atype != "int":
        raise ValueError(
            f"quantization_config.{path}.symmetric=False: {atype!r} activations must be symmetric "
            f"(zero points are int8 only)"
        )
    dynamic, strategy = raw.get("dynamic", False), raw.get("strategy")
    if (dynamic, strategy) not in ((True, "token"), (False, "tensor")):
        raise ValueError(
            f"quantization_config.{path}.strategy={strategy!r} with dynamic={dynamic!r} is not supported "
            f"(supported: dynamic true with 'token', dynamic false with 'tensor')"
        )
    return ActivationScheme(atype, bool(dynamic), symmetric)


def parse_quantization_config(raw) -> QuantizationSpec | UpstreamQuantization:
    """Validate a quantization_config dict; ValueError naming the field (quantization_config.<path>).
    GPTQ and AWQ checkpoints of other tools (quant_method gptq, awq) give an UpstreamQuantization
    (shoal/quant/upstream_config.py)."""
    if not isinstance(raw, dict):
        raise ValueError(f"quantization_config must be an object, got {type(raw).__name__}")
    method = raw.get("quant_method")
    if method in UPSTREAM_METHODS:
        return parse_upstream_config(raw)
    if method != QUANT_METHOD:
        supported = ", ".join(repr(m) for m in (QUANT_METHOD, *UPSTREAM_METHODS))
        raise ValueError(
            f"quantization_config.quant_method={method!r} is not supported (supported: {supported})"
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
        if group.get("output_activations"):
            raise ValueError(f"quantization_config.{path}.output_activations: not served (must be null)")
        acts = _activations(group.get("input_activations"), f"{path}.input_activations", fmt)
        if group.get("format") not in (None, fmt):
            raise ValueError(
                f"quantization_config.{path}.format={group['format']!r} differs from format={fmt!r}"
            )
        weights = _weights(_need(group, "weights", f"{path}."), f"{path}.weights", fmt)
        groups.append((list(targets), LayerScheme(**{**weights.__dict__, "activations": acts})))
    ignore = raw.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
        raise ValueError("quantization_config.ignore must be a list of module names")
    return QuantizationSpec(groups, list(ignore), fmt)


def build_quantization_config(
    schemes: dict[str, LayerScheme], ignore: list[str], fmt: str = PACK_QUANTIZED
) -> dict:
    """The quantization_config for layers quantized by shoal: one group per distinct scheme, targets by exact
    module name (checkpoint names, e.g. model.layers.0.self_attn.q_proj), in compressed-tensors' layout.
    fmt: the format of every group (pack-quantized, int-quantized or float-quantized)."""
    by_scheme: dict[LayerScheme, list[str]] = {}
    for module, scheme in schemes.items():
        by_scheme.setdefault(scheme, []).append(module)
    groups = {}
    for i, (scheme, targets) in enumerate(sorted(by_scheme.items(), key=lambda kv: -kv[0].group_size)):
        weights = {
            "num_bits": scheme.bits,
            "type": scheme.type,
            "symmetric": scheme.symmetric,
            "group_size": scheme.group_size or None,
            "strategy": "group" if scheme.group_size else "channel",
            "dynamic": False,
        }
        groups[f"group_{i}"] = {
            "targets": targets,
            "weights": weights,
            "input_activations": _activation_config(scheme.activations),
            "output_activations": None,
            "format": fmt,
        }
    return {
        "config_groups": groups,
        "quant_method": QUANT_METHOD,
        "kv_cache_scheme": None,
        "format": fmt,
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "ignore": list(ignore),
    }


def _activation_config(acts: ActivationScheme | None) -> dict | None:
    """compressed-tensors' QuantizationArgs for 8-bit input activations, or None."""
    if acts is None:
        return None
    return {
        "num_bits": 8,
        "type": acts.type,
        "symmetric": acts.symmetric,
        "group_size": None,
        "strategy": acts.strategy,
        "dynamic": acts.dynamic,
    }
