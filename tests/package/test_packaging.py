"""The package as a user receives it: ``python -m build`` makes the sdist, then the wheel
from the sdist (so the sdist must carry every source, header, .pxd and template the build
needs), and the wheel, installed into a fresh virtual environment, imports and computes.

One build (about half a minute, compiled at -O0: this checks packaging, not speed) serves
every test here.  Deselect with ``-m "not packaging"``.
"""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

pytestmark = pytest.mark.packaging

ROOT = pathlib.Path(__file__).resolve().parents[2]
VERSION = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)


def _checkout_files():
    """The checkout's files as git sees them (tracked, and untracked but not ignored):
    what a clean clone holds, without build outputs or virtual environments."""
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs a git checkout of cpubn")
    listing = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    return [name for name in listing.split("\0") if name and (ROOT / name).is_file()]


def _run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _clean_env(**extra):
    """The environment without PYTHONPATH: nothing may import the checkout's cpubn."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(sdist path, wheel path, checkout file list) from one build of a copy of the
    checkout, with this environment's setuptools, Cython and NumPy (the ``test`` extra)."""
    pytest.importorskip("build", reason="the test extra installs build")
    files = _checkout_files()
    work = tmp_path_factory.mktemp("packaging")
    source = work / "source"
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    dist = work / "dist"
    # Without --sdist/--wheel, build makes the sdist and then the wheel from the unpacked sdist.
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(source)],
         env=_clean_env(CFLAGS="-O0 -g0", CPUBN_FAIL_NO_OPENMP="1"))
    (sdist,) = dist.glob("cpubn-*.tar.gz")
    (wheel,) = dist.glob("cpubn-*.whl")
    return sdist, wheel, files


def test_sdist_carries_every_build_input(built):
    sdist, _, files = built
    with tarfile.open(sdist) as archive:
        top = archive.getnames()[0].split("/")[0]
        names = {name[len(top) + 1:] for name in archive.getnames()}
    needed = {"LICENSE", "CHANGELOG.md", "README.md", "pyproject.toml", "setup.py",
              "MANIFEST.in"}
    needed |= {name for name in files
               if name.startswith("src/") or (name.startswith("cpubn/")
                                              and name.endswith((".py", ".pyi", "py.typed")))}
    assert sorted(needed - names) == []
    assert any(name.endswith(".pxd") for name in needed)      # the check covers the .pxd files


def test_wheel_holds_modules_license_and_metadata(built):
    _, wheel, files = built
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(metadata_name).decode()
    # Each Cython source (or template of one) under src/ is the module of the same path.
    kernels = {name[len("src/"):].split(".")[0].replace("/", ".") for name in files
               if name.startswith("src/") and name.endswith((".pyx", ".pyx.tp"))}
    compiled = {n.split(".")[0].replace("/", ".") for n in names
                if n.startswith("cpubn/") and n.endswith((".so", ".pyd"))}
    assert "cpubn._kernels.forward" in kernels and compiled == kernels
    python_files = {name for name in files if name.startswith("cpubn/") and name.endswith(".py")}
    assert sorted(python_files - names) == []
    # PEP 561: the typing marker and the compiled modules' stubs.
    typing_files = {name for name in files
                    if name.startswith("cpubn/") and name.endswith((".pyi", "py.typed"))}
    assert "cpubn/py.typed" in typing_files and sorted(typing_files - names) == []
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: BSD-3-Clause" in metadata
    assert "Requires-Dist: numpy>=2" in metadata
    assert not any(n.startswith(("src/", "tests/")) for n in names)


@pytest.fixture(scope="module")
def fresh_env(built, tmp_path_factory):
    """A new virtual environment with the wheel installed (no network: NumPy is this
    environment's, reached through a folder that holds nothing else)."""
    numpy = pytest.importorskip("numpy")
    _, wheel, _ = built
    work = tmp_path_factory.mktemp("venv")
    venv = work / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
          "--no-index", "--no-cache-dir", str(wheel)], env=_clean_env())
    numpy_only = work / "numpy_only"
    numpy_only.mkdir()
    site = pathlib.Path(numpy.__file__).resolve().parent.parent
    for entry in site.iterdir():          # numpy and its bundled libraries (numpy.libs)
        if entry.name == "numpy" or entry.name.startswith("numpy.libs"):
            (numpy_only / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    site_packages = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         env=_clean_env()).stdout.strip()
    pathlib.Path(site_packages, "numpy_only.pth").write_text(f"{numpy_only}\n")
    return venv, python, work


def test_installed_wheel_imports_and_computes(fresh_env):
    venv, python, work = fresh_env
    code = """if True:
        import json, numpy as np, cpubn
        x = np.random.default_rng(0).standard_normal((16, 3, 5, 5)).astype(np.float32) * 4 + 2
        bn = cpubn.BatchNorm(3)
        y = bn(x)
        dx = bn.backward(np.ones_like(y))
        print(json.dumps({"file": cpubn.__file__, "version": cpubn.__version__,
                          "mean": float(np.abs(y.mean(axis=(0, 2, 3))).max()),
                          "std": float(y.std(axis=(0, 2, 3)).mean()),
                          "dx": float(np.abs(dx).max()), "openmp": cpubn.openmp_enabled()}))
    """
    out = json.loads(_run([str(python), "-c", code], cwd=work, env=_clean_env()).stdout)
    assert pathlib.Path(out["file"]).resolve().is_relative_to(venv.resolve())
    assert out["version"] == VERSION
    assert out["mean"] < 1e-5 and abs(out["std"] - 1) < 1e-3 and out["dx"] < 1e-4
    assert out["openmp"] is True


def test_installed_wheel_command_line(fresh_env):
    _, python, work = fresh_env
    result = _run([str(python), "-m", "cpubn", "info"], cwd=work, env=_clean_env())
    assert f"cpubn {VERSION}" in result.stdout
