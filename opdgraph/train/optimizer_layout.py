"""How MasterAdamW walks its state: buckets of parameters, pieces of elements, and each rank's shard of a tensor.

opdgraph.train.optimizer updates parameters in buckets of at most ``_BUCKET_ELEMENTS`` elements (the unit an
offloaded state streams through the device; opdgraph.sizing.OPTIMIZER_BUCKET_ELEMENTS mirrors it for the plan), and
its finiteness check walks a bucket in pieces of at most ``_CHECK_ELEMENTS`` (the optimizer's). Sharded parameters
(FSDP2 DTensors) keep their optimizer state for this rank's shard only: ``_local`` is that shard, ``_gathered`` the
full tensor back from it (for a state dict), ``_shard_of`` this rank's rows of a full tensor (for loading one).
Gradient clipping (opdgraph.train.grad_clipping) reads the local shards too.
"""

from __future__ import annotations

from typing import Iterable

import torch

_BUCKET_ELEMENTS = 1 << 26


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: writing it writes the parameter); a plain tensor as is."""
    return tensor.to_local() if hasattr(tensor, "device_mesh") else tensor


def _gathered(param: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """The full tensor whose shard on this rank is `local`, laid out like `param` (collective when sharded)."""
    if not hasattr(param, "device_mesh"):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, param.device_mesh, param.placements, shape=param.shape,
                              stride=param.stride()).full_tensor().cpu()


def _shard_of(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a full tensor, for a parameter sharded like `param` (no communication)."""
    if not hasattr(param, "device_mesh"):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(_local(param).device), param.device_mesh, param.placements,
                             src_data_rank=None).to_local()


def _pieces(names: list[str], tensors: dict[str, torch.Tensor], limit: int) -> Iterable[list[tuple[str, slice]]]:
    """The elements of `names`' tensors in groups of at most `limit`: (name, flat slice) pairs; a tensor larger than
    `limit` is split across groups."""
    group, size = [], 0
    for name in names:
        numel = tensors[name].numel()
        for start in range(0, numel, limit):
            stop = min(numel, start + limit)
            if group and size + stop - start > limit:
                yield group
                group, size = [], 0
            group.append((name, slice(start, stop)))
            size += stop - start
    if group:
        yield group


def _buckets(names: list[str], params: dict[str, torch.Tensor]) -> Iterable[list[str]]:
    """Consecutive groups of parameter names with at most _BUCKET_ELEMENTS elements (a bigger one goes alone)."""
    bucket, size = [], 0
    for name in names:
        numel = params[name].numel()
        if bucket and size + numel > _BUCKET_ELEMENTS:
            yield bucket
            bucket, size = [], 0
        bucket.append(name)
        size += numel
    if bucket:
        yield bucket
