"""analysis.sweep on Dask writes the serial run's files byte for byte."""
import pytest

from analysis import sweep

pytest.importorskip("dask.distributed")

GPU = "rtx3060-12gb"


def test_dask_sweep_reproduces_serial_csv_byte_for_byte(tiny_trace, tmp_path):
    from dask.distributed import LocalCluster

    serial, on_dask = tmp_path / "serial", tmp_path / "dask"
    serial.mkdir()
    on_dask.mkdir()  # sweep.main refuses a missing --out folder
    sweep.main([str(tiny_trace), "--name", "tiny", "--quick", "--gpu", f"{GPU},rtx4070-12gb", "--out", str(serial),
                "-q", "--scheduler", "serial"])
    # an existing cluster, reached by its address as a remote one would be (two worker processes)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        sweep.main([str(tiny_trace), "--name", "tiny", "--quick", "--gpu", f"{GPU},rtx4070-12gb",
                    "--out", str(on_dask), "-q", "--scheduler", cluster.scheduler_address])
    for name in ("tiny.csv", "tiny.per_layer.csv"):
        assert (on_dask / name).read_bytes() == (serial / name).read_bytes(), name
    assert len((serial / "tiny.csv").read_text().splitlines()) > 10


def test_bad_scheduler_is_one_line_exit_2(tiny_trace, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        sweep.main([str(tiny_trace), "--name", "x", "--quick", "--out", str(tmp_path), "--scheduler", "nowhere"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--scheduler" in err[0]
    assert not list(tmp_path.iterdir())
