"""`--auto_recipe`: a small search over documented recipes for one subject, within a budget of optimizer steps.

Each recipe in `auto_recipes` (RECIPES, in that order) changes a few keys of the config given; each is
trained and validated as a normal run (its best step chosen by `objective`) and scored as

    score = best objective - auto_param_penalty x changed parameters / 1e6

(the competition also ranks the changed-parameter count, spec §7; within one run it is fixed, across
recipes it differs). The highest score wins. A recipe that changes nothing (the config already has its
settings) is left out as a duplicate; one whose steps no longer fit into `auto_budget` (the optimizer
steps of all recipes run) is skipped and the next ones are tried, and so is one that would change more than
`auto_max_parameters` parameters (counted before it trains, libs/train/param_budget.py).

    <out>/auto_recipe/<recipe>/   each recipe's own training folder (train.py's layout; a loser keeps its
                                  personalization.json record, logs and validation, not its adapters)
    <out>/auto_recipe/table.csv   one row per recipe: changes, adapter, steps, best step, scores, changed
                                  parameters, score
    <out>/auto_recipe/frontier.png best-step objective against changed parameters (libs/train/frontier.py)
    <out>/auto_recipe/report.html the same table with links to each recipe's run report, and the frontier plot
    <out>/auto_recipe/logs/       with --auto_devices: each recipe's process output (<recipe>.log) and job
    <out>/                        the winner's personalization; personalization.json's `auto_recipe` holds the table

With `auto_devices` (cuda:0,cuda:1,... or cpu,cpu) the recipes train concurrently, one process per device
(libs/train/search_devices.py), each exactly as the serial search trains it: the same table and winner, a
diverged recipe recorded as failed, a stop and a resume as the serial search's.

Resumable: a recipe with a personalization.json is finished and never trained again; an interrupted one
continues from its last checkpoint. One scorer (face model + CLIP) serves every recipe.
"""
from __future__ import annotations

import copy
import csv
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_collections

from libs.files import CheckpointError, atomic_path, save_json
from libs.personalization import check_restore_path
from libs.train import search_report
from libs.devices import parse_devices
from libs.stopping import StopSignals, resume_command
from libs.train.frontier import plot_frontier
from libs.train.loop import DivergedError, StepCallback, claim_output, train
from libs.train.metrics import MetricScorer, ScoreFn
from libs.train.param_budget import planned_parameters
from libs.train.plan import TrainingError, make_plan
from libs.train.search_devices import read_failures, train_on_devices
from libs.train.recipes import RECIPE_NAMES, RECIPES, Recipe
from libs.train.selection import METRICS
from libs.train_output import (AUTO_DIR, FAILED_FILE, FRONTIER_FILE, META_FILE, OUTPUT_FILES, RUN_FILE,
                               TABLE_FILE, prepare_output)

RUN, DUPLICATE, OVER_BUDGET, OVER_PARAMETERS, FAILED = ("trained", "duplicate", "over budget",
                                                       "over parameter budget", "failed")


@dataclass
class Candidate:
    recipe: Recipe
    config: ml_collections.ConfigDict
    changes: dict[str, Any]
    folder: Path
    status: str  # RUN, DUPLICATE or OVER_BUDGET

    @property
    def steps(self) -> int:
        return int(self.config.train.train_step)

    @property
    def finished(self) -> bool:
        return (self.folder / META_FILE).is_file()


def plan_candidates(config: ml_collections.ConfigDict, work: Path) -> list[Candidate]:
    """The recipes of `auto_recipes` as configs, each with its status under the budget (a pure function of
    the config, so an interrupted search continues with the same candidates)."""
    cfg = config.train
    unknown = [name for name in cfg.auto_recipes if name not in RECIPE_NAMES]
    if unknown or not cfg.auto_recipes:
        raise TrainingError(f"auto_recipes {list(cfg.auto_recipes)}: choose one or more of {', '.join(RECIPE_NAMES)}")
    by_name = {recipe.name: recipe for recipe in RECIPES}
    candidates: list[Candidate] = []
    used = 0
    for name in dict.fromkeys(cfg.auto_recipes):
        recipe = by_name[name]
        changes = {k: v for k, v in recipe.changes(cfg).items() if cfg[k] != v}
        candidate_config = copy.deepcopy(config)
        candidate_config.train.update(auto_recipe=False, auto_devices="", **changes)
        candidate = Candidate(recipe, candidate_config, changes, work / name, RUN)
        same = next((c for c in candidates if c.config.train.to_dict() == candidate_config.train.to_dict()), None)
        if same is not None:
            candidate.status = f"{DUPLICATE} of {same.recipe.name}"
        elif cfg.auto_max_parameters and planned_parameters(candidate_config) > int(cfg.auto_max_parameters):
            candidate.status = OVER_PARAMETERS
        elif used + candidate.steps > int(cfg.auto_budget):
            candidate.status = OVER_BUDGET
        else:
            used += candidate.steps
        candidates.append(candidate)
    return candidates


def run_auto_recipe(config: ml_collections.ConfigDict, data_dir: str | Path, out_dir: str | Path,
                    resume: str | None = None, overwrite: bool = False, mixed_precision: str | None = None,
                    on_step: StepCallback | None = None, score_fn: ScoreFn | None = None) -> list[dict[str, Any]] | None:
    """Train the candidates, write the table and the winner into `out_dir`; returns the table's rows (None
    when `out_dir` already held a finished personalization and `resume` was asked for). `out_dir` is this
    search's alone while it runs (each recipe's folder is its training run's). SIGTERM / SIGINT stop the recipe
    in training as a single run stops (libs.stopping); a resumed search retrains no finished recipe."""
    hint = f"finished recipes are kept; continue with: {resume_command()}"
    with StopSignals(hint) as stop, claim_output(out_dir):
        return _search(config, data_dir, out_dir, resume, overwrite, mixed_precision, on_step, score_fn, stop)


def _search(config: ml_collections.ConfigDict, data_dir: str | Path, out_dir: str | Path, resume: str | None,
            overwrite: bool, mixed_precision: str | None, on_step: StepCallback | None,
            score_fn: ScoreFn | None, stop: StopSignals) -> list[dict[str, Any]] | None:
    from accelerate import PartialState

    cfg = config.train
    if not cfg.validation_steps:
        raise TrainingError("--auto_recipe compares recipes by their validation scores: validation_steps must be > 0")
    if resume not in (None, "latest"):
        raise TrainingError("--auto_recipe continues a search with --resume latest (each recipe from its own checkpoint)")
    plan = make_plan(config, data_dir, out_dir, resume, overwrite)
    devices = parse_devices(cfg.auto_devices) if cfg.auto_devices else None
    out, work = plan.out_dir, plan.out_dir / AUTO_DIR
    candidates = plan_candidates(config, work)
    if not any(c.status == RUN for c in candidates):
        raise TrainingError(f"auto_budget {cfg.auto_budget} is smaller than the train_step of every recipe "
                            f"({', '.join(f'{c.recipe.name} {c.steps}' for c in candidates)}): raise --auto_budget")
    if resume and plan.finished:
        print(f"{out} already holds a finished personalization: nothing to resume (pass --overwrite to search again)")
        return None
    if not resume and not overwrite and work.is_dir() and any(work.iterdir()):
        raise TrainingError(f"{out} holds an unfinished recipe search ({work}); pass --resume latest to continue it "
                            "or --overwrite to start over")
    state = PartialState()
    if devices is not None and state.num_processes > 1:
        raise TrainingError("--auto_devices starts one process per device itself: run train.py directly, not under "
                            "a multi-process accelerate launch")
    if state.is_main_process:
        if overwrite:
            shutil.rmtree(work, ignore_errors=True)
        prepare_output(out, overwrite)
        if score_fn is None and devices is None:  # each device's process scores its own recipes
            score_fn = MetricScorer(config, cfg.validation_face_backend, str(state.device))
    state.wait_for_everyone()

    failures = read_failures(work / FAILED_FILE)
    for candidate in candidates:
        if candidate.recipe.name in failures and candidate.status == RUN:
            candidate.status = FAILED
            print(f"recipe {candidate.recipe.name} failed in an earlier run ({work / FAILED_FILE}): not trained again")
    table_rows(candidates, float(cfg.auto_param_penalty))  # every finished recipe's record checked before training
    for candidate in candidates:
        if candidate.status == RUN and candidate.finished:
            print(f"recipe {candidate.recipe.name} finished in an earlier run ({candidate.folder / META_FILE}): "
                  "reused, not trained again")
    todo = [c for c in candidates if c.status == RUN and not c.finished]

    def failed(candidate: Candidate, why: str) -> None:  # recorded, and the search goes on with the other recipes
        print(f"recipe {candidate.recipe.name} failed: {why}; the search continues without it")
        candidate.status = FAILED
        failures[candidate.recipe.name] = why
        if state.is_main_process:
            save_json(failures, work / FAILED_FILE)

    if devices is not None and todo:
        by_name = {c.recipe.name: c for c in todo}
        train_on_devices({name: (c.config, c.folder) for name, c in by_name.items()}, devices, plan.data_dir, work,
                         mixed_precision, stop, lambda name, why: failed(by_name[name], why))
        _drop_losers(candidates, float(cfg.auto_param_penalty))
        todo = []
    for number, candidate in enumerate(todo, 1):
        changed = ", ".join(f"{k}={v}" for k, v in candidate.changes.items()) or "no changes"
        print(f"=== recipe {candidate.recipe.name} ({number}/{len(todo)} to train): {changed}; {candidate.steps} steps")
        try:
            train(candidate.config, plan.data_dir, candidate.folder,
                  resume="latest" if candidate.folder.exists() else None, mixed_precision=mixed_precision,
                  on_step=on_step, score_fn=score_fn)
        except DivergedError as error:
            failed(candidate, str(error))
            continue
        if state.is_main_process:
            _drop_losers(candidates, float(cfg.auto_param_penalty))
    rows = table_rows(candidates, float(cfg.auto_param_penalty))
    if state.is_main_process:
        _write_result(out, work, candidates, rows, config)
    state.wait_for_everyone()
    return rows


def table_rows(candidates: list[Candidate], penalty: float) -> list[dict[str, Any]]:
    """One row per candidate; finished ones with their best step, its scores, parameters and score."""
    rows = []
    for candidate in candidates:
        row: dict[str, Any] = {"recipe": candidate.recipe.name, "status": candidate.status,
                               "changes": json.dumps(candidate.changes), "adapter": candidate.config.train.adapter,
                               "train_step": candidate.steps}
        if candidate.status == RUN and candidate.finished:
            chosen, scores, parameters = _recipe_result(candidate.folder)
            row.update(best_step=chosen, **{k: scores.get(k) for k in (*METRICS, "objective")},
                       changed_parameters=parameters, penalty=penalty * parameters / 1e6)
            row["score"] = scores["objective"] - row["penalty"] if "objective" in scores else None
        rows.append(row)
    scored = [row for row in rows if row.get("score") is not None]
    best = max(scored, key=lambda row: row["score"], default=None)
    for row in rows:
        row["winner"] = row is best
    return rows


def _recipe_result(folder: Path) -> tuple[int, dict[str, float], int]:
    """A finished recipe's chosen step, that step's scores and its parameter count, from its personalization.json;
    a damaged one is named, never trusted or silently retrained."""
    path = folder / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        chosen = int(meta["selection"]["chosen_step"])
        scores = meta["selection"]["scores"].get(str(chosen), {})
        if not isinstance(scores, dict) or not isinstance(scores.get("objective", 0.0), (int, float)):
            raise TypeError(f"the scores of step {chosen} are not a record of numbers")
        return chosen, scores, int(meta["trainable_parameters"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise TrainingError(f"the recipe folder {folder} is damaged ({path}: {type(error).__name__} {error}): delete "
                            f"{folder} to train that recipe again, or pass --overwrite to search again") from None


def _drop_losers(candidates: list[Candidate], penalty: float) -> None:
    """Delete the adapters of every finished recipe but the best so far (their records stay)."""
    rows = table_rows(candidates, penalty)
    for candidate, row in zip(candidates, rows):
        if row.get("score") is not None and not row["winner"]:
            for name in OUTPUT_FILES:
                if name not in (META_FILE, RUN_FILE):
                    (candidate.folder / name).unlink(missing_ok=True)


def _write_result(out: Path, work: Path, candidates: list[Candidate], rows: list[dict[str, Any]],
                  config: ml_collections.ConfigDict) -> None:
    """table.csv, then the winner's files into `out`, personalization.json last (it marks the search finished)."""
    columns = ["recipe", "status", "changes", "adapter", "train_step", "best_step", *METRICS, "objective",
               "changed_parameters", "penalty", "score", "winner"]
    with atomic_path(work / TABLE_FILE) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)
    plot_frontier(rows, work / FRONTIER_FILE, str(config.train.objective))
    print("\n".join(_table_lines(rows)))
    report = search_report.write_search_report(work, rows, {c.recipe.name: c.recipe.what for c in candidates},
                                               float(config.train.auto_param_penalty))
    print(f"search report: {report}")
    winner = next((c for c, row in zip(candidates, rows) if row["winner"]), None)
    if winner is None:
        raise TrainingError(f"no recipe finished: {', '.join(f'{c.recipe.name} {c.status}' for c in candidates)} "
                            f"(see {work / TABLE_FILE}); lower --lr or keep --max_grad_norm > 0, then --overwrite")
    try:
        check_restore_path(winner.folder)
    except CheckpointError as error:
        raise TrainingError(f"recipe {winner.recipe.name} wins now, but its adapters were deleted when it lost under "
                            "an earlier --auto_param_penalty: keep that penalty, or pass --overwrite to search "
                            f"again ({error})") from error
    meta = json.loads((winner.folder / META_FILE).read_text())
    files = [name for name in OUTPUT_FILES if name != META_FILE and (winner.folder / name).is_file()]
    for name in files:
        with atomic_path(out / name) as tmp:
            shutil.copyfile(winner.folder / name, tmp)
    meta["auto_recipe"] = {"winner": winner.recipe.name, "budget": int(config.train.auto_budget),
                           "param_penalty": float(config.train.auto_param_penalty), "table": rows,
                           "recipes": {c.recipe.name: c.recipe.what for c in candidates}}
    save_json(meta, out / META_FILE)
    print(f"auto recipe: {winner.recipe.name} wins; its adapters (step {meta['selection']['chosen_step']}) are in {out}")


def _table_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = [f"{'recipe':<16} {'status':<22} {'best step':>9} {'sim face':>8} {'edit face':>9} {'CLIP-T':>7} "
             f"{'objective':>9} {'params':>11} {'score':>8}"]
    for row in rows:
        if row.get("score") is None:
            lines.append(f"{row['recipe']:<16} {row['status']:<22}")
            continue
        lines.append(f"{row['recipe']:<16} {row['status']:<22} {row['best_step']:>9} {row['sim_face']:>8.3f} "
                     f"{row['edit_face']:>9.3f} {row['edit_clip_text']:>7.3f} {row['objective']:>9.4f} "
                     f"{row['changed_parameters']:>11,} {row['score']:>8.4f}" + ("  <- winner" if row["winner"] else ""))
    return lines
