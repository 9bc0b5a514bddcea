"""Host staging of a CUDA-graph decode step: the graph's inputs and flashinfer's plan arrays, built with numpy.

A graph decode step needs, per sequence row: the token fed, its position, its cache slot, the sampler counters and
settings; and for flashinfer the page list of every row. ``build_model_inputs`` + ``plan_arrays`` build these as
python lists and many small tensors every step, which at 128-256 sequences costs milliseconds of host time while
the GPU waits. Here instead:

- all integer inputs sit in ONE [fields, rows] int64 host buffer and all float settings in one float32 buffer
  (pinned on CUDA), each copied to the device with a single transfer per step;
- what never changes for a sequence (seed, sample index, settings) is staged only when the batch's sequence list
  changes (sequences finished, joined or were reordered);
- each sequence's page table is cached as an int32 array keyed by its ``pages_version`` (bumped by the scheduler on
  every page change), so a step re-converts only the tables that grew or were copied-on-write, and the flat
  ``kv_indices`` is one ``np.concatenate``.

Padding rows (up to the captured graph size) feed token 0 at position 0, write and read only the scratch page (and,
for a model with linear-attention layers, the scratch state slot), and are greedy (their tokens are dropped). The
result equals what ``build_model_inputs`` + ``plan_arrays`` produce for the same batch
(tests/test_rollout_decode_staging.py checks this step by step through forks and preemptions).
"""

from __future__ import annotations

import numpy as np
import torch

from opdgraph.kernels.flashinfer_attention import PlanArrays

INT_FIELDS = ("input_ids", "positions", "slot_mapping", "seeds", "sample_indices", "sample_positions", "top_k",
              "greedy", "state_slots")
FLOAT_FIELDS = ("temperatures", "top_p", "min_p")
INT_ROW = {name: row for row, name in enumerate(INT_FIELDS)}
FLOAT_ROW = {name: row for row, name in enumerate(FLOAT_FIELDS)}


class DecodeStaging:
    """Reusable host buffers for decode steps of up to ``max_batch_size`` rows (see module docstring)."""

    def __init__(self, max_batch_size: int, page_size: int, scratch_page: int, *, pin: bool,
                 scratch_slot: int = -1):
        self.page_size = page_size
        self.scratch_page = scratch_page
        self.scratch_slot = scratch_slot  # recurrent-state slot of padding rows (models with linear attention)
        self.pin = pin
        self.ints = torch.zeros(len(INT_FIELDS), max_batch_size, dtype=torch.int64, pin_memory=pin)
        self.floats = torch.ones(len(FLOAT_FIELDS), max_batch_size, dtype=torch.float32, pin_memory=pin)
        self.qo_indptr = torch.arange(max_batch_size + 1, dtype=torch.int32).pin_memory() if pin else \
            torch.arange(max_batch_size + 1, dtype=torch.int32)
        self.kv_indptr = torch.zeros(max_batch_size + 1, dtype=torch.int32, pin_memory=pin)
        self.kv_last_page_len = torch.zeros(max_batch_size, dtype=torch.int32, pin_memory=pin)
        self.kv_indices = torch.zeros(0, dtype=torch.int32)
        self._page_arrays: dict = {}  # Sequence -> (pages_version, int32 pages)
        self._constants_for: list | None = None
        self._padded = 0
        self.sampling_key: tuple[bool, ...] = ()  # (all_greedy, any_greedy, any_top_k, any_top_p, any_min_p)

    def stage(self, batch, padded: int) -> PlanArrays:
        """Fill the buffers for an all-decode batch padded to ``padded`` rows; returns flashinfer's plan arrays."""
        sequences = [chunk.sequence for chunk in batch.chunks]
        count = len(sequences)
        if sequences != self._constants_for or padded != self._padded:
            self._stage_constants(sequences, padded)
        page_size = self.page_size
        ints = self.ints.numpy()
        starts = np.fromiter((chunk.start for chunk in batch.chunks), dtype=np.int64, count=count)
        ints[INT_ROW["input_ids"], :count] = [sequence.generated[-1] for sequence in sequences]
        ints[INT_ROW["positions"], :count] = starts
        ints[INT_ROW["slot_mapping"], :count] = [sequence.pages[start // page_size] for sequence, start in
                                                 zip(sequences, starts.tolist())]
        ints[INT_ROW["slot_mapping"], :count] = ints[INT_ROW["slot_mapping"], :count] * page_size + starts % page_size
        ints[INT_ROW["sample_positions"], :count] = [len(sequence.generated) for sequence in sequences]
        # Staged every step: a sequence preempted and prefilled again may hold another slot than before.
        ints[INT_ROW["state_slots"], :count] = [sequence.state_slot for sequence in sequences]
        ints[INT_ROW["state_slots"], count:padded] = self.scratch_slot

        kv_lens = starts + 1
        num_pages = (kv_lens + page_size - 1) // page_size
        indptr = self.kv_indptr.numpy()
        indptr[0] = 0
        np.cumsum(num_pages, out=indptr[1 : count + 1])
        indptr[count + 1 : padded + 1] = indptr[count] + np.arange(1, padded - count + 1)
        last = self.kv_last_page_len.numpy()
        last[:count] = kv_lens - (num_pages - 1) * page_size
        last[count:padded] = 1
        tables = self._page_tables(sequences, num_pages.tolist())
        total = int(indptr[padded])
        if self.kv_indices.numel() < total:
            self.kv_indices = torch.zeros(max(total, 2 * self.kv_indices.numel()), dtype=torch.int32,
                                          pin_memory=self.pin)
        flat = self.kv_indices.numpy()
        if tables:
            np.concatenate(tables, out=flat[: indptr[count]])
        flat[indptr[count] : total] = self.scratch_page
        return PlanArrays(qo_indptr=self.qo_indptr[: padded + 1], kv_indptr=self.kv_indptr[: padded + 1],
                          kv_indices=self.kv_indices[:total], kv_last_page_len=self.kv_last_page_len[:padded],
                          max_query_len=1)

    def _page_tables(self, sequences, num_pages: list[int]) -> list[np.ndarray]:
        cache, fresh = self._page_arrays, {}
        tables = []
        for sequence, pages_used in zip(sequences, num_pages):
            entry = cache.get(sequence)
            if entry is None or entry[0] != sequence.pages_version:
                entry = (sequence.pages_version, np.asarray(sequence.pages, dtype=np.int32))
            fresh[sequence] = entry
            tables.append(entry[1][:pages_used])
        self._page_arrays = fresh  # drop finished sequences
        return tables

    def _stage_constants(self, sequences, padded: int) -> None:
        """Per-sequence sampler counters and settings (they never change for a sequence object)."""
        count = len(sequences)
        ints, floats = self.ints.numpy(), self.floats.numpy()
        params = [sequence.request.params for sequence in sequences]
        greedy = [p.greedy for p in params]
        ints[INT_ROW["seeds"], :count] = [sequence.request.seed for sequence in sequences]
        ints[INT_ROW["sample_indices"], :count] = [sequence.sample_indices[0] for sequence in sequences]
        ints[INT_ROW["top_k"], :count] = [p.top_k for p in params]
        ints[INT_ROW["greedy"], :count] = greedy
        floats[FLOAT_ROW["temperatures"], :count] = [1.0 if p.greedy else float(p.temperature) for p in params]
        floats[FLOAT_ROW["top_p"], :count] = [float(p.top_p) for p in params]
        floats[FLOAT_ROW["min_p"], :count] = [float(p.min_p) for p in params]
        # Padding rows: greedy, no filters, on the scratch page (positions and slots are set every step).
        for name, value in (("input_ids", 0), ("positions", 0), ("seeds", 0), ("sample_indices", 0),
                            ("sample_positions", 0), ("top_k", 0), ("greedy", 1),
                            ("slot_mapping", self.scratch_page * self.page_size)):
            ints[INT_ROW[name], count:padded] = value
        floats[:, count:padded] = 1.0
        floats[FLOAT_ROW["min_p"], count:padded] = 0.0
        sampled = [not g for g in greedy]
        self.sampling_key = (
            all(greedy), any(greedy),
            any(p.top_k > 0 for p, s in zip(params, sampled) if s),
            any(p.top_p < 1.0 for p, s in zip(params, sampled) if s),
            any(p.min_p > 0.0 for p, s in zip(params, sampled) if s),
        )
        self._constants_for = sequences
        self._padded = padded
