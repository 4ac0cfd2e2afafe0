"""A face model that fails in the middle of a run (#24): its files damaged while a preempted training waits to
be resumed, or its runtime failing during a later validation. The run stops with one `error:` line naming the
model's files and the command that continues, exit 2; the last complete checkpoint and the best step so far stay
as they were, and `--resume latest` after the fix ends exactly as an uninterrupted run. The face model is the
tiny ONNX pack (libs/tiny_submission.py) loaded and run by insightface itself."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import sample
import score
from conftest import copy_folder, stop_when
from entrypoints import run_entry
from libs.config import REPO_ROOT
from libs.face import DlibBackend, FaceModelFailed, InsightFaceBackend
from libs.photos import image_is_complete
from libs.sample import rerank as rerank_module
from libs.train import MetricScorer, TrainingError
from libs.train import metrics as metrics_module
from libs.train import train as train_fn
from libs.train_output import CHECKPOINT_DIR, META_FILE, UVIT_LORA_FILE, candidate_path, list_checkpoints

DETECTOR = "det_tiny.onnx"


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` by its content (what must stay as it was)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error(err: str) -> str:
    assert "Traceback" not in err, err
    assert len(re.findall(r"^error: ", err, re.M)) == 1, err
    return err


# --- the pack damaged while a preempted run waits (real processes) ----------------------------------


@pytest.mark.slow
def test_a_face_model_damaged_before_a_resume_stops_it_and_the_fixed_resume_finishes(
        tiny_config_file, photos, tiny_insightface_root, tmp_path):
    extra = tmp_path / "extra"
    pack = copy_folder(tiny_insightface_root, extra / "insightface") / "models" / "buffalo_l"
    out = tmp_path / "run"
    args = [sys.executable, str(REPO_ROOT / "train.py"), "--config", str(tiny_config_file), "-d", str(photos),
            "-o", str(out), "--no_prior_preservation", "--train_step", "12", "--validation_steps", "2",
            "--checkpointing_steps", "2", "--log_every", "1", "--validation_face_backend", "insightface"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UNIDIFFUSER_EXTRA_MODELS": str(extra)}

    def run(*extra_args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*args, *extra_args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)

    # preempted after the first scored validation (step 2) was checkpointed
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    _, err = stop_when(first, lambda: bool(list_checkpoints(out)), "a first checkpoint")
    assert first.returncode == 128 + signal.SIGTERM, err
    stopped_at = json.loads((list_checkpoints(out)[-1] / "training_state.json").read_text())["step"]
    assert 2 <= stopped_at < 12
    before = snapshot(out)

    # the detector's file damaged (a partial copy, a failing disk): the resume names it and changes nothing
    detector = (pack / DETECTOR).read_bytes()
    (pack / DETECTOR).write_bytes(detector[:200])
    damaged = run("--resume", "latest")
    err = one_error(damaged.stderr)
    assert damaged.returncode == 2, err
    assert str(pack) in err and DETECTOR in err and "install the pack again" in err, err
    assert f"checkpoints in {out / CHECKPOINT_DIR} are untouched" in err and "--resume latest" in err, err
    assert snapshot(out) == before and not (out / ".lock").exists()

    # installed again: the printed command continues from the checkpoint, with the steps scored before
    (pack / DETECTOR).write_bytes(detector)
    fixed = run("--resume", "latest")
    assert fixed.returncode == 0, fixed.stderr
    assert f"(step {stopped_at})" in fixed.stdout, fixed.stdout
    selection = json.loads((out / META_FILE).read_text())["selection"]
    assert selection["face_backend"] == "insightface"
    assert sorted(map(int, selection["scores"])) == [2, 4, 6, 8, 10, 12]


# --- the face model's runtime failing at a later validation (in process) ----------------------------


def configured(config):
    config.train.update({"with_prior_preservation": False, "train_step": 8, "validation_steps": 2,
                         "checkpointing_steps": 3, "log_every": 1})
    return config


class FailingFrom:
    """insightface's FaceAnalysis.get of the real tiny pack, failing as onnxruntime fails when its device or its
    session breaks (onnxruntime's own exception), from the `calls`-th image on: a fault at the model's edge."""

    def __init__(self, backend: InsightFaceBackend, calls: int):
        self.get, self.calls = backend.app.get, calls

    def __call__(self, image):
        from onnxruntime.capi.onnxruntime_pybind11_state import Fail

        self.calls -= 1
        if self.calls <= 0:
            raise Fail("[ONNXRuntimeError] : 1 : FAIL : session run failed")
        return self.get(image)


@pytest.mark.slow
def test_a_face_model_failing_at_a_later_validation_stops_keeping_the_last_good_state(
        tiny_config, photos, tiny_insightface_root, tmp_path, monkeypatch):
    backend = InsightFaceBackend(root=tiny_insightface_root)
    monkeypatch.setattr(metrics_module, "get_face_backend", lambda name, **kwargs: backend)

    def scorer() -> MetricScorer:
        return MetricScorer(configured(tiny_config), "insightface")

    train_fn(configured(tiny_config), photos, tmp_path / "uninterrupted", score_fn=scorer())

    out = tmp_path / "run"
    real_get = backend.app.get
    # each scored validation detects in 2 photos (once) and 2 images: the first image of the second one fails
    backend.app.get = FailingFrom(backend, calls=2 + 2 + 1)
    try:
        with pytest.raises(TrainingError) as stopped:
            train_fn(configured(tiny_config), photos, out, score_fn=scorer())
    finally:
        backend.app.get = real_get
    message = str(stopped.value)
    assert isinstance(stopped.value.__cause__, FaceModelFailed)
    assert "insightface face model" in message and "failed while detecting faces" in message, message
    assert str(tiny_insightface_root / "models" / "buffalo_l") in message and "--resume latest" in message, message
    checkpoint = out / CHECKPOINT_DIR / "checkpoint-000003"
    assert f"the last complete checkpoint {checkpoint}" in message, message
    assert f"the best step so far (2) in {candidate_path(out, 2)}" in message, message
    assert list_checkpoints(out) == [checkpoint] and candidate_path(out, 2).is_file()
    assert not (out / META_FILE).exists() and not (out / ".lock").exists()

    train_fn(configured(tiny_config), photos, out, resume="latest", score_fn=scorer())
    reference = tmp_path / "uninterrupted"
    assert (out / UVIT_LORA_FILE).read_bytes() == (reference / UVIT_LORA_FILE).read_bytes()
    assert (json.loads((out / META_FILE).read_text())["selection"]
            == json.loads((reference / META_FILE).read_text())["selection"])


# --- best-of-N and score.py ---------------------------------------------------------------------------


def damaged_pack(tiny_insightface_root: Path, root: Path) -> Path:
    """A copy of the tiny pack whose detector file was cut short; returns the folder holding models/."""
    copy_folder(tiny_insightface_root, root)
    detector = root / "models" / "buffalo_l" / DETECTOR
    detector.write_bytes(detector.read_bytes()[:200])
    return root


def sample_args(config_file: Path, personalization: Path, photos: Path, prompts: Path, out: Path) -> list:
    return ["--config", config_file, "--restore_path", personalization, "--prompt_path", prompts, "--output_path", out,
            "--steps", "2", "--device", "cpu", "--candidates", "2", "--reference_dir", photos]


@pytest.fixture()
def two_prompts(tmp_path) -> Path:
    path = tmp_path / "boy1.json"
    path.write_text(json.dumps(["a photo of a boy", "a boy on the beach"]))
    return path


def test_best_of_n_with_a_damaged_face_model_stops_before_rendering(tiny_config_file, personalization, photos,
                                                                    two_prompts, tiny_insightface_root, tmp_path,
                                                                    monkeypatch, capsys):
    extra = tmp_path / "extra"
    damaged_pack(tiny_insightface_root, extra / "insightface")
    monkeypatch.setenv("UNIDIFFUSER_EXTRA_MODELS", str(extra))
    out = tmp_path / "outputs" / "boy1"
    assert run_entry(sample, sample_args(tiny_config_file, personalization, photos, two_prompts, out)) == 2
    err = one_error(capsys.readouterr().err)
    assert DETECTOR in err and "install the pack again" in err, err
    assert not out.exists()


class DetectorFailingFrom:
    """dlib's HOG detector (the real one), raising dlib's RuntimeError from the `calls`-th image on."""

    def __init__(self, detector, calls: int):
        self.detector, self.calls = detector, calls

    def run(self, *args):
        self.calls -= 1
        if self.calls <= 0:
            raise RuntimeError("dlib: device failure")
        return self.detector.run(*args)


def test_best_of_n_whose_face_model_fails_keeps_the_whole_images_and_skip_existing_completes_them(
        tiny_config_file, personalization, photos, two_prompts, tmp_path, monkeypatch, capsys):
    backend = DlibBackend()
    monkeypatch.setattr(rerank_module, "get_face_backend", lambda name, **kwargs: backend)
    args = ["--rerank_face_backend", "dlib"]
    reference = tmp_path / "uninterrupted"
    assert run_entry(sample, [*sample_args(tiny_config_file, personalization, photos, two_prompts, reference),
                              *args]) == 0

    out = tmp_path / "outputs" / "boy1"
    detector = backend.detector
    # the 2 reference photos, then the 3 x 2 candidates of prompt 0; the first candidate of prompt 1 fails
    backend.detector = DetectorFailingFrom(detector, calls=2 + 6 + 1)
    try:
        code = run_entry(sample, [*sample_args(tiny_config_file, personalization, photos, two_prompts, out), *args])
    finally:
        backend.detector = detector
    err = one_error(capsys.readouterr().err)
    assert code == 2 and "dlib face model" in err and "failed while detecting faces" in err, err
    assert "The 3 image(s) of the prompts ranked before are whole" in err and "--skip_existing" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["0-000.jpg", "0-001.jpg", "0-002.jpg"]
    assert all(image_is_complete(p) for p in out.iterdir())

    assert run_entry(sample, [*sample_args(tiny_config_file, personalization, photos, two_prompts, out), *args,
                              "--skip_existing"]) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in reference.iterdir()}


def test_score_py_with_a_damaged_face_model_names_it_and_writes_nothing(photos, tiny_world, tiny_insightface_root,
                                                                          tmp_path, capsys):
    (tmp_path / "eval_prompts").mkdir()
    (tmp_path / "eval_prompts" / "boy1.json").write_text(json.dumps(["a photo of a boy"]))
    images = tmp_path / "outputs" / "boy1"
    images.mkdir(parents=True)
    for index in range(3):
        Image.new("RGB", (64, 64), (index * 60, 90, 90)).save(images / f"0-{index:03d}.jpg")
    before = snapshot(tmp_path / "outputs")
    root = damaged_pack(tiny_insightface_root, tmp_path / "insightface")
    code = run_entry(score, ["--dataset", photos.parent, "--prompts", tmp_path / "eval_prompts", "--outputs",
                             tmp_path / "outputs", "--tasks", "boy1", "--insightface_root", root,
                             "--clip_model", tiny_world / "clip-vit-base-patch32", "--device", "cpu"])
    err = one_error(capsys.readouterr().err)
    assert code == 2 and DETECTOR in err and "install the pack again" in err, err
    assert snapshot(tmp_path / "outputs") == before
