"""Which group size each linear layer gets.

`auto` (the default): 128 where the layer's input size is a multiple of 128, else the largest of 64 and
32 that divides it. SmolLM2-135M's hidden size 576 takes 64 (576 = 4.5 x 128), its MLP input 1536 takes
128. A layer that none of them divides is quantized per channel (one scale per output row) where its rows
pack into whole int32 words (8 int4 or 4 int8 values a word), so that rows unpack without a tail; otherwise
it stays 16-bit and is listed in `ignore` (stories260K's down_proj: input 172 is 4 x 43, so int8 goes per
channel and int4 stays 16-bit). An explicit group size must divide every quantized layer: a ValueError
names the first layer it does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field

AUTO_GROUP_SIZES = (128, 64, 32)
PER_CHANNEL = 0  # group size recorded for a per-channel layer (one group spanning the whole row)


@dataclass
class GroupPlan:
    """group_sizes: layer name -> group size (PER_CHANNEL for one scale per row); ignored: layers kept 16-bit."""

    group_sizes: dict[str, int] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)


def values_per_word(bits: int) -> int:
    """Quantized values in one int32 word of compressed-tensors' pack-quantized layout (4 -> 8, 8 -> 4)."""
    if bits not in (4, 8):
        raise ValueError(f"bits={bits}: pack-quantized weights are 4 or 8 bits here")
    return 32 // bits


def parse_group_size(value: str | int) -> str | int:
    """`auto`, `channel` (PER_CHANNEL) or a positive integer (the CLI's --group-size); ValueError otherwise."""
    if value == "auto":
        return "auto"
    if value == "channel":
        return PER_CHANNEL
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--group-size must be auto, channel or a positive integer, got {value!r}") from None
    if size <= 0:
        raise ValueError(f"--group-size must be auto, channel or a positive integer, got {value!r}")
    return size


def auto_group_size(in_features: int, bits: int) -> int | None:
    """The `auto` rule for one layer: a group size, PER_CHANNEL, or None (keep 16-bit)."""
    for size in AUTO_GROUP_SIZES:
        if in_features % size == 0:
            return size
    return PER_CHANNEL if in_features % values_per_word(bits) == 0 else None


def plan_groups(in_features: dict[str, int], group_size: str | int, bits: int) -> GroupPlan:
    """Group size per layer, from each layer's input size.

    in_features: layer name -> input size. group_size: "auto", PER_CHANNEL or a positive int.
    Raises ValueError naming the layer when an explicit group size does not divide its input size."""
    values_per_word(bits)
    plan = GroupPlan()
    for name, size in in_features.items():
        if group_size == "auto":
            chosen = auto_group_size(size, bits)
        elif group_size == PER_CHANNEL:
            if size % values_per_word(bits):
                raise ValueError(
                    f"layer {name!r} (in_features={size}) does not pack into whole int32 words of {bits}-bit "
                    "values; use --group-size auto to keep it 16-bit"
                )
            chosen = PER_CHANNEL
        elif size % int(group_size) != 0 or size % values_per_word(bits):
            raise ValueError(
                f"--group-size {group_size} does not divide layer {name!r} (in_features={size}); "
                "use --group-size auto or a divisor"
            )
        else:
            chosen = int(group_size)
        if chosen is None:
            plan.ignored.append(name)
        else:
            plan.group_sizes[name] = chosen
    return plan
