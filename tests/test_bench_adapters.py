"""bench/bench_adapters.py: each family measured in a process of its own at tiny size, the computed full-size
figures exact (they are the README's table), and the GPU path's arguments (no GPU here: only how they are
handled). Timing values are never checked."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import bench_adapters
from bench.common import RESULT_FIELDS

# the README's "What each counts" table: the U-ViT adapter at full size with the default targets and sizes
FULL_SIZE = {"lora": 24_496_128, "dora": 24_927_744, "loha": 48_992_256, "lokr": 701_056, "vera": 463_872,
             "oft": 5_175_264}


def test_computed_full_size_figures_are_exact_counts():
    for family, count in FULL_SIZE.items():
        line = bench_adapters.computed_family("full", family)
        assert line["computed"] is True and line["median_s"] is None and line["peak_mem_bytes"] is None
        assert line["trainable_parameters"] == count
        assert line["trained_state_bytes"] == 16 * count  # fp32 value + gradient + AdamW's two moments
        assert (line["buffer_bytes"] > 0) == (family in ("vera", "oft"))  # seeded projections, block indices
        assert line["sizes"]["embed_dim"] == 1536 and set(RESULT_FIELDS) - {"bench", "run_id", "time", "device",
                                                                             "device_name", "torch", "threads"} <= set(line)


@pytest.mark.slow
def test_each_family_is_measured_in_its_own_process(tmp_path: Path):
    rows = bench_adapters.main(["--size", "tiny", "--repeats", "1", "--warmup", "0", "--threads", "1", "--families",
                                "vera", "--computed-size", "tiny", "--results-dir", str(tmp_path)])
    lines = [json.loads(line) for line in (tmp_path / "bench_adapters.jsonl").read_text().splitlines()]
    assert [line["config"] for line in lines] == ["measured/lora", "measured/vera", "computed/lora", "computed/vera"]
    assert lines == rows and len({line["run_id"] for line in lines}) == 1
    measured, computed = {l["adapter"]: l for l in lines[:2]}, {l["adapter"]: l for l in lines[2:]}
    assert measured["lora"]["ratio_to_lora"] == 1.0 and measured["vera"]["ratio_to_lora"] > 0
    for family in ("lora", "vera"):
        line = measured[family]
        assert line["median_s"] > 0 and len(line["times_s"]) == 1 and line["computed"] is False
        assert line["peak_mem_bytes"] >= line["working_mem_bytes"] >= 0 and line["setup_peak_rss_bytes"] > 0
        assert line["mem_kind"] in ("cpu_peak_rss", "cpu_lifetime_peak_rss")
        # what the measured process trained is what the meta-device count says
        assert line["trainable_parameters"] == computed[family]["trainable_parameters"]
    assert computed["vera"]["trainable_parameters"] < computed["lora"]["trainable_parameters"]


def test_the_gpu_path_takes_its_arguments(tmp_path: Path):
    args = bench_adapters.parse_args(["--size", "full", "--device", "cuda", "--families", "dora", "oft",
                                      "--batch-size", "4", "--repeats", "5", "--results-dir", str(tmp_path)])
    command = bench_adapters.measure_command("dora", args, Path("dora.json"))
    for flag, value in (("--measure", "dora"), ("--size", "full"), ("--device", "cuda"), ("--batch-size", "4"),
                        ("--repeats", "5")):
        assert command[command.index(flag) + 1] == value
    if not torch.cuda.is_available():
        with pytest.raises(bench_adapters.BenchDeviceError, match="--device cuda: this machine has no usable CUDA GPU"):
            bench_adapters.run(args)
    with pytest.raises(SystemExit):
        bench_adapters.parse_args(["--families", "lora", "ia3"])
