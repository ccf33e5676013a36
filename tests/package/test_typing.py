"""The typed API: `mypy --strict` (pyproject's [tool.mypy]) passes on the package and on
the README's examples, the compiled modules' stubs match them, and every public name and
method is documented.  The two mypy runs take a few seconds each (a fresh cache)."""
import ast
import importlib
import inspect
import os
import pathlib
import re
import subprocess
import sys

import pytest

import cpubn

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
COMPILED = ("_kernels.forward", "_kernels.backward", "_kernels.runtime", "_kernels.arrays")

pytest.importorskip("mypy", reason="mypy is in the test extra")


def run_mypy(args, cache_dir):
    """mypy with pyproject's configuration, from the checkout's root, on the checkout's
    cpubn (MYPYPATH puts it before an installed copy)."""
    env = dict(os.environ, MYPYPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         "--cache-dir", str(cache_dir), "--no-error-summary", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return result.returncode, result.stdout + result.stderr


def test_mypy_strict_on_the_package(tmp_path):
    code, output = run_mypy([], tmp_path / "cache")     # files = ["cpubn"] in pyproject
    assert code == 0, f"mypy --strict on cpubn:\n{output}"


def test_mypy_strict_on_the_readme_examples(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks
    paths = []
    for i, block in enumerate(blocks):
        path = tmp_path / f"readme_block_{i}.py"
        path.write_text(block)
        paths.append(str(path))
    code, output = run_mypy(paths, tmp_path / "cache")
    assert code == 0, f"mypy --strict on README.md's python blocks:\n{output}"


def test_typing_files_ship_with_the_package():
    package = pathlib.Path(cpubn.__file__).parent
    assert (package / "py.typed").is_file()
    for name in COMPILED:
        assert (package / f"{name.replace('.', '/')}.pyi").is_file(), name


@pytest.mark.parametrize("name", COMPILED)
def test_compiled_module_stub_matches_the_module(name):
    """Each stub declares exactly the module's public functions, with their parameter
    names, kinds and defaults (the .pyx signatures, as Cython exposes them)."""
    module = importlib.import_module(f"cpubn.{name}")
    stub = ast.parse((ROOT / "cpubn" / f"{name.replace('.', '/')}.pyi").read_text())
    declared = {node.name: node for node in stub.body if isinstance(node, ast.FunctionDef)}
    compiled = {attr: obj for attr, obj in vars(module).items()
                if not attr.startswith("_") and callable(obj)
                and getattr(obj, "__module__", None) == module.__name__}
    assert sorted(declared) == sorted(compiled)
    for attr, function in compiled.items():
        actual = [(p.name, p.kind, "-" if p.default is p.empty else repr(p.default))
                  for p in inspect.signature(function).parameters.values()]
        args = declared[attr].args
        assert not (args.posonlyargs or args.vararg or args.kwonlyargs or args.kwarg), attr
        defaults = [None] * (len(args.args) - len(args.defaults)) + list(args.defaults)
        expected = [(a.arg, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                     "-" if d is None else repr(ast.literal_eval(d)))
                    for a, d in zip(args.args, defaults)]
        assert actual == expected, f"cpubn.{name}.{attr}"


def _public_callables():
    """(name, function) for every public name and every public method or property that
    a public class defines itself (__call__ included)."""
    for export in cpubn.__all__:
        obj = getattr(cpubn, export)
        yield export, obj
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_") and attr != "__call__":
                    continue
                if isinstance(member, (classmethod, staticmethod)):
                    member = member.__func__
                elif isinstance(member, property):
                    member = member.fget
                if callable(member):
                    yield f"{export}.{attr}", member


PUBLIC = list(_public_callables())


@pytest.mark.parametrize("name, obj", PUBLIC, ids=[name for name, _ in PUBLIC])
def test_public_names_have_docstrings(name, obj):
    """Its own docstring, not only one inherited from a base class's method."""
    assert (obj.__doc__ or "").strip(), f"{name} has no docstring"


def test_batchnorm_docstring_lists_its_attributes():
    doc = inspect.getdoc(cpubn.BatchNorm)
    attributes = doc[doc.index("Attributes:"):]
    for attr in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked",
                 "grad_weight", "grad_bias", "training", "num_features", "eps", "momentum",
                 "affine", "track_running_stats", "axis", "dtype", "activation"):
        assert re.search(rf"\b{attr}\b", attributes), attr
