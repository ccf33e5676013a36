"""The folder says the layer (STYLE.md 20): imports point down the house, never up, and
no module imports itself back through others.

    _kernels  <-  _core  <-  _layers  <-  functional, fold, porting  <-  __init__
                                                          <-  __main__, bench, examples

A folder may import its own modules and any folder below it.  Checked on the sources,
lazy imports inside functions included, without importing them.  The compiled modules
(src/cpubn/_kernels/*.pyx) import nothing of cpubn's Python code by construction: they
are checked through their sources' cimports instead.
"""
import ast
import pathlib
import re

# The checkout's sources (the tests may run against an installed copy of the package).
ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "cpubn"
SOURCES = ROOT / "src" / "cpubn"

# The rank of each unit: a module may import units of its own rank or lower.
RANKS = {"_kernels": 0, "_core": 1, "_layers": 2, "functional": 3, "fold": 3, "porting": 3,
         "__init__": 4, "__main__": 5, "bench": 5, "examples": 5}


def unit_of(module):
    """The unit of a dotted module name under cpubn ("cpubn._core.threads" -> "_core")."""
    parts = module.split(".")
    assert parts[0] == "cpubn", module
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path):
    """The cpubn modules that the module at ``path`` imports, at any depth of its code."""
    name = module_name(path)
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "cpubn")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "cpubn":
                target = node.module
            else:
                continue
            # `from . import x` names a module; `from .x import y` names x.
            found.update(f"{target}.{a.name}" if node.module is None else target
                         for a in node.names)
    return found


def python_modules():
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_unit_has_a_rank():
    units = {unit_of(name) for name in python_modules()}
    assert units == set(RANKS)


def test_imports_point_down():
    for name, path in python_modules().items():
        rank = RANKS[unit_of(name)]
        for target in imported_modules(path):
            assert RANKS[unit_of(target)] <= rank, f"{name} imports {target}, a layer above it"


def test_no_import_cycles():
    graph = {name: {t for t in imported_modules(path) if t != name}
             for name, path in python_modules().items()}
    done, visiting = set(), []

    def visit(name):
        if name in done:
            return
        assert name not in visiting, f"import cycle: {' -> '.join(visiting + [name])}"
        visiting.append(name)
        for target in graph.get(name, ()):
            visit(target)
        visiting.pop()
        done.add(name)

    for name in graph:
        visit(name)


def test_compiled_sources_cimport_only_kernel_declarations():
    """Every project cimport is package-qualified, and names a .pxd under src/ that exists."""
    pattern = re.compile(r"^\s*(?:from\s+([\w.]+)\s+cimport|cimport\s+([\w.]+))", re.M)
    external = ("libc", "cython", "numpy", "openmp", "cpython")
    sources = [p for p in SOURCES.rglob("*") if p.suffix in (".pyx", ".pxd", ".tp")]
    assert sources
    for path in sources:
        for match in pattern.finditer(path.read_text()):
            module = match.group(1) or match.group(2)
            if module.split(".")[0] in external:
                continue
            assert module.startswith("cpubn._kernels."), f"{path.name}: cimport {module}"
            declaration = SOURCES.parent / (module.replace(".", "/") + ".pxd")
            template = declaration.with_name(declaration.name + ".tp")
            assert declaration.exists() or template.exists(), f"{path.name}: {module}"
