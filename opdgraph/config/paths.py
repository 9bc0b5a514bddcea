"""Where a prompt file named in a pipeline is on disk: the one rule `plan` (config checks) and `run` (the prompt
loader, the checkpoint's config record) share, so a path that passes `plan` is the file the run reads.

A leading `~` is the user's home; a relative path starts at the pipeline file's directory (cfg.base_dir). Torch-free.
"""

from __future__ import annotations

import os


def missing_file_problems(listed, base_dir: str, problem) -> list:
    """A Problem for each (config path, prompt file) of `listed` that is not a file on disk (config checks)."""
    problems = []
    for path, file in listed:
        real = data_file_path(base_dir, file)
        if not os.path.isfile(real):
            what = "is a directory, not a file" if os.path.isdir(real) else "does not exist"
            problems.append(problem(path, f"prompt file {file!r} {what} (looked at {real}; relative paths start "
                                          f"at the pipeline file's directory)"))
    return problems


def data_file_path(base_dir: str, file: str) -> str:
    """The filesystem path of prompt file `file` of a pipeline whose file lies in `base_dir`."""
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(file)))
