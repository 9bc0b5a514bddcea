"""Decode bursts: many decode steps on the device back to back, one host round trip per burst.

A per-step engine loop costs the host milliseconds per step (scheduling, staging inputs, attention planning, waiting
for the sampled tokens) while the GPU waits. In a burst (``Scheduler.schedule_burst``) every running sequence has
its pages for the next ``steps`` tokens reserved up front, so the device can advance on its own:

- the burst state (per row: token to feed, position, sampler counter, steps left, page table, sampler settings) is
  staged once and copied to the device;
- each step reads that state, computes the cache slot of the fed token from the page table, runs the model's paged
  forward with an attention backend that takes lengths and page tables from device tensors
  (``opdgraph.kernels.paged_decode_attention`` on CUDA; the plain-torch reference elsewhere), samples, records the
  tokens and log-probs at row ``step`` of the output, and advances the state (fed token <- sampled token);
- a row whose share of steps is used up stops advancing: it writes only the scratch page and its outputs are
  ignored (the same for padding rows up to a captured batch size);
- a model with linear-attention layers (Qwen3.5) also reads and writes each row's recurrent-state slot; a row
  that stopped advancing (and a padding row) uses the scratch slot instead, so its own state stays as its last
  real token left it;
- on CUDA with ``cuda_graphs`` one step is captured per (padded batch size, sampling mode) and replayed ``steps``
  times; the host then copies all tokens back with one synchronisation.

Tokens equal the per-step path's: the counter-based sampler keys on (seed, sample index, position), which the
burst advances exactly as the per-step path does; the host truncates each row at its first EOS / stop token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from opdgraph.kernels import burst_state
from opdgraph.models.attention_backend import using_backend
from opdgraph.models.attention_metadata import PagedMetadata
from opdgraph.rollout.cuda_graphs import batch_size_ladder
from opdgraph.rollout.sampler import SamplingRows, sample_tokens

# Rows of the int64 state tensor [fields, rows]; the float settings live in a float32 [fields, rows] tensor.
INT_FIELDS = ("input_ids", "positions", "sample_positions", "steps_left", "seeds", "sample_indices", "top_k",
              "greedy", "state_slots")
FLOAT_FIELDS = ("temperatures", "top_p", "min_p")
INT_ROW = {name: row for row, name in enumerate(INT_FIELDS)}
FLOAT_ROW = {name: row for row, name in enumerate(FLOAT_FIELDS)}


@dataclass
class BurstRecord:
    """One burst, for benchmarks: when the host had its tokens, how many steps and rows, the summed context length
    of the rows at the first step (it grows by ``rows`` per step), and the device time from the state copy to the
    last step (CUDA events; 0 elsewhere): wall time between bursts minus it is the host's share."""

    end_seconds: float
    steps: int
    rows: int
    context_tokens: int
    device_seconds: float = 0.0


class DecodeBurst:
    """Runs bursts of decode steps for one engine (see module docstring).

    ``attention``: backend whose ``paged`` reads kv_lens and page_table from device tensors without host syncs on
    CUDA. ``scratch_page``: a page beyond the scheduler's pages that idle rows write. ``logits_fn``: hidden [R, H]
    -> float32 logits [R, V]. ``ladder``: the batch sizes rows are padded to (and graphs captured for); default
    powers of two up to max_rows on CUDA, none (no padding) elsewhere. ``scratch_slot``: for a model with
    linear-attention layers, a recurrent-state slot beyond the scheduler's that idle rows write.
    ``fused_state``: the step's bookkeeping
    (slots, lengths, recording and advancing the state) as two Triton kernels (kernels/burst_state.py) instead of
    torch ops; same integers.
    """

    def __init__(self, model, *, attention, device, page_size: int, scratch_page: int, max_rows: int,
                 max_steps: int, logits_fn=None, cuda_graphs: bool = False, ladder: list[int] | None = None,
                 scratch_slot: int | None = None, fused_state: bool = False):
        self.model = model
        self.scratch_slot = scratch_slot
        self.attention = attention
        self.device = torch.device(device)
        self.page_size = page_size
        self.scratch_page = scratch_page
        self.max_steps = max_steps
        self.logits_fn = logits_fn or model.logits
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.fused_state = fused_state
        # CPU bursts run exactly the live rows (padding would only cost compute there).
        self.ladder = ladder or (batch_size_ladder(max_rows) if self.device.type == "cuda" else [])
        self.max_rows = max(self.ladder[-1] if self.ladder else 0, max_rows)
        pin = self.device.type == "cuda"
        self._host_ints = torch.zeros(len(INT_FIELDS), self.max_rows, dtype=torch.int64, pin_memory=pin)
        self._host_floats = torch.ones(len(FLOAT_FIELDS), self.max_rows, dtype=torch.float32, pin_memory=pin)
        self._host_tokens = torch.zeros(max_steps, self.max_rows, dtype=torch.int64, pin_memory=pin)
        self._host_logprobs = torch.zeros(max_steps, self.max_rows, dtype=torch.float32, pin_memory=pin)
        self._table_width = 0
        self._state: dict[str, torch.Tensor] | None = None
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._pool = None
        self._warmup_stream = None
        self.capture_seconds = 0.0
        self.num_captures = 0
        self.records: list[BurstRecord] | None = None  # benchmarks set a list to time bursts (off in runs)

    def release(self) -> None:
        """Drop graphs (they bake in the addresses of KV tensors that are going away)."""
        self._graphs = {}
        self._pool = None

    # ------------------------------------------------------------------------------------------------------ run
    def run(self, batch, kv_cache) -> tuple[list[list[int]], list[list[float]]]:
        """Run a burst batch; returns tokens[t][i] and log-probs[t][i] for t < batch.burst_steps, i in batch order."""
        count, steps = len(batch.chunks), batch.burst_steps
        # Eager bursts pad like graphed ones, so both run the same kernels on the same shapes (same numbers).
        size = next((s for s in self.ladder if s >= count), count)
        # One column more than the longest page list: a row whose share ran out keeps its position at the end of
        # its pages, and its (ignored) attention then reads that padded column, the scratch page.
        width = max(len(chunk.sequence.pages) for chunk in batch.chunks) + 1
        self._ensure_state(width)
        key = self._stage(batch, size)
        events = None
        if self.records is not None and self.device.type == "cuda":
            events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        with using_backend(self.model, self.attention), torch.inference_mode():
            if self.cuda_graphs and size in self.ladder:
                if (size, key) not in self._graphs:
                    self._capture(size, key, kv_cache)
                graph = self._graphs[(size, key)]
                _record(events, 0)
                self._copy_state_to_device()
                for _ in range(steps):
                    graph.replay()
            else:
                _record(events, 0)
                self._copy_state_to_device()
                for _ in range(steps):
                    self._step(size, key, kv_cache)
            _record(events, 1)
        result = self._results(steps, count)
        if self.records is not None:
            context = sum(chunk.start + 1 for chunk in batch.chunks)
            device_seconds = events[0].elapsed_time(events[1]) / 1000 if events else 0.0
            self.records.append(BurstRecord(time.perf_counter(), steps, count, context, device_seconds))
        return result

    def _results(self, steps: int, count: int):
        # Contiguous on both sides: one plain asynchronous copy each into the pinned buffers.
        tokens = self._host_tokens.view(-1)[: steps * count].view(steps, count)
        logprobs = self._host_logprobs.view(-1)[: steps * count].view(steps, count)
        tokens.copy_(self._state["out_tokens"][:steps, :count].contiguous(), non_blocking=True)
        logprobs.copy_(self._state["out_logprobs"][:steps, :count].contiguous(), non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the one host sync of the burst
        return tokens.tolist(), logprobs.tolist()

    # ------------------------------------------------------------------------------------------------ staging
    def _ensure_state(self, width: int) -> None:
        """Device state buffers; the page-table width grows in powers of two (growing drops the graphs)."""
        if self._state is not None and width <= self._table_width:
            return
        self._table_width = max(16, 1 << (width - 1).bit_length())
        rows, device = self.max_rows, self.device
        self._host_table = torch.full((rows, self._table_width), self.scratch_page, dtype=torch.int32,
                                      pin_memory=device.type == "cuda")
        self._state = {
            "ints": torch.zeros(len(INT_FIELDS), rows, dtype=torch.int64, device=device),
            "floats": torch.ones(len(FLOAT_FIELDS), rows, dtype=torch.float32, device=device),
            "page_table": torch.full((rows, self._table_width), self.scratch_page, dtype=torch.int32, device=device),
            "step": torch.zeros(1, dtype=torch.int64, device=device),
            "out_tokens": torch.zeros(self.max_steps, rows, dtype=torch.int64, device=device),
            "out_logprobs": torch.zeros(self.max_steps, rows, dtype=torch.float32, device=device),
            "query_lens": torch.ones(rows, dtype=torch.int32, device=device),
            "cu_query_lens": torch.arange(rows + 1, dtype=torch.int32, device=device),
            "logit_rows": torch.arange(rows, dtype=torch.int64, device=device),
        }
        self.release()

    def _stage(self, batch, size: int) -> tuple[bool, ...]:
        """Fill the host buffers for the batch padded to ``size`` rows; returns the sampling-mode key."""
        ints, floats, table = self._host_ints.numpy(), self._host_floats.numpy(), self._host_table.numpy()
        count = len(batch.chunks)
        sequences = [chunk.sequence for chunk in batch.chunks]
        params = [sequence.request.params for sequence in sequences]
        ints[:, :size] = 0
        ints[INT_ROW["input_ids"], :count] = [sequence.generated[-1] for sequence in sequences]
        ints[INT_ROW["positions"], :count] = [chunk.start for chunk in batch.chunks]
        ints[INT_ROW["sample_positions"], :count] = [len(sequence.generated) for sequence in sequences]
        ints[INT_ROW["steps_left"], :count] = [chunk.num_tokens for chunk in batch.chunks]
        ints[INT_ROW["seeds"], :count] = [sequence.request.seed for sequence in sequences]
        ints[INT_ROW["sample_indices"], :count] = [sequence.sample_indices[0] for sequence in sequences]
        ints[INT_ROW["top_k"], :count] = [p.top_k for p in params]
        ints[INT_ROW["greedy"], :count] = [p.greedy for p in params]
        ints[INT_ROW["greedy"], count:size] = 1  # padding rows: greedy, no filters, scratch page
        if self.scratch_slot is not None:  # padding rows are never active: they take the scratch slot in _step
            ints[INT_ROW["state_slots"], :count] = [sequence.state_slot for sequence in sequences]
        floats[:, :size] = 1.0
        floats[FLOAT_ROW["temperatures"], :count] = [1.0 if p.greedy else float(p.temperature) for p in params]
        floats[FLOAT_ROW["top_p"], :count] = [float(p.top_p) for p in params]
        floats[FLOAT_ROW["min_p"], :size] = 0.0
        floats[FLOAT_ROW["min_p"], :count] = [float(p.min_p) for p in params]
        table[:size] = self.scratch_page
        for row, sequence in enumerate(sequences):
            table[row, : len(sequence.pages)] = sequence.pages
        sampled = [p for p in params if not p.greedy]
        return (all(p.greedy for p in params), any(p.greedy for p in params) or size > count,
                any(p.top_k > 0 for p in sampled), any(p.top_p < 1.0 for p in sampled),
                any(p.min_p > 0.0 for p in sampled))

    def _copy_state_to_device(self) -> None:
        # Whole buffers (a few hundred KiB at most): contiguous pinned -> device copies, no staging temporaries.
        # Rows past the staged size hold stale values that no graph of this size reads.
        state = self._state
        state["ints"].copy_(self._host_ints, non_blocking=True)
        state["floats"].copy_(self._host_floats, non_blocking=True)
        state["page_table"].copy_(self._host_table, non_blocking=True)
        state["step"].zero_()

    # ------------------------------------------------------------------------------------------------ one step
    def _step(self, size: int, key: tuple[bool, ...], kv_cache) -> None:
        """One decode step of every row, entirely on the device (captured into the graphs)."""
        state, page_size = self._state, self.page_size
        ints = {name: state["ints"][row, :size] for name, row in INT_ROW.items()}
        floats = {name: state["floats"][row, :size] for name, row in FLOAT_ROW.items()}
        page_table = state["page_table"][:size]
        positions = ints["positions"]
        if self.fused_state:
            slots, kv_lens = burst_state.decode_slots(positions, ints["steps_left"], page_table, page_size,
                                                      self.scratch_page * page_size)
        else:
            active = ints["steps_left"] > 0
            page_of_token = page_table.gather(1, torch.div(positions, page_size, rounding_mode="floor")[:, None])
            slots = page_of_token.squeeze(1).to(torch.int64) * page_size + positions % page_size
            slots = torch.where(active, slots, self.scratch_page * page_size)
            kv_lens = (positions + 1).to(torch.int32)
        state_slots = None
        if self.scratch_slot is not None:  # idle rows write the scratch recurrent-state slot
            state_slots = torch.where(ints["steps_left"] > 0, ints["state_slots"], self.scratch_slot)
        meta = PagedMetadata(query_lens=state["query_lens"][:size], cu_query_lens=state["cu_query_lens"][:size + 1],
                             kv_lens=kv_lens, page_table=page_table, slot_mapping=slots, page_size=page_size,
                             state_slots=state_slots)
        all_greedy, any_greedy, any_top_k, any_top_p, any_min_p = key
        rows = SamplingRows(
            logit_rows=state["logit_rows"][:size], seeds=ints["seeds"], sample_indices=ints["sample_indices"],
            positions=ints["sample_positions"], temperatures=floats["temperatures"], top_k=ints["top_k"],
            top_p=floats["top_p"], min_p=floats["min_p"], greedy=ints["greedy"] != 0, any_greedy=any_greedy,
            all_greedy=all_greedy, any_top_k=any_top_k, any_top_p=any_top_p, any_min_p=any_min_p)
        hidden = self.model.forward_paged(ints["input_ids"], positions, meta, kv_cache)
        tokens, logprobs = sample_tokens(self.logits_fn(hidden), rows)
        step = state["step"]
        if self.fused_state:
            burst_state.advance(tokens, logprobs, state["out_tokens"][:, :size], state["out_logprobs"][:, :size],
                                step, ints["input_ids"], positions, ints["sample_positions"], ints["steps_left"])
            return
        # The torch path (CPU, and the reference of the kernels): `active` is the mask computed for the slots above.
        state["out_tokens"][:, :size].index_copy_(0, step, tokens[None])
        state["out_logprobs"][:, :size].index_copy_(0, step, logprobs[None])
        ints["input_ids"].copy_(torch.where(active, tokens, ints["input_ids"]))
        advance = active.to(torch.int64)
        positions.add_(advance)
        ints["sample_positions"].add_(advance)
        ints["steps_left"].sub_(advance)
        step.add_(1)

    def _capture(self, size: int, key: tuple[bool, ...], kv_cache) -> None:
        """Capture one step for this size and sampling mode on idle state (every row writes the scratch page)."""
        started = time.perf_counter()
        self._state["ints"].zero_()
        self._state["page_table"].fill_(self.scratch_page)
        self._state["step"].zero_()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # Warm up outside the graph first (Triton compiles, cuBLAS handles, lazily allocated buffers).
        # One warmup stream per object: every new stream would get its own 32 MiB cuBLAS workspace, kept for good.
        if self._warmup_stream is None:
            self._warmup_stream = torch.cuda.Stream(self.device)
        side_stream = self._warmup_stream
        side_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side_stream):
            self._step(size, key, kv_cache)
        torch.cuda.current_stream(self.device).wait_stream(side_stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._step(size, key, kv_cache)
        self._graphs[(size, key)] = graph
        torch.cuda.synchronize(self.device)
        self.num_captures += 1
        self.capture_seconds += time.perf_counter() - started


def _record(events, index: int) -> None:
    if events is not None:
        events[index].record()
