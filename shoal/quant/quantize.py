"""Quantize a model directory into a new model directory that `shoal serve --model OUT` serves as it is.

What is quantized: the linear layers of the decoder blocks (q/k/v/o, gate/up/down). Embeddings, norms and
lm_head stay as they are, as in llm-compressor's recipes. Each layer's group size comes from groups.py;
layers kept 16-bit are listed in the config's `ignore`, beside lm_head. The output is one model.safetensors
with the quantized tensors in compressed-tensors' pack-quantized layout (format.py), config.json with the
quantization_config (scheme.py), and every other file of the input directory (tokenizer, chat template,
generation config) copied unchanged.

Methods: rtn rounds each weight tensor on its own (`rtn.quantize_rtn(weight, None, bits, group_size)`,
no model forward); gptq and awq need each layer's inputs, so they run over the model block by block on
calibration windows of a text file (sequential.py, calibration.py, gptq.py, awq.py; awq is asymmetric
whatever --symmetric says, as in the paper, and also changes the norm weights). w8a8 and fp8
(activation_recipe.py) quantize every decoder linear per channel to 8 bits with input activations, and
are written in compressed-tensors' unpacked `int-quantized` / `float-quantized` layouts (naive_format.py).
Every path returns one `QuantizedWeight` per checkpoint linear.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shoal.quant.activation_recipe import ACTIVATION_METHODS, ActivationOptions, quantize_activation_method
from shoal.quant.calibration import load_calibration_tokens
from shoal.quant.format import compress
from shoal.quant.gptq import GPTQ_METHOD_DEFAULT, GPTQOptions
from shoal.quant.groups import PER_CHANNEL, GroupPlan, plan_groups
from shoal.quant.naive_format import compress_naive
from shoal.quant.rtn import quantize_rtn
from shoal.quant.scheme import PACK_QUANTIZED, LayerScheme, build_quantization_config
from shoal.quant.sequential import awq_model, gptq_model

IMPLEMENTED = ("rtn", "gptq", "awq", "w8a8", "fp8")
ISSUE_METHODS = ("rtn", "gptq", "awq", "w8a8", "fp8")
DEFAULT_CALIB_TEXT = Path(__file__).resolve().parents[3] / "shared" / "eval" / "wikitext2-valid.txt"
DECODER_LINEAR = re.compile(
    r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$"
)


@dataclass
class QuantizeResult:
    """What quantize_model wrote: layers quantized and kept, their stored bytes, and the time it took."""

    output: Path
    group_sizes: dict[str, int] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    quantized_bytes: int = 0  # packed weights + scales + zero points + shapes of the quantized layers
    dense_bytes_16bit: int = 0  # the same layers' weights at 2 bytes an element
    seconds: float = 0.0

    @property
    def ratio_to_16bit(self) -> float:
        return self.quantized_bytes / self.dense_bytes_16bit if self.dense_bytes_16bit else 1.0


@dataclass
class Calibration:
    """Where gptq's calibration windows come from: num_samples windows of seq_len tokens of text_file,
    drawn with seed (calibration.load_calibration_tokens). text_file None: DEFAULT_CALIB_TEXT."""

    text_file: Path | None = None
    num_samples: int = 512
    seq_len: int = 512
    seed: int = 0


def check_method(name: str) -> None:
    """ValueError for a method that is unknown or not implemented yet, listing the implemented ones."""
    if name in IMPLEMENTED:
        return
    implemented = ", ".join(IMPLEMENTED)
    if name in ISSUE_METHODS:
        raise ValueError(f"--method {name} is not implemented yet; implemented: {implemented}")
    raise ValueError(f"--method {name!r} is unknown; implemented: {implemented}")


def _calibration_ids(model_dir: Path, calibration: Calibration) -> torch.Tensor:
    text = calibration.text_file or DEFAULT_CALIB_TEXT
    if not Path(text).is_file():
        raise FileNotFoundError(f"calibration text {text} not found; pass --calib-text FILE")
    return load_calibration_tokens(
        model_dir, text, calibration.num_samples, calibration.seq_len, calibration.seed
    )


def _read_all(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
    if not tensors:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights found")
    return tensors


def quantize_lm_head_weight(tensors: dict[str, torch.Tensor], raw_config: dict, result: QuantizeResult):
    """Replace lm_head's weight in tensors by int8 symmetric per-channel pack-quantized tensors (round to
    nearest, whatever the method: the decoder's calibration does not reach lm_head) and return its scheme.
    int8 per channel, not 4-bit groups, because QuantizedLinear then runs it on torch's _weight_int8pack_mm
    for any number of rows (a batch's logits too), and SmolLM2's lm_head is a third of its weight bytes.
    A tied lm_head is untied (the embeddings stay 16-bit): config.json's tie_word_embeddings becomes false."""
    weight = tensors.pop("lm_head.weight", None)
    if weight is None:  # tied: lm_head reads the embedding matrix
        weight = tensors["model.embed_tokens.weight"]
        raw_config["tie_word_embeddings"] = False
    qw = quantize_rtn(weight, None, 8, PER_CHANNEL, symmetric=True)
    packed = compress(qw)
    tensors.update({f"lm_head.{suffix}": t for suffix, t in packed.items()})
    result.group_sizes["lm_head"] = PER_CHANNEL
    result.quantized_bytes += sum(t.numel() * t.element_size() for t in packed.values())
    result.dense_bytes_16bit += weight.numel() * 2
    return LayerScheme(8, PER_CHANNEL, True)


def quantize_model(
    model_dir: str | Path,
    output: str | Path,
    method: str = "rtn",
    bits: int = 4,
    group_size: str | int = "auto",
    symmetric: bool = True,
    calibration: Calibration | None = None,
    progress: Callable[[int, int], None] | None = None,
    activation_options: ActivationOptions | None = None,
    quantize_lm_head: bool = False,
    scale_dtype: str = "auto",
    gptq_options: GPTQOptions | None = None,
) -> QuantizeResult:
    """Quantize model_dir's decoder linears with method and write a servable model directory to output.

    calibration: gptq's calibration data (default: Calibration()); progress(done, total) is called after
    each block of a calibrated method. activation_options: w8a8's weight method, SmoothQuant alpha and
    activation scales (default: rtn, off, dynamic); bits and group_size are ignored by w8a8 and fp8
    (8-bit per channel). quantize_lm_head: also lm_head (see quantize_lm_head_weight; rtn/gptq/awq only).
    scale_dtype (rtn/gptq/awq): "auto" stores group scales in the weights' dtype (bf16 for SmolLM2, as
    compressed-tensors does by default), "float32" in float32 (compressed-tensors' `scale_dtype`; 1/16 more
    bytes at g64): bf16 scales cost SmolLM2 RTN g64 1.50x against 1.385x perplexity (docs/quantization.md).
    gptq_options: gptq's observer, act-order, dampening and true-sequential capture (GPTQOptions; default
    GPTQ_METHOD_DEFAULT for gptq, act-order with dampening 0.1); its observer also applies to rtn (w8a8's
    GPTQ has its own, activation_recipe.W8A8_GPTQ_OPTIONS). Raises ValueError for an unknown observer.

    Raises ValueError for an unknown or unimplemented method, unsupported bits, an explicit group size that
    does not divide a layer (naming it), or an already quantized input; FileNotFoundError for a missing
    config.json or weights. output may exist; its model files are overwritten.
    Runs on one torch thread: rounding a layer is a few elementwise passes over ~1M values, which threads do
    not speed up, and on a shared 2-core EPYC (load ~5) OpenMP's barriers made it 10x slower (SmolLM2
    1536x576 bf16, int4 g64: 12 ms a layer on 1 thread, 126 ms on 2). GPTQ's block forwards (matrix
    products of thousands of rows) run on the caller's thread count, as llm-compressor's do."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _quantize_model(
            Path(model_dir),
            Path(output),
            method,
            bits,
            group_size,
            symmetric,
            calibration or Calibration(),
            progress,
            activation_options or ActivationOptions(),
            quantize_lm_head,
            scale_dtype,
            gptq_options or (GPTQ_METHOD_DEFAULT if method == "gptq" else GPTQOptions()),
            threads,
        )
    finally:
        torch.set_num_threads(threads)


def _quantize_model(
    src: Path,
    out: Path,
    method: str,
    bits: int,
    group_size: str | int,
    symmetric: bool,
    calibration: Calibration,
    progress: Callable[[int, int], None] | None,
    activation_options: ActivationOptions,
    quantize_lm_head: bool = False,
    scale_dtype_name: str = "auto",
    gptq_options: GPTQOptions = GPTQOptions(),
    threads: int | None = None,
) -> QuantizeResult:
    start = time.perf_counter()
    check_method(method)
    if quantize_lm_head and method in ACTIVATION_METHODS:
        raise ValueError(f"--quantize-lm-head goes with rtn, gptq or awq (pack-quantized), not {method}")
    if not activation_options.activation_symmetric and method != "w8a8":
        raise ValueError(f"--activation-asymmetric goes with w8a8, not {method}")
    if scale_dtype_name not in ("auto", "float32"):
        raise ValueError(f"--scale-dtype {scale_dtype_name!r}: choose auto or float32")
    if scale_dtype_name != "auto" and method in ACTIVATION_METHODS:
        raise ValueError(f"--scale-dtype goes with rtn, gptq or awq (pack-quantized), not {method}")
    if out.resolve() == src.resolve():
        raise ValueError(f"--output {out} is the input directory; choose a new one")
    raw_config = json.loads((src / "config.json").read_text())
    if raw_config.get("quantization_config"):
        raise ValueError(f"{src}: the model is already quantized (config.json has quantization_config)")
    tensors = _read_all(src)
    linears = {n.removesuffix(".weight"): t for n, t in tensors.items() if DECODER_LINEAR.match(n)}
    if method in ACTIVATION_METHODS:
        bits, plan = 8, GroupPlan(dict.fromkeys(linears, 0), [])
    else:
        plan = plan_groups({n: t.shape[1] for n, t in linears.items()}, group_size, bits)
    result = QuantizeResult(out, plan.group_sizes, plan.ignored)
    scale_dtype = next(iter(linears.values())).dtype if scale_dtype_name == "auto" else torch.float32
    fmt, naive = PACK_QUANTIZED, None
    if method in ACTIVATION_METHODS:
        naive = quantize_activation_method(
            src, tensors, list(linears), method, activation_options,
            lambda: _calibration_ids(src, calibration), progress, threads,
        )  # fmt: skip
        quantized, fmt = naive.weights, naive.format
    elif method == "gptq":
        ids = _calibration_ids(src, calibration)
        quantized = gptq_model(
            src, plan.group_sizes, bits, symmetric, ids, scale_dtype, progress, gptq_options, threads=threads
        )
    elif method == "awq":
        ids = _calibration_ids(src, calibration)
        quantized, norms = awq_model(src, plan.group_sizes, bits, ids, scale_dtype, progress)
        tensors.update(norms)
    schemes: dict[str, LayerScheme] = {}
    for name, size in plan.group_sizes.items():
        weight = tensors.pop(f"{name}.weight")
        if method == "rtn":  # its scales take the dtype of the weight it is given
            qw = quantize_rtn(weight.to(scale_dtype), None, bits, size, symmetric, gptq_options.observer)
        else:
            qw = quantized[name]
        if naive is None:
            packed = compress(qw)
            schemes[name] = LayerScheme(bits, size, qw.symmetric)
        else:
            packed = compress_naive(qw, naive.input_scales.get(name), naive.input_zero_points.get(name))
            schemes[name] = naive.scheme
        for suffix, t in packed.items():
            tensors[f"{name}.{suffix}"] = t
        result.quantized_bytes += sum(t.numel() * t.element_size() for t in packed.values())
        result.dense_bytes_16bit += weight.numel() * 2
    ignore = ["lm_head", *plan.ignored]
    if quantize_lm_head:
        ignore.remove("lm_head")
        schemes["lm_head"] = quantize_lm_head_weight(tensors, raw_config, result)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)  # a previous output's shards would be loaded beside the new one
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, out / f.name)
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"), {"format": "pt"}
    )
    raw_config["quantization_config"] = build_quantization_config(schemes, ignore, fmt)
    (out / "config.json").write_text(json.dumps(raw_config, indent=2) + "\n")
    result.seconds = time.perf_counter() - start
    return result
