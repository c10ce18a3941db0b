"""The `quantization_config` of GPTQ and AWQ checkpoints made by other tools: validate it. No torch here (the
model config reads it in every process); the tensors are read by shoal/quant/upstream_format.py.

Two layouts, as their writers define them:
- GPTQ, AutoGPTQ / GPTQModel (`"quant_method": "gptq"`; GPTQModel 7.7 `QuantizeConfig.to_dict`,
  gptqmodel/quantization/config.py): `bits`, `group_size` (-1: per channel), `sym`, `desc_act`
  (act-order), and `checkpoint_format` (or `format`): `gptq` is v1, AutoGPTQ's files, whose zero points are
  stored minus one; `gptq_v2` stores them as they are. `pack_dtype` must be int32.
- AWQ, AutoAWQ (`"quant_method": "awq"`; AutoAWQ 0.2.9 `AwqConfig.to_transformers_dict`,
  awq/models/_config.py): `bits` (or `w_bit`), `group_size` (or `q_group_size`), `zero_point`, `version`
  and `modules_to_not_convert`. Only the GEMM version's layout is read (`version: gemm`), with zero points.

shoal serves 4- and 8-bit GPTQ and 4-bit AWQ (the only width AutoAWQ's GEMM packs). Anything else is a
ValueError naming the field (quantization_config.<field>).
"""

from __future__ import annotations

from dataclasses import dataclass, field

GPTQ, AWQ = "gptq", "awq"
UPSTREAM_METHODS = (GPTQ, AWQ)
GPTQ_FORMATS = {"gptq": True, "gptq_v2": False}  # checkpoint format -> zero points stored minus one
GPTQ_BITS = (4, 8)
AWQ_BITS = (4,)


@dataclass(frozen=True)
class UpstreamQuantization:
    """A validated GPTQ or AWQ quantization_config.

    method: "gptq" or "awq"; bits: 4 or 8 (AWQ: 4); group_size: input columns per scale, 0 for one scale
    per row (GPTQ's -1); symmetric: as the config says (GPTQ stores zero points either way; AWQ always
    has them); desc_act: GPTQ act-order (g_idx is a permutation of groups); zeros_minus_one: GPTQ v1 files;
    not_converted: module names the config says stay 16-bit (AWQ's modules_to_not_convert).
    Which linears are quantized is read from the checkpoint: those that have a `qweight` tensor.
    """

    method: str
    bits: int
    group_size: int
    symmetric: bool = False
    desc_act: bool = False
    zeros_minus_one: bool = False
    not_converted: list[str] = field(default_factory=list)


def _field(raw: dict, names: tuple[str, ...], default=None):
    """The first of names present in raw (AutoAWQ and transformers spell some fields two ways)."""
    for name in names:
        if raw.get(name) is not None:
            return name, raw[name]
    return names[0], default


def _bits(raw: dict, allowed: tuple[int, ...], method: str) -> int:
    name, bits = _field(raw, ("bits", "w_bit"))
    if bits not in allowed:
        raise ValueError(
            f"quantization_config.{name}={bits!r} is not supported for {method} "
            f"(supported: {', '.join(map(str, allowed))})"
        )
    return bits


def _group_size(raw: dict) -> int:
    name, size = _field(raw, ("group_size", "q_group_size"))
    if size == -1:
        return 0
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ValueError(
            f"quantization_config.{name}={size!r} must be a positive integer or -1 (per channel)"
        )
    return size


def _flag(raw: dict, name: str, default: bool) -> bool:
    value = raw.get(name, default)
    if not isinstance(value, bool):
        raise ValueError(f"quantization_config.{name} must be true or false, got {value!r}")
    return value


def _parse_gptq(raw: dict) -> UpstreamQuantization:
    name, fmt = _field(raw, ("checkpoint_format", "format"), "gptq")
    if fmt not in GPTQ_FORMATS:
        raise ValueError(
            f"quantization_config.{name}={fmt!r} is not supported (supported: {', '.join(GPTQ_FORMATS)})"
        )
    if raw.get("pack_dtype", "int32") != "int32":
        raise ValueError(f"quantization_config.pack_dtype={raw['pack_dtype']!r}: only int32 is supported")
    return UpstreamQuantization(
        GPTQ,
        _bits(raw, GPTQ_BITS, GPTQ),
        _group_size(raw),
        symmetric=_flag(raw, "sym", True),
        desc_act=_flag(raw, "desc_act", False),
        zeros_minus_one=GPTQ_FORMATS[fmt],
    )


def _parse_awq(raw: dict) -> UpstreamQuantization:
    version = raw.get("version", "gemm")
    if not isinstance(version, str) or version.lower() != "gemm":
        raise ValueError(f"quantization_config.version={version!r} is not supported (supported: gemm)")
    if not _flag(raw, "zero_point", True):
        raise ValueError("quantization_config.zero_point=false is not supported (AWQ GEMM with zero points)")
    not_converted = raw.get("modules_to_not_convert") or []
    if not isinstance(not_converted, list) or not all(isinstance(m, str) for m in not_converted):
        raise ValueError("quantization_config.modules_to_not_convert must be a list of module names")
    return UpstreamQuantization(
        AWQ, _bits(raw, AWQ_BITS, AWQ), _group_size(raw), not_converted=list(not_converted)
    )


def parse_upstream_config(raw: dict) -> UpstreamQuantization:
    """Validate a GPTQ or AWQ quantization_config dict (raw["quant_method"] in UPSTREAM_METHODS);
    ValueError naming the field otherwise."""
    method = raw.get("quant_method")
    if method == GPTQ:
        return _parse_gptq(raw)
    if method == AWQ:
        return _parse_awq(raw)
    raise ValueError(
        f"quantization_config.quant_method={method!r} is not an upstream layout ({', '.join(UPSTREAM_METHODS)})"
    )
