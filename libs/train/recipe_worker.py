"""One recipe of a parallel `--auto_recipe` search, in its own process on its own device:

    python -m libs.train.recipe_worker <job.json>

The job file (written by libs/train/auto_recipe.py) holds the recipe's full config, the photos, the recipe's
folder and the mixed precision; the run is exactly the serial search's `train(...)` call for that recipe
(same config, same seed: same numbers), continuing from its checkpoint when the folder has one. A recipe
that diverges leaves {recipe: why} in the job's failure record for the search to record as failed
(libs/train/search_devices.py); a stop signal stops it as a single run stops (after its step, with a checkpoint).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Sequence

import ml_collections

from libs.errors import run_cli
from libs.files import save_json


def write_job(path: Path, config: ml_collections.ConfigDict, data_dir: Path, folder: Path, failed: Path,
              mixed_precision: str | None) -> None:
    """The job file `main` reads (JSON: tuples become lists, which every consumer of the config accepts)."""
    save_json({"config": config.to_dict(), "data_dir": str(data_dir), "folder": str(folder), "failed": str(failed),
               "mixed_precision": mixed_precision}, path)


def main(argv: Sequence[str]) -> None:
    from libs.train.loop import DivergedError, train

    job: dict[str, Any] = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    folder = Path(job["folder"])
    try:
        train(ml_collections.ConfigDict(job["config"]), job["data_dir"], folder,
              resume="latest" if folder.exists() else None, mixed_precision=job["mixed_precision"])
    except DivergedError as error:
        save_json({folder.name: str(error)}, Path(job["failed"]))
        raise


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
