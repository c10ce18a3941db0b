"""The synchronous engine: add requests, call step() until done. The async front runs this in a thread."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from shoal.engine.admission import check_request
from shoal.engine.block_manager import BlockManager
from shoal.engine.config import EngineConfig
from shoal.engine.detokenizer import IncrementalDetokenizer
from shoal.engine.interrupt import StepInterrupted
from shoal.engine.model_runner import SHORT_PROMPT_TOKENS, ModelRunner, StepInput
from shoal.engine.outputs import CompletionOutput, RequestOutput
from shoal.engine.sampler import Sampler, SamplerOutput, SamplingRow, token_logprobs
from shoal.engine.sampling_params import SamplingParams
from shoal.engine.scheduler import ScheduledBatch, Scheduler
from shoal.engine.sequence import Sequence, Status
from shoal.engine.stats import EngineStats, StepStats
from shoal.engine.swap_space import SwapSpace
from shoal.engine.tp_worker import TensorParallelRunner, TensorParallelWorkers
from shoal.kernels import gemm, torch_threads
from shoal.model.batch_invariant import make_batch_invariant
from shoal.model.config import load_config, load_generation_config
from shoal.model.device import available_ram, mmap_dtype, resolve_device, resolve_dtype
from shoal.model.hub import resolve_model_path
from shoal.model.loader import load_model
from shoal.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CPU_DEFAULTS = {"max_num_batched_tokens": 512, "max_model_len": 2048}
CUDA_DEFAULTS = {"max_num_batched_tokens": 8192}
CPU_KV_SHARE_OF_FREE_RAM = 0.2
CUDA_MEMORY_READ_INTERVAL_S = 1.0


class LLMEngine:
    def __init__(self, config: EngineConfig):
        config.validate()
        self.config = config
        self.model_path = resolve_model_path(config.model)
        self.device = resolve_device(config.device)
        if config.urgent_threads is not None and self.device.type != "cpu":
            raise ValueError(f"urgent_threads sets CPU threads; this engine runs on {self.device}")
        model_cfg = load_config(self.model_path)
        mmap = config.load_format == "mmap"
        self.dtype = self._dtype(model_cfg.dtype, mmap)
        self._resolve_limits(model_cfg)
        t0 = time.monotonic()
        self.workers = self._start_workers(model_cfg)
        self.model, self.model_config = load_model(
            self.model_path,
            self.dtype,
            self.device,
            config.max_model_len,
            mmap=mmap,
            tp=self.workers.group if self.workers else None,
        )
        if config.deterministic:
            make_batch_invariant(self.model)
        self.load_seconds = time.monotonic() - t0
        template = Path(config.chat_template).read_text() if config.chat_template else None
        self.tokenizer = Tokenizer(self.model_path, chat_template=template)
        self.generation_config = load_generation_config(self.model_path)
        self.eos_token_ids = self._eos_ids()
        num_blocks = self._num_kv_blocks()
        num_host_blocks = self._num_host_blocks()
        if self.workers is not None:  # EngineConfig.validate keeps swap and deterministic mode off here
            self.runner = TensorParallelRunner(
                self.workers, self.model, num_blocks, config.block_size, self.device, self.dtype
            )
        else:
            self.runner = ModelRunner(
                self.model,
                num_blocks,
                config.block_size,
                self.device,
                self.dtype,
                compile_decode=config.compile,
                num_host_blocks=num_host_blocks,
                deterministic=config.deterministic,
            )
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            config.enable_chunked_prefill,
            config.scheduling_policy,
            SwapSpace(num_host_blocks) if config.preemption_mode == "swap" else None,
        )
        self.sampler = Sampler(self.model_config.vocab_size, self.eos_token_ids)
        self.requests: dict[str, list[Sequence]] = {}
        self.stats = EngineStats(block_size=config.block_size, num_kv_blocks=num_blocks)
        if self.device.type == "cuda":
            self.stats.cuda_device = self.device.index if self.device.index is not None else 0
        self._cuda_memory_read_at = 0.0
        self.step_listeners: list = []
        # Called between the decoder layers of a step with the least urgent (highest) priority of its rows;
        # True abandons the step under scheduling_policy "priority" (engine/interrupt.py). The engine core
        # sets it; None (the default) costs nothing.
        self.between_layers: Callable[[int], bool] | None = None
        self._added_since_step: list[str] = []  # with config.record_schedule
        log.info("shoal engine: %s", self.describe())

    # ---- set-up -------------------------------------------------------------------------------------
    def _dtype(self, checkpoint_dtype: str, mmap: bool) -> torch.dtype:
        if not mmap:
            return resolve_dtype(self.config.dtype, checkpoint_dtype, self.device)
        dtype, slow = mmap_dtype(self.config.dtype, checkpoint_dtype, self.device)
        if slow:
            log.warning(slow)
        return dtype

    def _start_workers(self, model_cfg) -> TensorParallelWorkers | None:
        """With tensor_parallel_size N > 1: ranks 1..N-1 as worker processes (ValueError first if the model
        does not split into N), this process being rank 0."""
        c = self.config
        if c.tensor_parallel_size == 1:
            return None
        return TensorParallelWorkers.start(
            c.tensor_parallel_size,
            self.model_path,
            model_cfg,
            self.dtype,
            self.device,
            c.max_model_len,
            c.block_size,
        )

    def close(self) -> None:
        """Stop what the engine started outside this process (tensor-parallel workers); idempotent."""
        self.runner.close()

    def _resolve_limits(self, model_cfg) -> None:
        c, limit = self.config, model_cfg.max_position_embeddings
        on_cpu = self.device.type == "cpu"
        if c.max_model_len is None:
            c.max_model_len = min(limit, CPU_DEFAULTS["max_model_len"]) if on_cpu else limit
        elif c.max_model_len > limit:
            raise ValueError(
                f"max_model_len={c.max_model_len} exceeds the model's max_position_embeddings ({limit})"
            )
        if c.max_num_batched_tokens is None:
            c.max_num_batched_tokens = (CPU_DEFAULTS if on_cpu else CUDA_DEFAULTS)["max_num_batched_tokens"]
        if not c.enable_chunked_prefill and c.max_num_batched_tokens < c.max_model_len:
            raise ValueError(
                f"without chunked prefill max_num_batched_tokens ({c.max_num_batched_tokens}) must be at least "
                f"max_model_len ({c.max_model_len})"
            )

    def _eos_ids(self) -> set[int]:
        ids = set(self.model_config.eos_token_ids)
        eos = self.generation_config.get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def _num_kv_blocks(self) -> int:
        c = self.config
        per_block = ModelRunner.kv_bytes_per_block(self.model_config, c.block_size, self.dtype)
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            activation_reserve = c.max_num_batched_tokens * self.model_config.vocab_size * 4 * 2
            budget = (
                int(total * c.gpu_memory_utilization) - torch.cuda.memory_allocated() - activation_reserve
            )
        elif c.kv_cache_memory is not None:
            budget = c.kv_cache_memory
        else:
            useful = c.max_num_seqs * c.max_model_len * per_block // c.block_size
            budget = min(int(available_ram() * CPU_KV_SHARE_OF_FREE_RAM), useful)
        num_blocks = budget // per_block
        min_blocks = -(-c.max_model_len // c.block_size)
        if num_blocks < min_blocks:
            raise ValueError(
                f"KV cache budget of {budget} bytes holds {num_blocks} blocks ({num_blocks * c.block_size} tokens), "
                f"less than one sequence of max_model_len={c.max_model_len}; raise --kv-cache-memory "
                f"(or --gpu-memory-utilization) or lower --max-model-len"
            )
        return num_blocks

    def _num_host_blocks(self) -> int:
        """Blocks of the swap pool: --swap-space GiB over the bytes of one block (0 unless swapping)."""
        c = self.config
        if c.preemption_mode != "swap":
            return 0
        per_block = ModelRunner.kv_bytes_per_block(self.model_config, c.block_size, self.dtype)
        return int(c.swap_space * 2**30) // per_block

    def describe(self) -> dict:
        c, bm = self.config, self.block_manager
        tokens = bm.num_blocks * c.block_size
        return {
            "model": str(self.model_path),
            "architecture": self.model_config.architecture,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "max_model_len": c.max_model_len,
            "max_num_seqs": c.max_num_seqs,
            "max_num_batched_tokens": c.max_num_batched_tokens,
            "block_size": c.block_size,
            "kv_cache_blocks": bm.num_blocks,
            "kv_cache_tokens": tokens,
            "kv_cache_bytes": bm.num_blocks
            * ModelRunner.kv_bytes_per_block(self.model_config, c.block_size, self.dtype),
            "max_concurrent_full_length_seqs": round(tokens / c.max_model_len, 2),
            "prefix_caching": c.enable_prefix_caching,
            "chunked_prefill": c.enable_chunked_prefill,
            "tensor_parallel_size": c.tensor_parallel_size,
            "preemption_mode": c.preemption_mode,
            "swap_blocks": self.scheduler.swap.num_blocks if self.scheduler.swap is not None else 0,
            "deterministic": c.deterministic,
            "bf16_decode_route": _bf16_decode_route(self.runner),
        }

    # ---- requests -----------------------------------------------------------------------------------
    def check_prompt(self, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0) -> None:
        """Raise ValueError for a request that cannot run here (see admission.check_request)."""
        check_request(
            prompt_token_ids,
            params,
            self.config.max_model_len,
            self.model_config.vocab_size,
            priority,
            self.config.scheduling_policy,
        )

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
    ) -> None:
        """Queue a request (ValueError if it cannot run). arrival_time (time.monotonic() seconds) is when
        it reached the server, so queue time and TTFT include what happened before the engine saw it.
        priority: lower is served earlier (only under scheduling_policy "priority"; otherwise it must be
        0). cache_salt: requests share prefix-cache blocks only with requests of the same salt."""
        self.check_prompt(prompt_token_ids, params, priority)
        self._queue(request_id, prompt_token_ids, params, arrival_time, priority, cache_salt)

    def _queue(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *seq_args) -> None:
        """add_request after its checks (prompt_logits checks differently); seq_args: Sequence's
        arrival_time, priority and cache_salt."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        seqs = []
        for i in range(params.n):
            seq = Sequence(request_id, i, prompt_token_ids, params, *seq_args)
            if params.seed is not None:
                seq.generator = torch.Generator(device=self.device).manual_seed(params.seed + i)
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params)
            seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = seqs
        if self.config.record_schedule:
            self._added_since_step.append(request_id)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        seqs = self.requests.pop(request_id, None)
        if seqs is None:
            return None
        for seq in seqs:
            if not seq.finished:
                self.scheduler.remove(seq)
                self._finish(seq, "abort")
        return self._request_output(seqs)

    def abort_all(self, error: Exception) -> list[str]:
        """After a failed step: abort every request (any may be half-updated) and return their ids."""
        request_ids = list(self.requests)
        log.error("engine step failed; failing %d request(s) in flight", len(request_ids), exc_info=error)
        for request_id in request_ids:
            self.abort_request(request_id)
        self.refresh_stats()
        return request_ids

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- the step -----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        t0 = time.monotonic()
        batch = self.scheduler.schedule()
        self.runner.swap_blocks(batch.swap_out, batch.swap_in)  # before any block is reused
        if batch.empty:
            return []
        step_input = self._step_input(batch)
        threads = self._step_threads(batch)
        try:
            with torch_threads(threads):
                logits = self.runner.run(step_input, self._layer_check(batch))
        except StepInterrupted:  # nothing computed: the rows run again later (engine/interrupt.py)
            self._record_stats(batch, time.monotonic() - t0, threads, interrupted=True)
            return []
        for seq in batch.seqs:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = t0
        sample_seqs, sample_logits = [], []
        per_seq = logits.split([len(rows) for rows in step_input.logit_rows])
        for seq, n, seq_logits in zip(batch.seqs, batch.num_tokens, per_seq, strict=True):
            start = seq.num_computed
            self._collect_prompt_logits(seq, start, n, seq_logits)
            seq.num_computed += n
            self.block_manager.register_computed(seq, start)
            if seq.num_computed == len(seq):
                sample_seqs.append(seq)
                sample_logits.append(seq_logits[-1])
        if sample_seqs:
            # Every sampling sequence holds at least its last row, so as many rows as samplers means each row
            # is one, in order: the logits as they are, not a copy (6 MB at 32 rows of SmolLM2's vocabulary).
            every_row = len(sample_seqs) == logits.shape[0]
            self._sample_and_append(sample_seqs, logits if every_row else torch.stack(sample_logits))
        seconds = time.monotonic() - t0
        self._share_busy_time(batch, seconds)
        self._record_stats(batch, seconds, threads)
        touched = dict.fromkeys(seq.request_id for seq in batch.seqs)
        return [self._pop_if_finished(rid) for rid in touched if rid in self.requests]

    def _step_threads(self, batch: ScheduledBatch) -> int | None:
        """The CPU threads this step's forward runs on where they differ from the engine's: urgent_threads
        for an urgent step (a prompt of priority <= urgent_priority toward its first token, with only rows
        as urgent: ScheduledBatch.first_token_priority); None for every other step."""
        urgent = batch.first_token_priority
        if self.config.urgent_threads is None or urgent is None or urgent > self.config.urgent_priority:
            return None
        return self.config.urgent_threads

    def _layer_check(self, batch: ScheduledBatch) -> Callable[[], None] | None:
        """The runner's between-layers call for this step: consult between_layers with the priority of the
        step's least urgent row, and raise StepInterrupted if it says so under the priority policy."""
        if self.between_layers is None:
            return None
        ask, least_urgent = self.between_layers, max(seq.priority for seq in batch.seqs)
        interruptible = self.config.scheduling_policy == "priority"

        def check() -> None:
            if ask(least_urgent) and interruptible:
                raise StepInterrupted(f"a request more urgent than priority {least_urgent} arrived")

        return check

    def _step_input(self, batch: ScheduledBatch) -> StepInput:
        inp = StepInput([], [], [], [])
        for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
            start = seq.num_computed
            inp.token_ids.append(seq.token_ids[start : start + n])
            inp.start_positions.append(start)
            inp.block_tables.append(seq.block_table)
            inp.logit_rows.append(self._logit_rows(seq, start, n))
        return inp

    @staticmethod
    def _logit_rows(seq: Sequence, start: int, n: int) -> list[int]:
        """Rows of this chunk whose logits we need: prompt-logprob targets, and the last if it samples."""
        if seq.captured_logits is not None:
            return list(range(n))
        rows = []
        if seq.prompt_logprobs is not None and seq.in_prompt:
            rows = [i for i in range(n) if start + i + 1 < seq.num_prompt_tokens]
        if start + n == len(seq) and (not rows or rows[-1] != n - 1):
            rows.append(n - 1)
        return rows

    def _collect_prompt_logits(self, seq: Sequence, start: int, n: int, logits: torch.Tensor) -> None:
        if seq.captured_logits is not None:
            seq.captured_logits.append(logits)
        if seq.prompt_logprobs is None or not seq.in_prompt:
            return
        count = sum(1 for i in range(n) if start + i + 1 < seq.num_prompt_tokens)
        if count:
            rows = logits[:count]
            targets = torch.tensor(seq.token_ids[start + 1 : start + 1 + count], device=rows.device)
            seq.prompt_logprobs.extend(token_logprobs(rows, targets, seq.params.prompt_logprobs))

    def _sample_and_append(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        rows = [SamplingRow(s.params, s.token_ids, s.num_prompt_tokens, s.generator) for s in seqs]
        out = self._sample(logits, rows)
        now = time.monotonic()
        for seq, token, lp in zip(seqs, out.token_ids, out.logprobs, strict=True):
            seq.token_ids.append(token)
            seq.token_times.append(now)
            if seq.first_token_time is None:
                seq.first_token_time = now
            if seq.logprobs is not None:
                seq.logprobs.append(lp)
            stop_token = self._is_stop_token(seq, token)
            # The token that ends a sequence is not part of its text (vLLM's rule), unless asked for.
            keep = not stop_token or seq.params.include_stop_str_in_output
            stop_str = seq.detokenizer.add_tokens([token]) if keep else None
            reason = self._finish_reason(seq, token, stop_str, stop_token)
            if reason is not None:
                self.scheduler.remove(seq)
                self._finish(seq, *reason)

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        """The batched sampler; in deterministic mode one row at a time, so that no batched reduction
        (softmax, cumulative sums) can see how many rows there are."""
        if not self.config.deterministic:
            return self.sampler(logits, rows)
        outs = [self.sampler(logits[i : i + 1], [row]) for i, row in enumerate(rows)]
        return SamplerOutput([t for o in outs for t in o.token_ids], [lp for o in outs for lp in o.logprobs])

    def _is_stop_token(self, seq: Sequence, token: int) -> bool:
        """Whether token ends seq as a stop token (stop_token_ids, or EOS unless ignore_eos). No stop
        condition counts before min_tokens tokens exist (vLLM's check_stop)."""
        p = seq.params
        if seq.num_output_tokens < p.min_tokens:
            return False
        return token in p.stop_token_ids or (token in self.eos_token_ids and not p.ignore_eos)

    def _finish_reason(
        self, seq: Sequence, token: int, stop_str: str | None, stop_token: bool
    ) -> tuple[str, int | str | None] | None:
        p = seq.params
        if stop_str is not None:
            return "stop", stop_str
        if stop_token:
            return "stop", token if token in p.stop_token_ids else None
        if p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens:
            return "length", None
        if len(seq) >= self.config.max_model_len:
            return "length", None
        return None

    @staticmethod
    def _share_busy_time(batch: ScheduledBatch, seconds: float) -> None:
        """Split a step's time over its sequences by tokens computed (what cost-per-request is built on)."""
        total = sum(batch.num_tokens)
        for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
            seq.busy_seconds += seconds * n / total

    @staticmethod
    def _finish(seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        seq.status = Status.FINISHED
        seq.finished_time = time.monotonic()
        seq.finish_reason, seq.stop_reason = reason, stop_reason

    def refresh_stats(self) -> None:
        s, bm = self.stats, self.block_manager
        s.num_running, s.num_waiting = len(self.scheduler.running), len(self.scheduler.waiting)
        s.kv_cache_usage = bm.usage
        s.prefix_cache_queries, s.prefix_cache_hits = bm.prefix_queries, bm.prefix_hits
        sched = self.scheduler
        s.num_preemptions = sched.num_preemptions
        s.num_swapped, s.num_swapped_out, s.num_swapped_in = (
            len(sched.swapped),
            sched.num_swapped_out,
            sched.num_swapped_in,
        )
        s.swap_usage = sched.swap.usage if sched.swap is not None else 0.0
        self._refresh_cuda_memory()

    def _refresh_cuda_memory(self) -> None:
        """The caching allocator's counters, at most once a second: torch.cuda.memory_stats builds a dict
        of a few hundred entries, too dear for every step at GPU step times."""
        now = time.monotonic()
        if self.stats.cuda_device is None or now - self._cuda_memory_read_at < CUDA_MEMORY_READ_INTERVAL_S:
            return
        self._cuda_memory_read_at = now
        self.stats.cuda_memory_allocated = torch.cuda.memory_allocated(self.device)
        self.stats.cuda_memory_reserved = torch.cuda.memory_reserved(self.device)

    def _record_stats(
        self, batch: ScheduledBatch, seconds: float, threads: int | None, interrupted: bool = False
    ) -> None:
        """After a step (its forward on `threads`, None: the engine's); an interrupted one counts apart
        (its StepStats says what it would have run)."""
        self.refresh_stats()
        s = self.stats
        if interrupted:
            s.num_steps_interrupted += 1
        else:
            s.last_batch_size = len(batch.seqs)
            s.num_steps += 1
        s.last_step_unix = time.time()
        if self.step_listeners:
            decode = sum(1 for n in batch.num_tokens if n == 1)
            step = StepStats(
                batch_size=len(batch.seqs),
                num_prefill_tokens=sum(batch.num_tokens) - decode,
                num_decode_tokens=decode,
                num_running=s.num_running,
                num_waiting=s.num_waiting,
                kv_cache_usage=s.kv_cache_usage,
                step_seconds=seconds,
                num_preempted=batch.num_preempted,
                interrupted=interrupted,
                threads=threads or torch.get_num_threads(),
            )
            if self.config.record_schedule:
                step.admitted = [[s.request_id, s.arrival_time, s.priority] for s in batch.admitted]
                step.added, self._added_since_step = self._added_since_step, []
                step.preempted = [s.request_id for s in batch.preempted]
                if interrupted:
                    step.abandoned = list(dict.fromkeys(s.request_id for s in batch.seqs))
            for listener in self.step_listeners:
                listener(step)

    # ---- outputs ------------------------------------------------------------------------------------
    def _pop_if_finished(self, request_id: str) -> RequestOutput:
        seqs = self.requests[request_id]
        out = self._request_output(seqs)
        if out.finished:
            del self.requests[request_id]
        return out

    @staticmethod
    def _request_output(seqs: list[Sequence]) -> RequestOutput:
        first = seqs[0]
        outputs = [
            CompletionOutput(
                index=s.index,
                text=s.detokenizer.stable_text(s.finished),
                token_ids=s.output_token_ids,
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
                token_times=list(s.token_times),
            )
            for s in seqs
        ]
        finished = all(s.finished for s in seqs)
        return RequestOutput(
            request_id=first.request_id,
            prompt_token_ids=first.token_ids[: first.num_prompt_tokens],
            outputs=outputs,
            prompt_logprobs=list(first.prompt_logprobs) if first.prompt_logprobs is not None else None,
            num_cached_tokens=first.num_cached_prompt_tokens,
            finished=finished,
            metrics=_request_metrics(seqs, finished),
        )

    # ---- offline helpers ----------------------------------------------------------------------------
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams],
        arrival_steps: list[int] | None = None,
    ) -> list[RequestOutput]:
        """Run prompts to completion; arrival_steps[i] delays prompt i until that many steps have run."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        arrivals = arrival_steps or [0] * len(prompts)
        ids = [f"offline-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        pending = sorted(range(len(prompts)), key=lambda i: arrivals[i])
        results: dict[str, RequestOutput] = {}
        steps = 0
        while pending or self.has_unfinished():
            while pending and arrivals[pending[0]] <= steps:
                i = pending.pop(0)
                self.add_request(ids[i], prompts[i], params_list[i])
            for out in self.step():
                if out.finished:
                    results[out.request_id] = out
            steps += 1
        return [results[i] for i in ids]

    @torch.inference_mode()
    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Teacher-forced float32 logits [len, vocab] computed through the real paged, chunked path.
        The prompt may fill the whole context (len == max_model_len): scoring generates nothing (the one
        token sampled after the prompt is dropped). ValueError for a longer or invalid prompt."""
        request_id = f"score-{time.monotonic_ns()}"
        params = SamplingParams(max_tokens=1, temperature=0.0)
        vocab = self.model_config.vocab_size
        check_request(token_ids, params, self.config.max_model_len, vocab, generates=False)
        self._queue(request_id, token_ids, params)
        seq = self.requests[request_id][0]
        seq.captured_logits = []
        while request_id in self.requests:
            self.step()
        return torch.cat(seq.captured_logits)[: len(token_ids)]

    def warm_up(self) -> None:
        """A short request end to end, so the first real request does not pay for lazy initialization
        (with compile on, this is where the single-sequence decode forward gets compiled)."""
        token = min(self.eos_token_ids) if self.eos_token_ids else 0
        t0 = time.monotonic()
        self.generate([[token] * 4], SamplingParams(max_tokens=3, ignore_eos=True))
        # A prompt past SHORT_PROMPT_TOKENS: the per-op forward, which short prompts no longer reach.
        self.generate([[token] * (SHORT_PROMPT_TOKENS + 8)], SamplingParams(max_tokens=1, ignore_eos=True))
        if self.config.compile:
            log.info("warm-up with the compiled decode forward took %.0f s", time.monotonic() - t0)
        self.block_manager.prefix_queries = self.block_manager.prefix_hits = 0


def _request_metrics(seqs: list[Sequence], finished: bool) -> dict:
    """RequestOutput.metrics of a request's sequences (see outputs.METRIC_KEYS): the earliest first
    schedule and first token of any choice, the last finish, and the sum of their busy time."""
    return {
        "arrival_time": seqs[0].arrival_time,
        "first_scheduled_time": min(
            (s.first_scheduled_time for s in seqs if s.first_scheduled_time), default=None
        ),
        "first_token_time": min((s.first_token_time for s in seqs if s.first_token_time), default=None),
        "finished_time": max(s.finished_time for s in seqs) if finished else None,
        "busy_seconds": sum(s.busy_seconds for s in seqs),
    }


def _bf16_decode_route(runner: object) -> str | None:
    """Which gemm.c route streams 1-4 bf16 rows now (chosen by timing at the first load in this process,
    kernels/gemm.py): "loop" or "tiles"; None where the one-call step or the bf16 kernel is not used
    (tensor-parallel runners have no one-call step)."""
    stack = getattr(runner, "decode_stack", None)
    if stack is None or stack.bf16_calibration is None:
        return None
    return "loop" if gemm.bf16_decode_loop() else "tiles"
