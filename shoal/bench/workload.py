"""What the benchmarks feed both sides: seeded requests of real-text token ids, the HF reference, machine facts."""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATASET = REPO.parent / "shared" / "eval" / "wikitext2-test.txt"
HUB_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
LOCAL_MODEL = Path("models") / "SmolLM2-135M-Instruct"


def default_model() -> str:
    """$SHOAL_MODEL, else models/SmolLM2-135M-Instruct (here or in the repository) if present, else the hub id."""
    env = os.environ.get("SHOAL_MODEL")
    if env:
        return env
    for candidate in (LOCAL_MODEL, REPO / LOCAL_MODEL):
        if (candidate / "config.json").exists():
            return str(candidate)
    return HUB_MODEL


@dataclass
class Request:
    prompt_token_ids: list[int]
    output_len: int


@dataclass
class TokenSource:
    """A stream of token ids to cut prompts from: real text if the dataset exists, else random ids."""

    ids: list[int] | None  # None: draw random ids
    vocab_size: int
    description: str

    @classmethod
    def load(cls, tokenizer, vocab_size: int, dataset: Path | None, tokens_needed: int) -> TokenSource:
        if dataset is not None and dataset.exists():
            # ~4 characters per token in English text: read ~4x what we need, so prompts start at varied places.
            text = dataset.read_text(encoding="utf-8", errors="replace")[: max(tokens_needed, 4096) * 16]
            ids = [t for t in tokenizer.encode(text, add_special_tokens=False) if 0 <= t < vocab_size]
            if ids:
                return cls(ids, vocab_size, f"{dataset.name} ({len(ids)} tokens)")
        return cls(None, vocab_size, f"random token ids (no dataset at {dataset})")

    def take(self, rng: random.Random, n: int) -> list[int]:
        if self.ids is None:
            low = min(100, self.vocab_size // 4)  # past the special and byte tokens at the start of the vocab
            return [rng.randrange(low, self.vocab_size) for _ in range(n)]
        if n > len(self.ids):  # a short dataset: repeat it
            reps = -(-n // len(self.ids))
            return (self.ids * reps)[:n]
        start = rng.randrange(0, len(self.ids) - n + 1)
        return self.ids[start : start + n]


LENGTH_DISTRIBUTIONS = ("uniform", "normal")


def draw_length(rng: random.Random, low: int, high: int, distribution: str = "uniform") -> int:
    """A length in [low, high]: uniform (inclusive), or normal around the middle with a standard deviation
    of a quarter of the range (the range is +-2 sd), clipped to it. ValueError for another distribution."""
    if distribution == "uniform":
        return rng.randint(low, high)
    if distribution == "normal":
        value = round(rng.gauss((low + high) / 2, (high - low) / 4))
        return min(max(value, low), high)
    raise ValueError(f"length distribution must be one of {LENGTH_DISTRIBUTIONS}, got {distribution!r}")


def build_requests(
    source: TokenSource,
    num_prompts: int,
    input_len_range: tuple[int, int],
    output_len_range: tuple[int, int],
    seed: int = 0,
    distribution: str = "uniform",
) -> list[Request]:
    """num_prompts requests with prompt and output lengths drawn (draw_length) from the given ranges."""
    rng = random.Random(seed)
    requests = []
    for _ in range(num_prompts):
        plen = draw_length(rng, *input_len_range, distribution)
        olen = draw_length(rng, *output_len_range, distribution)
        requests.append(Request(source.take(rng, plen), olen))
    return requests


def build_engine(model: str, dtype: str, device: str = "auto", **config):
    """A shoal LLMEngine; config passes EngineConfig fields through (None: the engine's default)."""
    from shoal.engine.config import EngineConfig
    from shoal.engine.llm_engine import LLMEngine

    config = {k: v for k, v in config.items() if v is not None}
    return LLMEngine(EngineConfig(model=model, dtype=dtype, device=device, **config))


# ---- the Hugging Face side ----------------------------------------------------------------------------
def load_hf_model(model_path: Path, dtype: torch.dtype, device: torch.device):
    """transformers' model for the same checkpoint, dtype and device, in eval mode, default attention (SDPA)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    return model.to(device).eval()


def sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hf_generate_kwargs(max_new_tokens: int, pad_token_id: int) -> dict:
    """Greedy, fixed length: EOS is not a stop token (eos_token_id=None), the way shoal's ignore_eos works."""
    return {
        "max_new_tokens": max_new_tokens,
        "do_sample": False,
        "eos_token_id": None,
        "pad_token_id": pad_token_id,
        "use_cache": True,
        "temperature": None,
        "top_p": None,
        "top_k": None,
    }


def token_clock():
    """A transformers StoppingCriteria that never stops and notes the time each new token is appended
    (transformers calls it once per generated token, the first right after the prefill)."""
    from transformers import StoppingCriteria

    class TokenClock(StoppingCriteria):
        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            import torch

            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return TokenClock()


def hf_pad_token_id(model) -> int:
    for value in (model.generation_config.pad_token_id, model.config.pad_token_id, 0):
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def set_threads(threads: int | None) -> None:
    """torch's intra-op threads for both sides (None: leave torch's default, one per core)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        import torch

        torch.set_num_threads(threads)


# ---- reporting ----------------------------------------------------------------------------------------
def cpu_model() -> tuple[str, str]:
    """(the CPU's model name, its /proc/cpuinfo flags line); platform's names where /proc is absent."""
    cpu = platform.processor() or platform.machine()
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    return cpu, flags


def machine_info() -> dict:
    import torch

    cpu, flags = cpu_model()
    try:
        import transformers

        hf_version = transformers.__version__
    except ImportError:
        hf_version = None
    return {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_bf16": any(f in flags.split() for f in ("avx512_bf16", "amx_bf16")),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": hf_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def write_json(result: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
