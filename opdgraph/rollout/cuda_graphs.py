"""The rollout engine's GPU path: flashinfer attention, CUDA-graph decode, one host sync per step.

``FlashInferRollout`` replaces the "forward + logits + sample" part of an engine step (the scheduler, the batch
builder and the sampler are shared with the plain-torch path):

- every step plans flashinfer from the scheduled batch's python lists (no device-to-host copy), runs the model's
  paged forward with the flashinfer backend, computes float32 logits of the sampling rows and samples on the device;
- a decode step (every sequence feeds one token) of at most ``max_graph_batch_size`` sequences instead replays a CUDA
  graph captured for the next size of a ladder (1, 2, 4, ... up to max_num_seqs) (``replay_decode``, called by the
  engine before it builds any tensors). Its inputs are staged with numpy into two pinned buffers
  (``decode_staging``) and reach the graph's static buffers in two transfers. Padded rows write their K/V into a
  scratch page beyond the scheduler's pages and read only that page; their sampled tokens are dropped;
- sampled tokens and log-probs go to pinned host buffers with non-blocking copies and the host waits ONCE per step
  (the scheduler needs the tokens to decide what comes next: EOS, stop tokens, lengths);
- ``stats.host_seconds`` accumulates the host time of each phase (stage, copy_inputs, plan, replay_launch, sync)
  for the benchmark's profile.

Graph lifetime: graphs bake in the addresses of the KV tensors. The engine drops the KV tensors at ``release()`` so
training gets the memory back; the graphs (and their memory pool) are dropped with them and re-captured lazily on
the first decode step of the next rollout (``stats.capture_seconds`` reports the cost). A graph is captured per
ladder size and per sampling mode (greedy only, or which filters are on), since the sampler skips whole phases
based on host-side flags.

Models with linear-attention layers (Qwen3.5) keep one recurrent-state slot per running sequence in those layers
(models/linear_state.py) plus a scratch slot (slot max_num_seqs) that padding rows use, as they use the scratch
page; the linear layers' decode step (linear_attention_backend.decode_rows) needs no host synchronisation, so the
same graphs cover them.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from opdgraph.models.attention_backend import using_backend
from opdgraph.models.attention_metadata import PagedMetadata
from opdgraph.rollout.decode_staging import FLOAT_FIELDS, FLOAT_ROW, INT_FIELDS, INT_ROW, DecodeStaging
from opdgraph.rollout.sampler import SamplingRows, sample_tokens

MAX_GRAPH_BATCH_SIZE = 256


def batch_size_ladder(max_num_seqs: int, max_graph_batch_size: int = MAX_GRAPH_BATCH_SIZE) -> list[int]:
    """Captured decode batch sizes: powers of two below the cap, then the cap min(max_num_seqs, max_graph)."""
    cap = min(max_num_seqs, max_graph_batch_size)
    ladder = []
    size = 1
    while size < cap:
        ladder.append(size)
        size *= 2
    return ladder + [cap]


def padded_batch_size(num_seqs: int, ladder: list[int]) -> int | None:
    """The smallest captured size that holds num_seqs sequences; None when the batch is larger than all of them."""
    return next((size for size in ladder if size >= num_seqs), None)


def batch_lists(batch, pad_to: int | None = None, scratch_page: int | None = None):
    """(query_lens, kv_lens, page_tables) of a scheduled batch, padded with one-token rows on the scratch page."""
    query_lens = [chunk.num_tokens for chunk in batch.chunks]
    kv_lens = [chunk.start + chunk.num_tokens for chunk in batch.chunks]
    page_tables = [chunk.sequence.pages for chunk in batch.chunks]
    num_padding = 0 if pad_to is None else pad_to - len(query_lens)
    return (query_lens + [1] * num_padding, kv_lens + [1] * num_padding,
            page_tables + [[scratch_page]] * num_padding)


@dataclass
class StepRecord:
    kind: str  # "graph" (replayed decode), "decode" (eager decode) or "mixed" (prefill chunks present)
    num_seqs: int
    context_tokens: int  # sum over sequences of the cached context after the step
    end_seconds: float  # perf_counter after the host received the step's tokens


@dataclass
class GpuPathStats:
    graph_steps: int = 0
    eager_steps: int = 0
    num_captures: int = 0
    capture_seconds: float = 0.0
    # Per-step timing records, for benchmarks only (a run would keep one per decode step forever): None = off.
    steps: list[StepRecord] | None = None
    # Host seconds per phase of the GPU path (stage, copy_inputs, plan, replay_launch, sync; gpu_step_total).
    host_seconds: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))


@dataclass
class _CapturedDecode:
    graph: torch.cuda.CUDAGraph
    meta: PagedMetadata
    tokens: torch.Tensor
    logprobs: torch.Tensor


class FlashInferRollout:
    """Forward + sampling of engine steps on CUDA (see module docstring). ``extra_pages``: the scratch page."""

    extra_pages = 1

    def __init__(self, model, *, device, page_size: int, num_pages: int, max_num_seqs: int,
                 kv_dtype: torch.dtype | None, cuda_graphs: bool, max_graph_batch_size: int = MAX_GRAPH_BATCH_SIZE,
                 use_tensor_cores: bool | None = None):
        from opdgraph.kernels.flashinfer_attention import FlashInferBackend

        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"attention='flashinfer' runs on CUDA devices only, got device={device!r}")
        self.model = model
        self.page_size = page_size
        self.scratch_page = num_pages  # the extra page allocate_kv_cache adds after the scheduler's pages
        self.recurrent = bool(getattr(model, "recurrent", False))
        self.max_num_seqs = max_num_seqs
        self.scratch_slot = max_num_seqs  # the extra state slot allocate_kv_cache adds (models with linear attention)
        self.kv_dtype = kv_dtype or model.dtype
        self.backend = FlashInferBackend(model.config, device=self.device, kv_dtype=self.kv_dtype,
                                         q_dtype=model.dtype, use_tensor_cores=use_tensor_cores)
        self.ladder = batch_size_ladder(max_num_seqs, max_graph_batch_size) if cuda_graphs else []
        self.stats = GpuPathStats()
        self.logits_fn = float32_logits_fn(model, self.device)
        # RoPE inverse frequencies are computed on the CPU (exact bits) and copied to the device at every forward;
        # a host-to-device copy cannot be captured in a graph, so keep the (identical) device copies on the model.
        model._inv_freq = {kind: inv_freq.to(self.device) for kind, inv_freq in model._inv_freq.items()}
        self._host_tokens = torch.empty(max_num_seqs, dtype=torch.int64, pin_memory=True)
        self._host_logprobs = torch.empty(max_num_seqs, dtype=torch.float32, pin_memory=True)
        self._static: dict[str, torch.Tensor] | None = None
        self._staging = DecodeStaging(self.ladder[-1], page_size, self.scratch_page, pin=True,
                                      scratch_slot=self.scratch_slot) if cuda_graphs else None
        self._graphs: dict[tuple, _CapturedDecode] = {}
        self._pool = None
        self._warmup_stream = None

    # ----------------------------------------------------------------------------------------- engine protocol
    def allocate_kv_cache(self, num_pages, page_size, dtype=None, device=None) -> list[torch.Tensor]:
        """The model's KV tensors plus the scratch page (and state slots plus the scratch slot for a model with
        linear-attention layers); graphs captured on earlier tensors are dropped."""
        self.release()
        slots = {"num_state_slots": self.max_num_seqs + 1} if self.recurrent else {}
        return self.model.allocate_kv_cache(num_pages + self.extra_pages, page_size, dtype=self.kv_dtype,
                                            device=self.device, **slots)

    def release(self) -> None:
        """Drop the graphs and their memory pool (they point at KV tensors that are going away)."""
        self._graphs = {}
        self._pool = None

    def replay_decode(self, batch, kv_cache) -> tuple[list[int], list[float]] | None:
        """Run an all-decode step by replaying a captured graph; None when the step is not one (the engine then
        builds the inputs and calls ``forward_and_sample``). Inputs are staged with numpy (``decode_staging``)."""
        if not self.ladder or not all(chunk.is_decode for chunk in batch.chunks):
            return None
        padded = padded_batch_size(len(batch.chunks), self.ladder)
        if padded is None:
            return None
        started = time.perf_counter()
        with using_backend(self.model, self.backend):  # the model keeps its own outside
            tokens, logprobs = self._replay(batch, kv_cache, padded)
        result = self._to_host(tokens, logprobs)
        self.stats.graph_steps += 1
        self._record(batch, "graph", started)
        return result

    def forward_and_sample(self, batch, inputs, kv_cache) -> tuple[list[int], list[float]]:
        """Run one scheduled step eagerly; returns the sampled tokens and raw log-probs as python lists (one sync)."""
        started = time.perf_counter()
        with using_backend(self.model, self.backend):  # the model keeps its own outside
            tokens, logprobs = self._eager(batch, inputs, kv_cache)
        result = self._to_host(tokens, logprobs)
        self.stats.eager_steps += 1
        all_decode = all(chunk.is_decode for chunk in batch.chunks)
        self._record(batch, "decode" if all_decode else "mixed", started)
        return result

    def _record(self, batch, kind: str, started: float) -> None:
        ended = time.perf_counter()
        self.stats.host_seconds["gpu_step_total"] += ended - started
        if self.stats.steps is None:
            return
        context = sum(chunk.start + chunk.num_tokens for chunk in batch.chunks)
        self.stats.steps.append(StepRecord(kind, len(batch.chunks), context, ended))

    # ------------------------------------------------------------------------------------------------- pieces
    def _eager(self, batch, inputs, kv_cache):
        from opdgraph.kernels.flashinfer_attention import plan_arrays

        self.backend.plan(inputs.meta, plan_arrays(*batch_lists(batch), self.page_size, pin=True))
        hidden = self.model.forward_paged(inputs.input_ids, inputs.positions, inputs.meta, kv_cache)
        if inputs.sampling is None:
            return None, None
        return sample_tokens(self.logits_fn(hidden.index_select(0, inputs.logit_rows)), inputs.sampling)

    def _to_host(self, tokens, logprobs) -> tuple[list[int], list[float]]:
        if tokens is None:
            return [], []
        count = tokens.shape[0]
        host_tokens, host_logprobs = self._host_tokens[:count], self._host_logprobs[:count]
        host_tokens.copy_(tokens, non_blocking=True)
        host_logprobs.copy_(logprobs, non_blocking=True)
        started = time.perf_counter()
        torch.cuda.current_stream(self.device).synchronize()  # the one host sync of the step
        result = host_tokens.tolist(), host_logprobs.tolist()
        self.stats.host_seconds["sync"] += time.perf_counter() - started
        return result

    def _replay(self, batch, kv_cache, padded: int):
        clock, host = time.perf_counter, self.stats.host_seconds
        started = clock()
        arrays = self._staging.stage(batch, padded)
        staged = clock()
        if not self.backend.ensure_graph_capacity(arrays.kv_indices.numel()):
            self.release()  # the graphs read page ids from the index buffer that was just replaced
        key = self._staging.sampling_key
        if (padded, key) not in self._graphs:
            self._capture_ladder(key, kv_cache)
        captured = self._graphs[(padded, key)]
        # Two transfers carry every per-row input of the step (pinned host -> device, asynchronous).
        self._static["ints"].copy_(self._staging.ints, non_blocking=True)
        self._static["floats"].copy_(self._staging.floats, non_blocking=True)
        copied = clock()
        self.backend.plan(captured.meta, arrays, graph_batch_size=padded)
        planned = clock()
        captured.graph.replay()
        host["stage"] += staged - started
        host["copy_inputs"] += copied - staged
        host["plan"] += planned - copied
        host["replay_launch"] += clock() - planned
        return captured.tokens[: len(batch.chunks)], captured.logprobs[: len(batch.chunks)]

    def _static_buffers(self) -> dict[str, torch.Tensor]:
        size, device = self.ladder[-1], self.device
        return {
            # Same layout as the host staging buffers: one row per field (decode_staging.INT_FIELDS, FLOAT_FIELDS).
            "ints": torch.zeros(len(INT_FIELDS), size, dtype=torch.int64, device=device),
            "floats": torch.ones(len(FLOAT_FIELDS), size, dtype=torch.float32, device=device),
            "query_lens": torch.ones(size, dtype=torch.int32, device=device),
            "cu_query_lens": torch.arange(size + 1, dtype=torch.int32, device=device),
            # flashinfer takes page tables and lengths from the plan; the metadata's copies are placeholders.
            "kv_lens": torch.ones(size, dtype=torch.int32, device=device),
            "page_table": torch.full((size, 1), self.scratch_page, dtype=torch.int32, device=device),
            "logit_rows": torch.arange(size, dtype=torch.int64, device=device),
        }

    def _capture_ladder(self, key: tuple[bool, ...], kv_cache) -> None:
        """Capture every ladder size for this sampling mode, largest first (smaller graphs reuse its pool)."""
        from opdgraph.kernels.flashinfer_attention import plan_arrays

        started = time.perf_counter()
        if self._static is None:
            self._static = self._static_buffers()
        if not self.backend.ensure_graph_capacity(self.ladder[-1]):
            self.release()  # graphs of other sampling modes read the index buffer that was just replaced
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.ladder):
            self._graphs[(size, key)] = self._capture(size, key, kv_cache, plan_arrays)
        torch.cuda.synchronize(self.device)
        self.stats.num_captures += len(self.ladder)
        self.stats.capture_seconds += time.perf_counter() - started

    def _capture(self, size: int, key: tuple[bool, ...], kv_cache, plan_arrays) -> _CapturedDecode:
        static = self._static
        ints = {name: static["ints"][row, :size] for name, row in INT_ROW.items()}
        floats = {name: static["floats"][row, :size] for name, row in FLOAT_ROW.items()}
        meta = PagedMetadata(query_lens=static["query_lens"][:size], cu_query_lens=static["cu_query_lens"][:size + 1],
                             kv_lens=static["kv_lens"][:size], page_table=static["page_table"][:size],
                             slot_mapping=ints["slot_mapping"], page_size=self.page_size,
                             state_slots=ints["state_slots"] if self.recurrent else None)
        all_greedy, any_greedy, any_top_k, any_top_p, any_min_p = key

        def decode_step():
            rows = SamplingRows(
                logit_rows=static["logit_rows"][:size], seeds=ints["seeds"], sample_indices=ints["sample_indices"],
                positions=ints["sample_positions"], temperatures=floats["temperatures"], top_k=ints["top_k"],
                top_p=floats["top_p"], min_p=floats["min_p"], greedy=ints["greedy"] != 0,  # captured conversion
                any_greedy=any_greedy, all_greedy=all_greedy, any_top_k=any_top_k, any_top_p=any_top_p,
                any_min_p=any_min_p)
            if self.recurrent:  # linear layers read kv_lens (> 1: the row continues its state); flashinfer does not
                meta.kv_lens.copy_(ints["positions"] + 1)
            hidden = self.model.forward_paged(ints["input_ids"], ints["positions"], meta, kv_cache)
            return sample_tokens(self.logits_fn(hidden), rows)

        # Capture on harmless inputs: every row writes and reads only the scratch page (and the scratch state slot).
        ints["slot_mapping"].fill_(self.scratch_page * self.page_size)
        ints["state_slots"].fill_(self.scratch_slot)
        self.backend.plan(meta, plan_arrays([1] * size, [1] * size, [[self.scratch_page]] * size, self.page_size,
                                            pin=True), graph_batch_size=size)
        # Warm up outside the graph first (lazy allocations, cuBLAS handles, flashinfer's cached buffers).
        # One warmup stream per object: every new stream would get its own 32 MiB cuBLAS workspace, kept for good.
        if self._warmup_stream is None:
            self._warmup_stream = torch.cuda.Stream(self.device)
        side_stream = self._warmup_stream
        side_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side_stream):
            decode_step()
        torch.cuda.current_stream(self.device).wait_stream(side_stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            tokens, logprobs = decode_step()
        return _CapturedDecode(graph, meta, tokens, logprobs)


def float32_logits_fn(model, device):
    """hidden [R, H] -> float32 logits [R, V] without materialising a float32 copy of the output embedding.

    A bf16 x bf16 -> fp32 matmul (``torch.mm(..., out_dtype=float32)``) forms exact products of the same bf16
    values and accumulates in fp32, like ``model.logits`` (which casts both to fp32 first) up to summation order.
    Falls back to ``model.logits`` where this torch build lacks it. The check runs at the first call, not here:
    an engine may be built while the model is still sharded (FSDP), and generate() sees the gathered weights.
    """
    choice = {}

    def logits(hidden):
        weight = model.lm_head_weight
        if "mixed" not in choice:
            choice["mixed"] = weight.dtype != torch.float32 and _has_mixed_mm(weight, device)
        if not choice["mixed"]:
            return model.logits(hidden)
        return torch.mm(hidden, weight.T, out_dtype=torch.float32)

    return logits


@torch.no_grad()
def _has_mixed_mm(weight, device) -> bool:
    """Whether torch.mm takes out_dtype=float32 for this weight's dtype here (eager, outside any graph capture)."""
    try:
        probe = torch.zeros(1, weight.shape[1], dtype=weight.dtype, device=device)
        torch.mm(probe, weight[:8].T, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True
