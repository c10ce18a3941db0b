"""`shoal quant eval`: quantize one model with each method and measure what each costs and saves.

One row for the base model (served with `--dtype auto`) and one per method, with the seed's columns
measured on this machine in one run:
- bits, and weight memory as stored: bytes of the decoder linear layers' tensors (packed weights, scales,
  zero points, shapes), and of every tensor of the checkpoint; each with its ratio to the same tensors at
  16 bits (2 bytes an element of the base checkpoint, whatever its stored dtype);
- single-stream decode tok/s (bench/latency.py's measure: greedy, EOS ignored, (N - 1) tokens over the
  time after the first), over a few short runs that alternate between the models so a load change hits
  all of them: the median, and the best run, whose ratio to the base model's best run is the speed ratio
  (on a shared machine the best run is the one least disturbed by other load; short runs of a tiny model
  are dominated by such disturbances);
- perplexity by the issue's protocol (perplexity.py) and its ratio to the base model's;
- agreement: the share of positions where the quantized model's argmax, teacher-forced on the base
  model's greedy continuation of a few prompts, equals the base model's token (teacher-forced, so one
  early divergence does not count against every later token);
- calibration time: the wall time of quantize_model (includes reading and writing the checkpoint).
A method is `name` or `name:bits` (`rtn:8` is W8A16; default bits: METHOD_BITS). One that is not
implemented, or fails, is a `skipped` entry with its reason, and the run goes on.
Outputs: a Markdown table, `quant_eval.json` and `quant_eval.png` (perplexity ratio against linear-weight
memory ratio, one labelled point per row) into the model directory or --output-dir; the quantized models
go to <output-dir>/quantized/<method> when keep_models, else into a temporary directory.
"""

from __future__ import annotations

import random
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from safetensors import safe_open

from shoal.bench import workload
from shoal.bench.latency import shoal_once
from shoal.quant.activation_recipe import ActivationOptions
from shoal.quant.gptq import GPTQOptions
from shoal.quant.perplexity import eval_tokens, perplexity, window_size
from shoal.quant.quantize import Calibration, quantize_model

METHOD_BITS = {"rtn": 4, "gptq": 4, "awq": 4, "w8a8": 8, "fp8": 8}
DEFAULT_EVAL_TEXT = Path(__file__).resolve().parents[3] / "shared" / "eval" / "wikitext2-test.txt"
LINEAR_TENSOR = re.compile(r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.")
KV_CACHE_BYTES = 256 << 20  # per engine: several engines are alive at once for the alternating speed runs


@dataclass
class MethodSpec:
    """One quantized row: its label, the method and bits, and settings of its own where they differ from
    the run's (group_size, symmetric: None takes EvalSettings'; activation: w8a8's options; scale_dtype:
    quantize_model's, auto or float32; gptq: gptq's options and rtn's observer; quantize_lm_head: lm_head
    int8 per channel too)."""

    label: str
    method: str
    bits: int
    group_size: str | int | None = None
    symmetric: bool | None = None
    activation: ActivationOptions | None = None
    scale_dtype: str = "auto"
    gptq: GPTQOptions | None = None
    quantize_lm_head: bool = False


@dataclass
class EvalSettings:
    """What one `quant eval` run measures, and with how much: tokens, iterations, prompts.
    methods: `name` or `name:bits` each, with the run's group size and symmetry; specs, when given,
    replace them with rows of their own settings (the benchmark's)."""

    methods: list[str]
    eval_text: Path = DEFAULT_EVAL_TEXT
    eval_tokens: int = 8192
    calibration: Calibration = field(default_factory=Calibration)
    group_size: str | int = "auto"
    symmetric: bool = True
    decode_tokens: int = 32
    decode_iters: int = 3
    agreement_prompts: int = 4
    agreement_tokens: int = 16
    seed: int = 0
    # False: decode speed and memory only (perplexity and agreement stay NaN), for speed runs that must
    # not wait minutes for perplexities that do not change with the kernels
    quality: bool = True
    specs: list[MethodSpec] = field(default_factory=list)

    def method_specs(self) -> list[MethodSpec]:
        return self.specs or [MethodSpec(m, *parse_method(m)) for m in self.methods]


@dataclass
class Row:
    """One model's measured columns (units in the names: bytes, tokens/s, seconds)."""

    method: str
    bits: int
    linear_bytes: int
    linear_ratio: float
    total_bytes: int
    total_ratio: float
    decode_tok_s: float = float("nan")  # median of the timed runs
    best_decode_tok_s: float = float("nan")  # the least disturbed run
    speed_ratio: float = float("nan")
    perplexity: float = float("nan")
    ppl_ratio: float = float("nan")
    agreement: float = float("nan")
    calibration_s: float | None = None
    model_dir: str = ""


def weight_bytes(model_dir: Path) -> tuple[int, int, int, int]:
    """(linear bytes, all bytes, linear elements, all floating elements) of model_dir's safetensors files.

    Linear: every tensor of a decoder linear layer as stored. The element counts are of the floating
    tensors (the 16-bit reference is 2 bytes each); for a quantized checkpoint they are not used."""
    linear = total = linear_n = total_n = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                t = f.get_slice(name)
                n = 1
                for d in t.get_shape():
                    n *= d
                size = n * _dtype_bytes(t.get_dtype())
                is_linear = bool(LINEAR_TENSOR.match(name))
                floating = t.get_dtype() in ("F32", "F16", "BF16", "F64")
                linear += size if is_linear else 0
                total += size
                linear_n += n if is_linear and floating else 0
                total_n += n if floating else 0
    return linear, total, linear_n, total_n


def _dtype_bytes(code: str) -> int:
    """Bytes per element of a safetensors dtype code (F32, BF16, I32, U8, F8_E4M3, ...)."""
    digits = "".join(c for c in code.split("_")[0] if c.isdigit())
    return max(1, int(digits) // 8) if digits else 1


def eval_engine(model_dir: Path):
    """A shoal engine on the model, dtype auto, with a KV cache small enough for several at once."""
    return workload.build_engine(str(model_dir), "auto", kv_cache_memory=KV_CACHE_BYTES)


def decode_speeds(engines: list, prompts: list[list[int]], n_tokens: int) -> list[tuple[float, float]]:
    """(median, best) decode tok/s per engine over prompts[1:]; iteration i runs the engines in order, reversed
    on odd i. prompts[0] is an untimed round (the first full-length request of an engine pays for lazy
    initialization that warm_up's short one does not)."""
    for e in engines:
        e.warm_up()
        shoal_once(e, prompts[0], n_tokens)
    runs: list[list[float]] = [[] for _ in engines]
    for i, prompt in enumerate(prompts[1:]):
        order = list(range(len(engines)))
        for k in order if i % 2 == 0 else order[::-1]:
            runs[k].append(shoal_once(engines[k], prompt, n_tokens).decode_tokens_per_s)
    return [(workload.median(r), max(r)) for r in runs]


def greedy_continuations(engine, prompts: list[list[int]], n_tokens: int) -> list[list[int]]:
    """The engine's greedy continuations (EOS ignored) of prompts, n_tokens each."""
    from shoal.engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=n_tokens)
    return [list(o.outputs[0].token_ids) for o in engine.generate(prompts, params)]


def agreement(engine, prompts: list[list[int]], continuations: list[list[int]]) -> float:
    """Share (0..1) of continuation tokens that are engine's argmax when teacher-forced on them."""
    same = total = 0
    for p, c in zip(prompts, continuations, strict=True):
        logits = engine.prompt_logits(p + c)
        pred = logits[len(p) - 1 : len(p) + len(c) - 1].argmax(-1).tolist()
        same += sum(a == b for a, b in zip(pred, c, strict=True))
        total += len(c)
    return same / total if total else float("nan")


def _slices(tokens: list[int], n: int, length: int, seed: int) -> list[list[int]]:
    """n slices of length tokens drawn from tokens with seed (prompts for speed and agreement)."""
    rng = random.Random(seed)
    top = max(1, len(tokens) - length)
    return [tokens[(s := rng.randrange(top)) : s + length] for _ in range(n)]


def parse_method(spec: str) -> tuple[str, int]:
    """ "rtn" -> ("rtn", 4); "rtn:8" -> ("rtn", 8): a method and its bits (METHOD_BITS by default)."""
    name, _, bits = spec.partition(":")
    return name, int(bits) if bits else METHOD_BITS.get(name, 4)


def quantize_all(model_dir: Path, s: EvalSettings, out_root: Path, log) -> tuple[list, list[dict]]:
    """Quantize model_dir with each method into out_root/<label>: ([(label, dir, seconds, bits)], skipped)."""
    done, skipped = [], []
    for spec in s.method_specs():
        log(f"quantizing {spec.label}: {spec.method}, {spec.bits}-bit")
        out = out_root / spec.label.replace(":", "-w")
        t0 = time.perf_counter()
        try:
            quantize_model(
                model_dir,
                out,
                spec.method,
                spec.bits,
                s.group_size if spec.group_size is None else spec.group_size,
                s.symmetric if spec.symmetric is None else spec.symmetric,
                s.calibration,
                activation_options=spec.activation,
                quantize_lm_head=spec.quantize_lm_head,
                scale_dtype=spec.scale_dtype,
                gptq_options=spec.gptq,
            )
        except (ValueError, NotImplementedError, RuntimeError, OSError) as e:
            skipped.append({"method": spec.label, "reason": str(e)})
            log(f"  skipped {spec.label}: {e}")
            continue
        done.append((spec.label, out, time.perf_counter() - t0, spec.bits))
        log(f"  {spec.label}: calibrated and saved in {done[-1][2]:.1f} s")
    return done, skipped


def run_eval(
    model_dir: Path, s: EvalSettings, output_dir: Path | None = None, keep_models: bool = False, log=print
) -> dict:
    """Quantize, load every model, measure every row; write quant_eval.json/.png; return the result."""
    model_dir = Path(model_dir)
    output_dir = Path(output_dir) if output_dir else model_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="shoal-quant-eval-") as tmp:
        out_root = output_dir / "quantized" if keep_models else Path(tmp)
        done, skipped = quantize_all(model_dir, s, out_root, log)
        result = _measure(model_dir, done, s, log)
    result["skipped"] = skipped
    result["settings"] = _settings_json(s)
    write_outputs(result, output_dir)
    return result


def _measure(model_dir: Path, done: list, s: EvalSettings, log) -> dict:
    """Load the base and each quantized model, and measure all rows (see the module docstring)."""
    dirs = [("base", model_dir, None, None)] + done
    log(f"loading {len(dirs)} engines")
    engines = [eval_engine(d) for _, d, _, _ in dirs]
    base = engines[0]
    tokens = eval_tokens(base.tokenizer, s.eval_text, s.eval_tokens)
    size = window_size(base.config.max_model_len)
    prompts = _slices(tokens, s.agreement_prompts, 32, s.seed)
    speed_prompts = _slices(tokens, s.decode_iters + 1, 32, s.seed + 1)
    continuations = greedy_continuations(base, prompts, s.agreement_tokens) if s.quality else []
    log("decode speed")
    speeds = decode_speeds(engines, speed_prompts, s.decode_tokens)
    for (method, *_), (tok_s, best) in zip(dirs, speeds, strict=True):
        log(f"  {method}: {tok_s:.1f} tok/s median, {best:.1f} best")
    lin16, tot16 = (n * 2 for n in weight_bytes(model_dir)[2:])
    rows = []
    for (method, d, secs, bits), engine, (tok_s, best) in zip(dirs, engines, speeds, strict=True):
        lin, tot, _, _ = weight_bytes(d)
        bits = engine.dtype.itemsize * 8 if method == "base" else bits
        if method == "base":
            lin, tot = lin16, tot16
        rows.append(
            Row(
                method,
                bits,
                lin,
                lin / lin16,
                tot,
                tot / tot16,
                tok_s,
                best,
                calibration_s=secs,
                model_dir=str(d),
            )
        )
        if s.quality:
            log(f"perplexity: {method}")
            rows[-1].perplexity = perplexity(engine, tokens, size)
            rows[-1].agreement = 1.0 if method == "base" else agreement(engine, prompts, continuations)
            log(
                f"  {method}: perplexity {rows[-1].perplexity:.4f}, greedy agreement {rows[-1].agreement:.3f}"
            )
    for r in rows:
        r.speed_ratio = r.best_decode_tok_s / rows[0].best_decode_tok_s
        r.ppl_ratio = r.perplexity / rows[0].perplexity
    return {
        "model": str(model_dir),
        "dtype": str(base.dtype).removeprefix("torch."),
        "machine": workload.machine_info(),
        "eval_tokens": len(tokens),
        "window": size,
        "rows": [asdict(r) for r in rows],
    }


def _settings_json(s: EvalSettings) -> dict:
    d = asdict(s)
    d["eval_text"] = str(s.eval_text)
    d["calibration"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s.calibration).items()}
    return d


def markdown_table(result: dict) -> str:
    """The rows as a Markdown table (memory as the linear layers' ratio to 16-bit and total MB)."""
    head = (
        "| method | bits | linear weights MB | linear / 16-bit | all weights MB | all / 16-bit | decode tok/s "
        "| best tok/s | speed / base | perplexity | ppl / base | greedy agreement | calibration s |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in result["rows"]:
        calib = "" if r["calibration_s"] is None else f"{r['calibration_s']:.1f}"
        lines.append(
            f"| {r['method']} | {r['bits']} | {r['linear_bytes'] / 1e6:.3f} | {r['linear_ratio']:.3f} "
            f"| {r['total_bytes'] / 1e6:.3f} | {r['total_ratio']:.3f} | {r['decode_tok_s']:.1f} "
            f"| {r['best_decode_tok_s']:.1f} | {r['speed_ratio']:.2f} | {r['perplexity']:.3f} | {r['ppl_ratio']:.3f} "
            f"| {r['agreement']:.3f} | {calib} |"
        )
    for sk in result.get("skipped", []):
        lines.append(f"\nskipped {sk['method']}: {sk['reason']}")
    return "\n".join(lines)


def write_outputs(result: dict, output_dir: Path) -> None:
    """quant_eval.json and quant_eval.png into output_dir."""
    workload.write_json(result, output_dir / "quant_eval.json")
    plot(result, output_dir / "quant_eval.png")


def plot(result: dict, path: Path) -> None:
    """Perplexity ratio (y) against linear-weight memory ratio (x), one labelled point per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for r in result["rows"]:
        ax.scatter(r["linear_ratio"], r["ppl_ratio"])
        ax.annotate(
            r["method"], (r["linear_ratio"], r["ppl_ratio"]), textcoords="offset points", xytext=(5, 5)
        )
    ax.set_xlabel("linear-layer weight memory / 16-bit")
    ax.set_ylabel("perplexity / base model")
    ax.set_title(f"{Path(result['model']).name}: quality against memory")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
