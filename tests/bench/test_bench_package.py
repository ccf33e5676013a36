"""The layout of cpubn.bench: imports go one way (harness <- peers, report <- plot <- the
benches <- cli), so a change to a variant or to the command line cannot reach the harness
through an import circle.  Checked on the sources, without importing them."""
import ast
import pathlib

import cpubn

BENCH_DIR = pathlib.Path(cpubn.__file__).resolve().parent / "bench"

# Each module and the bench modules it may import (directly).
ALLOWED = {
    "harness": set(),
    "peers": {"harness"},
    "report": {"harness"},
    "plot": {"harness", "report"},
    "batchnorm": {"harness", "peers", "plot"},
    "fused": {"harness", "report", "plot"},
    "half": {"harness", "report", "plot"},
    "contention": {"harness", "peers", "report", "plot"},
    "sync": {"harness", "report", "plot"},
    "small_batch": {"harness", "report", "plot"},
    "cli": {"harness", "batchnorm", "report", "plot"},
    "__init__": {"cli"},
}


def bench_imports(path):
    """The cpubn.bench modules that the module at ``path`` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:                          # from .x import y / from . import x
                names = [node.module] if node.module else [a.name for a in node.names]
            elif node.module and node.module.startswith("cpubn.bench"):
                rest = node.module[len("cpubn.bench"):].lstrip(".")
                names = [rest] if rest else [a.name for a in node.names]
            else:
                continue
            found.update(n.split(".")[0] for n in names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[2] for a in node.names
                         if a.name.startswith("cpubn.bench."))
    return found


def test_every_module_is_known():
    modules = {p.stem for p in BENCH_DIR.glob("*.py")}
    assert modules == set(ALLOWED)


def test_imports_go_one_way():
    for name, allowed in ALLOWED.items():
        imported = bench_imports(BENCH_DIR / f"{name}.py") - {"_copy"}
        assert imported <= allowed, f"cpubn.bench.{name} imports {sorted(imported - allowed)}"


def test_the_allowed_graph_has_no_circle():
    """ALLOWED itself is layered, so the test above forbids every circle."""
    done, visiting = set(), set()

    def visit(name):
        assert name not in visiting, f"import circle through {name}"
        if name in done:
            return
        visiting.add(name)
        for other in ALLOWED[name]:
            visit(other)
        visiting.discard(name)
        done.add(name)

    for name in ALLOWED:
        visit(name)


def test_the_cli_dispatches_to_every_variant():
    from cpubn.bench import cli
    assert set(cli.VARIANTS.values()) == {"fused", "half", "small_batch", "contention", "sync"}
    assert all((BENCH_DIR / f"{m}.py").exists() for m in cli.VARIANTS.values())


def test_no_bench_code_left_in_the_library():
    """The bench's parallel copy is not part of the thread-control module."""
    from cpubn._kernels import runtime
    assert not hasattr(runtime, "copy_parallel") and not hasattr(runtime, "omp_num_procs")
