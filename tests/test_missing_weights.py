"""Every entry script stops at start, naming each missing weight file and the download command."""
from __future__ import annotations

import json

import pytest

import sample
import train


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
    with pytest.raises(SystemExit) as error:
        sample.main(sample.parse_args(["--config", str(config_without_weights), "--restore_path", str(tmp_path),
                                       "--prompt_path", str(prompts), "--output_path", str(tmp_path / "out")]))
    message = str(error.value)
    assert "uvit_v1.pth" in message and "autoencoder_kl.pth" in message and "python -m libs.download" in message
    assert "finetuned parameters" not in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_train_py_names_missing_weights(config_without_weights, tmp_path, public_photos, capsys):
    photos = tmp_path / "boy1"
    photos.mkdir()
    public_photos["astronaut"].save(photos / "a.jpg")
    code = train.main(train.parse_args(["--config", str(config_without_weights), "-d", str(photos),
                                        "-o", str(tmp_path / "out"), "--no_prior_preservation"]))
    err = capsys.readouterr().err
    assert code != 0
    assert "uvit_v1.pth" in err and "autoencoder_kl.pth" in err and "python -m libs.download" in err
    assert not (tmp_path / "out").exists()
