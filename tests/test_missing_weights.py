"""Every entry script stops at start, naming each missing weight file and the download command."""
from __future__ import annotations

import json

import pytest

import sample
import train
from entrypoints import run_entry


@pytest.fixture()
def config_without_weights(tiny_config_file, tmp_path):
    path = tmp_path / "no_weights.py"
    path.write_text(tiny_config_file.read_text().replace(
        "    return config\n",
        f"    config.paths.nnet = {str(tmp_path / 'gone' / 'uvit_v1.pth')!r}\n"
        f"    config.paths.autoencoder = {str(tmp_path / 'gone' / 'autoencoder_kl.pth')!r}\n"
        "    return config\n"))
    return path


def test_sample_py_names_missing_weights(config_without_weights, tmp_path, capsys):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(["a boy"]))
    code = run_entry(sample, ["--config", config_without_weights, "--restore_path", tmp_path,
                              "--prompt_path", prompts, "--output_path", tmp_path / "out"])
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err
    message = captured.err
    assert "uvit_v1.pth" in message and "autoencoder_kl.pth" in message and "python tools/download.py" in message
    assert "finetuned parameters" not in captured.out
    assert not (tmp_path / "out").exists()


def test_train_py_names_missing_weights(config_without_weights, tmp_path, public_photos, capsys):
    photos = tmp_path / "boy1"
    photos.mkdir()
    public_photos["astronaut"].save(photos / "a.jpg")
    code = run_entry(train, ["--config", config_without_weights, "-d", photos, "-o", tmp_path / "out",
                             "--no_prior_preservation"])
    err = capsys.readouterr().err
    assert code == 2
    assert "uvit_v1.pth" in err and "autoencoder_kl.pth" in err and "python tools/download.py" in err
    assert not (tmp_path / "out").exists()
