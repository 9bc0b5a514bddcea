"""Golden error messages for every class of config mistake, and the strict-typing guards.

Each case edits a valid base pipeline and the resulting ConfigError text is compared with
tests/golden/config_errors.txt (OPDGRAPH_REGEN_GOLDEN=1 rewrites it). A failure means a message changed (review
the diff) or a mistake is no longer caught.
"""

from __future__ import annotations

import pathlib

import pytest

from golden_helpers import check_golden
from opdgraph.config import ConfigError, load_pipeline

BASE = """\
[pipeline]
name = "t"
num_steps = 2

[models.student]
role = "student"
dtype = "float32"
config = { model_type = "llama", hidden_size = 16, intermediate_size = 32, num_hidden_layers = 2, num_attention_heads = 2, vocab_size = 64 }

[models.teacher]
role = "teacher"
dtype = "float32"
config = { model_type = "llama", hidden_size = 16, intermediate_size = 32, num_hidden_layers = 3, num_attention_heads = 2, vocab_size = 64 }

[data]
train_files = ["train.jsonl"]
prompts_per_step = 2
max_prompt_tokens = 8

[rollout]
max_new_tokens = 8

[teacher_score]
micro_batch_tokens = 64

[loss]
divergence = "reverse_kl"

[backward]

[step]
lr = 0.001
"""

TEACHER_CONFIG = 'config = { model_type = "llama", hidden_size = 16, intermediate_size = 32, num_hidden_layers = 3, num_attention_heads = 2, vocab_size = 64 }'

# name -> (edits as (old, new) text replacements on BASE, --set overrides)
CASES = {
    "unknown key": ([("num_steps = 2", "num_steps = 2\nnum_step = 3")], []),
    "unknown nested key": ([("num_steps = 2", "num_steps = 2\n[pipeline.hardware]\npcie_gpbs = 16.0")], []),
    "string for bool": ([("num_steps = 2", 'num_steps = 2\nfuse_training = "false"')], []),
    "float for int": ([("num_steps = 2", "num_steps = 2.5")], []),
    "bool for int": ([("max_new_tokens = 8", "max_new_tokens = true")], []),
    "string for float": ([("lr = 0.001", 'lr = "1e-3"')], []),
    "string for list": ([('train_files = ["train.jsonl"]', 'train_files = "train.jsonl"')], []),
    "bad list item": ([("[backward]", "[backward]\n"), ("max_new_tokens = 8", 'max_new_tokens = 8\nstop_token_ids = [1, "2"]')], []),
    "wrong tuple length": ([("lr = 0.001", "lr = 0.001\nbetas = [0.9]")], []),
    "bad choice": ([('divergence = "reverse_kl"', 'divergence = "reverse-kl"')], []),
    "missing required": ([("lr = 0.001", "")], []),
    "unknown stage kind": ([("[backward]", "[backwards]")], []),
    "second stage with bad kind": ([("[backward]", '[backward]\n\n[eval2]\nkind = "evaluate"')], []),
    "value out of range": ([("max_new_tokens = 8", "max_new_tokens = 8\ntemperature = 0.0")], []),
    "jsd beta 0": ([('divergence = "reverse_kl"', 'divergence = "jsd"\nbeta = 0')], []),
    "jsd beta 1": ([('divergence = "reverse_kl"', 'divergence = "jsd"\nbeta = 1.0')], []),
    "two sources for a model": ([('role = "teacher"', 'role = "teacher"\npath = "x.json"')], []),
    "keep_layers without init_from": ([('role = "teacher"', 'role = "teacher"\nkeep_layers = [0]')], []),
    "two students": ([('role = "teacher"', 'role = "student"')], []),
    "unknown model reference": ([("max_new_tokens = 8", 'max_new_tokens = 8\nmodel = "studnet"')], []),
    "rollout with the teacher": ([("max_new_tokens = 8", 'max_new_tokens = 8\nmodel = "teacher"')], []),
    "init_from unknown model": ([('config = { model_type = "llama", hidden_size = 16, intermediate_size = 32, num_hidden_layers = 2',
                                  'init_from = "teachr"\n#'), ], []),
    "keep_layers out of range": ([('config = { model_type = "llama", hidden_size = 16, intermediate_size = 32, num_hidden_layers = 2',
                                   'init_from = "teacher"\nkeep_layers = [0, 3]\n#')], []),
    "teacher vocab too small": ([("num_hidden_layers = 3, num_attention_heads = 2, vocab_size = 64",
                                  "num_hidden_layers = 3, num_attention_heads = 2, vocab_size = 32")], []),
    "missing config key": ([("num_hidden_layers = 3, num_attention_heads = 2, vocab_size = 64",
                             "num_attention_heads = 2, vocab_size = 64")], []),
    "missing model file": ([(TEACHER_CONFIG, 'path = "missing/config.json"')], []),
    "missing pkg wheel": ([(TEACHER_CONFIG, 'path = "pkg:llm_not_there/m.gguf"')], []),
    "missing producer": ([("[teacher_score]\nmicro_batch_tokens = 64", "")], []),
    "missing sink stage": ([("[step]\nlr = 0.001", "")], []),
    "two producers": ([("[backward]", '[backward]\n\n[loss2]\nkind = "loss"\ndivergence = "forward_kl"')], []),
    "micro-batch smaller than a sequence": ([("micro_batch_tokens = 64", "micro_batch_tokens = 10")], []),
    "eval answers longer than a micro-batch": ([("lr = 0.001", "lr = 0.001\n\n[eval]\nmax_new_tokens = 60\nfiles = [\"train.jsonl\"]")], []),
    "eval answers longer than the teacher's positions": ([(TEACHER_CONFIG, TEACHER_CONFIG.replace(
        "vocab_size = 64", "vocab_size = 64, max_position_embeddings = 20")),
        ("lr = 0.001", "lr = 0.001\n\n[eval]\nnum_prompts = 2\nmax_new_tokens = 16\nfiles = [\"train.jsonl\"]")], []),
    "longer than the model's positions": ([("vocab_size = 64 }\n\n[models.teacher]",
                                           "vocab_size = 64, max_position_embeddings = 12 }\n\n[models.teacher]")], []),
    "rollout longer than the teacher's positions": ([(TEACHER_CONFIG, TEACHER_CONFIG.replace(
        "vocab_size = 64", "vocab_size = 64, max_position_embeddings = 12"))], []),
    "toml syntax error": ([("num_steps = 2", "num_steps = = 2")], []),
    "set unknown key": ([], ["rollout.max_new_token=16"]),
    "set bad type": ([], ["pipeline.num_steps=ten"]),
    "set unknown model": ([], ["models.studnt.dtype=float32"]),
    "set malformed": ([], ["pipeline.num_steps"]),
    "many mistakes at once": ([("num_steps = 2", "num_steps = 2.0\nseeed = 1"), ('dtype = "float32"', 'dtype = "fp32"'),
                               ("[backward]", "[backwrd]")], ["loss.chunk_tokens=0"]),
}


def write_case(tmp_path: pathlib.Path, edits) -> pathlib.Path:
    text = BASE
    for old, new in edits:
        assert old in text, f"case edit does not apply: {old!r}"
        text = text.replace(old, new, 1)
    path = tmp_path / "case.toml"
    path.write_text(text, encoding="utf-8")
    (tmp_path / "train.jsonl").write_text('{"prompt": "hi"}\n', encoding="utf-8")  # plan checks data files exist
    return path


def test_base_pipeline_is_valid(tmp_path):
    """If this fails, the base every error case edits is itself invalid, so the cases test nothing."""
    load_pipeline(str(write_case(tmp_path, [])))


def test_error_messages_golden(tmp_path):
    """If this fails, a config mistake is no longer reported, or its message/location changed (see the diff)."""
    sections = []
    for name, (edits, overrides) in CASES.items():
        with pytest.raises(ConfigError) as caught:
            load_pipeline(str(write_case(tmp_path, edits)), overrides)
        sections.append(f"## {name}\n{caught.value}\n")
    check_golden("config_errors.txt", "\n".join(sections))


@pytest.mark.parametrize("field, literal, accepted", [
    ("pipeline.fuse_training", '"false"', False), ("pipeline.fuse_training", "0", False),
    ("pipeline.fuse_training", "false", True), ("pipeline.num_steps", "3.7", False),
    ("pipeline.num_steps", "true", False), ("pipeline.num_steps", '"3"', False), ("pipeline.num_steps", "3", True),
    ("pipeline.memory_budget_gib", "3", True), ("pipeline.memory_budget_gib", "true", False),
    ("pipeline.name", "5", False), ("data.train_files", '"a.jsonl"', False), ("data.train_files", "[1]", False),
    ("pipeline.hardware", "3", False), ("models.student.config", '"x"', False),
])
def test_coercion_guards(tmp_path, field, literal, accepted):
    """If this fails, a value of the wrong TOML type is silently coerced (or a valid one rejected)."""
    path = write_case(tmp_path, [])
    override = f"{field}={literal}"
    if accepted:
        load_pipeline(str(path), [override])
    else:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_pipeline(str(path), [override])


def test_int_for_float_becomes_float(tmp_path):
    """If this fails, an integer given for a float field stays an int (or is rejected)."""
    cfg = load_pipeline(str(write_case(tmp_path, [("lr = 0.001", "lr = 1")])))
    assert type(cfg.stages["step"].config.lr) is float and cfg.stages["step"].config.lr == 1.0


def test_all_problems_reported_in_one_pass(tmp_path):
    """If this fails, loading stops at the first problem instead of reporting every one."""
    edits = CASES["many mistakes at once"][0]
    with pytest.raises(ConfigError) as caught:
        load_pipeline(str(write_case(tmp_path, edits)), ["loss.chunk_tokens=0"])
    assert len(caught.value.problems) == 5
    assert {problem.path for problem in caught.value.problems} == {
        "pipeline.num_steps", "pipeline.seeed", "models.student.dtype", "backwrd", "loss.chunk_tokens"}


def test_model_tokenizer_key_is_unknown(tmp_path):
    """If this fails, `[models.X] tokenizer = ...` is accepted again though nothing reads it: the run would use the
    model's own tokenizer while the file says otherwise."""
    path = write_case(tmp_path, [('role = "student"', 'role = "student"\ntokenizer = "tok"')])
    with pytest.raises(ConfigError) as caught:
        load_pipeline(str(path))
    [problem] = caught.value.problems
    assert problem.path == "models.student.tokenizer" and problem.location == "case.toml:7"
    assert problem.message.startswith("unknown key (valid keys: dtype, role, path, revision, config, init_from")
