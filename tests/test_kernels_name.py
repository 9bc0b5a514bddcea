"""The repository's kernels/ (installed as opdgraph.kernels) must not shadow Hugging Face's `kernels` package, which
transformers imports at startup, when the repository root is on sys.path (`python -m pytest`, `python -m opdgraph`
run from it)."""

import importlib.metadata
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_from_root(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def hf_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_top_level_kernels_is_the_installed_package_or_absent():
    """If this fails, `import kernels` from the repository root finds our kernels/ instead of Hugging Face's (then
    transformers' import fails with "cannot import name ... from 'kernels'"), or, where none is installed, raises
    (transformers 5.1x probes the import and would not catch it)."""
    result = run_from_root("import kernels, opdgraph.kernels as ours; print(kernels.__file__); print(ours.__file__)")
    if hf_kernels_installed():
        assert result.returncode == 0, result.stderr
        theirs, ours = result.stdout.split()
        assert not pathlib.Path(theirs).resolve().is_relative_to(ROOT), theirs
        assert pathlib.Path(ours).resolve() == ROOT / "kernels" / "__init__.py"
    else:
        assert result.returncode == 0, result.stderr


def test_transformers_and_our_kernels_import_from_the_root():
    """If this fails, a command run from the repository root cannot import transformers' layers next to ours."""
    result = run_from_root("import transformers.activations, opdgraph.kernels; print(opdgraph.kernels.triton_imports())")
    assert result.returncode == 0, result.stderr
