"""The repository's kernels/ (installed as opdgraph.kernels) must not shadow Hugging Face's `kernels` package, which
transformers imports at startup, when the repository root is on sys.path (`python -m pytest`, `python -m opdgraph`
run from it), nor hand the name over in an endless loop when another spelling of the root, or another checkout, is on
sys.path too."""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_from_root(code: str, *flags: str, pythonpath: list[pathlib.Path] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(path) for path in pythonpath)}
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


def fake_installed_kernels(tmp_path: pathlib.Path) -> pathlib.Path:
    """A stand-in for Hugging Face's package: a `kernels` that says it is the installed one."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text('WHO = "installed"\n')
    return site


def test_top_level_kernels_is_the_installed_package(tmp_path):
    """If this fails, `import kernels` from the repository root finds our kernels/ instead of the installed package
    (then transformers' import fails with "cannot import name ... from 'kernels'")."""
    result = run_from_root("import kernels; print(kernels.WHO)", pythonpath=[fake_installed_kernels(tmp_path)])
    assert result.returncode == 0 and result.stdout.split() == ["installed"], result.stderr


def test_other_spellings_and_checkouts_of_ours_are_passed_over(tmp_path):
    """If this fails, a symlink to the root or a second checkout on sys.path (a worktree) is executed as `kernels`
    and hands over to the first again: RecursionError, or our module where the installed one is."""
    link = tmp_path / "link"
    link.symlink_to(ROOT)
    checkout = tmp_path / "checkout"
    (checkout / "kernels").mkdir(parents=True)
    for name in ("__init__.py", "fla_linear_attention.py"):
        (checkout / "kernels" / name).write_text((ROOT / "kernels" / name).read_text())
    site = fake_installed_kernels(tmp_path)
    (site / "opdgraph").mkdir()  # an opdgraph installed beside the package: that package is still not ours
    (site / "opdgraph" / "planned_paths.py").write_text("")
    result = run_from_root("import kernels; print(kernels.WHO)", pythonpath=[link, checkout, site])
    assert result.returncode == 0 and result.stdout.split() == ["installed"], result.stderr


def test_without_an_installed_package_ours_stays(tmp_path):
    """If this fails, `import kernels` raises where no other package of that name exists (-S: no site-packages);
    transformers 5.1x probes that import and would not catch it."""
    result = run_from_root("import kernels; print(kernels.triton_imports.__name__)", "-S",
                           pythonpath=[tmp_path / "link"])
    assert result.returncode == 0 and result.stdout.split() == ["triton_imports"], result.stderr


def test_transformers_and_our_kernels_import_from_the_root():
    """If this fails, a command run from the repository root cannot import transformers' layers next to ours."""
    result = run_from_root("import transformers.activations, opdgraph.kernels; print(opdgraph.kernels.triton_imports())")
    assert result.returncode == 0, result.stderr
