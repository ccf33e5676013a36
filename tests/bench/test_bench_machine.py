"""What the bench says about the machine it ran on: the instruction set of the kernel
loops the loader picked (cpubn._kernels.runtime.kernel_isa) and the data caches, which decide how
the same build's ratios come out on different servers."""

import platform

import pytest

from cpubn._core import machine as _machine
from cpubn._kernels import runtime
from cpubn.bench import cli, harness


def cpuinfo_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def test_kernel_isa_is_the_clone_this_cpu_supports():
    isa = runtime.kernel_isa()
    assert isa in {"avx512f", "avx2", "default", "native"}
    flags = cpuinfo_flags()
    if isa == "native" or flags is None or platform.machine() != "x86_64":
        pytest.skip("a single-target build or no /proc/cpuinfo: nothing to compare with")
    # The ifunc resolver's order of priority: the widest instruction set the CPU has.
    expected = "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "default"
    assert isa == expected


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def fake_cache(root, index, level, kind, size):
    write(root / f"index{index}" / "level", str(level))
    write(root / f"index{index}" / "type", kind)
    write(root / f"index{index}" / "size", size)


def test_data_caches_read_from_sysfs(tmp_path):
    fake_cache(tmp_path, 0, 1, "Data", "32K")
    fake_cache(tmp_path, 1, 1, "Instruction", "64K")     # not a data cache: left out
    fake_cache(tmp_path, 2, 2, "Unified", "512K")
    fake_cache(tmp_path, 3, 3, "Unified", "8192K")
    write(tmp_path / "uevent", "")
    assert _machine.data_caches(str(tmp_path)) == {"L1": 32 << 10, "L2": 512 << 10,
                                                   "L3": 8 << 20}


def test_data_caches_skip_what_they_cannot_read(tmp_path):
    fake_cache(tmp_path, 0, 1, "Data", "48K")
    fake_cache(tmp_path, 2, 2, "Unified", "lots")          # unparsable size
    write(tmp_path / "index3" / "level", "3")              # no type, no size
    assert _machine.data_caches(str(tmp_path)) == {"L1": 48 << 10}
    assert _machine.data_caches(str(tmp_path / "missing")) == {}


def test_last_level_cache_is_the_highest_level_known():
    assert _machine.last_level_cache_bytes({"L1": 32 << 10, "L2": 512 << 10,
                                            "L3": 8 << 20}) == 8 << 20
    assert _machine.last_level_cache_bytes({"L1": 48 << 10, "L2": 2 << 20}) == 2 << 20
    assert _machine.last_level_cache_bytes({}) == 0


def test_machine_label():
    m = {"cpu": "AMD EPYC", "usable_cpus": 2, "kernels": "avx2",
         "caches": {"L1": 32 << 10, "L2": 512 << 10, "L3": 8 << 20}}
    assert harness.machine_label(m) == "AMD EPYC (2 usable CPUs; avx2 kernels; L2 512 KiB, L3 8 MiB)"
    m = {"cpu": "AMD EPYC", "usable_cpus": 2, "kernels": "avx512f", "caches": {"L2": 1 << 20}}
    assert harness.machine_label(m) == "AMD EPYC (2 usable CPUs; avx512f kernels; L2 1 MiB)"
    # A report written before the machine record had these fields.
    assert harness.machine_label({"cpu": "x", "usable_cpus": 4}) == "x (4 usable CPUs)"


def test_machine_info_records_kernels_and_caches():
    import cpubn
    m = harness.machine_info(cpubn, None)
    assert m["kernels"] == runtime.kernel_isa()
    assert m["caches"] == _machine.data_caches()


def test_bench_header_names_the_kernels(tmp_path, capsys):
    rc = cli.main(["--quick", "--shape", "4,8,5,5", "--layout", "nchw", "--ops", "eval",
                   "--repeats", "2", "--threads", "1", "--copy-mib", "1", "--no-torch",
                   "--no-onnxruntime", "--json", str(tmp_path / "b.json")])
    assert rc == 0
    header = [line for line in capsys.readouterr().out.splitlines()
              if line.startswith("cpubn ") and " bench on " in line]
    assert header and f"{runtime.kernel_isa()} kernels" in header[0]
