"""Numerical parity with transformers (float32) on every supported architecture.

1. Logits: shoal's teacher-forced logits (`LLMEngine.prompt_logits`, the real paged + chunked-prefill path)
   match transformers' forward on 8 varied prompts, within a per-architecture tolerance.
2. Greedy: 64 new tokens (ignore_eos, fixed length) for all prompts in one batch, and again with staggered
   arrivals, checked with one teacher-forced reference pass per sequence (tiny_models.check_greedy), with
   near-ties allowed only where the reference's own gap is below twice the logit error measured in 1.
   transformers' generate() is never called, so its EOS handling plays no part: the reference is only asked
   for logits of prompt + shoal's tokens.
3. bfloat16: shoal's rounding error against the float32 reference is no larger than transformers' bfloat16.

Architectures: SmolLM2-135M (Llama, real weights), and tiny random checkpoints of Llama with Llama 3 rope
scaling and biases, Qwen2 (qkv bias, disabled sliding window), Qwen3 (q/k norm) and Mistral (sliding window
16, active: most prompts are 40-300 tokens). Prefill chunk sizes (max_num_batched_tokens) are small and not
multiples of the block size on the tiny models, so chunks attend to cached context across block boundaries.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest
import torch
from tiny_models import CHAT, MISTRAL_WINDOW, PROMPT_TEXTS, Reference, check_greedy, make_engine, tie_margin

from shoal.engine.llm_engine import LLMEngine
from shoal.engine.sampling_params import SamplingParams

ARCHS = ("smollm2", "llama3", "qwen2", "qwen3", "mistral")

# Max |shoal - transformers| over all prompt positions and the whole vocabulary, float32. The tiny random
# models have logits of std ~2; SmolLM2's reach ~30 through 30 layers. Measured values are printed.
LOGIT_TOL = {"smollm2": 1e-3, "llama3": 2e-4, "qwen2": 2e-4, "qwen3": 2e-4, "mistral": 2e-4}

# Prefill budget per step: chunked prefill with cached context everywhere except the shortest prompts.
CHUNK = {"smollm2": 128, "llama3": 32, "qwen2": 40, "qwen3": 32, "mistral": 24}

NEW_TOKENS = 64
STAGGER = [0, 1, 2, 4, 7, 11, 16, 30]  # arrival steps: later prompts prefill while earlier ones decode


@dataclass
class Bundle:
    """One architecture: a shared engine, the transformers reference, and the measured logit error."""

    arch: str
    engine: LLMEngine
    ref: Reference
    prompts: dict[str, list[int]]
    diffs: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, list[list[int]]] = field(default_factory=dict)
    ties: dict[str, list[str]] = field(default_factory=dict)

    @property
    def max_diff(self) -> float:
        return max(self.diffs.values())

    @property
    def margin(self) -> float:
        return tie_margin(self.max_diff)


class Bundles:
    """Built lazily, once per module: the logit error is measured on construction, so the greedy checks have
    their tie margin whatever order the tests run in."""

    def __init__(self, model_dirs, prompts):
        self.model_dirs, self.prompts, self._built = model_dirs, prompts, {}

    def __getitem__(self, arch: str) -> Bundle:
        if arch not in self._built:
            d = self.model_dirs[arch]
            engine = make_engine(d, kv_tokens=4096, max_model_len=512, max_num_batched_tokens=CHUNK[arch])
            b = Bundle(arch, engine, Reference.load(d), self.prompts)
            for label, ids in self.prompts.items():
                ours = engine.prompt_logits(ids)
                theirs = b.ref.logits(ids)
                assert ours.shape == theirs.shape, (
                    f"{arch}/{label}: {tuple(ours.shape)} vs {tuple(theirs.shape)}"
                )
                b.diffs[label] = float((ours - theirs).abs().max())
            self._built[arch] = b
        return self._built[arch]


@pytest.fixture(scope="module")
def bundles(model_dirs, test_prompts) -> Bundles:
    return Bundles(model_dirs, test_prompts)


def test_prompt_set_is_varied(test_prompts, smollm2_dir):
    lengths = {label: len(ids) for label, ids in test_prompts.items()}
    print("prompt lengths:", lengths)
    assert len(test_prompts) >= 8
    assert 280 <= lengths["long"] <= 340
    assert lengths["short"] < 16
    # Sliding window active: most prompts are well past Mistral's window.
    assert sum(n > 2 * MISTRAL_WINDOW for n in lengths.values()) >= 6
    # The prompts are what transformers' tokenizer and chat template make of the texts.
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    for label, text in PROMPT_TEXTS.items():
        assert hf(text)["input_ids"] == test_prompts[label], label
    chat = hf.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert hf(chat, add_special_tokens=False)["input_ids"] == test_prompts["chat"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("arch", ARCHS)
def test_logit_parity(arch, bundles):
    b = bundles[arch]
    report = ", ".join(f"{label} {d:.2e}" for label, d in b.diffs.items())
    print(f"{arch}: max |logit diff| {b.max_diff:.2e} ({report})")
    assert b.max_diff < LOGIT_TOL[arch], f"{arch}: logits differ from transformers: {report}"


@pytest.mark.timeout(30)
def test_mistral_window_matters(bundles, model_dirs, test_prompts):
    """The reference with the window removed gives clearly different logits on the long prompt, so the parity
    above really tests the sliding window (and not just full attention on short prompts)."""
    b = bundles["mistral"]
    ids = test_prompts["long"]
    full = Reference.load(model_dirs["mistral"])
    full.model.config.sliding_window = None
    without_window = full.logits(ids)
    with_window = b.ref.logits(ids)
    early = (without_window[:MISTRAL_WINDOW] - with_window[:MISTRAL_WINDOW]).abs().max()
    late = (without_window[-50:] - with_window[-50:]).abs().max()
    assert early < 1e-4 and late > 0.1, (float(early), float(late))
    assert b.diffs["long"] < LOGIT_TOL["mistral"]


def _greedy(bundle: Bundle, arrival_steps: list[int] | None) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    prompts = list(bundle.prompts.values())
    outs = bundle.engine.generate(prompts, params, arrival_steps=arrival_steps)
    for o in outs:
        assert o.outputs[0].finish_reason == "length"
        assert len(o.outputs[0].token_ids) == NEW_TOKENS
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["batched", "staggered"])
def test_greedy_parity(arch, mode, bundles):
    """Greedy tokens equal the reference's argmax (teacher-forced on shoal's own tokens) for every prompt."""
    b = bundles[arch]
    t0 = time.monotonic()
    outputs = _greedy(b, STAGGER if mode == "staggered" else None)
    elapsed = time.monotonic() - t0
    ties = []
    for (label, prompt), out in zip(b.prompts.items(), outputs, strict=True):
        ties += check_greedy(b.ref, prompt, out, b.margin, f"{arch}/{mode}/{label}")
    print(f"{arch}/{mode}: {len(outputs)}x{NEW_TOKENS} tokens in {elapsed:.1f}s, near-ties: {len(ties)}")
    b.outputs[mode], b.ties[mode] = outputs, ties
    if len(b.outputs) == 2 and not any(b.ties.values()):
        # Without near-ties, batching and arrival order cannot change a single token.
        assert b.outputs["batched"] == b.outputs["staggered"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("arch", ["llama3", "qwen2", "qwen3", "mistral"])
def test_bfloat16_error_matches_transformers(arch, bundles, model_dirs, test_prompts):
    """In bfloat16 (on CPU: oneDNN pre-packed linears where available) shoal's logits stray from the float32
    reference no more than transformers' own bfloat16 forward does: the same rounding, no extra error."""
    transformers = pytest.importorskip("transformers")
    d = model_dirs[arch]
    ids = test_prompts["long"]
    exact = bundles[arch].ref.logits(ids)
    hf16 = transformers.AutoModelForCausalLM.from_pretrained(
        d, dtype=torch.bfloat16, attn_implementation="eager"
    )
    theirs = Reference(hf16.eval()).logits(ids)
    engine = make_engine(
        d, kv_tokens=1024, dtype="bfloat16", max_model_len=512, max_num_batched_tokens=CHUNK[arch]
    )
    ours = engine.prompt_logits(ids)
    ours_err, theirs_err = (ours - exact).abs().mean(), (theirs - exact).abs().mean()
    print(f"{arch} bf16: mean |logit err| shoal {ours_err:.4f}, transformers {theirs_err:.4f}")
    assert ours_err <= 1.25 * theirs_err + 1e-3
