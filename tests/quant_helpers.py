"""Helpers shared by the quantization tests: the weights shoal dequantizes, split back into checkpoint
names, and one completion served over the OpenAI API from a model directory."""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch

from shoal.quant.linear import QuantizedLinear

FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def shoal_dequantized(model: torch.nn.Module, cfg, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """checkpoint module name -> weight [out, in] shoal dequantizes, split back out of the fused linears,
    columns in the input's order (an act-order layer stores them permuted)."""
    weights = {}
    for path, module in model.named_modules():
        if not isinstance(module, QuantizedLinear):
            continue
        head, _, leaf = path.rpartition(".")
        parts = FUSED.get(leaf, (leaf,))
        w = module.dequantized_weight(dtype)
        if module.input_perm is not None:
            w = torch.empty_like(w).index_copy_(1, module.input_perm, w)
        if leaf == "qkv_proj":
            q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            sizes = [q, kv, kv]
        else:
            sizes = [w.shape[0] // len(parts)] * len(parts)
        for part, chunk in zip(parts, w.split(sizes), strict=True):
            weights[f"model.{head}.{part}" if head else part] = chunk  # lm_head has no "model." prefix
    return weights


def serve_completion(model_dir: Path, prompt: str, max_tokens: int = 8, dtype: str = "float32") -> dict:
    """POST /v1/completions (greedy) to shoal's app serving model_dir in process; the response JSON.
    AssertionError with the body unless the status is 200."""
    import httpx

    from shoal.engine.async_engine import AsyncEngine
    from shoal.engine.config import EngineConfig
    from shoal.server.app import build_app
    from shoal.server.settings import ServerSettings

    engine = AsyncEngine.from_config(EngineConfig(model=str(model_dir), dtype=dtype, kv_cache_memory=4 << 20))
    app = build_app(engine, ServerSettings(served_model_name="quantized"))
    body = {"model": "quantized", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}

    async def run() -> httpx.Response:
        await engine.start()
        try:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
                return await client.post("/v1/completions", json=body)
        finally:
            await engine.shutdown()

    r = asyncio.run(run())
    assert r.status_code == 200, r.text
    return r.json()
