"""Bad inputs of the features that landed beside #24's first pass: best-of-N (`--candidates`,
`--rerank_weights`, `--keep_candidates` into a damaged folder), the adapter families (`--adapter` and each
family's settings), the device lists (`--auto_devices`, train.sh's `--devices`) and the HTML reports. Each is
one `error:` line and exit 2 before anything is written, or a run that reads past what is damaged."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import sample
import score
import train
from conftest import stop_at
from entrypoints import run_entry
from libs import devices
from libs.errors import run_cli
from libs.score.candidates import CANDIDATES_DIR, CANDIDATES_FILE
from libs.score.report import REPORT_HTML
from libs.train import train as train_fn
from libs.train_output import LOG_DIR, LOG_FILE, META_FILE, REPORT_FILE
from test_reliability import refused, sample_args, train_args


@pytest.fixture()
def prompts(tmp_path) -> Path:
    path = tmp_path / "boy1.json"
    path.write_text(json.dumps(["a photo of a boy"]))
    return path


# --- best-of-N ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, pattern", [
    (["--candidates", "0"], r"--candidates: must be >= 1, got 0"),
    (["--candidates", "-3"], r"--candidates: must be >= 1, got -3"),
    (["--candidates", "2.5"], r"--candidates: expected an integer, got '2\.5'"),
    (["--candidates", "2", "--rerank_weights", "1", "1"], r"rerank_weights takes 3 non-negative weights"),
    (["--candidates", "2", "--rerank_weights", "a", "1", "1"], r"--rerank_weights: expected a number, got 'a'"),
    (["--candidates", "2", "--rerank_weights", "nan", "1", "1"], r"--rerank_weights: must be a finite number"),
    (["--candidates", "2", "--rerank_weights", "-1", "1", "1"], r"--rerank_weights: must be >= 0"),
    (["--candidates", "2", "--rerank_weights", "0", "0", "0"], r"not all 0"),
    (["--candidates", "1", "--keep_candidates"], r"keep_candidates writes the candidates of best-of-N"),
])
def test_best_of_n_settings_that_cannot_be_meant(extra, pattern, tiny_config_file, personalization, photos, prompts,
                                                 tmp_path, capsys):
    out = tmp_path / "out"
    code = run_entry(sample, sample_args(tiny_config_file, personalization, prompts, out, "--reference_dir", photos,
                                         "--rerank_face_backend", "dlib", *extra))
    refused(capsys, code, pattern)
    assert not out.exists()


@pytest.mark.parametrize("damage, pattern", [
    ("candidates_is_a_file", r"--keep_candidates folder .*candidates is a file"),
    ("record_is_a_folder", r"candidates\.json is a folder, where --keep_candidates writes"),
])
def test_keep_candidates_into_a_damaged_folder_is_refused_before_rendering(damage, pattern, tiny_config_file,
                                                                          personalization, photos, prompts, tmp_path,
                                                                          capsys):
    out = tmp_path / "out"
    out.mkdir()
    if damage == "candidates_is_a_file":
        (out / CANDIDATES_DIR).write_text("not a folder")
    else:
        (out / CANDIDATES_FILE).mkdir()
    before = sorted(p.name for p in out.iterdir())
    code = run_entry(sample, sample_args(tiny_config_file, personalization, prompts, out, "--reference_dir", photos,
                                         "--rerank_face_backend", "dlib", "--candidates", "2", "--keep_candidates",
                                         "--skip_existing"))
    refused(capsys, code, pattern)
    assert sorted(p.name for p in out.iterdir()) == before


# --- adapter families ---------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, pattern", [
    (["--adapter", "lorax"], r"--adapter: invalid choice: 'lorax'"),
    (["--adapter", "loha", "--rank", "0"], r"--rank: must be >= 1, got 0"),
    (["--adapter", "vera", "--vera_rank", "0"], r"--vera_rank: must be >= 1, got 0"),
    (["--adapter", "lokr", "--lokr_factor", "-1"], r"--lokr_factor: must be >= 0, got -1"),
    (["--adapter", "dora", "--alpha", "nan"], r"--alpha: must be a finite number"),
    (["--adapter", "oft", "--oft_block_size", "7"], r"adapter oft cannot adapt .*not a multiple of --oft_block_size 7"),
])
def test_adapter_families_and_settings_out_of_range(extra, pattern, tiny_config_file, photos, tmp_path, capsys):
    out = tmp_path / "out"
    refused(capsys, run_entry(train, train_args(tiny_config_file, photos, out, *extra)), pattern)
    assert not out.exists()


# --- device lists -------------------------------------------------------------------------------------


@pytest.mark.parametrize("listed, pattern", [
    ("gpu0", r"unknown device 'gpu0'"),
    ("cpu,,cpu", r"has an empty item"),
    ("cpu,cpu,", r"has an empty item"),
    (",", r"is empty"),
    ("cuda:0", r"this machine has no usable CUDA GPU"),
    ("cuda:0,cuda:1", r"this machine has no usable CUDA GPU"),
    ("mps", r"mps is neither cpu nor cuda"),
])
def test_device_lists_that_name_no_device_here(listed, pattern, tiny_config_file, photos, tmp_path, capsys):
    if listed.startswith("cuda") and __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "out"
    code = run_entry(train, train_args(tiny_config_file, photos, out, "--auto_recipe", "--validation_steps", "1",
                                       "--auto_devices", listed))
    refused(capsys, code, pattern)
    assert not out.exists()
    try:  # train.sh --devices reads the same list through `python -m libs.devices`
        run_cli(lambda: devices.main([listed]))
    except SystemExit as exit_info:
        assert exit_info.code == 2
    refused(capsys, 2, pattern)


def test_cpu_devices_are_named_as_one_device_kind(capsys):
    run_cli(lambda: devices.main(["cpu, cpu:1"]))
    assert capsys.readouterr().out.splitlines() == ["cpu -", "cpu -"]


# --- HTML reports -------------------------------------------------------------------------------------


def test_train_refuses_a_folder_where_its_report_goes(tiny_config_file, photos, tmp_path, capsys):
    out = tmp_path / "out"
    (out / REPORT_FILE).mkdir(parents=True)
    refused(capsys, run_entry(train, train_args(tiny_config_file, photos, out)),
            rf"{REPORT_FILE} is a folder, where the run writes its report page")
    assert [p.name for p in out.iterdir()] == [REPORT_FILE]


def test_score_refuses_a_folder_where_its_report_goes_before_scoring(photos, tmp_path, capsys):
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "boy1.json").write_text(json.dumps(["a boy"]))
    outputs = tmp_path / "outputs"
    (outputs / REPORT_HTML).mkdir(parents=True)
    code = run_entry(score, ["--dataset", photos.parent, "--prompts", tmp_path / "prompts", "--outputs", outputs,
                             "--tasks", "boy1", "--face_backend", "dlib"])
    refused(capsys, code, rf"score report .*{REPORT_HTML} is a folder")
    assert [p.name for p in outputs.iterdir()] == [REPORT_HTML]


def test_a_damaged_log_does_not_stop_the_report_refresh_or_the_resume(tiny_config, photos, tmp_path):
    """The run report and the curves are redrawn from logs/train_log.jsonl at every validation: bytes damaged in it
    (a disk error, a line cut short) are left out, and the resumed run ends as usual."""
    config = tiny_config
    config.train.update({"with_prior_preservation": False, "train_step": 4, "checkpointing_steps": 2,
                         "validation_steps": 2, "validation_face_backend": "none", "log_every": 1})
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_fn(config, photos, out, on_step=stop_at(3))
    with open(out / LOG_DIR / LOG_FILE, "ab") as log:
        log.write(b"\xff\xfe{\"step\": 3, \"lo")
    train_fn(config, photos, out, resume="latest")
    steps = [json.loads(line)["step"] for line in (out / LOG_DIR / LOG_FILE).read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 4
    assert (out / REPORT_FILE).is_file() and (out / META_FILE).is_file()
