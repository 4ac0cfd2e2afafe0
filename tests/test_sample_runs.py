"""`./sample.sh` as the organizers run it: every prompt file of the folder in one process, one
`finetuned parameters` line per prompt file equal to a separate sample.py run, personalizations swapped
exactly (subject B's images do not depend on subject A running first), and every input checked first."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import sample
from entrypoints import run_entry
from libs.config import REPO_ROOT
from libs.prompts import image_name
from libs.layout import SUBJECTS

COUNT_LINE = re.compile(r"^finetuned parameters: (\d+)$", re.MULTILINE)
FAST = ["--steps", "2", "--device", "cpu"]


def workspace(root: Path, trained: dict[str, Path], subjects=SUBJECTS, preliminary=False, advanced=False) -> Path:
    """A competition-shaped folder: sample.sh/sample.py/libs/configs, model_output/ and prompt files."""
    root.mkdir(parents=True)
    shutil.copy(REPO_ROOT / "sample.sh", root)
    for name in ("sample.py", "libs", "configs"):
        (root / name).symlink_to(REPO_ROOT / name)
    for name in subjects:
        shutil.copytree(trained[name], root / "model_output" / name)
        word = "boy" if name.startswith("boy") else "girl"
        if preliminary:
            write_prompts(root / "eval_prompts" / f"{name}.json", [f"a {word} smiling"])
        if advanced:
            write_prompts(root / "eval_prompts_advance" / f"{name}_sim.json", [f"a photo of a {word}"])
            write_prompts(root / "eval_prompts_advance" / f"{name}_edit.json",
                          [f"a {word} in the snow", f"a {word} wearing a hat"])
    return root


def write_prompts(path: Path, prompts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(prompts))


def run_sample_sh(root: Path, config_file: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "VIRTUAL_ENV": str(Path(sys.executable).parent.parent), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", str(root / "sample.sh"), "--config", str(config_file), *FAST, *extra],
                          capture_output=True, text=True, cwd=root.parent, env=env, timeout=900)


def single_run_count(config_file: Path, restore: Path, prompts: Path, out: Path, capsys) -> int:
    """What a separate `python sample.py --restore_path --prompt_path --output_path` prints."""
    assert run_entry(sample, ["--config", config_file, "--restore_path", restore, "--prompt_path", prompts,
                              "--output_path", out, *FAST]) == 0
    (count,) = COUNT_LINE.findall(capsys.readouterr().out)
    return int(count)


@pytest.mark.slow
def test_sample_sh_renders_the_advanced_split_in_one_process(tmp_path, tiny_config_file, subject_personalizations,
                                                             capsys):
    root = workspace(tmp_path / "ws", subject_personalizations, advanced=True)
    done = run_sample_sh(root, tiny_config_file)
    assert done.returncode == 0, done.stderr
    assert "found 8 prompt file(s)" in done.stdout
    counts = [int(c) for c in COUNT_LINE.findall(done.stdout)]
    assert len(counts) == 8
    for name in SUBJECTS:
        for part, n_prompts in (("sim", 1), ("edit", 2)):
            folder = root / "outputs" / f"{name}_{part}"
            made = sorted(p.name for p in folder.glob("*-*.jpg"))
            assert made == sorted(image_name(p, i) for p in range(n_prompts) for i in range(3)), folder
            assert not (folder / ".lock").exists()
    expected = {name: single_run_count(tiny_config_file, subject_personalizations[name],
                                       root / "eval_prompts_advance" / f"{name}_sim.json", tmp_path / "single" / name,
                                       capsys) for name in SUBJECTS}
    assert counts == [expected[name] for name in SUBJECTS for _ in range(2)]
    assert len(set(expected.values())) == 4 and min(expected.values()) > 0
    # the one-process images equal the separate runs' images bit for bit
    for name in SUBJECTS:
        for i in range(3):
            one = (root / "outputs" / f"{name}_sim" / image_name(0, i)).read_bytes()
            assert one == (tmp_path / "single" / name / image_name(0, i)).read_bytes()


@pytest.mark.slow
def test_sample_sh_with_both_splits_makes_twelve_runs(tmp_path, tiny_config_file, subject_personalizations,
                                                      monkeypatch, capsys):
    root = workspace(tmp_path / "ws", subject_personalizations, preliminary=True, advanced=True)
    done = run_sample_sh(root, tiny_config_file, "--n_samples", "1")
    assert done.returncode == 0, done.stderr
    assert len(COUNT_LINE.findall(done.stdout)) == 12 and "found 12 prompt file(s)" in done.stdout
    assert all((root / "outputs" / task / "0-000.jpg").is_file()
               for name in SUBJECTS for task in (name, f"{name}_sim", f"{name}_edit"))
    # one split again (what sample.sh runs: sample.py --all with its flags), in this process
    monkeypatch.chdir(root)
    assert run_entry(sample, ["--all", "--config", tiny_config_file, *FAST, "--n_samples", "1", "--preliminary",
                              "--skip_existing"]) == 0
    printed = capsys.readouterr().out
    assert len(COUNT_LINE.findall(printed)) == 4 and printed.count("nothing to sample") == 4


def test_a_personalization_swap_is_exact(tmp_path, tiny_config_file, subject_personalizations, monkeypatch):
    """boy2 rendered after boy1 in one process equals boy2 rendered alone, bit for bit."""
    both = workspace(tmp_path / "both", subject_personalizations, subjects=["boy1", "boy2"], preliminary=True)
    alone = workspace(tmp_path / "alone", subject_personalizations, subjects=["boy2"], preliminary=True)
    for root in (both, alone):
        monkeypatch.chdir(root)
        assert run_entry(sample, ["--all", "--config", tiny_config_file, *FAST, "--n_samples", "2"]) == 0
    for i in range(2):
        assert ((both / "outputs" / "boy2" / image_name(0, i)).read_bytes()
                == (alone / "outputs" / "boy2" / image_name(0, i)).read_bytes())
    assert ((both / "outputs" / "boy1" / image_name(0, 0)).read_bytes()
            != (both / "outputs" / "boy2" / image_name(0, 0)).read_bytes())


@pytest.mark.parametrize("case, message", [
    ("no_prompts", "no prompt files found"),
    ("no_personalization", "have no trained personalization"),
    ("advanced_incomplete", "the advanced split needs 8 prompt files"),
    ("bad_prompt_file", "not valid JSON"),
])
def test_every_input_is_checked_before_any_run(tmp_path, tiny_config_file, subject_personalizations, monkeypatch, capsys,
                                               case, message):
    root = workspace(tmp_path / "ws", subject_personalizations, subjects=["boy1", "girl1"],
                     preliminary=case != "no_prompts")
    extra = []
    if case == "no_personalization":
        write_prompts(root / "eval_prompts" / "girl2.json", ["a girl"])
    elif case == "advanced_incomplete":
        write_prompts(root / "eval_prompts_advance" / "boy1_sim.json", ["a boy"])
        extra = ["--advanced"]
    elif case == "bad_prompt_file":
        (root / "eval_prompts" / "girl1.json").write_text("[1, ")
    monkeypatch.chdir(root)
    assert run_entry(sample, ["--all", "--config", tiny_config_file, *FAST, *extra]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err
    assert "finetuned parameters" not in captured.out
    assert not (root / "outputs").exists()  # nothing ran, nothing was created
