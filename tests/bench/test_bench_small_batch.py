"""python -m cpubn bench --small-batch: runs, reports every layer, checks its options
(no timing is asserted)."""
import pytest

from cpubn.bench.cli import main as bench_main


def test_small_batch_bench_reports_each_layer(capsys):
    assert bench_main(["--small-batch", "--shape", "8,4,3,3", "--ghost", "3",
                       "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "nchw" in out and "nhwc" in out
    for name in ("BatchNorm", "BatchRenorm", "GhostBatchNorm(3)"):
        assert out.count(f"{name} ") == 2
    assert "1.00x" in out                                   # BatchNorm against itself


@pytest.mark.parametrize("bad", [["--repeats", "0"], ["--ghost", "0"], ["--shape", "8"]])
def test_small_batch_bench_bad_options(bad):
    with pytest.raises(SystemExit):
        bench_main(["--small-batch"] + bad)
