"""Chat templates: per-model template files and template variables, and the teacher/student agreement check.

The HF tokenizer here is built in the test with the tokenizers library (byte-level, no merges: one id per byte,
plus the chat's special tokens), saved beside a tiny model config: no network. Its template prints the marker
<think></think> after the generation prompt when enable_thinking is false, as Qwen3's does.
What these protect: template variables and template files reach the prompts the data stage tokenises, and a teacher
whose template renders the student's prompts differently stops the run before any weights are read.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opdgraph.config import ConfigError, load_pipeline
from opdgraph.models import ByteTokenizer, ModelLoadError
from opdgraph.models.tokenizers import load_tokenizer_from_dir
from opdgraph.runtime import startup as run
from opdgraph.runtime.chat_templates import first_difference

PIPELINES = Path(__file__).parent.parent / "pipelines"
TINY = PIPELINES / "tiny.toml"
SPECIALS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>"
            "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}{% endif %}")
OTHER_TEMPLATE = "{% for m in messages %}<|user|>{{ m['content'] | upper }}<|end|>{% endfor %}<|assistant|>"
MESSAGES = [{"role": "user", "content": "hi"}]


def write_model_dir(directory: Path, model_config: dict) -> Path:
    """config.json + an HF byte-level tokenizer with TEMPLATE as its chat template."""
    import tokenizers
    import transformers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[byte]: byte for byte in range(256)}
    model = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = tokenizers.decoders.ByteLevel()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=model, eos_token="<|end|>",
                                                     additional_special_tokens=SPECIALS[:3])
    tokenizer.chat_template = TEMPLATE
    directory.mkdir(parents=True)
    tokenizer.save_pretrained(str(directory))
    (directory / "config.json").write_text(json.dumps(model_config))
    return directory


def template_pipeline(tmp_path: Path, student_lines: str = "", teacher_lines: str = "") -> str:
    """tiny.toml with both models read from HF model directories (same tokenizer), plus extra lines per model."""
    tiny = load_pipeline(str(TINY))
    text = TINY.read_text().replace('"data/', f'"{PIPELINES}/data/')
    for name, extra in (("student", student_lines), ("teacher", teacher_lines)):
        directory = write_model_dir(tmp_path / name, dict(tiny.models[name].config))
        config_line = next(line for line in text.split(f"[models.{name}]")[1].splitlines()
                           if line.startswith("config ="))
        text = text.replace(config_line, f'path = "{directory}"\n{extra}')
    file = tmp_path / "pipeline.toml"
    file.write_text(text)
    return str(file)


def load(file: str):
    return load_pipeline(file, ["data.max_prompt_tokens=256"])  # one id per byte: longer than the byte tokenizer's


@pytest.mark.parametrize("a, b, expected", [
    ([1, 2, 3], [1, 2, 3], None), ([1, 2], [1, 2, 3], 2), ([1, 2, 3], [1, 2], 2), ([1, 5], [1, 2], 1),
    ([], [7], 0), ([], [], None), ([4, 2], [9, 2], 0),
])
def test_first_difference(a, b, expected):
    """If this fails, a mismatch is reported at the wrong token, or a prefix (one template adds tokens) is missed."""
    assert first_difference(a, b) == expected


def test_template_variables_reach_the_template(tmp_path):
    """If this fails, chat_template_kwargs (e.g. enable_thinking = false) never reach apply_chat_template."""
    tokenizer = load_tokenizer_from_dir(write_model_dir(tmp_path / "m", {}), 384)
    plain = tokenizer.decode(tokenizer.chat_ids(MESSAGES))
    no_thinking = tokenizer.with_chat_options(None, {"enable_thinking": False})
    assert plain == "<|user|>hi<|end|><|assistant|>"
    assert no_thinking.decode(no_thinking.chat_ids(MESSAGES)) == "<|user|>hi<|end|><|assistant|><think></think>"
    assert tokenizer.decode(tokenizer.chat_ids(MESSAGES)) == plain  # the original adapter is left as it was
    other = tokenizer.with_chat_options(OTHER_TEMPLATE, {})
    assert other.decode(other.chat_ids(MESSAGES)) == "<|user|>HI<|end|><|assistant|>"


def test_saved_tokenizer_keeps_the_template_file(tmp_path):
    """If this fails, a student trained with a chat_template file is saved with its tokenizer's old template."""
    tokenizer = load_tokenizer_from_dir(write_model_dir(tmp_path / "m", {}), 384)
    tokenizer.with_chat_options(OTHER_TEMPLATE, {}).save(tmp_path / "saved")
    reloaded = load_tokenizer_from_dir(tmp_path / "saved", 384)
    assert reloaded.decode(reloaded.chat_ids(MESSAGES)) == "<|user|>HI<|end|><|assistant|>"
    assert tokenizer.decode(tokenizer.chat_ids(MESSAGES)) == "<|user|>hi<|end|><|assistant|>"


def test_same_options_on_both_models_pass_and_reach_the_prompts(tmp_path):
    """If this fails, the data stage tokenises prompts without the student's template variables, or two models
    with the same template are reported as a mismatch."""
    kwargs = "chat_template_kwargs = { enable_thinking = false }"
    startup = run.check_startup(load(template_pipeline(tmp_path, kwargs, kwargs)))
    first = startup.train_prompts[0]
    assert startup.tokenizers["student"].decode(list(first.prompt_ids)).endswith("<|assistant|><think></think>")


def test_teacher_template_variables_differ_is_an_error(tmp_path):
    """If this fails, a teacher whose template variables render the student's prompts differently scores them
    silently (biased log-probs), or the error does not show where the renderings part."""
    cfg = load(template_pipeline(tmp_path, teacher_lines="chat_template_kwargs = { enable_thinking = false }"))
    with pytest.raises(ModelLoadError) as raised:
        run.check_startup(cfg)
    message = str(raised.value)
    student_tokenizer = load_tokenizer_from_dir(tmp_path / "student", 384)
    startup_ids = student_tokenizer.chat_ids([{"role": "user", "content": _first_train_prompt()}])
    assert f"first difference at token {len(startup_ids)}" in message  # the teacher's ids extend the student's
    assert "[models.teacher]" in message and "tiny_train.jsonl" in message
    assert "the student has ...'bread.<|end|><|assistant|>' | ''" in message  # where it ends, the teacher goes on
    assert "the teacher ...'bread.<|end|><|assistant|>' | '<think><'" in message
    assert "allow_template_mismatch = true" in message


def test_allow_template_mismatch_warns_and_runs(tmp_path, capsys):
    """If this fails, allow_template_mismatch = true does not let a deliberate mismatch run, or it runs silently."""
    teacher = "chat_template_kwargs = { enable_thinking = false }\nallow_template_mismatch = true"
    run.check_startup(load(template_pipeline(tmp_path, teacher_lines=teacher)))
    assert "warning: [models.teacher] renders prompt 1" in capsys.readouterr().out


def test_template_file_relative_to_the_pipeline(tmp_path):
    """If this fails, a chat_template file is looked up elsewhere than beside the pipeline file, is not used, or a
    missing one is not reported with its path."""
    (tmp_path / "teacher.jinja").write_text(OTHER_TEMPLATE)  # "Tell ..." -> "TELL ...": <|user|> T agree
    with pytest.raises(ModelLoadError, match=r"first difference at token 2 .*'ELL ME A'"):
        run.check_startup(load(template_pipeline(tmp_path / "a", teacher_lines='chat_template = "../teacher.jinja"')))
    with pytest.raises(ModelLoadError, match=r"chat_template: no file .*missing\.jinja"):
        run.check_startup(load(template_pipeline(tmp_path / "b", teacher_lines='chat_template = "missing.jinja"')))


def test_byte_tokenizer_rejects_a_template_file_and_notes_variables(capsys):
    """If this fails, a template file given to an inline-config model (fixed byte format) is silently unused, or
    its template variables are dropped without a word."""
    with pytest.raises(ModelLoadError, match="fixed chat format"):
        ByteTokenizer().with_chat_options("{{ messages }}", {})
    cfg = load_pipeline(str(TINY), ["models.teacher.chat_template_kwargs.enable_thinking=false"])
    run.check_startup(cfg)
    assert "note: [models.teacher] chat_template_kwargs (enable_thinking) do not apply" in capsys.readouterr().out


@pytest.mark.parametrize("override, message", [
    ("models.teacher.chat_template_kwargs.tokenize=false", "tokenize cannot be template variables"),
    ("models.student.allow_template_mismatch=true", "allow_template_mismatch belongs on the teacher"),
    ("models.teacher.revision=main", "revision needs path"),
])
def test_chat_option_config_errors(override, message):
    """If this fails, a template variable that would change tokenisation itself, the mismatch allowance on the
    student (where nothing reads it) or a revision without a Hub id is accepted."""
    with pytest.raises(ConfigError, match=message):
        load_pipeline(str(TINY), [override])


def _first_train_prompt() -> str:
    row = json.loads((PIPELINES / "data" / "tiny_train.jsonl").read_text().splitlines()[0])
    return row.get("prompt") or row.get("question") or row["problem"]


def test_template_errors_are_user_errors(tmp_path):
    """If this fails, a syntax error in a chat_template file, or a template's own raise_exception (Gemma's "System
    role not supported"), reaches the user as a jinja2 traceback instead of an error naming the template."""
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }\n{% endfor %}")
    with pytest.raises(ModelLoadError, match=r"broken.jinja:\d+"):
        run.check_startup(load(template_pipeline(tmp_path, f'chat_template = "{broken}"')))
    tokenizer = load_tokenizer_from_dir(write_model_dir(tmp_path / "m", {}), 384)
    refusing = tokenizer.with_chat_options("{{ raise_exception('System role not supported') }}", {})
    with pytest.raises(ModelLoadError, match="System role not supported"):
        refusing.chat_ids(MESSAGES)
