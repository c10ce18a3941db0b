"""Tiny random-weight checkpoints of every supported architecture, built with transformers itself.

Each model is made from transformers' own config class and `AutoModelForCausalLM.from_config`, then EVERY
parameter is re-drawn (from_config leaves norm weights at exactly 1 and biases at exactly 0, which would hide
a loader that silently drops them), and saved with `save_pretrained` (safetensors) next to SmolLM2's tokenizer
files and chat template. They are small enough (hidden 64, 2-3 layers) that a forward pass costs nothing, yet
use the real 49152-token vocabulary so that the test prompts (chat, non-English, code, emoji) tokenize as they
do for SmolLM2.

Each variant switches on the feature of its architecture that a loader or kernel could get wrong:

- llama3:  Llama 3 rope scaling (theta 50000 and original_max_position_embeddings=64: at head_dim 16 one
           frequency is kept, one smoothed and six scaled), attention and MLP biases, untied lm_head.
- qwen2:   q/k/v biases (no o_proj bias), a `sliding_window` that `use_sliding_window: false` switches off.
- qwen3:   q/k RMSNorm before rope, tied embeddings.
- mistral: sliding window of 16 tokens (the test prompts are much longer), untied lm_head.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
MISTRAL_WINDOW = 16
INIT_STD = 0.2

_COMMON = dict(
    vocab_size=49152,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    initializer_range=INIT_STD,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 50000.0,  # not the 10000 default: a parser that drops it must fail
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


# Test prompts (tokenized with SmolLM2's tokenizer by the test_prompts fixture in conftest.py)

LONG_TEXT = (
    "The history of the lighthouse is a long one. Long before electricity, sailors relied on fires lit on "
    "hilltops to guide them past dangerous rocks and into safe harbours. The Pharos of Alexandria, built in the "
    "third century BC, was one of the seven wonders of the ancient world and stood for more than a thousand "
    "years. Medieval towers burned wood, then coal, and later whale oil in simple lamps whose light was weak and "
    "smoky. Everything changed in 1822, when Augustin Fresnel designed a lens made of concentric rings of glass "
    "prisms that bent the scattered light of a single flame into a narrow, powerful beam visible for more than "
    "twenty miles. Keepers lived in small houses at the foot of the towers, trimming wicks, polishing brass and "
    "winding the clockwork that turned the lens through the night. Their logbooks record storms that shook the "
    "walls, ships that vanished in the fog, and long winters without a visitor. In the twentieth century "
    "electric lamps, automatic timers and radio beacons made the keepers unnecessary, and one by one the "
    "stations were automated. Today satellite navigation tells a ship its position to within a few metres, yet "
    "many lighthouses still shine every night, maintained by volunteers and coastal authorities who believe that "
    "a light on the shore remains the simplest and most reliable signal a sailor can hope to see. Some of the old "
    "towers have become museums, hotels or homes for artists, and their keepers' cottages now welcome tourists "
    "who climb the spiral stairs to watch the sun set over the sea."
)

CHAT = [
    {"role": "system", "content": "You are a terse assistant who answers in one sentence."},
    {"role": "user", "content": "What is the boiling point of water at sea level?"},
    {"role": "assistant", "content": "Water boils at 100 degrees Celsius at sea level."},
    {"role": "user", "content": "And on the summit of Mount Everest?"},
]

PROMPT_TEXTS = {
    "short": "The capital of France is",
    "long": LONG_TEXT,
    "french": (
        "Le petit prince s'assit sur une pierre et leva les yeux vers le ciel. Il se demandait si les étoiles "
        "étaient éclairées afin que chacun puisse un jour retrouver la sienne."
    ),
    "chinese": "北京是中华人民共和国的首都，也是全国的政治、文化和国际交往中心。这座城市有着三千多年的建城史。",
    "russian": (
        "Москва — столица России, крупнейший по численности населения город страны. Город расположен на реке "
        "Москве."
    ),
    "code": (
        "def fibonacci(n: int) -> list[int]:\n"
        '    """Return the first n Fibonacci numbers."""\n'
        "    seq = [0, 1]\n"
        "    while len(seq) < n:\n"
        "        seq.append(seq[-1] + seq[-2])\n"
        "    return seq[:n]\n\n"
        "print(fibonacci("
    ),
    "emoji": "I love pizza 🍕 and sunny days ☀️! Party time 🎉🎉 👩\u200d💻 #fun #weekend 🚀✨ What about you? 😄",
}


def _config(name: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    if name == "llama3":
        return LlamaConfig(
            **_COMMON,
            num_hidden_layers=2,
            rope_parameters=dict(LLAMA3_ROPE),
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=False,
        )
    if name == "qwen2":
        return Qwen2Config(
            **_COMMON,
            num_hidden_layers=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            tie_word_embeddings=False,
        )
    if name == "qwen3":
        return Qwen3Config(
            **_COMMON,
            num_hidden_layers=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            tie_word_embeddings=True,
        )
    if name == "mistral":
        return MistralConfig(
            **_COMMON,
            num_hidden_layers=3,
            sliding_window=MISTRAL_WINDOW,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=False,
        )
    raise KeyError(name)


TINY_MODELS = ("llama3", "qwen2", "qwen3", "mistral")


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter: weights and biases N(0, INIT_STD), RMSNorm weights 1 + N(0, INIT_STD)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * INIT_STD
            p.copy_(noise + 1.0 if name.endswith("norm.weight") else noise)


def build_tiny_model(name: str, out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Write the tiny `name` checkpoint to out_dir (float32 safetensors + SmolLM2's tokenizer files)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = _config(name)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    randomize_(model, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    for f in TOKENIZER_FILES:
        if (tokenizer_dir / f).exists():
            shutil.copy(tokenizer_dir / f, out_dir / f)
    if name == "qwen2":
        # transformers drops the window itself when use_sliding_window is false; real Qwen2 checkpoints keep
        # it in config.json, so write it back: the loader must ignore it, as transformers does.
        path = out_dir / "config.json"
        raw = json.loads(path.read_text())
        raw.update(sliding_window=MISTRAL_WINDOW, use_sliding_window=False)
        path.write_text(json.dumps(raw, indent=2))
    return out_dir


def load_reference(model_dir: Path):
    """The transformers model for a checkpoint directory, float32, eager attention, eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# Reference checks shared by the parity, prefix-caching and preemption tests

MIN_TIE_MARGIN = 1e-4


class Reference:
    """A transformers model, asked for teacher-forced float32 logits (nothing else: no generate(), no cache)."""

    def __init__(self, model):
        self.model = model
        self.checked: dict[tuple, tuple[list[str], list[str]]] = {}  # check_greedy's verdicts, see there

    @classmethod
    def load(cls, model_dir: Path) -> Reference:
        return cls(load_reference(model_dir))

    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        return self.model(torch.tensor([token_ids]), use_cache=False).logits[0].float()


def tie_margin(max_abs_logit_diff: float) -> float:
    """How close two reference logits must be for shoal to legitimately pick the other one.

    Shoal's logits and the reference's differ by at most d per entry (d measured by the logit-parity check on
    the same model), so shoal can rank two tokens differently from the reference only if the reference's gap
    between them is below 2d. The floor keeps a margin for models whose measured error is ~0.
    """
    return max(2.0 * max_abs_logit_diff, MIN_TIE_MARGIN)


def check_greedy(
    ref: Reference, prompt: list[int], output: list[int], margin: float, label: str = ""
) -> list[str]:
    """Check shoal's greedy `output` for `prompt` with ONE teacher-forced reference pass over prompt + output.

    Every output token must be the reference's argmax at its position, or a near-tie: a token whose reference
    logit is within `margin` of the top one (see tie_margin). Because the reference is teacher-forced on
    shoal's own tokens, a legitimate divergence at a near-tie does not break the check of the tokens after it:
    each is still compared with the reference's argmax given exactly the prefix shoal had.

    Returns the near-ties found (descriptions, also printed); raises AssertionError listing every real mismatch.
    """
    assert output, f"{label}: no tokens generated"
    key = (tuple(prompt), tuple(output), margin)
    if key not in ref.checked:  # the same tokens again (e.g. batched and staggered agree): one forward only
        logits = ref.logits(prompt + output[:-1])[len(prompt) - 1 :]
        assert logits.shape[0] == len(output)
        top = logits.argmax(dim=-1)
        ties, mismatches = [], []
        for i, token in enumerate(output):
            best = int(top[i])
            if token == best:
                continue
            gap = float(logits[i, best] - logits[i, token])
            what = f"token {i}: shoal {token}, reference argmax {best}, reference gap {gap:.3g}"
            (ties if gap <= margin else mismatches).append(what)
        ref.checked[key] = ties, mismatches
    ties = [f"{label} {t}" for t in ref.checked[key][0]]
    mismatches = [f"{label} {m}" for m in ref.checked[key][1]]
    for t in ties:
        print(f"near-tie (margin {margin:.3g}): {t}")
    assert not mismatches, (
        f"greedy tokens differ from the reference (tie margin {margin:.3g}):\n" + "\n".join(mismatches)
    )
    return ties


def make_engine(model_dir: Path, kv_tokens: int, block_size: int = 16, **config):
    """An LLMEngine (float32 unless dtype is given) whose KV cache holds kv_tokens tokens (rounded down to blocks)."""
    from shoal.engine.config import EngineConfig
    from shoal.engine.llm_engine import LLMEngine
    from shoal.engine.model_runner import ModelRunner
    from shoal.model.config import load_config

    dtype = config.pop("dtype", "float32")
    per_block = ModelRunner.kv_bytes_per_block(load_config(model_dir), block_size, torch.float32)
    if dtype != "float32":
        per_block //= 2
    return LLMEngine(
        EngineConfig(
            model=str(model_dir),
            dtype=dtype,
            kv_cache_memory=(kv_tokens // block_size) * per_block,
            block_size=block_size,
            **config,
        )
    )


def measure_logit_error(model_dir: Path, ref: Reference, prompts: list[list[int]], **config) -> float:
    """Max |shoal - reference| teacher-forced logit over prompts, from a fresh engine without prefix caching
    (so every prompt is computed in full whatever ran before)."""
    config = {"max_model_len": 512, "max_num_batched_tokens": 32, **config}
    engine = make_engine(model_dir, kv_tokens=2048, enable_prefix_caching=False, **config)
    return max(float((engine.prompt_logits(p) - ref.logits(p)).abs().max()) for p in prompts)
