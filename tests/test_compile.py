"""`--compile`: the single-sequence decode forward through torch.compile gives the same greedy tokens as transformers
(checked with the same near-tie rule as the eager parity tests), in float32 on a tiny Qwen3 (q/k norm)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import Reference, check_greedy, make_engine, measure_logit_error, tie_margin

from shoal.engine.sampling_params import SamplingParams


@pytest.mark.timeout(300)
def test_compiled_decode_matches_transformers(model_dirs, test_prompts):
    from torch._dynamo.utils import counters

    model_dir = model_dirs["qwen3"]
    ref = Reference.load(model_dir)
    prompts = [test_prompts[k] for k in ("short", "french", "code")]
    margin = tie_margin(measure_logit_error(model_dir, ref, prompts))
    engine = make_engine(model_dir, kv_tokens=2048, max_model_len=512, compile=True)
    engine.warm_up()
    assert engine.runner.compiled is not None
    graphs_after_warm_up = counters["stats"]["unique_graphs"]
    assert graphs_after_warm_up > 0, "warm-up compiled nothing"
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    singles = [engine.generate([p], params)[0] for p in prompts]  # compiled: one sequence decoding
    batched = engine.generate(prompts, params)  # eager: batched decode steps
    ties = []
    for prompt, out in zip(prompts + prompts, singles + batched, strict=True):
        ties += check_greedy(ref, prompt, out.outputs[0].token_ids, margin, "compiled")
    print(f"compiled decode: {len(ties)} near-ties, {graphs_after_warm_up} graphs compiled in warm-up")
    assert counters["stats"]["unique_graphs"] == graphs_after_warm_up, "real traffic recompiled"
    assert torch.compiler.is_compiling() is False
