"""A teacher sharded across 2 gloo ranks (teacher_weights = "shard") must train exactly as a replicated one.

One torchrun launch (this file is the worker script, see `_worker`) trains one step of pipelines/tiny.toml on
2 ranks three times: teacher replicated, teacher sharded in the fused micro-batch loop, and teacher sharded with
fuse_training off (the teacher's root then stays gathered from the first teacher_score to the last loss). The
runs see the same data; compared are the gathered student weights, the AdamW moments (exp_avg is proportional to
the gradient), the logged loss and gradient norm, and the eval metrics (eval gathers the whole sharded teacher to
let it generate its own answers). The plan tests check the per-rank sizes and the fit search's choice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the torchrun worker imports its sibling test module

from test_distributed_cpu import (OVERRIDES, TINY, _assert_close, _checkpoint, _optimizer,  # noqa: E402
                                  _train_record, _weights)

# The teacher's all-gathers copy its weights exactly, so only the order of nothing changes: near-bitwise equality.
RELATIVE = 1e-6
VARIANTS = {"replicated": ("keep", []), "sharded": ("shard", []),
            "sharded_unfused": ("shard", ["pipeline.fuse_training=false"])}
EVAL_KEYS = ("reverse_kl", "forward_kl", "top1_agreement", "teacher_text_reverse_kl", "teacher_text_forward_kl",
             "response_length_mean")


def _config(output_dir: Path, extra: list[str]):
    from opdgraph.config import load_pipeline

    return load_pipeline(TINY, [*OVERRIDES, *extra, f"pipeline.output_dir={output_dir}", "pipeline.num_steps=1"])


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)


def _records(run_dir: Path, kind: str) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [record for record in records if record["kind"] == kind]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher_shard")
    launched = _torchrun("teacher_shard", str(root))
    assert launched.returncode == 0, launched.stderr[-4000:]
    return root


@pytest.mark.parametrize("variant", ["sharded", "sharded_unfused"])
def test_sharded_teacher_trains_like_replicated(runs, variant):
    """Fails if the sharded teacher scores differently (a shard read as the whole weight, the lm_head read while
    resharded, all-gathers out of step between ranks) or if eval cannot use it."""
    reference, candidate = runs / "replicated", runs / variant
    _assert_close(_weights(_checkpoint(reference, 1)), _weights(_checkpoint(candidate, 1)), "weights")
    expected, actual = _optimizer(_checkpoint(reference, 1)), _optimizer(_checkpoint(candidate, 1))
    for key in ("exp_avg", "exp_avg_sq"):
        _assert_close(expected[key], actual[key], key)
    for key in ("loss", "grad_norm", "response_tokens"):
        assert _train_record(candidate, 1)[key] == pytest.approx(_train_record(reference, 1)[key], rel=RELATIVE), key
    for want, got in zip(_records(reference, "eval"), _records(candidate, "eval"), strict=True):
        for key in EVAL_KEYS:
            assert got[key] == pytest.approx(want[key], rel=RELATIVE, abs=1e-9), key


@pytest.mark.parametrize("variant", ["sharded", "sharded_unfused"])
def test_sharded_teacher_holds_half_and_reshards(runs, variant):
    """Fails if the runtime ignores the plan's placement (each rank keeps the whole teacher), or if the teacher's
    root (embedding, lm_head) is still gathered when the backward runs (the plan frees it after the loss) or
    after eval."""
    facts = json.loads((runs / variant / "teacher_facts.json").read_text())
    assert facts["local_elements"] < facts["full_elements"]
    assert facts["local_elements"] <= -(-facts["full_elements"] // 2) + facts["padding_bound"]
    assert facts["root_sharded_at_backward"] and all(facts["root_sharded_at_backward"])
    assert facts["root_resharded"] and facts["layers_resharded"]
    assert json.loads((runs / "replicated" / "teacher_facts.json").read_text())["local_elements"] == \
        facts["full_elements"]


def test_plan_of_a_sharded_teacher():
    """Fails if the plan keeps the whole teacher per rank when sharded, forgets what FSDP gathers (two layers
    during scoring, the root until the loss, the whole teacher for eval), or does not charge the all-gathers."""
    from opdgraph.compile import compile_plan
    from opdgraph.config import load_pipeline
    from opdgraph.placement import Placement

    cfg = load_pipeline(TINY, [])
    replicated, sharded = compile_plan(cfg, world_size=2), compile_plan(cfg, Placement(teacher_weights="shard"), 2)
    full = replicated.buffers["teacher.weights"].bytes
    assert sharded.buffers["teacher.weights"].bytes == -(-full // 2)
    shape = cfg.shapes["teacher"]
    layer = shape.layer_parameters() * 4
    assert sharded.buffers["teacher.gathered_layer"].bytes == 2 * layer
    assert sharded.buffers["teacher.gathered_root"].bytes == full - shape.layers * layer
    assert sharded.buffers["teacher.gathered_weights"].bytes == full
    scoring = sharded.step("teacher_score")
    assert "teacher.gathered_layer" in scoring.allocates and "teacher.gathered_root" in scoring.allocates
    assert any(r.buffer == "teacher.gathered_root" for r in sharded.step("loss").releases)
    gathers = [t for t in sharded.transfers if t.direction == "all_gather" and t.buffer == "teacher.weights"]
    assert [t.step for t in gathers] == ["teacher_score"]
    assert gathers[0].bytes == full // 2 * scoring.repeats
    assert scoring.work.seconds >= replicated.step("teacher_score").work.seconds
    assert not any(t.buffer.startswith("teacher.") for t in replicated.transfers)


def _fit(budget_gib: float, *overrides: str, world_size: int = 2, pipeline=None):
    from opdgraph.config import load_pipeline
    from opdgraph.fit import fit_plan

    return fit_plan(load_pipeline(pipeline or TINY, [f"pipeline.memory_budget_gib={budget_gib}", *overrides]),
                    world_size)


def test_fit_shards_only_when_replicating_does_not_fit():
    """Fails if the search shards a teacher that fits replicated (a sharded teacher computes the same and adds its
    all-gathers, so it is never faster), or misses the shard when no replicated candidate fits."""
    from opdgraph.compile import compile_plan
    from opdgraph.config import load_pipeline
    from opdgraph.fit import apply_decisions, search_space

    # A pipeline without an eval stage: eval generates with the whole teacher gathered, so in the tiny pipeline
    # (whose peak is its eval) a sharded teacher cannot lower the peak at all.
    qwen = TINY.parent / "qwen25_1b5_from_7b.toml"
    only_keep_or_shard = 'pipeline.fit.forbid=["teacher_weights.offload", "teacher_weights.stream"]'  # also forces it
    configured = compile_plan(load_pipeline(qwen, []), world_size=2)
    roomy = _fit(configured.peak_bytes / 2**30, only_keep_or_shard, pipeline=qwen)
    assert roomy.searched and roomy.fits and roomy.decisions.teacher_weights == "keep"
    assert any(c.decisions.teacher_weights == "shard" and c.plan.peak_bytes <= roomy.plan.budget_bytes
               for c in roomy.candidates)  # shard fit too: the roofline (then fewer offloads) decided
    replicated = load_pipeline(qwen, ['pipeline.fit.teacher_weights="keep"'])
    smallest_replicated = min(compile_plan(apply_decisions(replicated, d), d.placement, 2).peak_bytes
                              for d in search_space(replicated, 2))
    tight = _fit((smallest_replicated - 1) / 2**30, only_keep_or_shard, pipeline=qwen)
    assert tight.fits and tight.decisions.teacher_weights == "shard"
    assert tight.cfg.models["teacher"].offload_when_idle is False
    forced = _fit(1.0, 'pipeline.fit.teacher_weights="shard"')
    assert forced.decisions.teacher_weights == "shard" and "teacher.gathered_root" in forced.plan.buffers
    assert not any(c.decisions.teacher_weights == "shard" for c in _fit(1e-3, world_size=1).candidates)


def test_shard_on_one_process_is_an_error():
    """Fails if forcing a sharded teacher on one process is silently ignored or fails without naming the key."""
    from opdgraph.cli import main

    with pytest.raises(ValueError, match=r"pipeline\.fit\.teacher_weights = 'shard' \(--set\).*--nproc-per-node"):
        _fit(1.0, 'pipeline.fit.teacher_weights="shard"', world_size=1)
    assert main(["plan", str(TINY), "--set", 'pipeline.fit.teacher_weights="shard"']) != 0
    with pytest.raises(ValueError, match=r"pipeline\.fit\.forbid leaves only teacher_weights\.shard"):
        _fit(1.0, 'pipeline.fit.forbid=["teacher_weights.keep", "teacher_weights.offload", "teacher_weights.stream"]',
             world_size=1)
    assert main(["plan", str(TINY), "--set", 'pipeline.fit.teacher_weights="shard"', "--nproc-per-node", "2"]) == 0


def _root_sharded(teacher) -> bool:
    from torch.distributed.tensor import DTensor

    return all(isinstance(p, DTensor) for p in (teacher.embed_tokens.weight, teacher.lm_head.weight,
                                                 teacher.norm.weight))


def _teacher_facts(teacher, root_sharded_at_backward: list[bool]) -> dict:
    from torch.distributed.tensor import DTensor

    parameters = list(teacher.parameters())
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in parameters)
    return {"local_elements": local, "full_elements": sum(p.numel() for p in parameters),
            "padding_bound": sum(p.shape[1:].numel() if p.dim() > 1 else 1 for p in parameters),
            "root_sharded_at_backward": root_sharded_at_backward, "root_resharded": _root_sharded(teacher),
            "layers_resharded": all(isinstance(p, DTensor) for p in teacher.layers.parameters())}


def _watch_backward(observed: list[bool]) -> None:
    """Record, at each backward, whether the teacher's root is sharded (the stage calls training.backward; the teacher
    is the one the chunked loss before it read)."""
    from opdgraph.runtime import training

    seen, loss, original = {}, training.chunked_loss, training.backward

    def chunked_loss(config, inputs):
        seen["teacher"] = next(iter(inputs.models["teachers"].values())).model
        loss(config, inputs)

    def backward(inputs):
        observed.append(_root_sharded(seen["teacher"]))
        original(inputs)

    training.chunked_loss, training.backward = chunked_loss, backward


def _worker(mode: str, root: str) -> None:
    """Runs on every rank under torchrun."""
    from opdgraph.compile import compile_plan
    from opdgraph.placement import Placement
    from opdgraph.runtime import distributed
    from opdgraph.runtime.run import run_pipeline

    observed: list[bool] = []
    _watch_backward(observed)
    for name, (teacher_weights, extra) in VARIANTS.items():
        observed.clear()
        cfg = _config(Path(root) / name, extra)
        ctx = run_pipeline(cfg, compile_plan(cfg, Placement(teacher_weights=teacher_weights), world_size=2))
        if distributed.is_main():
            facts = _teacher_facts(ctx.teacher, list(observed))
            (Path(root) / name / "teacher_facts.json").write_text(json.dumps(facts))
    distributed.shutdown()


if __name__ == "__main__":
    _worker(*sys.argv[1:])


BOOKKEEPING_SCRIPT = """
import torch, torch.distributed as dist
from opdgraph.models import load_decoder
from opdgraph.models.packing import pack
from opdgraph.models.tiny_configs import tiny_config
from opdgraph.runtime import fsdp

dist.init_process_group("gloo", rank=0, world_size=1)
model = load_decoder(tiny_config("llama"), dtype=torch.float32)
fsdp.shard_teacher(model)
state = model._get_fsdp_state()
def recorded():
    return len(state._comm_ctx.post_forward_order)
with torch.no_grad():
    for _ in range(3):
        model.forward_hidden(*pack([[1, 2, 3]]))
grown = recorded()
model.reshard()
after_plain_reshard = recorded()
fsdp.reshard_forward_only(model)
print(grown, after_plain_reshard, recorded())
dist.destroy_process_group()
"""


def test_forward_only_reshard_drops_fsdp_backward_bookkeeping():
    """FSDP2 records each unit's forward for a backward that a frozen teacher never runs: a plain reshard keeps the
    record growing every micro-batch (host memory over a long run); reshard_forward_only must empty it."""
    import socket

    with socket.socket() as probe:  # a free port for the one-process group
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", BOOKKEEPING_SCRIPT], capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    grown, after_plain_reshard, after_forward_only = map(int, done.stdout.split()[-3:])
    assert grown > 0 and after_plain_reshard == grown  # the record really grows, and reshard() alone keeps it
    assert after_forward_only == 0
