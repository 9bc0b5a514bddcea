"""RolloutEngine: the embedded generation engine the rollout stage calls (student samples its own responses).

It drives the very model the optimizer trains (no weight copy) through its paged-forward protocol:

    model.forward_paged(input_ids [T], positions [T], meta: PagedMetadata, kv_cache) -> hidden [T, H]
    model.logits(hidden [k, H]) -> float32 [k, V]
    model.allocate_kv_cache(num_pages, page_size, dtype=None, device=None) -> list of per-layer KV tensors
    model.config.vocab_size

Each step: scheduler (which tokens, which pages) -> copy-on-write page copies -> batch builder (tensors) -> one
forward -> logits of the rows that sample -> sampler -> scheduler.update. ``release()`` drops the KV tensors so
their memory can serve training (the plan's release point); the next ``generate`` allocates them again.

``attention="flashinfer"`` (CUDA, bf16/fp16 model) hands the forward + sampling part of a step to the GPU path in
``cuda_graphs.py`` (flashinfer paged attention, optional CUDA-graph decode with ``cuda_graphs=True``, one host sync
per step); scheduling, batch building and sampling semantics are the same.

Models with linear-attention layers (Qwen3.5, ``model.recurrent``) also get a recurrent-state pool: one slot per
running sequence (max_num_seqs of them) in every linear-attention layer, beside the KV pages of the attention
layers (state_slots.py, models/linear_state.py), plus one scratch slot (slot max_num_seqs) for the idle and padding
rows of decode bursts and graphed decode steps, as the scratch page is for their K/V. The flashinfer path, its CUDA
graphs and decode bursts cover them (the linear layers' decode step needs no host synchronisation); the fused
rollout kernels do not (they fuse attention layers only), and are left out for them with a note.

``vocab_limit`` restricts sampling to ids below it (the logits beyond are dropped before the sampler): eval's teacher
answers in the student's vocabulary when its own has extra (padding) rows, as the loss compares them (the teacher's
extra columns never enter its softmax there either).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from opdgraph.rollout.batch_builder import build_model_inputs
from opdgraph.rollout.kv_pool import PagePool
from opdgraph.rollout.request import Request, Response, ResponseCounters
from opdgraph.rollout.sampler import sample_tokens
from opdgraph.rollout.scheduler import ScheduledBatch, Scheduler
from opdgraph.rollout.sequence import Sequence
from opdgraph.rollout.state_slots import StateSlotPool


@dataclass
class EngineStats:
    """Counters of the last ``generate`` call."""

    prefill_tokens: int = 0  # tokens computed by prefill chunks (prompts, and contexts re-prefilled after preemption)
    decode_tokens: int = 0  # tokens computed by decode steps (one per running sequence per step)
    generated_tokens: int = 0  # tokens in the returned responses
    forwards: int = 0
    preemptions: int = 0
    wall_seconds: float = 0.0
    peak_pages_used: int = 0
    bursts: int = 0  # decode bursts run (decode_burst_steps > 1)
    burst_steps: int = 0  # device decode steps inside them
    kv_pool_created: bool = False  # this call (re)allocated the KV tensors (first call, or after release())
    # Host seconds per engine phase (schedule, build_inputs, update); the GPU path keeps its own split.
    host_seconds: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per wall-clock second."""
        return self.generated_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0


class RolloutEngine:
    def __init__(
        self,
        model,
        *,
        page_size: int,
        num_pages: int,
        max_num_seqs: int,
        prefill_token_budget: int,
        device: torch.device | str,
        kv_dtype: torch.dtype | None = None,
        attention: str = "torch",
        cuda_graphs: bool = False,
        decode_burst_steps: int = 1,
        fused_kernels: bool = False,
        stacked_gate_up: bool = True,
        vocab_limit: int | None = None,
    ):
        for name, value in [
            ("page_size", page_size),
            ("num_pages", num_pages),
            ("max_num_seqs", max_num_seqs),
            ("prefill_token_budget", prefill_token_budget),
            ("decode_burst_steps", decode_burst_steps),
        ]:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"RolloutEngine: {name} must be an integer >= 1, got {value!r}")
        if attention not in ("torch", "flashinfer"):
            raise ValueError(f"RolloutEngine: attention must be 'torch' or 'flashinfer', got {attention!r}")
        if cuda_graphs and attention != "flashinfer":
            raise ValueError("RolloutEngine: cuda_graphs=True needs attention='flashinfer'")
        if vocab_limit is not None and attention != "torch":
            raise ValueError("RolloutEngine: vocab_limit needs attention='torch'")
        self.model = model
        self.recurrent = bool(getattr(model, "recurrent", False))
        if self.recurrent and fused_kernels:
            print("note: rollout: the fused rollout kernels cover attention layers only; the student has "
                  "linear-attention layers (Qwen3.5), so its rollout forward runs unfused")
            fused_kernels = False
        self.vocab_limit = vocab_limit
        self.page_size = page_size
        self.num_pages = num_pages
        self.max_num_seqs = max_num_seqs
        self.prefill_token_budget = prefill_token_budget
        self.device = torch.device(device)
        self.kv_dtype = kv_dtype
        self.kv_cache: list[torch.Tensor] | None = None
        self.stats = EngineStats()
        self.gpu_path = None
        if attention == "flashinfer":
            from opdgraph.rollout.cuda_graphs import FlashInferRollout

            self.gpu_path = FlashInferRollout(model, device=self.device, page_size=page_size, num_pages=num_pages,
                                              max_num_seqs=max_num_seqs, kv_dtype=kv_dtype, cuda_graphs=cuda_graphs)
        self.decode_burst_steps = decode_burst_steps
        # The model's rollout forward with Triton kernels for its elementwise work (kernels/fused_decode.py); the
        # flag is on only inside generate(), so training and teacher scoring never see it.
        self.fused_kernels = fused_kernels
        # With fused kernels, gate/up run as one matmul in the layers whose parameters are packed back to back
        # (DecoderLM.pack_gate_up: a view, no copy); other layers keep two.
        self.stacked_gate_up = stacked_gate_up
        self.stacked_gate_up_layers = 0
        self._stacked_qkv = None
        self.burst = None if decode_burst_steps == 1 else self._build_burst(cuda_graphs)

    def _build_burst(self, cuda_graphs: bool):
        """Decode bursts (decode_burst.py): the Triton paged-decode kernel on CUDA (graphs only on the flashinfer
        path, whose scratch page and ladder they share), the torch reference elsewhere."""
        from opdgraph.rollout.decode_burst import DecodeBurst

        if self.device.type == "cuda":  # with or without the flashinfer path (prefill may run either way)
            from opdgraph.kernels.paged_decode_attention import TritonDecodeBackend
            from opdgraph.rollout.cuda_graphs import float32_logits_fn

            attention = TritonDecodeBackend(num_kv_heads=self.model.config.num_kv_heads,
                                            max_context=self.kv_pool_tokens, device=self.device)
            if self.gpu_path is not None:
                logits_fn, ladder = self.gpu_path.logits_fn, self.gpu_path.ladder or None
            else:
                logits_fn, ladder = float32_logits_fn(self.model, self.device), None
        else:
            from opdgraph.models.attention_backend import TorchReferenceBackend

            attention, logits_fn, ladder = TorchReferenceBackend(), None, None
        if self.vocab_limit is not None:
            logits_fn = self._limited(logits_fn or self.model.logits)
        return DecodeBurst(self.model, attention=attention, device=self.device, page_size=self.page_size,
                           scratch_page=self.num_pages, max_rows=self.max_num_seqs,
                           max_steps=self.decode_burst_steps, logits_fn=logits_fn, cuda_graphs=cuda_graphs,
                           ladder=ladder, scratch_slot=self.max_num_seqs if self.recurrent else None,
                           fused_state=self.fused_kernels)

    @property
    def kv_pool_tokens(self) -> int:
        return self.num_pages * self.page_size

    def drop_graphs(self) -> None:
        """Forget captured graphs (they are captured again when next needed): for callers whose weights may have
        moved since the last generate, e.g. a sharded student gathered anew (the KV pool stays)."""
        if self.gpu_path is not None:
            self.gpu_path.release()
        if self.burst is not None:
            self.burst.release()
        self._stacked_qkv = None

    def release(self) -> None:
        """Drop the KV tensors (their memory returns to the allocator for training); generate() re-creates them."""
        self.kv_cache = None
        self._stacked_qkv = None  # the fused rollout's stacked q/k/v weights go with the graphs that read them
        if self.gpu_path is not None:
            self.gpu_path.release()
        if self.burst is not None:
            self.burst.release()

    def generate(self, requests: list[Request]) -> list[Response]:
        """Sample every request n times; responses come back in request order, then sample index."""
        self._validate(requests)
        stats = EngineStats()
        fused_before = getattr(self.model, "use_fused_decode_kernels", False)
        if self.fused_kernels:
            self.model.use_fused_decode_kernels = True
            # Restacked in place every rollout (training changed the weights; graphs keep the addresses).
            self._stacked_qkv = self.model.stack_qkv(self._stacked_qkv)
            self.model.install_fused_qkv(self._stacked_qkv)
            self.stacked_gate_up_layers = self.model.install_fused_gate_up(self.stacked_gate_up)
        try:
            return self._generate(requests, stats)
        finally:
            if self.fused_kernels:
                self.model.use_fused_decode_kernels = fused_before
                self.model.install_fused_qkv(None)
                self.model.install_fused_gate_up(False)

    def _generate(self, requests: list[Request], stats: EngineStats) -> list[Response]:
        with torch.inference_mode():
            if self.kv_cache is None:
                self.kv_cache = self._allocate_kv_cache()
                stats.kv_pool_created = True
            pool = PagePool(self.num_pages)
            scheduler = Scheduler(
                pool,
                page_size=self.page_size,
                max_num_seqs=self.max_num_seqs,
                prefill_token_budget=self.prefill_token_budget,
                state_slots=StateSlotPool(self.max_num_seqs) if self.recurrent else None,
            )
            for order, request in enumerate(requests):
                scheduler.add(Sequence(request, sample_indices=list(range(request.n)), arrival_order=order))
            started = time.perf_counter()
            while scheduler.has_work():
                self._step(scheduler, stats)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            stats.wall_seconds = time.perf_counter() - started
        stats.preemptions = scheduler.num_preemptions
        stats.peak_pages_used = pool.peak_pages_used
        finished = sorted(scheduler.finished, key=lambda s: (s.arrival_order, s.sample_indices[0]))
        stats.generated_tokens = sum(len(sequence.generated) for sequence in finished)
        self.stats = stats
        return [_response(sequence) for sequence in finished]

    def _allocate_kv_cache(self) -> list[torch.Tensor]:
        """KV tensors, plus one scratch page (page id num_pages) where padded and idle rows write on the GPU path and
        in bursts."""
        if self.burst is not None:
            self.burst.release()  # its graphs point at the old tensors
        if self.gpu_path is not None:  # adds the scratch page and drops graphs of the old tensors
            return self.gpu_path.allocate_kv_cache(self.num_pages, self.page_size, dtype=self.kv_dtype,
                                                   device=self.device)
        extra_pages = 0 if self.burst is None else 1
        if self.recurrent:  # bursts add a scratch slot too
            return self.model.allocate_kv_cache(self.num_pages + extra_pages, self.page_size, dtype=self.kv_dtype,
                                                device=self.device, num_state_slots=self.max_num_seqs + extra_pages)
        return self.model.allocate_kv_cache(self.num_pages + extra_pages, self.page_size, dtype=self.kv_dtype,
                                            device=self.device)

    def _step(self, scheduler: Scheduler, stats: EngineStats) -> None:
        clock, phases = time.perf_counter, stats.host_seconds
        started = clock()
        if self.burst is not None and self._burst(scheduler, stats):
            phases["burst"] += clock() - started
            return
        batch = scheduler.schedule()
        if not batch.chunks:
            raise RuntimeError("rollout scheduler made no progress (internal error: please report)")
        if batch.page_copies:
            self._copy_pages(batch.page_copies)
        scheduled = clock()
        result = None if self.gpu_path is None else self.gpu_path.replay_decode(batch, self.kv_cache)
        if result is None:  # not a graph decode step: build the inputs as tensors and run eagerly
            inputs = build_model_inputs(batch, self.page_size, self.device)
            phases["build_inputs"] += clock() - scheduled
            if self.gpu_path is not None:
                result = self.gpu_path.forward_and_sample(batch, inputs, self.kv_cache)
            else:
                result = self._forward_and_sample(inputs)
        tokens, logprobs = result
        _count(batch, stats)
        updating = clock()
        scheduler.update(batch, tokens, logprobs)
        if scheduler.state_copies:  # forked samples continue from copies of their prompt's state, in order
            for source, destination in scheduler.state_copies:
                for layer_cache in self.kv_cache:
                    if not isinstance(layer_cache, torch.Tensor):
                        layer_cache.copy_slot(source, destination)
            scheduler.state_copies.clear()
        phases["schedule"] += scheduled - started
        phases["update"] += clock() - updating

    def _burst(self, scheduler: Scheduler, stats: EngineStats) -> bool:
        """Run a decode burst if the scheduler allows one; False when it does not (a normal step follows)."""
        batch = scheduler.schedule_burst(self.decode_burst_steps)
        if batch is None:
            return False
        if batch.page_copies:
            self._copy_pages(batch.page_copies)
        tokens, logprobs = self.burst.run(batch, self.kv_cache)
        stats.bursts += 1
        stats.burst_steps += batch.burst_steps
        _count(batch, stats)
        scheduler.update_burst(batch, tokens, logprobs)
        return True

    def _forward_and_sample(self, inputs) -> tuple[list[int], list[float]]:
        hidden = self.model.forward_paged(inputs.input_ids, inputs.positions, inputs.meta, self.kv_cache)
        if inputs.sampling is None:
            return [], []
        logits_fn = self.model.logits if self.vocab_limit is None else self._limited(self.model.logits)
        logits = logits_fn(hidden.index_select(0, inputs.logit_rows))
        sampled, sampled_logprobs = sample_tokens(logits, inputs.sampling)
        return sampled.tolist(), sampled_logprobs.tolist()

    def _limited(self, logits_fn):
        limit = self.vocab_limit
        return lambda hidden: logits_fn(hidden)[:, :limit].contiguous()

    def _copy_pages(self, copies: list[tuple[int, int]]) -> None:
        sources = torch.tensor([source for source, _ in copies], device=self.device)
        destinations = torch.tensor([destination for _, destination in copies], device=self.device)
        for layer_cache in self.kv_cache:
            if not isinstance(layer_cache, torch.Tensor):  # a linear-attention layer's state: no pages
                continue
            if layer_cache.element_size() == 1:  # float8 caches: no float8 indexing kernels, copy the bytes
                layer_cache = layer_cache.view(torch.uint8)
            layer_cache[:, destinations] = layer_cache[:, sources]

    def _validate(self, requests: list[Request]) -> None:
        vocab_size = self.model.config.vocab_size
        seen_ids = set()
        for request in requests:
            if not isinstance(request, Request):
                raise TypeError(f"generate() takes Request objects, got {type(request).__name__}")
            request.validate(vocab_size)
            if request.request_id in seen_ids:
                raise ValueError(f"request id {request.request_id!r} appears twice; request ids must be unique")
            seen_ids.add(request.request_id)
            if request.n > self.max_num_seqs:
                raise ValueError(
                    f"request {request.request_id!r} asks for n={request.n} samples but max_num_seqs="
                    f"{self.max_num_seqs}: the n samples of a prompt run together (they share its KV pages); "
                    f"raise max_num_seqs to at least {request.n}"
                )
            # The last sampled token is never fed back, so the longest context cached is prompt + max_new - 1.
            longest_context = len(request.prompt_ids) + request.params.max_new_tokens - 1
            pages_needed = -(-longest_context // self.page_size)
            if pages_needed > self.num_pages:
                raise ValueError(
                    f"request {request.request_id!r}: prompt ({len(request.prompt_ids)} tokens) + max_new_tokens "
                    f"({request.params.max_new_tokens}) needs a KV cache of {longest_context} tokens for one "
                    f"sample, but the pool holds only kv_pool_tokens={self.kv_pool_tokens} "
                    f"({self.num_pages} pages of {self.page_size}); raise kv_pool_tokens to at least "
                    f"{pages_needed * self.page_size} or lower max_new_tokens / the prompt length"
                )


def _count(batch: ScheduledBatch, stats: EngineStats) -> None:
    stats.forwards += max(1, batch.burst_steps)
    for chunk in batch.chunks:
        if chunk.is_decode:
            stats.decode_tokens += chunk.num_tokens
        else:
            stats.prefill_tokens += chunk.num_tokens


def _response(sequence: Sequence) -> Response:
    request = sequence.request
    return Response(
        request_id=request.request_id,
        sample_index=sequence.sample_indices[0],
        prompt_ids=list(request.prompt_ids),
        token_ids=list(sequence.generated),
        logprobs=list(sequence.logprobs),
        finish_reason=sequence.finish_reason,
        counters=ResponseCounters(
            num_prompt_tokens=len(request.prompt_ids),
            num_generated_tokens=len(sequence.generated),
            num_preemptions=sequence.num_preemptions,
            num_recomputed_tokens=sequence.num_recomputed_tokens,
        ),
    )
