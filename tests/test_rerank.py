"""Best-of-N sampling (`sample.py --candidates N`) on the tiny world with the offline dlib face model: N = 1 is
the plain output bit for bit, the kept images are the best candidates by numbers that score.py reproduces
from the files, candidates do not depend on the batch size, and bad references stop the run before anything
is written."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import sample
import score
from entrypoints import run_entry
from libs.score.candidates import CANDIDATES_DIR, CANDIDATES_FILE, load_record
from libs.prompts import image_name
from libs.sample.rerank import METRICS, RerankError, judged_metrics, reference_dirs
from libs.sample.runs import SampleRun
from libs.train_output import RUN_FILE
from libs.score.report import REPORT_HTML, RESULTS_JSON
from libs.score.scorer import Scorer
from test_sample_runs import COUNT_LINE, run_sample_sh, workspace

PROMPTS = ["a boy standing in the wild", "a photo of a boy smiling"]
FAST = ["--steps", "2", "--device", "cpu"]
DLIB = ["--rerank_face_backend", "dlib"]


@pytest.fixture()
def restore(personalization) -> Path:
    """The session's personalization of a boy (read-only)."""
    return personalization


@pytest.fixture()
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "eval_prompts" / "boy1.json"
    path.parent.mkdir()
    path.write_text(json.dumps(PROMPTS))
    return path


def run(config_file: Path, restore: Path, prompts: Path, out: Path, *extra) -> int:
    return run_entry(sample, ["--config", config_file, "--restore_path", restore, "--prompt_path", prompts,
                              "--output_path", out, *FAST, *extra])


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_one_candidate_is_the_plain_output_bit_for_bit(tiny_config_file, restore, prompt_file, photos, tmp_path):
    plain, one = tmp_path / "plain", tmp_path / "one"
    assert run(tiny_config_file, restore, prompt_file, plain) == 0
    # references are not even read with N = 1: a folder that does not exist is no error
    assert run(tiny_config_file, restore, prompt_file, one, "--candidates", "1",
               "--reference_dir", tmp_path / "nowhere") == 0
    assert files(plain) == files(one) and len(files(plain)) == 3 * len(PROMPTS) + 1  # + grid.jpg


def test_one_candidate_is_the_plain_output_bit_for_bit_under_all(tiny_config_file, restore, tmp_path, monkeypatch):
    outputs = {}
    for name, extra in (("plain", []), ("one", ["--candidates", "1"])):
        root = workspace(tmp_path / name, {"boy1": restore}, subjects=["boy1"], preliminary=True, advanced=True)
        monkeypatch.chdir(root)
        assert run_entry(sample, ["--all", "--config", tiny_config_file, *FAST, *extra]) == 0
        outputs[name] = files(root / "outputs")
    assert outputs["plain"] == outputs["one"] and len(outputs["plain"]) == 3 * 4 + 3  # 4 prompts + 3 grids


@pytest.fixture()
def best_of_4(tiny_config_file, restore, prompt_file, photos, tmp_path, capsys) -> tuple[Path, str]:
    """`--candidates 4 --keep_candidates` into outputs/boy1, the references train_data/boy1 (dlib finds faces)."""
    out = tmp_path / "outputs" / "boy1"
    assert run(tiny_config_file, restore, prompt_file, out, "--candidates", "4", "--keep_candidates",
               "--reference_dir", photos, *DLIB) == 0
    return out, capsys.readouterr().out


def test_the_kept_images_are_the_best_candidates_as_score_py_scores_them(best_of_4, tiny_config_file, photos,
                                                                          prompt_file, tmp_path):
    out, printed = best_of_4
    assert COUNT_LINE.findall(printed) and "of the first 3 candidates (what --candidates 1 keeps)" in printed
    record = load_record(out)
    assert record.settings["candidates"] == 4 and record.settings["face_backend"] == "dlib"
    weights = judged_metrics(prompt_file)
    assert weights == METRICS  # a preliminary prompt file: face + clip_img + clip_text
    candidates_dir = out / CANDIDATES_DIR
    for index in range(len(PROMPTS)):
        entries = record.of_prompt(index)
        assert [c.candidate for c in entries] == list(range(12))
        assert [c.noise_key for c in entries] == [(1234, index, k) for k in range(12)]
        by_objective = sorted(entries, key=lambda c: (-sum(getattr(c, m) for m in weights), c.candidate))
        for slot, best in enumerate(by_objective[:3]):
            assert best.objective == pytest.approx(sum(getattr(best, m) for m in weights))
            assert best.kept_as == image_name(index, slot)
            assert (out / image_name(index, slot)).read_bytes() == (candidates_dir / best.file).read_bytes()
        assert sum(c.kept for c in entries) == 3
    assert sorted(p.name for p in out.glob("*-*.jpg")) == sorted(image_name(i, s) for i in range(2) for s in range(3))
    # score.py on the kept files gives the recorded numbers
    assert run_entry(score, ["--dataset", photos.parent, "--prompts", prompt_file.parent, "--outputs", out.parent,
                             "--tasks", "boy1", "--face_backend", "dlib", "--config", tiny_config_file]) == 0
    page = (out.parent / REPORT_HTML).read_text()
    assert page.count("best-of-4 candidates") == len(PROMPTS) and page.count("<div class='cand'>") == 12 * len(PROMPTS)
    assert page.count("class='kept'") == 3 * len(PROMPTS) and f"boy1/{CANDIDATES_DIR}/1-011.jpg" in page
    reported = json.loads((out.parent / RESULTS_JSON).read_text())["tasks"]["boy1"]["prompts"]
    kept = {c.kept_as: c for c in record.candidates if c.kept}
    for prompt in reported:
        for image in prompt["images"]:
            entry = kept[Path(image["path"]).name]
            for metric in METRICS:
                assert image[metric] == pytest.approx(getattr(entry, metric), abs=1e-6)
    # and score.py's scorer on every candidate file gives every recorded number
    scorer = Scorer("dlib", config=str(tiny_config_file), device="cpu", progress=False)
    task = scorer.score_task(photos, prompt_file, candidates_dir, images_per_prompt=12)
    for prompt in task.prompts:
        for image, entry in zip(prompt.images, record.of_prompt(prompt.index), strict=True):
            assert Path(image.path).name == entry.file
            assert [getattr(image, m) for m in METRICS] == pytest.approx([getattr(entry, m) for m in METRICS], abs=1e-6)


def test_candidates_are_reproducible_and_independent_of_the_batch_size(best_of_4, tiny_config_file, restore,
                                                                       prompt_file, photos, tmp_path):
    out, _ = best_of_4
    again, batched, plain = tmp_path / "again", tmp_path / "batched", tmp_path / "plain"
    assert run(tiny_config_file, restore, prompt_file, again, "--candidates", "4", "--keep_candidates",
               "--reference_dir", photos, *DLIB) == 0
    assert files(again) == files(out)
    assert run(tiny_config_file, restore, prompt_file, batched, "--candidates", "4", "--keep_candidates",
               "--reference_dir", photos, *DLIB, "--batch_size", "5") == 0
    assert files(batched) == files(out)
    # round 0 of the candidates is what --candidates 1 renders
    assert run(tiny_config_file, restore, prompt_file, plain) == 0
    for index in range(len(PROMPTS)):
        for slot in range(3):
            assert ((out / CANDIDATES_DIR / image_name(index, slot)).read_bytes()
                    == (plain / image_name(index, slot)).read_bytes())


def test_skip_existing_redoes_a_partly_written_prompt_whole(best_of_4, tiny_config_file, restore, prompt_file,
                                                            photos, capsys):
    out, _ = best_of_4
    before = files(out)
    (out / image_name(1, 2)).unlink()
    assert run(tiny_config_file, restore, prompt_file, out, "--candidates", "4", "--keep_candidates",
               "--reference_dir", photos, *DLIB, "--skip_existing") == 0
    printed = capsys.readouterr().out
    assert "skipping 1 prompt(s)" in printed and "over 1 prompt(s)" in printed
    assert files(out) == before
    # a run without --keep_candidates that remakes a prompt drops the old record of it (it no longer fits)
    (out / image_name(0, 0)).unlink()
    assert run(tiny_config_file, restore, prompt_file, out, "--candidates", "4", "--reference_dir", photos, *DLIB,
               "--skip_existing") == 0
    assert [c.prompt_index for c in load_record(out).candidates] == [1] * 12
    assert sorted(p.name for p in (out / CANDIDATES_DIR).iterdir()) == [image_name(1, k) for k in range(12)]
    assert (out / image_name(0, 0)).read_bytes() == before[image_name(0, 0)]


@pytest.mark.parametrize("case, message", [
    ("no_folder", "reference photo folder not found"),
    ("no_photo", "no reference photos"),
    ("no_face", "no face found by dlib in any reference photo"),
    ("no_insightface", "model pack 'buffalo_l' not found"),
    ("no_record", "pass --reference_dir"),
])
def test_bad_references_stop_the_run_before_anything_is_written(case, message, tiny_config_file, restore, prompt_file,
                                                                 photos, public_photos, tmp_path, monkeypatch, capsys):
    references, extra = photos, DLIB
    if case == "no_folder":
        references = tmp_path / "missing"
    elif case == "no_photo":
        references = tmp_path / "empty"
        references.mkdir()
        (references / "notes.txt").write_text("no photos here")
    elif case == "no_face":
        references = tmp_path / "faceless"
        references.mkdir()
        public_photos["camera"].save(references / "camera.jpg")
    elif case == "no_insightface":
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        monkeypatch.delenv("UNIDIFFUSER_EXTRA_MODELS", raising=False)
        extra = []
    out = tmp_path / "out"
    reference = [] if case == "no_record" else ["--reference_dir", references]
    assert run(tiny_config_file, restore, prompt_file, out, "--candidates", "2", *reference, *extra) == 2
    captured = capsys.readouterr()
    assert captured.err.count("error:") == 1 and message in captured.err and "Traceback" not in captured.err
    if case == "no_insightface":
        assert "--rerank_face_backend dlib" in captured.err
    assert "finetuned parameters" not in captured.out and not out.exists()


def test_a_single_run_defaults_to_the_photo_folder_train_py_recorded(restore, photos, tmp_path, monkeypatch):
    trained = tmp_path / "model_output" / "boy1"
    shutil.copytree(restore, trained)
    run_one = SampleRun(trained, tmp_path / "boy1.json", tmp_path / "out")
    with pytest.raises(RerankError, match="pass --reference_dir"):
        reference_dirs([run_one], "", all_runs=False)
    (trained / RUN_FILE).write_text(json.dumps({"data_dir": str(photos)}))
    assert reference_dirs([run_one], "", all_runs=False) == {run_one.output_path: photos}
    assert reference_dirs([run_one], str(tmp_path), all_runs=False) == {run_one.output_path: tmp_path}
    (trained / RUN_FILE).write_text(json.dumps({"data_dir": str(tmp_path / "moved")}))
    with pytest.raises(RerankError, match="is not there any more"):
        reference_dirs([run_one], "", all_runs=False)
    # under --all: train_data/<name>/ of the working folder, for the sim and edit files alike
    monkeypatch.chdir(tmp_path)
    runs = [SampleRun(trained, Path(f"eval_prompts_advance/boy1_{part}.json"), Path(f"outputs/boy1_{part}"))
            for part in ("sim", "edit")]
    assert set(reference_dirs(runs, "", all_runs=True).values()) == {tmp_path / "train_data" / "boy1"}
    with pytest.raises(RerankError, match="is for a single run"):
        reference_dirs(runs, str(photos), all_runs=True)


@pytest.mark.slow
def test_sample_sh_with_two_candidates_renders_the_advanced_split(tmp_path, tiny_config_file, subject_personalizations,
                                                                   public_photos, monkeypatch, capsys):
    from libs.layout import SUBJECTS

    root = workspace(tmp_path / "ws", subject_personalizations, advanced=True)
    for name in SUBJECTS:
        (root / "train_data" / name).mkdir(parents=True)
        portrait = public_photos["astronaut" if name.startswith("girl") else "grace_hopper"]
        portrait.save(root / "train_data" / name / "a.jpg")
    done = run_sample_sh(root, tiny_config_file, "--candidates", "2", *DLIB)
    assert done.returncode == 0, done.stderr
    counts = COUNT_LINE.findall(done.stdout)
    assert len(counts) == 8 and done.stdout.count("best-of-2 (") == 8
    for name in SUBJECTS:
        for part, n_prompts in (("sim", 1), ("edit", 2)):
            folder = root / "outputs" / f"{name}_{part}"
            assert sorted(p.name for p in folder.glob("*-*.jpg")) == sorted(
                image_name(p, i) for p in range(n_prompts) for i in range(3))
            assert not (folder / CANDIDATES_DIR).exists() and not (folder / CANDIDATES_FILE).exists()
    shutil.rmtree(root / "outputs")
    monkeypatch.chdir(root)
    capsys.readouterr()
    assert run_entry(sample, ["--all", "--config", tiny_config_file, *FAST, "--n_samples", "1"]) == 0
    assert COUNT_LINE.findall(capsys.readouterr().out) == counts  # choosing images changes no parameter
