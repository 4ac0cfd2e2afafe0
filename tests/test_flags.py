"""Flags generated from the config (libs/flags.py) as train.py uses them: every config.train key is a flag
whose help is the key's comment in the config file and shows the default, the reference entry's and older
spellings still work, bools come in --key / --no_key pairs, tuples take several values, and numbers
outside their range stop the parse with exit status 2 and the flag's name, never a traceback."""
from __future__ import annotations

import argparse
import re
import shlex

import pytest

import train as train_script
from entrypoints import run_entry
from libs.config import DEFAULT_CONFIG, KEY_RANGES, config_path, load_config
from libs.flags import add_config_flags, block_keys, key_comments, overrides

BASE = ["-d", "train_data/boy1", "-o", "model_output/boy1"]


def config_of(argv: list[str]):
    """The config train.py's main() would train with for this command line."""
    return train_script.config_from_args(train_script.parse_args(argv))


def train_block_comments() -> dict[str, str]:
    """The inline comment of each key in the config file's `config.train = d(...)`, read without libs.flags."""
    source = config_path(DEFAULT_CONFIG).read_text()
    block = source[source.index("config.train = d("):]
    block = block[:block.index("\n    )\n")]
    return dict(re.findall(r"^ {8}(\w+)=.*?  # (.*)$", block, re.M))


def shown(value) -> str:
    if isinstance(value, tuple):
        return shlex.join(value)
    return shlex.quote(value) if isinstance(value, str) else str(value)


def test_help_lists_every_train_key_with_its_comment_and_default(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")  # one line per help text: nothing wrapped
    assert run_entry(train_script, ["--help"]) == 0
    text = capsys.readouterr().out
    section = text[text.index("\nsettings:"):]
    config = load_config(DEFAULT_CONFIG)
    comments = train_block_comments()
    assert set(comments) == set(config.train)  # every key carries its comment
    for key, value in config.train.items():
        start = re.search(rf"^  --{key}\b", section, re.M)
        assert start, f"no flag --{key}"
        end = section.find("\n  --", start.end())
        entry = " ".join(section[start.start():end if end > 0 else None].split())
        assert f" {comments[key]} (" in entry, key
        assert f"default: {shown(value)})" in entry, key
    assert "(~+50% compute)" in section  # a % in a comment survives argparse's formatting
    assert re.search(r"^  --with_prior_preservation, --no_with_prior_preservation, --no_prior_preservation$",
                     section, re.M)
    assert re.search(r"^  --hflip, --no_hflip ", section, re.M)


def test_every_numeric_train_key_has_a_range():
    config = load_config(DEFAULT_CONFIG)
    numeric = [key for key, value in config.train.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)]
    assert numeric and [key for key in numeric if f"train.{key}" not in KEY_RANGES] == []


def test_flags_set_their_keys_and_absent_flags_keep_the_config_file_values(tiny_config_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = config_of(["--config", str(tiny_config_file), *BASE])
    assert config.train.train_step == 8 and config.train.crop == "center"  # tiny's own values, not the defaults
    config = config_of(["--config", str(tiny_config_file), *BASE, "--train_step", "3", "--lr", "2e-3",
                        "--text_encoder_mode", "lora", "--cache_dir", "cache", "--seed", "7", "--resolution", "128",
                        "--nnet_path", "weights/uvit.pth"])
    assert (config.train.train_step, config.train.lr, config.train.text_encoder_mode) == (3, 2e-3, "lora")
    assert config.train.cache_dir == str(tmp_path / "cache")  # path keys given here: relative to the cwd
    assert (config.seed, config.resolution, config.paths.nnet) == (7, 128, str(tmp_path / "weights/uvit.pth"))


def test_reference_entry_spellings():
    args = train_script.parse_args(["--instance_data_dir", "photos/boy1", "-o", "out"])
    assert args.data == "photos/boy1"
    config = config_of([*BASE, "--with_prior_preservation", "--class_data_dir", "/data/class_boy",
                        "--instance_prompt", "a {token} {class_word}", "--class_prompt", "a boy",
                        "--prior_loss_weight", "0.2", "--num_class_images", "50", "--modifier_token", "<sks>",
                        "--initializer_token", "man", "--train_step", "300", "--hflip"])
    cfg = config.train
    assert cfg.with_prior_preservation and cfg.hflip and cfg.class_data_dir == "/data/class_boy"
    assert (cfg.instance_prompt, cfg.class_prompt, cfg.prior_loss_weight) == ("a {token} {class_word}", "a boy", 0.2)
    assert (cfg.num_class_images, cfg.modifier_token, cfg.initializer_token) == (50, "<sks>", "man")
    assert cfg.train_step == 300


def test_switches_come_in_pairs_and_the_last_one_wins():
    off = config_of([*BASE, "--no_prior_preservation", "--no_hflip", "--no_cache_latents"]).train
    assert (off.with_prior_preservation, off.hflip, off.cache_latents) == (False, False, False)
    assert config_of([*BASE, "--no_with_prior_preservation"]).train.with_prior_preservation is False
    on = config_of([*BASE, "--gradient_checkpointing", "--compile", "--keep_checkpoints"]).train
    assert on.gradient_checkpointing and on.compile and on.keep_checkpoints
    assert config_of([*BASE, "--no_hflip", "--hflip"]).train.hflip is True
    assert config_of([*BASE, "--hflip", "--no_hflip"]).train.hflip is False
    assert config_of(BASE).train.hflip is True  # the config's value


def test_tuple_keys_take_several_values():
    cfg = config_of([*BASE, "--lora_targets", "qkv", "patch_embed.proj", "--validation_edit_prompts",
                     "a photo of a {class_word}", "a {class_word} at the beach"]).train
    assert cfg.lora_targets == ("qkv", "patch_embed.proj")
    assert cfg.validation_edit_prompts == ("a photo of a {class_word}", "a {class_word} at the beach")


@pytest.mark.parametrize("flag, value, message", [
    ("--lr", "nan", "must be a finite number"),
    ("--lr", "-1", "must be > 0"),
    ("--text_lr", "inf", "must be a finite number"),
    ("--rank", "0", "must be >= 1"),
    ("--train_step", "2.5", "expected an integer"),
    ("--batch_size", "0", "must be >= 1"),
    ("--num_vectors", "0", "must be >= 1"),
    ("--prior_loss_weight", "-0.5", "must be >= 0"),
    ("--lora_dropout", "1", r"must be in \[0, 1\)"),
    ("--seed", "-1", "must be in"),
    ("--crop", "left", "invalid choice"),
    ("--lora_targets", "attn", "invalid choice"),
])
def test_bad_numbers_exit_2_naming_the_flag(tmp_path, capsys, flag, value, message):
    out = tmp_path / "out"
    assert run_entry(train_script, ["-d", tmp_path / "boy1", "-o", out, flag, value]) == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: " in err and re.search(message, err) and "Traceback" not in err
    assert not out.exists()


def test_out_of_range_values_in_a_config_file_are_refused(tiny_config_file, tmp_path, capsys):
    bad = tmp_path / "bad_config.py"
    bad.write_text(tiny_config_file.read_text().replace(
        "    return config\n", "    config.train.rank = 0\n    config.train.lr = float('nan')\n    return config\n"))
    photos = tmp_path / "boy1"
    photos.mkdir()
    assert run_entry(train_script, ["--config", bad, "-d", photos, "-o", tmp_path / "out"]) == 2
    err = capsys.readouterr().err
    assert "train.rank must be >= 1, got 0" in err and "train.lr must be a finite number" in err
    assert not (tmp_path / "out").exists()


def test_key_comments_and_flags_for_any_block(tmp_path):
    """What sample.py needs for `config.sample`: comments of any block, flags, ranges, overrides."""
    source = tmp_path / "demo_config.py"
    source.write_text(
        "def get_config():\n"
        "    config = ml_collections.ConfigDict()\n"
        "    config.seed = 3  # the seed\n"
        "    # --- a section heading, no key's comment ---\n"
        "    config.sample = d(\n"
        "        # about the next keys\n"
        "        steps=50,  # solver steps\n"
        "        scale=7.0,\n"
        "        modes=(  # several values\n"
        "            'a',\n"
        "        ),\n"
        "    )\n"
        "    config.sample.update(steps=9)  # not an assignment\n"
        "    return config\n")
    assert key_comments(source) == {"seed": "the seed", "sample.steps": "solver steps",
                                    "sample.modes": "several values"}

    config = load_config(DEFAULT_CONFIG)
    parser = argparse.ArgumentParser()
    add_config_flags(parser, config, block_keys(config, "sample"), key_comments(config_path(DEFAULT_CONFIG)),
                     choices={"sample.cfg_mode": ("true_uncond", "empty_token")})
    assert overrides(parser.parse_args([])) == {}
    assert overrides(parser.parse_args(["--scale", "3", "--cfg_mode", "empty_token"])) == {
        "sample.scale": 3.0, "sample.cfg_mode": "empty_token"}
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--steps", "0"])
    assert exit_info.value.code == 2

