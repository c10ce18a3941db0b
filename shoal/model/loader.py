"""Load a Hugging Face model directory (or Hub id) into our Transformer.

Weights are read memory-mapped from (possibly sharded) safetensors and mapped to our fused layout:
q/k/v -> qkv_proj and gate/up -> gate_up_proj, concatenated along the output dimension.
A quantized checkpoint (compressed-tensors' pack-quantized, see shoal/quant/format.py) gets a
QuantizedLinear for every linear its config quantizes. Fused linears are fused quantized too: the packing
runs along the input dimension and every row has its own scales, so concatenating packed rows, scales and
zero points along the output dimension is exact and the Transformer keeps one qkv/gate_up matmul. Parts
quantized differently (bits, group size, symmetry) are an error, as in vLLM.
GPTQ (AutoGPTQ/GPTQModel) and AWQ (AutoAWQ GEMM) checkpoints are converted at load into the same
QuantizedLinear (shoal/quant/upstream_format.py).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from shoal.model import huge_pages
from shoal.model.config import ModelConfig, load_config
from shoal.model.device import available_ram
from shoal.model.packed_linear import PackedLinear, pack_linears, packing_available
from shoal.model.rope import RotaryEmbedding
from shoal.model.split_linear import SplitLinear
from shoal.model.tensor_parallel import check_tensor_parallel, local_config, parallelize, shard
from shoal.model.tp_group import TPGroup
from shoal.model.transformer import Transformer
from shoal.quant.format import TENSOR_SUFFIXES, decompress
from shoal.quant.fp8 import FP8Linear
from shoal.quant.linear import QuantizedLinear, fuse
from shoal.quant.naive_format import NAIVE_SUFFIXES, decompress_naive
from shoal.quant.scheme import PACK_QUANTIZED
from shoal.quant.upstream_config import UpstreamQuantization
from shoal.quant.upstream_format import UPSTREAM_SUFFIXES, read_upstream_linear
from shoal.quant.w8a8 import W8A8Linear, union_affine

log = logging.getLogger(__name__)

# Our parameter suffix -> the Hugging Face tensors concatenated (in order) to make it.
_FUSED = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


class WeightLoadError(ValueError):
    """Weights missing, unexpected or unreadable; the message names the file and tensor."""


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise WeightLoadError(
            f"{model_dir}: no *.safetensors weights found (shoal does not load .bin/.pth files)"
        )
    return files


class _TensorSource:
    """Name -> (file, handle) over all shards, opened memory-mapped."""

    def __init__(self, files: list[Path]):
        self.where: dict[str, tuple[Path, object]] = {}
        for f in files:
            if not f.exists():
                raise WeightLoadError(f"{f}: shard listed in the index is missing")
            try:
                handle = safe_open(str(f), framework="pt")
            except Exception as e:  # noqa: BLE001
                raise WeightLoadError(f"{f}: not a readable safetensors file ({e})") from e
            for name in handle.keys():
                self.where[name] = (f, handle)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise WeightLoadError(f"tensor {name!r} is missing from the checkpoint")
        f, handle = self.where[name]
        try:
            return handle.get_tensor(name)
        except Exception as e:  # noqa: BLE001
            raise WeightLoadError(f"{f}: cannot read tensor {name!r} ({e})") from e


def _hf_names(param: str) -> list[str]:
    """The checkpoint tensors that make up one of our parameters."""
    if param.startswith("lm_head."):
        return [param]
    prefix = "model."
    for fused, parts in _FUSED.items():
        if f".{fused}." in param:
            head, tail = param.split(f".{fused}.")
            return [f"{prefix}{head}.{p}.{tail}" for p in parts]
    return [prefix + param]


def load_model(
    model_dir: Path,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int | None = None,
    for_compile: bool = False,
    pack: bool = True,
    mmap: bool = False,
    tp: TPGroup | None = None,
):
    """Build the Transformer on the meta device, then fill every parameter from the checkpoint.
    pack=False keeps plain nn.Linear modules on CPU too (calibration rewrites their weights).
    mmap=True (`--load-format mmap`) leaves every weight a view of the safetensors mapping: no fused, cast
    or packed copy (fused linears become SplitLinear; dtype must be the checkpoint's).
    tp: this rank's tensor-parallel group; the model then holds only the rank's slice of every layer
    (model/tensor_parallel.py) and model.config its local shapes, while the returned config stays the
    checkpoint's. ValueError for a model the group's size cannot split."""
    cfg: ModelConfig = load_config(model_dir)
    if mmap and cfg.quantization is not None:
        raise WeightLoadError(f"{model_dir}: --load-format mmap serves unquantized checkpoints only")
    size = tp.world_size if tp is not None else 1
    check_tensor_parallel(cfg, size)
    with torch.device("meta"):
        model = Transformer(local_config(cfg, size) if tp is not None else cfg, max_positions)
    source = _TensorSource(_safetensors_files(model_dir))
    used: set[str] = set()
    if isinstance(cfg.quantization, UpstreamQuantization):
        used |= _swap_upstream(model, cfg.quantization, cfg, source, device)
    elif cfg.quantization is not None:
        used |= _swap_quantized(model, cfg, source, device)
    for name, param in list(model.named_parameters()):
        names = _hf_names(name)
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        tensors = [source.get(n) for n in names]
        if tp is not None:
            tensors = [shard(name, t, tp.rank, size) for t in tensors]
        used.update(names)
        _check_shape(names[0], tensors, param)
        if mmap and len(tensors) > 1:
            _set_split(model, name, [t.to(device=device, dtype=dtype) for t in tensors])
            continue
        value = torch.cat(tensors, dim=0) if len(tensors) > 1 else tensors[0]
        _set_parameter(model, name, nn.Parameter(value.to(device=device, dtype=dtype), requires_grad=False))
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
        used.add("lm_head.weight")
    unexpected = [n for n in source.where if n not in used and not _IGNORED.search(n)]
    if unexpected:
        raise WeightLoadError(
            f"checkpoint has tensors this architecture does not use, e.g. {unexpected[0]!r}"
        )
    if tp is not None:
        parallelize(model, tp, cfg.vocab_size)
    with torch.device(device):
        model.rope = RotaryEmbedding(
            cfg.head_dim, max_positions or cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling
        )
    if pack and not mmap and packing_available(device, dtype):
        pack_linears(model, available_ram(), keep_weights=for_compile)
        _streamed_weights_on_huge_pages(model)
    return model.eval(), cfg


def _streamed_weights_on_huge_pages(model: nn.Module) -> None:
    """What every decode step reads in full (the gemm panels of the 16-bit linears, lm_head included, and
    the quantized linears' packed integers) moved into buffers on transparent huge pages
    (model/huge_pages.py: single-stream bf16 step 10.4-11.3 -> 6.0-8.2 ms on the 2-core Zen 4)."""
    modules = list(model.modules())
    huge_pages.gather([m for m in modules if isinstance(m, PackedLinear) and m.panels is not None], "panels")
    quantized = [m for m in modules if isinstance(m, QuantizedLinear)]
    huge_pages.gather([m for m in quantized if m.weight_packed is not None], "weight_packed")
    huge_pages.gather([m for m in quantized if m.weight_int8 is not None], "weight_int8")


def _check_shape(first: str, tensors: list[torch.Tensor], param: nn.Parameter) -> None:
    """The parts, concatenated on dim 0, must have the parameter's shape (config.json's)."""
    shape = (sum(t.shape[0] for t in tensors), *tensors[0].shape[1:])
    if shape != tuple(param.shape):
        raise WeightLoadError(f"tensor {first!r} has shape {shape}, config.json implies {tuple(param.shape)}")


def _set_split(model: nn.Module, name: str, parts: list[torch.Tensor]) -> None:
    """A fused linear's weight (or bias) kept as its checkpoint parts: the module becomes a SplitLinear."""
    path, _, attr = name.rpartition(".")
    if attr == "weight":
        _set_module(model, path, SplitLinear(parts))
    else:  # the bias comes after the weight in named_parameters: the SplitLinear is there
        model.get_submodule(path).set_biases(parts)


def _swap_quantized(
    model: nn.Module, cfg: ModelConfig, source: _TensorSource, device: torch.device
) -> set[str]:
    """Replace each linear the quantization config targets by a QuantizedLinear; the checkpoint names read.
    Its bias stays a meta parameter, filled by the main loop like any other."""
    used: set[str] = set()
    for path, linear, parts in _linear_parts(model, cfg):
        schemes = [cfg.quantization.scheme_for(p) for p in parts]
        if all(s is None for s in schemes):
            continue
        if any(s is None for s in schemes):
            raise WeightLoadError(f"{parts}: fused into {path!r}, but only some are quantized")
        if len(set(schemes)) > 1:
            raise WeightLoadError(f"{parts}: fused into {path!r}, but quantized with different schemes")
        naive = cfg.quantization.format != PACK_QUANTIZED
        quantized, input_scales, zero_points = [], [], []
        for part, scheme in zip(parts, schemes, strict=True):
            suffixes = NAIVE_SUFFIXES if naive else TENSOR_SUFFIXES
            tensors = {k: source.get(f"{part}.{k}") for k in suffixes if f"{part}.{k}" in source.where}
            used.update(f"{part}.{k}" for k in tensors)
            try:
                if naive:
                    qw, input_scale, zero_point = decompress_naive(tensors, scheme, part)
                    quantized.append(qw)
                    input_scales.append(input_scale)
                    zero_points.append(zero_point)
                else:
                    quantized.append(
                        decompress(tensors, scheme.bits, scheme.group_size, scheme.symmetric, part)
                    )
            except ValueError as e:
                raise WeightLoadError(str(e)) from None
        try:
            qw = fuse(quantized, path)
        except ValueError as e:
            raise WeightLoadError(str(e)) from None
        module = _quantized_module(qw, schemes[0], input_scales, zero_points)
        _install(model, path, linear, parts, qw, module, device)
    return used


def _linear_parts(model: nn.Module, cfg: ModelConfig):
    """(path, linear, checkpoint module names fused into it) for every nn.Linear but a tied lm_head."""
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    for path, linear in linears:
        if path == "lm_head" and cfg.tie_word_embeddings:
            continue
        yield path, linear, [n.removesuffix(".weight") for n in _hf_names(f"{path}.weight")]


def _install(model, path: str, linear: nn.Linear, parts: list[str], qw, module: nn.Module, device) -> None:
    """Put a quantized module in place of linear, after checking its weight's shape against config.json.
    Its bias stays linear's meta parameter, filled by load_model's main loop like any other."""
    if tuple(qw.qweight.shape) != (linear.out_features, linear.in_features):
        raise WeightLoadError(
            f"{parts[0]!r}: quantized weight has shape {tuple(qw.qweight.shape)}, "
            f"config.json implies {(linear.out_features, linear.in_features)}"
        )
    module = module.to(device)
    module.bias = linear.bias
    _set_module(model, path, module)


def _swap_upstream(
    model: nn.Module, spec: UpstreamQuantization, cfg: ModelConfig, source: _TensorSource, device
) -> set[str]:
    """GPTQ / AWQ checkpoints (shoal/quant/upstream_format.py): every linear whose checkpoint parts have a
    `qweight` becomes a QuantizedLinear; the checkpoint names read."""
    used: set[str] = set()
    for path, linear, parts in _linear_parts(model, cfg):
        present = [f"{p}.qweight" in source.where for p in parts]
        if not any(present):
            continue
        if not all(present):
            raise WeightLoadError(f"{parts}: fused into {path!r}, but only some are quantized")
        names = [[f"{p}.{k}" for k in UPSTREAM_SUFFIXES if f"{p}.{k}" in source.where] for p in parts]
        tensors = [{n.rsplit(".", 1)[1]: source.get(n) for n in part} for part in names]
        used.update(n for part in names for n in part)
        try:
            qw, perm = read_upstream_linear(tensors, spec, parts, path)
        except ValueError as e:
            raise WeightLoadError(str(e)) from None
        _install(model, path, linear, parts, qw, QuantizedLinear(qw, input_perm=perm), device)
    return used


def _quantized_module(qw, scheme, input_scales: list, zero_points: list) -> nn.Module:
    """The layer serving one (fused) quantized weight: W8A8Linear for int8 activations (a fused layer's
    static symmetric input scale is the largest of its parts', as vLLM takes it; asymmetric ones are
    merged by w8a8.union_affine), FP8Linear for float8 weights, QuantizedLinear for integer weight-only
    layers (W4A16, W8A16)."""
    acts = scheme.activations
    if scheme.type == "float":
        return FP8Linear(qw, dynamic_activations=acts is not None)
    if acts is None:
        return QuantizedLinear(qw)
    if acts.dynamic:
        return W8A8Linear(qw, None, symmetric=acts.symmetric)
    if acts.symmetric:
        return W8A8Linear(qw, torch.stack([s.float().reshape(()) for s in input_scales]).max())
    scale, zero_point = union_affine(input_scales, zero_points)
    return W8A8Linear(qw, scale, symmetric=False, input_zero_point=zero_point)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _set_parameter(model: nn.Module, name: str, value: nn.Parameter) -> None:
    module_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module_name), attr, value)
