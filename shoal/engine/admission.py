"""The checks a request passes before it enters the engine, runnable without the model (no torch), so
that an engine client in another process refuses bad requests with a 400 before sending them."""

from __future__ import annotations

from shoal.engine.sampling_params import SamplingParams


def check_request(
    prompt_token_ids: list[int],
    params: SamplingParams,
    max_model_len: int,
    vocab_size: int,
    priority: int = 0,
    scheduling_policy: str = "fcfs",
    generates: bool = True,
) -> None:
    """Raise ValueError (naming the field, with the lengths) for a request that cannot run.
    generates=False (scoring a prompt: LLMEngine.prompt_logits) lets the prompt fill the whole context."""
    params.validate(vocab_size)
    if priority != 0 and scheduling_policy != "priority":
        # vLLM's rule: a priority the scheduler would ignore is an error, not a silent no-op.
        raise ValueError(
            f"priority is {priority}, but the server schedules first come, first served: start it with "
            "--scheduling-policy priority to use request priorities"
        )
    n = len(prompt_token_ids)
    if n == 0:
        raise ValueError("the prompt is empty")
    bad = next((t for t in prompt_token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"prompt token id {bad} is outside the vocabulary (size {vocab_size})")
    if not generates:
        if n > max_model_len:
            raise ValueError(f"the prompt has {n} tokens, more than max_model_len ({max_model_len})")
        return
    if n >= max_model_len:
        raise ValueError(
            f"the prompt has {n} tokens, but max_model_len is {max_model_len}: it leaves no room to generate"
        )
    if params.max_tokens is not None and n + params.max_tokens > max_model_len:
        raise ValueError(
            f"the prompt ({n} tokens) plus max_tokens ({params.max_tokens}) is {n + params.max_tokens} tokens, "
            f"more than max_model_len ({max_model_len})"
        )
