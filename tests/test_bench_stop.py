"""bench/bench_stop.py (the stop-time bound's two measurable parts) writes complete result lines."""
from __future__ import annotations

from pathlib import Path

import pytest

from bench import bench_stop
from test_bench import check_lines, read_lines

ARGS = ["--size", "tiny", "--threads", "1", "--repeats", "1"]


def test_the_checkpoint_write_is_measured_through_the_real_writer(tmp_path: Path) -> None:
    [row] = bench_stop.main([*ARGS, "--parts", "write", "--results-dir", str(tmp_path)])
    check_lines(read_lines(tmp_path, "bench_stop"), "bench_stop", ("host_copy_s", "checkpoint_bytes", "trained_values"))
    holder, _, _, ema = bench_stop.trained_state("tiny")
    values = sum(p.numel() for p in holder.parameters())
    assert row["trained_values"] == values and len(ema) == len(list(holder.parameters()))
    # weights + EMA in fp32, AdamW's two moments: at least 4 copies of the trained values on disk
    assert row["checkpoint_bytes"] >= 4 * 4 * values


@pytest.mark.slow
def test_the_stop_latency_of_a_real_process_is_measured(tmp_path: Path) -> None:
    [row] = bench_stop.main([*ARGS, "--parts", "signal", "--results-dir", str(tmp_path)])
    check_lines(read_lines(tmp_path, "bench_stop"), "bench_stop", ())
    assert 0 < row["times_s"][0] < 60
