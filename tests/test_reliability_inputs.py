"""The newer features' bad inputs, like the old ones (tests/test_reliability.py): config values of the wrong type,
objectives that overflow, a recipe that diverges, a damaged recipe record or failure record, a damaged
candidate of the step selection. Each is one `error:` line (exit 2) naming what and where, or a documented,
logged recovery; nothing is lost, nothing damaged is trusted or silently retrained."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch

import sample
import train
from entrypoints import run_entry
from libs.errors import UserError
from libs.train import TrainingError, run_auto_recipe
from libs.train import train as train_fn
from libs.train_output import AUTO_DIR, FAILED_FILE, META_FILE, TABLE_FILE, candidate_files
from test_auto_recipe import RecipeCurves
from test_reliability import refused, sample_args, train_args
from conftest import copy_folder, stop_at, write_photos


# --- config files -----------------------------------------------------------------------------------


def config_file(tmp_path: Path, tiny_config_file: Path, body: str) -> Path:
    """A user's config: the test's tiny config changed by `body` (statements on `config`)."""
    path = tmp_path / "my_config.py"
    text = tiny_config_file.read_text().replace("    return config\n", "".join(f"    {line}\n" for line in
                                                                              body.splitlines()) + "    return config\n")
    path.write_text(text)
    return path


@pytest.mark.parametrize("body, key", [
    ("config.train.validation_sim_prompts = 5", "validation_sim_prompts"),  # a number where prompts belong
    ("config.train.update({'lora_targets': 'qkv'})", "lora_targets"),  # a string where a list belongs
    # a config built from scratch (no default to compare with while it is built)
    ("import ml_collections\nplain = config.to_dict()\nplain['train']['validation_edit_prompts'] = [1, 2]\n"
     "config = ml_collections.ConfigDict(plain)", r"train\.validation_edit_prompts must be a list of strings"),
    ("import ml_collections\nplain = config.to_dict()\nplain['sample']['steps'] = '50'\n"
     "config = ml_collections.ConfigDict(plain)", r"sample\.steps must be a number, got '50'"),
])
@pytest.mark.parametrize("script", ["train", "sample"])
def test_config_values_of_the_wrong_type_name_the_key(script, body, key, tmp_path, tiny_config, tiny_config_file,
                                                      photos, capsys):
    config = config_file(tmp_path, tiny_config_file, body)
    out = tmp_path / "out"
    if script == "train":
        code = run_entry(train, train_args(config, photos, out))
    else:
        prompts = tmp_path / "prompts.json"
        prompts.write_text(json.dumps(["a boy"]))
        code = run_entry(sample, sample_args(config, tmp_path / "nothing", prompts, out, "--base_model"))
    err = refused(capsys, code, key, re.escape(str(config)))
    assert err.count("error:") == 1
    assert not out.exists()


@pytest.mark.parametrize("objective", ["1e400*sim_face", "1e308*sim_face + 1e308*edit_face", "inf*sim_face",
                                       "nan*sim_face"])
def test_objective_weights_that_overflow_or_are_not_finite(objective, tmp_path, tiny_config_file, photos, capsys):
    out = tmp_path / "out"
    code = run_entry(train, train_args(tiny_config_file, photos, out, "--objective", objective))
    refused(capsys, code, re.escape(repr(objective)), "overflow|cannot read the term")
    assert not out.exists()


# --- the recipe search --------------------------------------------------------------------------------


def search_config(config, **extra):
    config.train.update({"with_prior_preservation": False, "train_step": 2, "validation_steps": 1,
                         "auto_recipe": True, "auto_recipes": ("base", "double_lr"), "auto_budget": 4,
                         # on the tiny world this lr trains; doubled, the weights overflow at step 2
                         "lr": 6000.0, "text_lr": 6000.0, "max_grad_norm": 0.0, "warmup_steps": 0, **extra})
    return config


def test_a_diverging_recipe_is_recorded_as_failed_and_the_search_goes_on(tiny_config, photos, tmp_path, capsys):
    out = tmp_path / "out"
    rows = run_auto_recipe(search_config(tiny_config), photos, out, score_fn=RecipeCurves())
    printed = capsys.readouterr().out
    assert re.search(r"recipe double_lr failed: the (trained weights hold NaN|loss became).* at step \d", printed)
    by_recipe = {row["recipe"]: row for row in rows}
    assert by_recipe["double_lr"]["status"] == "failed" and by_recipe["double_lr"].get("score") is None
    assert by_recipe["base"]["winner"] and (out / META_FILE).is_file()
    assert "failed" in (out / AUTO_DIR / TABLE_FILE).read_text()
    assert "double_lr" in json.loads((out / AUTO_DIR / FAILED_FILE).read_text())

    (out / META_FILE).unlink()  # as if stopped before the result was written: a resume retrains nothing
    again = RecipeCurves()
    assert run_auto_recipe(search_config(tiny_config), photos, out, resume="latest", score_fn=again) == rows
    assert again.calls == []


@pytest.fixture(scope="module")
def stopped_search(tiny_session_config, public_photos, tmp_path_factory) -> tuple[Path, Path]:
    """(a search stopped after its first recipe (base) finished, its photos), made once for the module (on one
    thread, as the tests' runs are). Read-only: a test damages `half_search`, its own copy."""
    root = tmp_path_factory.mktemp("half_search")
    photos = write_photos(root, public_photos)
    config = search_config(copy.deepcopy(tiny_session_config), auto_recipes=("base", "half_rank"), lr=1e-4,
                           text_lr=1e-4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_auto_recipe(config, photos, root / "out", score_fn=RecipeCurves(stop_at="half_rank"))
    finally:
        torch.set_num_threads(threads)
    assert (root / "out" / AUTO_DIR / "base" / META_FILE).is_file()
    return root / "out", photos


@pytest.fixture()
def half_search(stopped_search, tmp_path) -> Path:
    """This test's copy of the stopped search."""
    return copy_folder(stopped_search[0], tmp_path / "out")


@pytest.mark.parametrize("damage", ["not_json", "no_selection"])
def test_a_damaged_recipe_record_is_named_before_anything_trains(damage, half_search, stopped_search,
                                                                  tiny_config_file, capsys):
    photos = stopped_search[1]
    record = half_search / AUTO_DIR / "base" / META_FILE
    if damage == "not_json":
        record.write_text('{"selection": ')
    else:
        record.write_text(json.dumps({**json.loads(record.read_text()), "selection": None}))
    before = record.read_bytes()
    code = run_entry(train, [*train_args(tiny_config_file, photos, half_search, "--auto_recipe", "--auto_recipes",
                                         "base", "half_rank", "--auto_budget", "4", "--validation_steps", "1",
                                         "--resume", "latest"), "--checkpointing_steps", "1"])
    refused(capsys, code, rf"the recipe folder {re.escape(str(record.parent))} is damaged", "delete")
    assert record.read_bytes() == before
    assert not (half_search / AUTO_DIR / "half_rank" / META_FILE).exists()  # nothing trained meanwhile


def test_a_damaged_failure_record_is_named(half_search, stopped_search, tiny_config):
    photos = stopped_search[1]
    (half_search / AUTO_DIR / FAILED_FILE).write_text("[1, 2")
    config = search_config(tiny_config, auto_recipes=("base", "half_rank"), lr=1e-4, text_lr=1e-4)
    with pytest.raises(TrainingError, match=rf"{re.escape(str(half_search / AUTO_DIR / FAILED_FILE))} is damaged"):
        run_auto_recipe(config, photos, half_search, resume="latest", score_fn=RecipeCurves())


# --- the step selection -------------------------------------------------------------------------------


def test_a_damaged_candidate_is_named_when_the_run_resumes(tiny_config, photos, tmp_path):
    out = tmp_path / "base"  # RecipeCurves scores it by this name
    tiny_config.train.update(with_prior_preservation=False, train_step=4, validation_steps=1, checkpointing_steps=2)

    with pytest.raises(KeyboardInterrupt):
        train_fn(tiny_config, photos, out, on_step=stop_at(2), score_fn=RecipeCurves())
    [best] = candidate_files(out)
    best.write_bytes(best.read_bytes()[:40])
    with pytest.raises(UserError, match=rf"damaged .*{re.escape(str(best))}"):
        train_fn(tiny_config, photos, out, resume="latest", score_fn=RecipeCurves())
