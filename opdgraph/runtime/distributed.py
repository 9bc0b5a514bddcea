"""Data-parallel runs under torchrun: the process group, rank-aware helpers, and failures that name their rank.

`opdgraph run` started by torchrun (RANK / WORLD_SIZE / LOCAL_RANK in the environment) calls `init_distributed`
first; without those variables everything here is a no-op for one process, so the single-process path is unchanged.

How a step runs on N ranks (see README, "Several GPUs"):
- every rank rolls out its own share of the step's prompts (PromptSampler(rank, world_size)); the student is
  sharded with FSDP2 (opdgraph.runtime.fsdp) and the rollout engine runs on the gathered weights;
- the loss weights divide by the *global* response-token (or sequence) count, all-reduced in rollout
  (`all_reduce_sum`), and FSDP sums (not averages) gradients, so N ranks apply the update one rank would on the same
  global batch;
- every rank runs the same number of training micro-batches (`pad_micro_batches`): FSDP's all-gathers are
  collectives, so a rank with fewer samples runs zero-weight copies instead of waiting forever.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(device_setting: str) -> None:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); one process without torchrun."""
    if not launched_by_torchrun() or dist.is_initialized():
        return
    # NVLink SHARP (multicast) has hung collectives on the machines we run on; opt in explicitly if you want it.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    use_cuda = device_setting == "cuda" or (device_setting == "auto" and torch.cuda.is_available())
    if use_cuda:
        # An explicit device binds the NCCL communicator to this rank's GPU at once; without it NCCL guesses the
        # device from the global rank at the first collective, which can hang when ranks map to GPUs differently.
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    if not is_main():
        sys.stdout = open(os.devnull, "w")  # rank 0 prints progress and tables; errors still reach stderr


def shutdown() -> None:
    """Leave the process group together: every rank first waits for the others, so none tears its communicator
    down while a peer's last collective still uses it."""
    if dist.is_available() and dist.is_initialized():
        if world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def report_rank_failure():
    """Any exception on a rank is printed as `[rank r] ...` and the whole group is torn down (no hanging peers); an
    OpdgraphError without its traceback (exit 2), as the CLI prints it for one process."""
    from opdgraph.errors import EXIT_USER_ERROR, OpdgraphError

    try:
        yield
    except BaseException as error:
        if world_size() > 1 and not isinstance(error, SystemExit):
            # A user-facing error, or a signal that stopped the run at once, is its message; anything else a bug.
            code, text = 1, "".join(traceback.format_exception(error))
            if isinstance(error, OpdgraphError):
                code, text = EXIT_USER_ERROR, f"opdgraph: error: {error}"
            elif isinstance(error, KeyboardInterrupt) and hasattr(error, "signum"):
                code, text = 128 + error.signum, f"opdgraph: interrupted by {error}"
            prefix = f"[rank {rank()}] "
            sys.stderr.write("".join(prefix + line + "\n" for line in text.rstrip().splitlines()))
            sys.stderr.flush()
            dist.destroy_process_group()  # aborts pending collectives, so the peers fail instead of waiting
            os._exit(code)  # torchrun then stops the other ranks and reports this one as the first failure
        raise


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum each number over all ranks (float64, so token counts stay exact)."""
    if world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_reduce_max(value: int, device: torch.device) -> int:
    if world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def pad_micro_batches(micro_batches: list, device: torch.device) -> list:
    """Append zero-weight copies of the first micro-batch until every rank has as many as the busiest rank."""
    import dataclasses

    most = all_reduce_max(len(micro_batches), device)
    template = micro_batches[0]
    # Each copy has an index of its own: per-micro-batch buffers are keyed by it (runtime.training).
    gold = {} if template.gold_weights is None else {"gold_weights": torch.zeros_like(template.gold_weights)}
    padding = [dataclasses.replace(template, weights=torch.zeros_like(template.weights), index=len(micro_batches) + k,
                                   **gold)
               for k in range(most - len(micro_batches))]
    return micro_batches + padding
