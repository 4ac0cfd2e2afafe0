"""Metric validation during training and best-step selection, on the tiny world: the logged scores are score.py's
numbers on the saved images, the adapters written are the best step's (bitwise), a resumed run chooses as an
uninterrupted one, candidates stay bounded on disk, the face-model fallbacks, and the plot and grids."""
from __future__ import annotations

import json
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPTokenizer

import score
from libs.files import load_safetensors
from libs.face import FaceModelMissing
from libs.photos import open_image
from libs.sample.files import save_jpeg
from libs.sample.pipeline import load_pipeline
from libs.train import (METRICS, MetricScorer, Objective, Rendered, TrainingError, ValidationScores, make_plan,
                        train)
from libs.train import metrics as metrics_module
from libs.train.selection import SelectionError
from libs.train_output import (CANDIDATE_DIR, CHECKPOINT_DIR, LOG_DIR, LOG_FILE, META_FILE, TOKEN_FILE, UVIT_LORA_FILE,
                               VALIDATION_DIR, candidate_files, list_checkpoints)


@pytest.fixture(scope="module")
def positive_clip_dir(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny CLIP ViT-B/32 with its text projection negated: its text/image cosines become positive (the
    original's are all negative, so every CLIP-T would be clamped to 0 and compare trivially)."""
    folder = tmp_path_factory.mktemp("clip_positive")
    source = tiny_world / "clip-vit-base-patch32"
    model = CLIPModel.from_pretrained(source)
    with torch.no_grad():
        model.text_projection.weight.neg_()
    model.save_pretrained(folder)
    CLIPTokenizer.from_pretrained(source).save_pretrained(folder)
    for extra in source.glob("preprocessor_config.json"):
        (folder / extra.name).write_bytes(extra.read_bytes())
    return folder


def configured(config, **train_settings):
    config.train.update(with_prior_preservation=False, **train_settings)
    return config


def logged(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / LOG_DIR / LOG_FILE).read_text().splitlines()]


class KnownCurve:
    """An injected scorer: the objective (sim_face) at step k is curve[k]; records what it was asked."""

    def __init__(self, curve: dict[int, float]):
        self.curve = curve
        self.calls: list[tuple[str, int]] = []

    def __call__(self, rendered: Rendered) -> ValidationScores:
        assert all(len(images) == 1 for split in rendered.images.values() for images in split)
        self.calls.append((rendered.folder.parent.parent.name, rendered.step))
        values = {metric: 0.0 for metric in METRICS}
        values["sim_face"] = self.curve[rendered.step]
        return ValidationScores(values, "test", True)


def adapters(out: Path) -> dict[str, torch.Tensor]:
    """uvit_lora.safetensors + token_embeddings.safetensors under the training parameters' names."""
    tensors = {f"nnet.{k.replace('.weight', '.default.weight')}": v
               for k, v in load_safetensors(out / UVIT_LORA_FILE).items()}
    (rows,) = load_safetensors(out / TOKEN_FILE).values()
    tensors["text_encoder.transformer.embeddings.token_embedding.extra_weight"] = rows
    return tensors


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


# --- the logged scores are score.py's ------------------------------------------------------------


def test_logged_scores_equal_score_py_on_the_saved_images(tiny_config, photos, positive_clip_dir, tmp_path):
    config = configured(tiny_config, train_step=2, validation_steps=1, validation_images=3,
                        validation_face_backend="dlib")
    config.paths.clip_img = str(positive_clip_dir)  # the training's image tower and the scorer's CLIP
    out = tmp_path / "out"
    train(config, photos, out)

    lines = {line["step"]: line for line in logged(out) if "objective" in line}
    assert sorted(lines) == [1, 2]  # step 0 has the fixed-noise loss only
    assert all(line["face_backend"] == "dlib" for line in lines.values())
    for step, line in lines.items():
        args = score.parse_args(["--dataset", str(photos.parent), "--prompts", str(out / VALIDATION_DIR / "prompts"),
                                 "--outputs", str(out / VALIDATION_DIR / f"step-{step:06d}"), "--tasks", "boy1",
                                 "--face_backend", "dlib", "--clip_model", str(positive_clip_dir)])
        (result,) = score.main(args)
        assert result.split == "advanced"
        for metric, value in result.advanced.items():
            assert abs(line[metric] - value) <= 1e-6, (step, metric, line[metric], value)
        assert line["edit_clip_text"] > 0 and line["sim_clip_img"] > 0  # not a comparison of zeros
        assert all(image.found for task in result.tasks.values() for image in task.images)

    meta = json.loads((out / META_FILE).read_text())
    assert meta["selection"]["face_backend"] == "dlib" and set(meta["selection"]["scores"]) == {"1", "2"}
    assert meta["selection"]["scores"]["2"]["edit_clip_text"] == lines[2]["edit_clip_text"]

    with Image.open(out / VALIDATION_DIR / "curves.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 400
        plot.verify()
    for step in (1, 2):
        with Image.open(out / VALIDATION_DIR / f"step-{step:06d}.jpg") as grid:
            assert grid.format == "JPEG" and grid.size == (48 + 3 * 256, 2 * 256)  # sim and edit rows, 3 images
            grid.verify()
    assert not (out / CANDIDATE_DIR).exists()


def test_validation_images_are_what_sample_py_renders_from_the_step(tiny_config, photos, tmp_path):
    """The validated step's images are the ones its adapters give in sample.py's pipeline (same prompts, noise
    and solver steps), also with `empty_token` guidance while the text encoder trains: the empty prompt's
    encoding is the step's, not the first validation's."""
    config = configured(tiny_config, text_encoder_mode="lora", text_lr=1e-2, train_step=2, validation_steps=1,
                        validation_images=1, selection="last")
    config.sample.cfg_mode = "empty_token"
    rendered: dict[int, Rendered] = {}

    def keep(step_images: Rendered) -> ValidationScores:
        rendered[step_images.step] = step_images
        return ValidationScores({metric: 0.0 for metric in METRICS}, "test", True)

    out = tmp_path / "out"
    train(config, photos, out, score_fn=keep)
    last = rendered[2]
    vset = last.validation_set
    items = vset.items()
    pipeline = load_pipeline(config, "cpu", out)
    images = pipeline.generate([item.sampled for item in items], [vset.generator(item) for item in items],
                               steps=int(config.train.validation_sample_steps))
    for item, image in zip(items, images):
        save_jpeg(image, tmp_path / "sampled.jpg")
        sampled = np.asarray(open_image(tmp_path / "sampled.jpg"), dtype=np.float32)
        validated = np.asarray(last.images[item.split][item.index][item.idx], dtype=np.float32)
        assert np.abs(sampled - validated).mean() < 0.05, item  # a stale empty prompt: ~0.5 per pixel


# --- selection ------------------------------------------------------------------------------------


def test_the_adapters_written_are_the_best_steps(tiny_config, photos, tmp_path):
    curve = {1: 0.1, 2: 0.3, 3: 0.9, 4: 0.5, 5: 0.2}
    settings = dict(train_step=5, validation_steps=1, checkpointing_steps=1, checkpoints_total_limit=10,
                    keep_checkpoints=True)
    best = tmp_path / "best"
    train(configured(deepcopy(tiny_config), **settings), photos, best, score_fn=KnownCurve(curve))

    checkpoints = {int(p.name.split("-")[1]): p for p in list_checkpoints(best)}
    assert sorted(checkpoints) == [1, 2, 3, 4, 5]
    assert_bitwise(adapters(best), load_safetensors(checkpoints[3] / "trainable.safetensors"))
    meta = json.loads((best / META_FILE).read_text())
    assert meta["steps"] == 3 and meta["trained_steps"] == 5
    selection = meta["selection"]
    assert selection["chosen_step"] == 3 and selection["mode"] == "best"
    assert selection["objective"] == "sim_face + edit_face + edit_clip_text"
    assert {int(k): v["objective"] for k, v in selection["scores"].items()} == curve
    assert [line["objective"] for line in logged(best) if "objective" in line] == list(curve.values())

    last = tmp_path / "last"
    train(configured(deepcopy(tiny_config), selection="last", **settings), photos, last, score_fn=KnownCurve(curve))
    assert_bitwise(adapters(last), load_safetensors(checkpoints[5] / "trainable.safetensors"))
    assert json.loads((last / META_FILE).read_text())["selection"]["chosen_step"] == 5
    assert not (last / CANDIDATE_DIR).exists()


def test_candidates_stay_bounded_and_a_resumed_run_chooses_the_same(tiny_config, photos, tmp_path):
    # the best so far changes after the checkpoint at step 3: a resume from it needs step 2's candidate
    curve = {1: 0.1, 2: 0.5, 3: 0.2, 4: 0.9, 5: 0.3, 6: 0.1}

    def config():
        return configured(deepcopy(tiny_config), train_step=6, validation_steps=1, checkpointing_steps=3,
                          lr_scheduler="cosine", warmup_steps=2)

    def bounded(out: Path):
        def check(step, logs):
            assert len(candidate_files(out)) <= 2  # the best so far + the best the checkpoint recorded
        return check

    straight = tmp_path / "straight"
    train(config(), photos, straight, score_fn=KnownCurve(curve), on_step=bounded(straight))

    resumed = tmp_path / "resumed"
    seen = bounded(resumed)

    def interrupt(step, logs):
        seen(step, logs)
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(), photos, resumed, score_fn=KnownCurve(curve), on_step=interrupt)
    assert sorted(p.name for p in candidate_files(resumed)) == ["step-000002.safetensors", "step-000004.safetensors"]

    scorer = KnownCurve(curve)
    train(config(), photos, resumed, resume="latest", score_fn=scorer, on_step=seen)
    assert [step for _, step in scorer.calls] == [4, 5, 6]  # steps up to the checkpoint are not validated again
    assert_bitwise(adapters(straight), adapters(resumed))
    chosen = [json.loads((out / META_FILE).read_text())["selection"] for out in (straight, resumed)]
    assert chosen[0] == chosen[1] and chosen[0]["chosen_step"] == 4
    assert not (resumed / CANDIDATE_DIR).exists() and not (resumed / CHECKPOINT_DIR).exists()
    assert [line["step"] for line in logged(resumed)] == [line["step"] for line in logged(straight)]


def test_no_validation_keeps_the_last_step(tiny_config, photos, tmp_path):
    result = train(configured(tiny_config, train_step=2), photos, tmp_path / "out")
    assert result.selection["chosen_step"] == 2 and "validation_steps 0" in result.selection["reason"]
    assert not (tmp_path / "out" / VALIDATION_DIR / "curves.png").exists()


# --- the objective and the face fallbacks ---------------------------------------------------------


def test_objective_text():
    objective = Objective.parse("sim_face + 0.5*edit_clip_text + 2 * edit_face")
    scores = {"sim_face": 0.4, "sim_clip_img": 0.9, "edit_face": 0.3, "edit_clip_img": 0.8, "edit_clip_text": 0.2}
    assert objective(scores) == pytest.approx(0.4 + 0.1 + 0.6)
    assert str(objective) == "sim_face + 0.5*edit_clip_text + 2*edit_face"
    fallback = objective.without_face()
    assert fallback(scores) == pytest.approx(0.9 + 0.1 + 1.6) and "face" not in str(fallback)
    for bad in ("identity", "sim_face +", "-1*sim_face", "0*sim_face"):
        with pytest.raises(SelectionError):
            Objective.parse(bad)


def test_a_bad_objective_is_refused_before_anything_is_written(tiny_config, photos, tmp_path):
    with pytest.raises(TrainingError, match="edit_clip_text"):
        make_plan(configured(tiny_config, objective="sim_face + clip"), photos, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_without_a_face_model_selection_uses_clip(tiny_config, photos, tmp_path, monkeypatch, capsys):
    def missing(name, **kwargs):
        raise FaceModelMissing("no face model here")

    monkeypatch.setattr(metrics_module, "get_face_backend", missing)
    scorer = MetricScorer(tiny_config, "auto")
    assert scorer.face_backend == "none"
    assert "no face model usable" in capsys.readouterr().out

    config = configured(tiny_config, train_step=2, validation_steps=1)
    result = train(config, photos, tmp_path / "out", score_fn=scorer)
    selection = result.selection
    assert selection["face_usable"] is False and selection["face_backend"] == "none"
    assert selection["objective_used"] == "sim_clip_img + edit_clip_img + edit_clip_text"
    for values in selection["scores"].values():
        assert values["sim_face"] == values["edit_face"] == 0
        assert values["objective"] == pytest.approx(values["sim_clip_img"] + values["edit_clip_img"]
                                                    + values["edit_clip_text"])
    best = max((int(k) for k in selection["scores"]), key=lambda k: selection["scores"][str(k)]["objective"])
    assert selection["chosen_step"] == best


def test_without_buffalo_l_faces_are_scored_with_dlib_and_it_says_so(tiny_config, tmp_path, monkeypatch, capsys):
    import libs.face

    monkeypatch.setattr(libs.face, "INSIGHTFACE_ROOT", str(tmp_path / "no_insightface"))
    scorer = MetricScorer(tiny_config, "auto")
    assert scorer.face_backend == "dlib"
    said = capsys.readouterr().out
    assert said.count("face backend: dlib") == 1 and "NOT comparable" in said


def test_dlib_without_a_face_in_the_photos_falls_back_and_says_so(tiny_config, public_photos, tmp_path, capsys):
    folder = tmp_path / "girl1"
    folder.mkdir()
    public_photos["camera"].save(folder / "camera.png")  # a person, no frontal face
    scorer = MetricScorer(tiny_config, "dlib")
    result = train(configured(tiny_config, train_step=1, validation_steps=1), folder, tmp_path / "out",
                   score_fn=scorer)
    assert result.selection["face_backend"] == "dlib" and result.selection["face_usable"] is False
    assert capsys.readouterr().out.count("no face found by dlib") == 1  # said once, not at every step
