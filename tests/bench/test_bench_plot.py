"""The bench's figures and its busy-machine guard: every bench accepts --plot and --full,
the figure shows the spread of the repeats, and a busy machine is reported as such
instead of as a ratio.  Tiny shapes and few repeats; no timing is asserted."""
import json
import sys

import numpy as np
import pytest

from cpubn.bench import batchnorm, cli, contention, fused, half, harness, plot, report, sync

PNG = b"\x89PNG\r\n\x1a\n"
FAST = ["--repeats", "2", "--threads", "1", "--copy-mib", "1"]


def test_busy_reason_flags_a_disturbed_copy_and_a_huge_spread():
    quiet = {"copy": [1.0, 1.1, 1.05], "cpubn": [2.0, 2.2, 2.1]}
    assert harness.busy_reason(quiet, copy_name="copy") is None
    slow_copy = {"copy": [1.0, 1.6, 1.7], "cpubn": [2.0, 2.2, 2.1]}
    assert "copy baseline" in harness.busy_reason(slow_copy, copy_name="copy")
    spread = {"copy": [1.0, 1.0, 1.0], "cpubn": [2.0, 2.1, 9.0]}
    assert "cpubn's repeats spread 4.5x" in harness.busy_reason(spread, copy_name="copy")
    assert harness.busy_reason({"fused": [1.0, 3.5]}) is not None


def test_paired_ratios_pair_samples_of_the_same_round():
    assert harness.paired_ratios([2.0, 6.0], [1.0, 2.0]) == [2.0, 3.0]


def test_bar_spread_and_readable_ticks():
    b = plot.bar("r", "c", "case", "vs numpy", [1.0, 2.0, 3.0, 4.0, 100.0], median=2.5)
    assert b["median"] == 2.5 and b["min"] == 1.0 and b["max"] == 100.0
    assert b["q1"] == 2.0 and b["q3"] == 4.0
    assert plot.bar("r", "c", "case", "s", []) is None
    ticks = plot._ticks(0.8, 3.0)
    assert 1.5 in ticks and 2 in ticks and 1 in ticks        # not only decades
    assert 3 <= len(plot._ticks(0.3, 40)) <= 8
    assert 3 <= len(plot._ticks(0.01, 500)) <= 8


def test_main_bench_plot_and_spread(tmp_path):
    pytest.importorskip("matplotlib")
    png, path = tmp_path / "bench.png", tmp_path / "bench.json"
    rc = cli.main(["--shape", "4,8,5,5", "--shape", "16,8", "--no-tiny", "--plot", str(png),
                   "--json", str(path), *FAST])
    assert rc == 0 and png.read_bytes()[:8] == PNG
    results = json.loads(path.read_text())["results"]
    for r in results:
        assert len(r["speedup_samples_vs_numpy"]) == 2           # one ratio per repeat
        assert "busy" in r
    bars = [b for b in batchnorm.plot_bars({"results": results}) if b is not None]
    assert {b["col"] for b in bars} == {"train", "eval", "backward"}


def test_no_torch_summary_does_not_mention_torch(tmp_path, capsys):
    rc = cli.main(["--shape", "4,8,5,5", "--no-torch", "--no-tiny", *FAST])
    assert rc == 0
    out = capsys.readouterr().out
    summary = out[out.index("Summary:"):]
    assert "vs numpy" in summary and "torch" not in summary.split("\n\n")[0]


def test_a_busy_machine_is_reported_not_given_a_ratio(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(harness, "BUSY_SPREAD", 1.0)       # every case counts as busy
    path = tmp_path / "busy.json"
    rc = cli.main(["--shape", "4,8,5,5", "--layout", "nchw", "--ops", "eval", "--no-tiny",
                   "--json", str(path), *FAST])
    assert rc == 0
    out = capsys.readouterr().out
    assert "WARNING: this machine was visibly busy" in out
    assert "no result: the machine was busy" in out
    row = next(line for line in out.splitlines() if line.startswith("4x8x5x5"))
    # the vs-numpy ratio says busy (the vs-torch and vs-ort columns after it are "-" where
    # those peers are missing)
    assert row.split()[-3] == "busy"
    assert json.loads(path.read_text())["results"][0]["busy"]


def test_busy_summary_leaves_busy_cases_out():
    quiet = {"op": "eval", "layout": "nchw", "busy": None, "speedup_vs_numpy": 2.0,
             "speedup_vs_torch": None}
    noisy = dict(quiet, busy="cpubn's repeats spread 9.0x", speedup_vs_numpy=0.01)
    text = report.format_summary([quiet, noisy])
    assert "2.0x vs numpy" in text and "1 busy case left out" in text
    assert "0.0" not in text and "torch" not in text


@pytest.mark.parametrize("variant, extra", [
    ("--fused", []), ("--half", []),
    ("--contention", ["--samples", "3", "--quiet", "--layout", "nchw"]),
    ("--small-batch", ["--ghost", "2"]),
])
def test_every_variant_accepts_plot_and_full(variant, extra, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "variant.png"
    args = [variant, "--shape", "4,3,3,3", "--plot", str(png), *extra]
    if variant in ("--fused", "--half"):
        args += ["--repeats", "2", "--threads", "1", "--no-torch", "--layout", "nhwc"]
    if variant == "--small-batch":
        args += ["--repeats", "2", "--layout", "nchw"]
    if variant == "--contention":
        args += ["--no-torch"]
    assert cli.main(args + ["--full"]) == 0
    assert png.read_bytes()[:8] == PNG


@pytest.mark.parametrize("parser", [fused.build_parser, half.build_parser,
                                    contention.build_parser, sync._parser])
def test_variant_parsers_take_full_and_quick_but_not_both(parser):
    assert parser().parse_args(["--full", "--plot", "f.png"]).full
    with pytest.raises(SystemExit):
        parser().parse_args(["--full", "--quick"])


def test_sync_plot_from_a_report(tmp_path):
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(0)
    names = ("local", "sync", "sync alone", "local forward", "sync forward", "allgather")
    samples = {name: list(1e-3 * (1 + rng.random(3))) for name in names}
    case = {"shape": [8, 16], "layout": "nchw", "samples_s": samples,
            "medians_s": {name: float(np.median(s)) for name, s in samples.items()}}
    png = tmp_path / "sync.png"
    sync.save_plot({"processes": 2, "threads": 1, "cpubn": "x", "repeats": 3,
                    "cases": [case]}, png)
    assert png.read_bytes()[:8] == PNG


def test_plot_without_matplotlib_is_a_clear_error_for_variants(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["--fused", "--plot", "x.png", "--shape", "4,8"]) == 2
    assert "matplotlib" in capsys.readouterr().err
