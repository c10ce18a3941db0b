"""Freeze the start-up heap, so that the garbage collector's full passes do not stall serving.

A process that has loaded a model holds about 190,000 objects tracked by the cyclic garbage collector
(the engine core of SmolLM2-135M after warm-up: modules, parameters, the tokenizer, imported code). A
full (generation 2) collection walks all of them: 35-47 ms in an idle engine core after warm-up, and
49-54 ms in the HTTP process in the middle of a traffic spike (docs/benchmarks.md, "GC pauses" in the
spike's sections), during which no step runs and no urgent request is noticed. Python starts one
whenever the objects that survived younger collections grow by a quarter of the long-lived ones, so a
busy server pays it every few minutes, at random requests.

`gc.freeze()` moves every tracked object into a permanent generation that collections skip; what is
created afterwards (requests, outputs) is collected as before. Collecting first matters: freeze takes
the generations as they are, so garbage still in them would never be reclaimed. The same is done by
vLLM after its engine's start-up (`vllm/utils/gc_utils.py`, `freeze_gc_heap`) and described for
long-running services in the `gc.freeze` documentation. Standard library only.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect every generation, then freeze what is left; returns the number of frozen objects (all
    calls together: a later call, after another model loads, adds to it)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
