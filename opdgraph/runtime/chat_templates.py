"""Chat templates at run start: each model's template options put on its tokenizer, and the teacher's rendering of
the first prompts compared with the student's.

The teacher scores the student's token ids: the prompt it conditions on is the student's rendering. When the
teacher's own template (or its template variables, e.g. Qwen3's enable_thinking) would render the same messages to
other ids, the teacher sees a prompt format it was not trained on and its log-probs are biased (one framework measured
+0.29 nats per token from such a mismatch). `check_template_agreement` renders the first NUM_COMPARED prompts with
each model's tokenizer + template + variables and stops the run at the first difference, unless the teacher's table
says `allow_template_mismatch = true` (then it is printed as a warning). Both run in `check_startup`, before weights.
"""

from __future__ import annotations

from pathlib import Path

from opdgraph.config.paths import data_file_path
from opdgraph.models.errors import ModelLoadError
from opdgraph.models.tokenizers import ByteTokenizer

NUM_COMPARED = 4  # prompts compared; a template difference shows in every prompt, the first few suffice
CONTEXT_TOKENS = 8  # tokens shown on each side of the first difference


def configure_chat_templates(cfg, tokenizers: dict) -> dict:
    """Each model's tokenizer with its `chat_template` file (relative to the pipeline file) and
    `chat_template_kwargs` applied; models without chat options keep theirs as they are."""
    configured = {}
    for name, tokenizer in tokenizers.items():
        model = cfg.models[name]
        if model.chat_template is None and not model.chat_template_kwargs:
            configured[name] = tokenizer
            continue
        template = _read_template(name, model.chat_template, cfg.base_dir) if model.chat_template else None
        if isinstance(tokenizer, ByteTokenizer) and model.chat_template_kwargs:
            print(f"note: [models.{name}] chat_template_kwargs ({', '.join(model.chat_template_kwargs)}) do not "
                  "apply: the built-in byte tokenizer has one fixed chat format")
        configured[name] = tokenizer.with_chat_options(template, model.chat_template_kwargs)
    return configured


def _read_template(name: str, file: str, base_dir: str) -> str:
    path = Path(data_file_path(base_dir, file))
    if not path.is_file():
        raise ModelLoadError(f"[models.{name}] chat_template: no file {path} (relative paths start at the "
                             "pipeline file's directory)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as problem:
        raise ModelLoadError(f"[models.{name}] chat_template: {path} is not UTF-8 text ({problem})") from problem
    import jinja2

    try:
        jinja2.Environment().parse(text)  # a syntax error is named now, with its line, not at the first prompt
    except jinja2.TemplateSyntaxError as problem:
        raise ModelLoadError(f"[models.{name}] chat_template: {path}:{problem.lineno}: {problem.message}") from problem
    return text


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first index where the two id lists differ (the shorter one's length when one is a prefix of the other),
    None when they are equal."""
    for index, (left, right) in enumerate(zip(a, b)):
        if left != right:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def _around(tokenizer, ids: list[int], index: int) -> str:
    start = max(0, index - CONTEXT_TOKENS)
    before, after = tokenizer.decode(ids[start:index]), tokenizer.decode(ids[index:index + CONTEXT_TOKENS])
    return f"{'...' if start else ''}{before!r} | {after!r}"


def template_mismatch(student: tuple[str, object], teacher: tuple[str, object], prompts) -> str | None:
    """The first of `prompts` (PromptRecords rendered with the student's tokenizer) that the teacher renders to
    other ids, described; None when the first NUM_COMPARED agree."""
    (student_name, student_tokenizer), (teacher_name, teacher_tokenizer) = student, teacher
    for number, record in enumerate(list(prompts)[:NUM_COMPARED], start=1):
        student_ids = list(record.prompt_ids)
        try:
            teacher_ids = list(teacher_tokenizer.chat_ids(list(record.messages), add_generation_prompt=True))
        except (ModelLoadError, ValueError) as problem:
            return f"[models.{teacher_name}] cannot render prompt {number} ({record.location}): {problem}"
        index = first_difference(student_ids, teacher_ids)
        if index is not None:
            return (f"[models.{teacher_name}] renders prompt {number} ({record.location}) to other token ids than "
                    f"[models.{student_name}]: first difference at token {index} (student {len(student_ids)} ids, "
                    f"teacher {len(teacher_ids)}); around it ('|' marks the position) the student has "
                    f"{_around(student_tokenizer, student_ids, index)}, the teacher "
                    f"{_around(teacher_tokenizer, teacher_ids, index)}")
    return None


def check_template_agreement(cfg, tokenizers: dict, prompts) -> None:
    """Stop the run (ModelLoadError) when the teacher's chat template disagrees with the student's on the first
    prompts, unless the teacher allows it (then warn)."""
    from opdgraph.teachers import teacher_specs

    student = cfg.model_with_role("student")
    # Only a teacher that scores the student's ids: one that sees a prompt of its own renders it with its template.
    scoring = {spec.model for spec in teacher_specs(cfg.models, cfg.stages, cfg.data.max_prompt_tokens)
               if not spec.self_teacher and not spec.has_context}
    for teacher in sorted(scoring):
        _check_one_teacher(cfg, tokenizers, prompts, student, teacher)


def _check_one_teacher(cfg, tokenizers: dict, prompts, student: str, teacher: str) -> None:
    problem = template_mismatch((student, tokenizers[student]), (teacher, tokenizers[teacher]), prompts)
    if problem is None:
        return
    if cfg.models[teacher].allow_template_mismatch:
        print(f"warning: {problem} (allowed by [models.{teacher}] allow_template_mismatch = true)")
        return
    raise ModelLoadError(f"{problem}. The teacher scores the student's ids, so it would condition on a prompt format "
                         f"it was not trained on and its log-probs would be biased; give both models the same "
                         f"chat_template / chat_template_kwargs, or set allow_template_mismatch = true in "
                         f"[models.{teacher}] to run anyway")
