"""Shared fixtures: where the test models live, the tiny random checkpoints and the prompt set.

Real checkpoints come from $SHOAL_TEST_MODELS (default <repo>/models): SmolLM2-135M-Instruct and
stories260K. Tests that need one skip when it is absent. The tiny random-weight models of every
architecture (tests/tiny_models.py) are built once per session into a temporary directory; they borrow
SmolLM2's tokenizer files, so they need that directory too.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tiny_models import CHAT, PROMPT_TEXTS, TINY_MODELS, build_tiny_model

REPO = Path(__file__).resolve().parent.parent
MODELS_DIR = Path(os.environ.get("SHOAL_TEST_MODELS", REPO / "models"))
SMOLLM2 = "SmolLM2-135M-Instruct"
STORIES = "stories260K"


def require_model(name: str) -> Path:
    path = MODELS_DIR / name
    if not (path / "config.json").exists():
        pytest.skip(f"test model {name} not found under {MODELS_DIR} (set SHOAL_TEST_MODELS)")
    return path


# One intra-op thread by default: on a small shared CI box (2 cores, often busy with other work) OpenMP's
# spinning threads slow the many small ops of an engine step down by 10x or more as soon as a core is taken;
# one thread is as fast for the tiny models and only mildly slower for SmolLM2 on an idle machine.
TEST_THREADS = int(os.environ.get("SHOAL_TEST_THREADS", "1"))


@pytest.fixture(scope="session", autouse=True)
def _deterministic_torch():
    threads = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return require_model(SMOLLM2)


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    return require_model(STORIES)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, smollm2_dir) -> dict[str, Path]:
    """name -> directory of every tiny random-weight checkpoint (built once per session)."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("tiny_models")
    return {
        name: build_tiny_model(name, root / name, smollm2_dir, seed=i) for i, name in enumerate(TINY_MODELS)
    }


@pytest.fixture(scope="session")
def model_dirs(smollm2_dir, tiny_model_dirs) -> dict[str, Path]:
    """Every architecture under test: SmolLM2 (Llama, real weights) and the tiny random ones."""
    return {"smollm2": smollm2_dir, **tiny_model_dirs}


@pytest.fixture(scope="session")
def test_prompts(smollm2_dir) -> dict[str, list[int]]:
    """label -> token ids (SmolLM2's tokenizer, shared by the tiny models): short, ~300 tokens, multi-turn chat,
    French, Chinese, Russian, code and emoji."""
    from shoal.model.tokenizer import Tokenizer

    tok = Tokenizer(smollm2_dir)
    prompts = {label: tok.encode(text) for label, text in PROMPT_TEXTS.items()}
    prompts["chat"] = tok.encode(tok.apply_chat_template(CHAT), add_special_tokens=False)
    return prompts
