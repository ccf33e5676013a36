"""Build the cpubn Cython/OpenMP extensions.

Environment switches (all optional):
  CPUBN_FAIL_NO_OPENMP=1  a compiler without OpenMP is an error instead of a serial build (CI sets it)
  CPUBN_DEBUG=1           -O0 -g and Cython's bounds/wraparound/initialized checks on: a build
                          to step through in a debugger.  Those checks guard typed memoryview
                          indexing in the .pyx wrappers only; the kernels index raw pointers,
                          which no Cython check sees.  The memory checker for the kernels is
                          tools/sanitize.sh (AddressSanitizer + UndefinedBehaviorSanitizer).
  CPUBN_NATIVE=1          add -march=native (local builds only).  The default build is portable:
                          with GCC on x86-64 glibc Linux it compiles the loops for AVX-512, AVX2
                          and baseline x86-64 and picks one at run time (target_clones, see
                          CPUBN_CLONES in src/cpubn/_kernels/c/loops.h); other compilers and
                          platforms get the baseline instruction set only.
"""
import os
import shlex
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# src/ mirrors the package: the source of a compiled module is its dotted name as a path
# under src/ (src/cpubn/_kernels/forward.pyx builds cpubn._kernels.forward), so every .pyx
# found there is a module and no table lists them.
SOURCE_ROOT = Path("src")
KERNELS = SOURCE_ROOT / "cpubn" / "_kernels"
C_SOURCES = KERNELS / "c"        # hand-written and templated C: the only include folder

OPENMP_PROBE = r"""
#include <omp.h>
int main(void) {
    int n = 0;
    #pragma omp parallel reduction(+:n)
    n += 1;
    return n > 0 ? 0 : 1;
}
"""


def _env_flag(name):
    return os.environ.get(name, "") not in ("", "0", "false", "False")


def _openmp_flag_candidates(compiler_type):
    """(compile args, link args) to try, most likely first."""
    if compiler_type == "msvc":
        return [(["/openmp"], [])]
    if sys.platform == "darwin":
        # Apple clang has no -fopenmp driver flag; libomp comes from Homebrew or conda.
        return [(["-fopenmp"], ["-fopenmp"]),
                (["-Xpreprocessor", "-fopenmp"], ["-lomp"])]
    return [(["-fopenmp"], ["-fopenmp"])]


def _compiles_and_links(compiler, source, compile_args, link_args):
    # Compiled and linked as the extensions are (a shared object, through the same
    # compiler and linker commands, which carry the user's CFLAGS and LDFLAGS): a probe
    # linked differently can fail where the real build works, e.g. under -fsanitize.
    tmp = tempfile.mkdtemp(prefix="cpubn_probe_")
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(source.replace("int main(void)", "int cpubn_probe(void)"))
        objects = compiler.compile([src], output_dir=tmp, extra_postargs=compile_args)
        compiler.link_shared_object(objects, "probe.so", output_dir=tmp,
                                    extra_postargs=link_args)
        return True
    except Exception:
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class BuildExtWithOpenMP(build_ext):
    """Probe the real compiler for OpenMP once, then add the flags to every extension."""

    def build_extensions(self):
        compiler_type = self.compiler.compiler_type
        openmp = None
        for compile_args, link_args in _openmp_flag_candidates(compiler_type):
            if _compiles_and_links(self.compiler, OPENMP_PROBE, compile_args, link_args):
                openmp = (compile_args, link_args)
                break
        if openmp is None:
            message = ("cpubn: the C compiler does not support OpenMP; building a serial version. "
                       "Install an OpenMP runtime (libgomp / libomp) for multi-threaded kernels.")
            if _env_flag("CPUBN_FAIL_NO_OPENMP"):
                raise RuntimeError(message + " (CPUBN_FAIL_NO_OPENMP is set)")
            warnings.warn(message)
        for ext in self.extensions:
            ext.extra_compile_args += _optimization_flags(compiler_type)
            if openmp is not None:
                ext.extra_compile_args += openmp[0]
                ext.extra_link_args += openmp[1]
            # The user's CFLAGS come last, so that e.g. CFLAGS=-O1 wins over our -O3.
            ext.extra_compile_args += shlex.split(os.environ.get("CFLAGS", ""))
        super().build_extensions()

    def run(self):
        super().run()
        if not self.inplace:
            self._copy_into_source_tree()

    def _copy_into_source_tree(self):
        # From the checkout's root, `import cpubn` finds the source package before the
        # installed one (Python puts the current directory first on sys.path).  Placing
        # the compiled modules next to the sources too makes both copies complete, so the
        # README's commands work from any folder, the checkout included.
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            package_dir = os.path.abspath(build_py.get_package_dir(ext.name.rpartition(".")[0]))
            if not os.path.isdir(package_dir):
                continue
            built = self.get_ext_fullpath(ext.name)
            target = os.path.join(package_dir, os.path.basename(built))
            if os.path.abspath(built) != target:
                self.copy_file(built, target)


def _optimization_flags(compiler_type):
    if compiler_type == "msvc":
        return ["/Od", "/Zi"] if _env_flag("CPUBN_DEBUG") else ["/O2"]
    flags = ["-O0", "-g"] if _env_flag("CPUBN_DEBUG") else ["-O3"]
    # No contraction of a*b+c into FMA: the same source then gives the same bits on every
    # instruction-set clone, so results do not depend on which CPU runs them.
    flags += ["-ffp-contract=off", "-fno-math-errno"]
    # Cython emits every pairing of the kernels' fused types (data type x compute type x
    # parameter type); the entry points use six, and the compiler drops the rest.
    flags.append("-Wno-unused-function")
    if _env_flag("CPUBN_NATIVE"):
        flags.append("-march=native")
    return flags


# All Cython directives live here; CPUBN_DEBUG turns Cython's checks back on (memoryview
# indexing in the wrappers; the raw-pointer kernels are checked by tools/sanitize.sh).
_debug = _env_flag("CPUBN_DEBUG")
COMPILER_DIRECTIVES = {
    "language_level": 3,
    "boundscheck": _debug,
    "wraparound": _debug,
    "initializedcheck": _debug,
    "cdivision": True,
    "nonecheck": False,
    "embedsignature": True,
}


def generate_loop_layer(folder=KERNELS):
    """Render every *.tp template in ``folder`` and its subfolders with the table in
    loops_table.py beside them (Cython's Tempita, as scikit-learn does): the C loops of each
    data type, loops.pxd, and the compiled modules whose entry points dispatch on the
    table's type pairings.  A file is rewritten only when its text changes, so unchanged
    outputs keep their mtime."""
    import importlib.util

    from Cython import Tempita

    spec = importlib.util.spec_from_file_location("loops_table", folder / "loops_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    for template in sorted(folder.rglob("*.tp")):
        name = template.name
        text = Tempita.sub(template.read_text(), **table.NAMESPACE)
        target = template.with_suffix("")
        note = f"GENERATED by setup.py from {name} and loops_table.py: do not edit."
        text = (f"/* {note} */\n" if target.suffix == ".h" else f"# {note}\n") + text
        if target.exists() and target.read_text() == text:
            continue
        target.write_text(text)


def module_name(source):
    """The dotted name of the module a source under src/ builds: its path, without the suffix."""
    return ".".join(source.relative_to(SOURCE_ROOT).with_suffix("").parts)


generate_loop_layer()

extensions = [
    Extension(
        module_name(source),
        [source.as_posix()],
        include_dirs=[C_SOURCES.as_posix(), np.get_include()],
        depends=sorted(header.as_posix() for header in C_SOURCES.glob("*.h")),
        # Compiled against NumPy 2.0's C API: no API deprecated by 2.0, and modules that
        # load on every NumPy >= 2.0 (the runtime dependency), whatever NumPy builds them.
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_2_0_API_VERSION"),
                       ("NPY_TARGET_VERSION", "NPY_2_0_API_VERSION")],
    )
    for source in sorted(SOURCE_ROOT.rglob("*.pyx"))
]

setup(
    # include_path: package-qualified cimports (cpubn._kernels.loops) resolve under src/;
    # build_dir: the generated C stays out of the source tree.
    ext_modules=cythonize(extensions, compiler_directives=COMPILER_DIRECTIVES,
                          include_path=[SOURCE_ROOT.as_posix()], build_dir="build/cython"),
    cmdclass={"build_ext": BuildExtWithOpenMP},
)
