"""flashinfer paged attention for rollout: the model's attention backend on CUDA (prefill, decode, CUDA graphs).

``FlashInferBackend`` implements the two entry points of ``opdgraph.models.attention_backend``:

- ``paged``: writes the new tokens' K/V into the layer's cache at ``meta.slot_mapping`` (torch ``index_copy_`` on the
  flattened cache, so it also works inside a CUDA graph; skipped with ``kv_written=True``, when the fused RoPE kernel
  already stored them), then runs a flashinfer wrapper over each sequence's pages.
  A forward where every sequence feeds exactly one token uses the decode wrapper; any other forward (prefill chunks,
  mixed prefill + decode) uses the prefill wrapper with a causal mask aligned to the end of each context.
- ``packed`` (training, teacher scoring) delegates to the plain-torch reference: not the rollout's concern.

flashinfer splits work into a host-side ``plan()`` (page bookkeeping, split-kv schedule; syncs nothing if its index
arrays are on the host) and a device-side ``run()``. Every layer of one forward receives the same metadata object, so
the plan is made once per forward: either explicitly by the caller (``plan(meta, arrays)``, with host arrays built
from python lists, no device sync) or lazily on the first layer call (``plan_arrays_from_metadata``: one small
device-to-host copy). Layers with different attention windows (Gemma 3 sliding / global) need one wrapper each,
because flashinfer fixes ``window_left`` at plan time.

KV layout: the engine's per-layer tensor [2, num_pages, page_size, kv_heads, head_dim] is flashinfer's "NHD" layout
with K and V stacked on dim 0; it is passed as the tuple (kv[0], kv[1]). bf16/fp16 queries; the cache may be the
query dtype or float8_e4m3fn (scale 1: values are stored as-is, rounded to e4m3).

Kernels JIT-compile with nvcc on first use; backend "fa2" is used everywhere (FA3 takes minutes to build and does
not mix bf16 queries with an fp8 cache). flashinfer is imported lazily, inside the functions that need it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opdgraph.models.attention_backend import TorchReferenceBackend, to_cache_dtype
from opdgraph.models.attention_metadata import PagedMetadata
from opdgraph.models.config import SLIDING_ATTENTION, DecoderConfig

WORKSPACE_BYTES = 128 * 1024 * 1024  # flashinfer's recommended float workspace (split-kv partial results)
FLASHINFER_BACKEND = "fa2"


@dataclass
class PlanArrays:
    """flashinfer's description of one paged forward; int32 host tensors (pinned when built for CUDA)."""

    qo_indptr: torch.Tensor  # [S + 1], query token offsets of each sequence in the packed batch
    kv_indptr: torch.Tensor  # [S + 1], offsets of each sequence's pages in kv_indices
    kv_indices: torch.Tensor  # [total pages], page ids, sequence after sequence
    kv_last_page_len: torch.Tensor  # [S], tokens used in each sequence's last page (1..page_size)
    max_query_len: int

    @property
    def is_decode(self) -> bool:
        return self.max_query_len == 1


def plan_arrays(query_lens: list[int], kv_lens: list[int], page_tables: list[list[int]], page_size: int, *,
                pin: bool = False) -> PlanArrays:
    """PlanArrays from python lists: sequence s feeds query_lens[s] tokens and then holds kv_lens[s] tokens in
    the first ceil(kv_lens[s] / page_size) pages of page_tables[s] (longer tables are cut, entries past the end of
    a padded page table are never read)."""
    qo_indptr, kv_indptr, kv_indices, last_page_lens = [0], [0], [], []
    for query_len, kv_len, table in zip(query_lens, kv_lens, page_tables, strict=True):
        num_pages = -(-kv_len // page_size)
        kv_indices += table[:num_pages]
        qo_indptr.append(qo_indptr[-1] + query_len)
        kv_indptr.append(len(kv_indices))
        last_page_lens.append(kv_len - (num_pages - 1) * page_size)

    def host(values):
        tensor = torch.tensor(values, dtype=torch.int32)
        return tensor.pin_memory() if pin else tensor

    return PlanArrays(qo_indptr=host(qo_indptr), kv_indptr=host(kv_indptr), kv_indices=host(kv_indices),
                      kv_last_page_len=host(last_page_lens), max_query_len=max(query_lens))


def plan_arrays_from_metadata(meta: PagedMetadata) -> PlanArrays:
    """PlanArrays read back from device metadata (one device-to-host copy: for callers that plan nothing)."""
    page_table = meta.page_table.cpu().tolist()
    return plan_arrays(meta.query_lens.cpu().tolist(), meta.kv_lens.cpu().tolist(), page_table, meta.page_size,
                       pin=meta.query_lens.is_cuda)


def window_left(sliding_window: int | None) -> int:
    """flashinfer's window_left (keys at positions >= query - window_left are visible) for our sliding_window
    (a query sees itself and the sliding_window - 1 positions before it); -1 means no window."""
    return -1 if sliding_window is None else sliding_window - 1


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store k, v [T, kv_heads, D] at cache slots slot_mapping [T] of a [2, pages, page_size, kv_heads, D] cache."""
    num_kv_heads, head_dim = kv_cache.shape[-2:]
    k, v = to_cache_dtype(k, kv_cache.dtype), to_cache_dtype(v, kv_cache.dtype)
    if kv_cache.element_size() == 1:
        # index_copy_ has no float8 kernels; the bytes are what matter, so move them as uint8.
        kv_cache, k, v = kv_cache.view(torch.uint8), k.view(torch.uint8), v.view(torch.uint8)
    slots = kv_cache.view(2, -1, num_kv_heads, head_dim)
    slots[0].index_copy_(0, slot_mapping, k)
    slots[1].index_copy_(0, slot_mapping, v)


def should_use_tensor_cores(num_heads: int, num_kv_heads: int, kv_dtype: torch.dtype) -> bool:
    """Decode on tensor cores (the prefill kernel) when a kv head serves >= 4 query heads or the cache is fp8;
    the CUDA-core decode kernel wins for small groups. Same rule as SGLang's."""
    return num_heads // num_kv_heads >= 4 or kv_dtype.itemsize == 1


class FlashInferBackend:
    """Paged attention through flashinfer for one model's shapes; plan once per forward, run once per layer."""

    def __init__(self, config: DecoderConfig, *, device: torch.device | str, kv_dtype: torch.dtype,
                 q_dtype: torch.dtype = torch.bfloat16, use_tensor_cores: bool | None = None,
                 workspace_bytes: int = WORKSPACE_BYTES):
        import flashinfer

        if q_dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"flashinfer attention needs a bfloat16 or float16 model, got {q_dtype}; load the "
                             "model in bfloat16 or use attention='torch'")
        if kv_dtype not in (q_dtype, torch.float8_e4m3fn):
            raise ValueError(f"flashinfer KV cache dtype must be the model dtype ({q_dtype}) or "
                             f"torch.float8_e4m3fn, got {kv_dtype}")
        self._flashinfer = flashinfer
        self.device = torch.device(device)
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.scale = config.attention_scale
        self.q_dtype, self.kv_dtype = q_dtype, kv_dtype
        self.use_tensor_cores = (should_use_tensor_cores(self.num_heads, self.num_kv_heads, kv_dtype)
                                 if use_tensor_cores is None else use_tensor_cores)
        windows = {config.sliding_window if kind == SLIDING_ATTENTION else None for kind in config.layer_types}
        self.window_lefts = sorted(window_left(window) for window in windows)
        # One float workspace for every wrapper: wrappers run one after another on one stream, and each run's
        # split-kv partials are merged before the next run starts. Each wrapper keeps its own int workspace (its
        # plan lives there).
        self.workspace = torch.zeros(workspace_bytes, dtype=torch.uint8, device=self.device)
        self.prefill_wrappers = {w: flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self.workspace, "NHD", backend=FLASHINFER_BACKEND) for w in self.window_lefts}
        self.decode_wrappers = {w: flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_tensor_cores=self.use_tensor_cores, backend=FLASHINFER_BACKEND)
            for w in self.window_lefts}
        self.graph_indices_capacity = 0
        self._graph_indices: torch.Tensor | None = None
        self._graph_wrappers: dict[int, dict[int, object]] = {}
        self._planned_meta: PagedMetadata | None = None
        self._active_wrappers: dict[int, object] = {}
        self._reference = TorchReferenceBackend()

    # ------------------------------------------------------------------------------------------------ planning
    def plan(self, meta: PagedMetadata, arrays: PlanArrays, *, graph_batch_size: int | None = None) -> None:
        """Plan every window's wrapper for the forward described by ``meta`` (called outside any CUDA graph).

        With ``graph_batch_size`` the fixed-buffer decode wrappers of that batch size are planned: their index
        buffers keep their addresses, so a graph captured after such a plan replays correctly after the next one.
        """
        if graph_batch_size is not None:
            wrappers = self.graph_decode_wrappers(graph_batch_size)
            # flashinfer copies host indices into the fixed buffer synchronously; from the device it is async.
            arrays = PlanArrays(arrays.qo_indptr, arrays.kv_indptr, arrays.kv_indices.to(self.device,
                                non_blocking=True), arrays.kv_last_page_len, arrays.max_query_len)
        else:
            wrappers = self.decode_wrappers if arrays.is_decode else self.prefill_wrappers
        for window, wrapper in wrappers.items():
            common = dict(window_left=window, sm_scale=self.scale, q_data_type=self.q_dtype,
                          kv_data_type=self.kv_dtype, non_blocking=True)
            if graph_batch_size is not None or arrays.is_decode:
                wrapper.plan(arrays.kv_indptr, arrays.kv_indices, arrays.kv_last_page_len, self.num_heads,
                             self.num_kv_heads, self.head_dim, meta.page_size, **common)
            else:
                wrapper.plan(arrays.qo_indptr, arrays.kv_indptr, arrays.kv_indices, arrays.kv_last_page_len,
                             self.num_heads, self.num_kv_heads, self.head_dim, meta.page_size, causal=True,
                             **common)
        # Holding the object (not its id) means a later metadata object can never be mistaken for this one.
        self._planned_meta = meta
        self._active_wrappers = wrappers

    def ensure_graph_capacity(self, num_indices: int) -> bool:
        """Make the shared page-index buffer of the graph wrappers hold num_indices entries. Returns False when it
        had to be re-allocated: wrappers are rebuilt and graphs captured before must be captured again."""
        if num_indices <= self.graph_indices_capacity:
            return True
        self.graph_indices_capacity = max(2 * self.graph_indices_capacity, num_indices, 1024)
        self._graph_indices = torch.empty(self.graph_indices_capacity, dtype=torch.int32, device=self.device)
        self._graph_wrappers = {}
        return False

    def graph_decode_wrappers(self, batch_size: int) -> dict[int, object]:
        """Decode wrappers (one per window) with fixed-address index buffers for exactly batch_size sequences."""
        if batch_size not in self._graph_wrappers:
            if self._graph_indices is None:
                self.ensure_graph_capacity(batch_size)
            wrappers = {}
            for window in self.window_lefts:
                wrappers[window] = self._flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                    self.workspace, "NHD", use_cuda_graph=True, use_tensor_cores=self.use_tensor_cores,
                    paged_kv_indptr_buffer=torch.zeros(batch_size + 1, dtype=torch.int32, device=self.device),
                    paged_kv_indices_buffer=self._graph_indices,
                    paged_kv_last_page_len_buffer=torch.zeros(batch_size, dtype=torch.int32, device=self.device),
                    backend=FLASHINFER_BACKEND)
            self._graph_wrappers[batch_size] = wrappers
        return self._graph_wrappers[batch_size]

    # ------------------------------------------------------------------------------------------ backend protocol
    def packed(self, q, k, v, meta, *, scale, sliding_window):
        return self._reference.packed(q, k, v, meta, scale=scale, sliding_window=sliding_window)

    @torch.no_grad()
    def paged(self, q, k, v, meta: PagedMetadata, kv_cache, *, scale, sliding_window, kv_written=False):
        if scale != self.scale:
            raise ValueError(f"attention scale {scale} differs from the {self.scale} this backend plans with")
        if not kv_written:
            write_kv(kv_cache, k, v, meta.slot_mapping)
        if meta is not self._planned_meta:
            self.plan(meta, plan_arrays_from_metadata(meta))
        wrapper = self._active_wrappers[window_left(sliding_window)]
        return wrapper.run(q.contiguous(), (kv_cache[0], kv_cache[1]))
