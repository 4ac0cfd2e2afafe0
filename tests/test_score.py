"""The competition metric, checked against an independent computation: real dlib face codes on public
photos, tiny (random but real) CLIP models, the real file layout, reports and command line."""
from __future__ import annotations

import ast
import csv
import json
import re
import shutil
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPTokenizer

import score
from entrypoints import run_entry
from libs.errors import UserError
from libs.models.clip import clip_image_preprocess
from libs.face import DlibBackend, InsightFaceBackend
from libs.photos import PhotoError
from libs.photos import open_image as load_rgb
from libs.prompts import image_name
from libs.layout import SUBJECTS
from libs.score.metrics import ADVANCED_KEYS, METRIC_NAMES, METRICS
from libs.score.report import REPORT_HTML, RESULTS_CSV, RESULTS_JSON, write_reports
from libs.score.results import ImageScore, PromptScore, ScoreResult, TaskResult
from libs.score.scorer import DEFAULT_PROMPT_ROOTS, Scorer, ScoringError, ScoringWarning, detect_runs, detect_split, score_outputs
from libs.tiny_submission import synthetic_face, write_tiny_insightface_pack
from libs.train.selection import METRICS as OBJECTIVE_METRICS

LONG_PROMPT = "a photo of a woman astronaut, " * 12  # 86 CLIP tokens


# --- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip_dir(tiny_world: Path) -> Path:
    """The tiny random CLIP ViT-B/32 stand-in: its text/image cosines happen to be all negative."""
    return tiny_world / "clip-vit-base-patch32"


@pytest.fixture(scope="module")
def scorer(dlib_backend: DlibBackend, positive_clip_dir: Path) -> Scorer:
    return Scorer(dlib_backend, clip_model=str(positive_clip_dir), device="cpu", progress=False)


def _save(image: Image.Image | np.ndarray, path: Path, **kwargs) -> Path:
    image = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def _write_prompts(path: Path, prompts: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(prompts))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, public_photos) -> Path:
    """Two subjects in the competition layout.

    astro: refs astronaut (.jpg), a flipped smaller Grace Hopper (.png: max over refs must differ from their
           mean) and camera (.jpeg, no detectable face);
           prompt 0 -> astronaut, Grace Hopper, grey; prompt 1 -> astronaut (JPEG q40), missing, corrupt.
    grace: ref Grace Hopper; one prompt -> Grace Hopper, astronaut, grey.
    """
    root = tmp_path_factory.mktemp("run")
    astronaut, grace, camera = public_photos["astronaut"], public_photos["grace_hopper"], public_photos["camera"]
    _save(astronaut, root / "train_data/astro/a.jpg", quality=95)
    _save(grace.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((320, 375)), root / "train_data/astro/b.png")
    _save(camera, root / "train_data/astro/c.jpeg", quality=95)
    _save(grace, root / "train_data/grace/g.jpg", quality=95)
    grey = Image.new("RGB", (256, 256), (128, 128, 128))
    small = {"astronaut": astronaut.resize((256, 256)), "grace": grace.resize((256, 256))}
    _write_prompts(root / "eval_prompts/astro.json", ["a photo of a woman astronaut", LONG_PROMPT])
    _write_prompts(root / "eval_prompts/grace.json", ["an old portrait of a woman in uniform"])
    out = root / "outputs"
    for name, image in [("0-000", small["astronaut"]), ("0-001", small["grace"]), ("0-002", grey),
                        ("1-000", small["astronaut"])]:
        _save(image, out / f"astro/{name}.jpg", quality=40 if name == "1-000" else 95)
    (out / "astro/1-002.jpg").write_bytes(b"not a jpeg")
    for name, image in [("0-000", small["grace"]), ("0-001", small["astronaut"]), ("0-002", grey)]:
        _save(image, out / f"grace/{name}.jpg", quality=95)
    return root


@pytest.fixture(scope="module")
def scored(run_dir: Path, scorer: Scorer):
    with pytest.warns(ScoringWarning) as caught:
        result = score_outputs(run_dir / "train_data", run_dir / "eval_prompts", run_dir / "outputs",
                               tasks=["astro", "grace"], scorer=scorer)
    return result, [str(w.message) for w in caught]


# --- an independent computation of the metric -----------------------------------------------------

class Reference:
    """The metric recomputed from the models' public interfaces: CLIPModel's own normalized embeddings."""

    def __init__(self, clip_dir: Path, backend: DlibBackend):
        self.model = CLIPModel.from_pretrained(clip_dir).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(clip_dir)
        self.backend = backend
        self.size = self.model.config.vision_config.image_size

    @torch.no_grad()
    def embeds(self, paths: list[Path], prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        images = [Image.open(p).convert("RGB") for p in paths]
        tokens = self.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        out = self.model(input_ids=tokens.input_ids, pixel_values=clip_image_preprocess(images, self.size))
        return out.image_embeds, out.text_embeds

    def face(self, path: Path) -> np.ndarray | None:
        return self.backend.embed_first(np.asarray(Image.open(path).convert("RGB")))


@pytest.fixture(scope="module")
def reference(positive_clip_dir: Path, dlib_backend: DlibBackend) -> Reference:
    return Reference(positive_clip_dir, dlib_backend)


# --- the formulas --------------------------------------------------------------------------------

def test_image_scores_match_the_formula(scored, run_dir: Path, reference: Reference):
    result, _ = scored
    task = result.tasks["astro"]
    refs = sorted((run_dir / "train_data/astro").iterdir())
    assert [Path(r.path).name for r in task.references] == ["a.jpg", "b.png", "c.jpeg"]
    assert [r.face_found for r in task.references] == [True, True, False]
    ref_faces = [reference.face(p) for p in refs[:2]]

    prompts = json.loads((run_dir / "eval_prompts/astro.json").read_text())
    generated = [run_dir / f"outputs/astro/{name}.jpg" for name in ("0-000", "0-001", "0-002", "1-000")]
    image_embeds, text_embeds = reference.embeds(refs + generated, prompts)
    ref_clip, gen_clip = image_embeds[:3], image_embeds[3:]
    checked_max_not_mean = False
    for k, (path, prompt_index) in enumerate(zip(generated, (0, 0, 0, 1))):
        got = task.prompts[prompt_index].images[int(path.stem[-1])]
        assert got.found and got.path == str(path)
        face = reference.face(path)
        if face is None:
            assert not got.face_found and got.face == 0.0
        else:
            sims = [reference.backend.similarity(face, ref) for ref in ref_faces]
            assert got.face_found and got.face == pytest.approx(max(0.0, max(sims)), abs=1e-6)
            checked_max_not_mean |= abs(max(sims) - np.mean(sims)) > 0.1
        cosines = (ref_clip @ gen_clip[k]).tolist()
        assert got.clip_img == pytest.approx(max(0.0, max(cosines)), abs=1e-4)
        assert max(cosines) - np.mean(cosines) > 1e-3
        assert got.clip_text == pytest.approx(max(0.0, float(gen_clip[k] @ text_embeds[prompt_index])), abs=1e-4)
        assert got.clip_text > 0.0
    assert checked_max_not_mean, "the data must tell max over refs from mean over refs"
    grey = task.prompts[0].images[2]
    assert not grey.face_found and grey.face == 0.0 and grey.clip_img > 0.0


def test_in_memory_images_score_like_files_with_the_same_pixels(run_dir: Path, tmp_path: Path, scorer: Scorer,
                                                                public_photos):
    """Training scores PIL images with score_images, score.py scores files: the same pixels must give the same
    numbers. Lossless files hold the pixels that were saved; a JPEG file holds other pixels, so its numbers
    are those of its decoded pixels."""
    astronaut, grace = public_photos["astronaut"].resize((200, 200)), public_photos["grace_hopper"].resize((200, 234))
    rendered = [[astronaut, grace, Image.new("RGB", (200, 200), (128, 128, 128))],
                [grace.transpose(Image.Transpose.FLIP_LEFT_RIGHT), astronaut.crop((20, 0, 180, 200)), astronaut]]
    prompts = ["a photo of a woman astronaut", "an old portrait of a woman in a navy uniform, oil painting"]
    for index, images in enumerate(rendered):
        for idx, image in enumerate(images):
            _save(image, tmp_path / "png" / image_name(index, idx), format="PNG")  # lossless, under the graded name
            _save(image, tmp_path / "jpeg" / image_name(index, idx), quality=75)
    ref_dir = run_dir / "train_data/astro"
    from_png = scorer.score_task(ref_dir, prompts, tmp_path / "png")
    from_jpeg = scorer.score_task(ref_dir, prompts, tmp_path / "jpeg")

    def numbers(prompt_score):
        return [(i.found, i.face_found, i.face, i.clip_img, i.clip_text) for i in prompt_score.images]

    jpeg_changed_numbers = False
    for index, (prompt, images) in enumerate(zip(prompts, rendered)):
        decoded = [load_rgb(tmp_path / "jpeg" / image_name(index, idx)) for idx in range(3)]
        in_memory = scorer.score_images(ref_dir, prompt, images, index=index)
        in_memory_decoded = scorer.score_images(ref_dir, prompt, decoded, index=index)
        for got, expected in [(in_memory, from_png.prompts[index]), (in_memory_decoded, from_jpeg.prompts[index])]:
            assert (got.index, got.prompt, got.num_tokens) == (expected.index, expected.prompt, expected.num_tokens)
            for got_image, expected_image in zip(numbers(got), numbers(expected), strict=True):
                assert got_image[:2] == expected_image[:2]
                assert got_image[2:] == pytest.approx(expected_image[2:], abs=1e-6)
        jpeg_changed_numbers |= any(abs(a - b) > 1e-6 for x, y in zip(numbers(in_memory), numbers(in_memory_decoded))
                                    for a, b in zip(x[2:], y[2:]))
    assert any(i.face_found for i in from_png.images) and any(not i.face_found for i in from_png.images)
    assert jpeg_changed_numbers, "JPEG encoding changes pixels: compare files with their decoded pixels"


def test_missing_and_corrupt_images_score_zero_and_are_listed(scored, run_dir: Path):
    result, warned = scored
    task = result.tasks["astro"]
    missing, corrupt = task.prompts[1].images[1], task.prompts[1].images[2]
    for image in (missing, corrupt):
        assert not image.found and not image.face_found
        assert (image.face, image.clip_img, image.clip_text) == (0.0, 0.0, 0.0)
    assert missing.error == "missing" and corrupt.error.startswith("unreadable")
    assert task.missing == [str(run_dir / "outputs/astro/1-001.jpg"), str(run_dir / "outputs/astro/1-002.jpg")]
    assert any("1-001.jpg" in message and "1-002.jpg" in message for message in warned)
    # the detection rate counts the images that exist: astronaut, Grace Hopper and astronaut have faces, grey not
    assert task.face_detection_rate == pytest.approx(3 / 4)


def test_means_go_images_then_prompts_then_tasks(scored):
    result, _ = scored
    for task in result.tasks.values():
        for metric in ("face", "clip_img", "clip_text"):
            for prompt in task.prompts:
                assert len(prompt.images) == 3  # a missing image still counts, as a 0
                assert getattr(prompt, metric) == pytest.approx(sum(getattr(i, metric) for i in prompt.images) / 3)
            assert getattr(task, metric) == pytest.approx(np.mean([getattr(p, metric) for p in task.prompts]))
    tasks = list(result.tasks.values())
    summary = result.preliminary
    assert set(summary) == {"face", "img_clip", "text_clip"}
    assert summary["face"] == pytest.approx(np.mean([t.face for t in tasks]))
    assert summary["img_clip"] == pytest.approx(np.mean([t.clip_img for t in tasks]))
    assert summary["text_clip"] == pytest.approx(np.mean([t.clip_text for t in tasks]))
    flat = np.mean([i.face for t in tasks for i in t.images])
    by_prompt = np.mean([p.face for t in tasks for p in t.prompts])
    assert abs(summary["face"] - flat) > 1e-3 and abs(summary["face"] - by_prompt) > 1e-3, \
        "the data must tell the averaging orders apart"
    assert result.split == "preliminary" and result.advanced is None


def test_long_prompt_is_truncated_with_a_warning_not_zeroed(scored, run_dir: Path, reference: Reference):
    result, warned = scored
    prompt = result.tasks["astro"].prompts[1]
    assert prompt.truncated and prompt.num_tokens > 77
    assert any("astro prompt 1" in message and "77" in message for message in warned)
    image = run_dir / "outputs/astro/1-000.jpg"
    image_embeds, text_embeds = reference.embeds([image], [LONG_PROMPT])
    expected = float(image_embeds[0] @ text_embeds[0])
    assert prompt.images[0].clip_text == pytest.approx(expected, abs=1e-4) and expected > 0


def test_negative_cosines_clamp_to_zero(run_dir: Path, clip_dir: Path, dlib_backend: DlibBackend):
    """With the unmodified tiny CLIP every text/image cosine is negative: clip_text must be exactly 0."""
    plain = Scorer(dlib_backend, clip_model=str(clip_dir), device="cpu", progress=False)
    prompts = ["a photo of a woman astronaut"]
    task = plain.score_task(run_dir / "train_data/grace", prompts, run_dir / "outputs/grace")
    image = Image.open(run_dir / "outputs/grace/0-000.jpg").convert("RGB")
    raw = float(plain.image_features([image])[0] @ plain.text_features(prompts)[0])
    assert raw < 0
    assert all(i.clip_text == 0.0 for i in task.images)
    assert all(i.clip_img > 0.0 for i in task.images)


def test_negative_face_cosine_clamps_to_zero_with_insightface(tmp_path: Path, positive_clip_dir: Path):
    """insightface compares by plain cosine, which can be negative; the score must clamp it at 0."""
    write_tiny_insightface_pack(tmp_path / "if")
    backend = InsightFaceBackend(root=tmp_path / "if")
    _save(synthetic_face("left"), tmp_path / "refs/left.png")
    for name, image in [("0-000", synthetic_face("left")), ("0-001", synthetic_face("right")),
                        ("0-002", np.zeros((640, 640, 3), np.uint8))]:
        _save(image, tmp_path / f"out/{name}.jpg", format="PNG")  # lossless pixels under the expected name
    scorer = Scorer(backend, clip_model=str(positive_clip_dir), device="cpu", progress=False)
    task = scorer.score_task(tmp_path / "refs", ["a face"], tmp_path / "out")
    same, mirrored, empty = task.prompts[0].images
    assert same.face_found and same.face == pytest.approx(1.0, abs=1e-5)
    raw = backend.similarity(backend.embed_first(synthetic_face("right")), backend.embed_first(synthetic_face("left")))
    assert raw < 0 and mirrored.face_found and mirrored.face == 0.0
    assert not empty.face_found and empty.face == 0.0


def test_subject_without_detectable_face_scores_face_zero(run_dir: Path, tmp_path: Path, scorer: Scorer):
    shutil.copy(run_dir / "train_data/astro/c.jpeg", tmp_path / "camera.jpeg")
    with pytest.warns(ScoringWarning, match="no face detected in any reference photo"):
        task = scorer.score_task(tmp_path, ["a photo of a woman astronaut"], run_dir / "outputs/grace")
    assert task.reference_faces == 0
    assert task.images[0].face_found and task.images[1].face_found  # the generated faces are there...
    assert task.face == 0.0  # ...but there is nothing to compare them with
    assert task.clip_img > 0.0 and task.clip_text > 0.0


# --- the advanced split --------------------------------------------------------------------------

def test_advanced_split_is_detected_and_gives_five_numbers(run_dir: Path, tmp_path: Path, scorer: Scorer):
    prompts, outputs = tmp_path / "eval_prompts_advance", tmp_path / "outputs"
    _write_prompts(prompts / "astro_sim.json", ["a photo of a woman astronaut"])
    _write_prompts(prompts / "astro_edit.json", ["a woman astronaut on the moon", "a woman astronaut in a forest"])
    shutil.copytree(run_dir / "outputs/astro", outputs / "astro_sim")
    shutil.copytree(run_dir / "outputs/grace", outputs / "astro_edit")
    for name in ("1-000", "1-001", "1-002"):
        shutil.copy(run_dir / "outputs/grace/0-002.jpg", outputs / f"astro_edit/{name}.jpg")
    assert detect_split(prompts, ["astro"]) == "advanced"
    assert detect_split(run_dir / "eval_prompts", ["astro"]) == "preliminary"

    result = score_outputs(run_dir / "train_data", prompts, outputs, tasks=["astro"], scorer=scorer, report=False)
    assert result.split == "advanced" and list(result.tasks) == ["astro_sim", "astro_edit"]
    sim, edit = result.tasks["astro_sim"], result.tasks["astro_edit"]
    assert result.advanced == pytest.approx({"sim_face": sim.face, "sim_clip_img": sim.clip_img, "edit_face": edit.face,
                                             "edit_clip_img": edit.clip_img, "edit_clip_text": edit.clip_text})
    assert result.summary == result.advanced
    assert sim.ref_dir == edit.ref_dir == str(run_dir / "train_data/astro")
    assert scorer.references(run_dir / "train_data/astro") is scorer.references(run_dir / "train_data/astro")

    with pytest.raises(ScoringError, match="astro_sim.json"):
        score_outputs(run_dir / "train_data", run_dir / "eval_prompts", outputs, tasks=["astro"], advanced=True,
                      scorer=scorer)


# --- inputs --------------------------------------------------------------------------------------

def test_reference_photos_take_jpg_jpeg_png_webp_and_fix_exif(tmp_path: Path, public_photos, scorer: Scorer):
    astronaut = public_photos["astronaut"]
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers must turn it 90 degrees clockwise
    _save(astronaut.transpose(Image.Transpose.ROTATE_90), tmp_path / "rotated.JPG", exif=exif, quality=95)
    _save(astronaut, tmp_path / "b.jpeg")
    _save(astronaut, tmp_path / "c.png")
    _save(astronaut, tmp_path / "d.webp", lossless=True)
    (tmp_path / "notes.txt").write_text("not a photo")
    _save(astronaut, tmp_path / ".hidden.jpg")
    references = scorer.references(tmp_path).references
    assert [Path(r.path).name for r in references] == ["b.jpeg", "c.png", "d.webp", "rotated.JPG"]
    assert all(r.face_found for r in references)  # the rotated photo is read upright: dlib finds its face
    upright = np.asarray(load_rgb(tmp_path / "rotated.JPG"), dtype=np.float32)
    assert upright.shape == (512, 512, 3)
    assert np.abs(upright - np.asarray(astronaut, dtype=np.float32)).mean() < 8


def test_missing_inputs_are_clear_errors(run_dir: Path, tmp_path: Path, scorer: Scorer):
    with pytest.raises(ScoringError, match=re.escape(str(tmp_path / "eval_prompts" / "astro.json"))):
        score_outputs(run_dir / "train_data", tmp_path / "eval_prompts", run_dir / "outputs", tasks=["astro"], scorer=scorer)
    with pytest.raises(ScoringError, match=re.escape(str(tmp_path / "outputs" / "astro"))):
        score_outputs(run_dir / "train_data", run_dir / "eval_prompts", tmp_path / "outputs", tasks=["astro"], scorer=scorer)
    with pytest.raises(UserError, match="prompt file not found"):
        scorer.score_task(run_dir / "train_data/astro", tmp_path / "none.json", run_dir / "outputs/astro")
    with pytest.raises(PhotoError, match="no reference photos"):
        scorer.score_task(tmp_path, ["x"], run_dir / "outputs/astro")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"0": "a prompt"}))
    with pytest.raises(UserError, match="JSON list of strings"):
        scorer.score_task(run_dir / "train_data/astro", bad, run_dir / "outputs/astro")


def test_command_line_reports_bad_inputs_before_loading_models(tmp_path: Path, capsys):
    args = ["--dataset", str(tmp_path / "data"), "--prompts", str(tmp_path / "prompts"),
            "--outputs", str(tmp_path / "out"), "--tasks", "boy1", "--face_backend", "insightface",
            "--insightface_root", str(tmp_path / "nowhere")]
    assert run_entry(score, args) == 2
    err = capsys.readouterr().err
    for path in (tmp_path / "data" / "boy1", tmp_path / "prompts" / "boy1.json", tmp_path / "out" / "boy1"):
        assert str(path) in err


def test_command_line_without_insightface_models_suggests_dlib(run_dir: Path, tmp_path: Path, clip_dir: Path, capsys):
    args = ["--dataset", str(run_dir / "train_data"), "--prompts", str(run_dir / "eval_prompts"),
            "--outputs", str(run_dir / "outputs"), "--tasks", "grace", "--clip_model", str(clip_dir),
            "--insightface_root", str(tmp_path)]
    assert run_entry(score, args) == 2
    assert "--face_backend dlib" in capsys.readouterr().err


# --- reports and the command line ----------------------------------------------------------------

def _html_sources(report: Path) -> list[str]:
    return [unquote(src) for src in re.findall(r"src='([^']+)'", report.read_text())]


def test_reports_are_written_and_link_existing_images(scored, run_dir: Path, tmp_path: Path):
    result, _ = scored
    out = run_dir / "outputs"
    data = json.loads((out / RESULTS_JSON).read_text())
    assert data["summary"] == pytest.approx(result.preliminary)
    assert data["face_backend"] == "dlib" and data["comparable_with_competition"] is False
    astro = data["tasks"]["astro"]
    assert astro["face_detection_rate"] == pytest.approx(0.75) and len(astro["missing"]) == 2
    assert astro["prompts"][1]["truncated"] is True
    assert {"face", "clip_img", "clip_text", "face_found", "found"} <= set(astro["prompts"][0]["images"][0])

    rows = list(csv.DictReader((out / RESULTS_CSV).open()))
    assert len(rows) == 9 and {r["task"] for r in rows} == {"astro", "grace"}
    assert float(rows[0]["face"]) == pytest.approx(result.tasks["astro"].prompts[0].images[0].face)

    report = out / REPORT_HTML
    sources = _html_sources(report)
    assert len(sources) == 4 + 7  # reference photos + generated images that exist
    assert all(not Path(src).is_absolute() for src in sources)
    assert all((out / src).is_file() for src in sources)
    assert "missing" in report.read_text() and "unreadable" in report.read_text()
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved)
    assert all((moved / "outputs" / src).is_file() for src in _html_sources(moved / "outputs" / REPORT_HTML))


def test_command_line_scores_and_prints_the_summary(run_dir: Path, positive_clip_dir: Path, tmp_path: Path, capsys):
    outputs = tmp_path / "outputs"
    shutil.copytree(run_dir / "outputs/grace", outputs / "grace")
    args = score.parse_args(["--dataset", str(run_dir / "train_data"), "--prompts", str(run_dir / "eval_prompts"),
                             "--outputs", str(outputs), "--tasks", "grace", "--face_backend", "dlib",
                             "--clip_model", str(positive_clip_dir), "--device", "cpu"])
    [result] = score.main(args)
    printed = capsys.readouterr().out
    assert printed.splitlines()[-1] == str(result.preliminary)  # the graders read the last line
    assert "not comparable" in printed
    assert (outputs / REPORT_HTML).is_file() and (outputs / RESULTS_JSON).is_file()


# --- `python score.py` with no arguments: score what was rendered ---------------------------------

SIM_PROMPTS, EDIT_PROMPTS = ["a photo of a {}"], ["a {} on the moon", "a {} in a forest, oil painting"]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory, public_photos) -> Path:
    """A competition workspace for the four subjects: one reference photo each, the local eval_prompts/ and
    eval_prompts_advance/ prompt files, and every split's images under rendered/ (tests copy what they need
    into outputs/)."""
    root = tmp_path_factory.mktemp("workspace")
    faces = [public_photos["astronaut"].resize((160, 160)), public_photos["grace_hopper"].resize((160, 187))]
    for k, subject in enumerate(SUBJECTS):
        word = "boy" if subject.startswith("boy") else "girl"
        _save(faces[k % 2], root / f"train_data/{subject}/photo.jpg", quality=95)
        splits = {subject: SIM_PROMPTS, f"{subject}_sim": SIM_PROMPTS, f"{subject}_edit": EDIT_PROMPTS}
        for task, prompts in splits.items():
            folder = "eval_prompts" if task == subject else "eval_prompts_advance"
            _write_prompts(root / folder / f"{task}.json", [p.format(word) for p in prompts])
            for index in range(len(prompts)):
                for idx in range(3):
                    _save(faces[(k + idx) % 2], root / "rendered" / task / image_name(index, idx), quality=90)
    return root


def _workspace(rendered: Path, where: Path, tasks: list[str], advanced_prompts: bool = True) -> Path:
    """`where` as the organizers' /workspace: train_data/, eval_prompts/ [, eval_prompts_advance/], outputs/<tasks>."""
    for folder in ["train_data", "eval_prompts"] + (["eval_prompts_advance"] if advanced_prompts else []):
        shutil.copytree(rendered / folder, where / folder)
    for task in tasks:
        shutil.copytree(rendered / "rendered" / task, where / "outputs" / task)
    return where


def _no_arguments(tiny_config_file: Path) -> list[str]:
    """No scoring arguments: only the offline face backend and the tiny world's CLIP (through the config)."""
    return ["--face_backend", "dlib", "--config", str(tiny_config_file), "--device", "cpu"]


def _summaries(printed: str) -> list[dict]:
    return [ast.literal_eval(line) for line in printed.splitlines() if line.startswith("{")]


def test_no_arguments_scores_the_advanced_split_when_it_was_rendered(rendered: Path, tmp_path: Path,
                                                                      tiny_config_file: Path, monkeypatch, capsys):
    """The organizers' run: eval_prompts_advance/ mounted, outputs/<name>_sim|_edit rendered. The local
    eval_prompts/ files are there too and a stale outputs/boy1 is left over: the preliminary split is only
    partly rendered, so it is left out with a warning."""
    tasks = [f"{s}_{split}" for s in SUBJECTS for split in ("sim", "edit")]
    monkeypatch.chdir(_workspace(rendered, tmp_path, tasks + ["boy1"]))
    assert run_entry(score, _no_arguments(tiny_config_file)) == 0
    captured = capsys.readouterr()
    assert "preliminary split only partly rendered" in captured.err and "outputs/boy2/" in captured.err
    data = json.loads((tmp_path / "outputs" / RESULTS_JSON).read_text())
    assert data["split"] == "advanced" and list(data["tasks"]) == tasks
    last = ast.literal_eval(captured.out.splitlines()[-1])
    assert set(last) == {"sim_face", "sim_clip_img", "edit_face", "edit_clip_img", "edit_clip_text"}
    assert last == pytest.approx(data["summary"])
    assert len(data["tasks"]["boy1_edit"]["prompts"]) == len(EDIT_PROMPTS)


def test_no_arguments_scores_the_preliminary_split_when_it_was_rendered(rendered: Path, tmp_path: Path,
                                                                         tiny_config_file: Path, monkeypatch, capsys):
    monkeypatch.chdir(_workspace(rendered, tmp_path, list(SUBJECTS), advanced_prompts=False))
    assert run_entry(score, _no_arguments(tiny_config_file)) == 0
    printed = capsys.readouterr().out
    data = json.loads((tmp_path / "outputs" / RESULTS_JSON).read_text())
    assert data["split"] == "preliminary" and list(data["tasks"]) == list(SUBJECTS)
    assert _summaries(printed) == [pytest.approx(data["summary"])]
    assert set(_summaries(printed)[0]) == {"face", "img_clip", "text_clip"}
    assert printed.splitlines()[-1].startswith("{")


def test_no_arguments_scores_both_splits_as_two_labelled_dicts(rendered: Path, tmp_path: Path, tiny_config_file: Path,
                                                                monkeypatch, capsys):
    tasks = list(SUBJECTS) + [f"{s}_{split}" for s in SUBJECTS for split in ("sim", "edit")]
    monkeypatch.chdir(_workspace(rendered, tmp_path, tasks))
    assert run_entry(score, _no_arguments(tiny_config_file)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-4].startswith("preliminary split (eval_prompts/)") and lines[-2].startswith("advanced split (eval_prompts_advance/)")
    preliminary, advanced = ast.literal_eval(lines[-3]), ast.literal_eval(lines[-1])
    data = json.loads((tmp_path / "outputs" / RESULTS_JSON).read_text())
    assert data["summaries"] == {"preliminary": pytest.approx(preliminary), "advanced": pytest.approx(advanced)}
    assert list(data["splits"]["preliminary"]["tasks"]) == list(SUBJECTS)
    assert list(data["splits"]["advanced"]["tasks"]) == tasks[len(SUBJECTS):]
    rows = list(csv.DictReader((tmp_path / "outputs" / RESULTS_CSV).open()))
    assert {r["task"] for r in rows} == set(tasks)
    page = (tmp_path / "outputs" / REPORT_HTML).read_text()
    assert "split: <b>preliminary</b>" in page and "split: <b>advanced</b>" in page
    assert all(f"id='{task}'" in page for task in tasks)

    # each dict is what scoring that split alone gives
    explicit = ["--prompts", "eval_prompts_advance", *_no_arguments(tiny_config_file)]
    assert run_entry(score, explicit) == 0
    assert ast.literal_eval(capsys.readouterr().out.splitlines()[-1]) == pytest.approx(advanced)


def test_no_arguments_with_nothing_rendered_says_what_was_looked_for(rendered: Path, tmp_path: Path, monkeypatch,
                                                                     capsys):
    monkeypatch.chdir(_workspace(rendered, tmp_path, []))
    args = ["--face_backend", "insightface", "--insightface_root", str(tmp_path / "nowhere")]  # fails before models load
    assert run_entry(score, args) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert captured.err.startswith("error: nothing to score")
    for looked_for in ("eval_prompts/<name>.json", "outputs/<name>/", "eval_prompts_advance/<name>_sim.json",
                       "outputs/<name>_edit/", "outputs/boy1_sim/", "./sample.sh", "--prompts"):
        assert looked_for in captured.err


def test_detect_runs_picks_the_completely_rendered_splits(rendered: Path, tmp_path: Path):
    """The selection alone: every task's prompt file and images folder, or the split is left out."""
    where = _workspace(rendered, tmp_path, ["boy1", "girl1", "boy1_sim", "boy1_edit", "girl1_sim"])
    roots = {split: where / Path(folder).name for split, folder in DEFAULT_PROMPT_ROOTS.items()}
    runs = detect_runs(where / "train_data", roots, where / "outputs", ["boy1"])
    assert [(run.split, [spec.name for spec in run.tasks]) for run in runs] == [
        ("preliminary", ["boy1"]), ("advanced", ["boy1_sim", "boy1_edit"])]
    assert runs[1].prompts_dir == roots["advanced"]
    assert runs[1].tasks[1].prompt_file == where / "eval_prompts_advance/boy1_edit.json"
    assert runs[1].tasks[1].output_dir == where / "outputs/boy1_edit"
    assert runs[1].tasks[1].photo_dir == where / "train_data/boy1"

    with pytest.warns(ScoringWarning, match="advanced split only partly rendered.*girl1_edit"):
        runs = detect_runs(where / "train_data", roots, where / "outputs", ["boy1", "girl1"])
    assert [run.split for run in runs] == ["preliminary"]

    with pytest.raises(ScoringError, match="nothing to score") as error:
        detect_runs(where / "train_data", roots, where / "outputs", ["boy2"])
    assert str(where / "outputs/boy2/") in str(error.value) and str(where / "outputs/boy2_sim/") in str(error.value)


def test_the_metric_table_drives_the_means_the_dicts_and_the_reports(tmp_path: Path):
    """Per-image numbers in, every level and every output from libs/score/metrics.py's table: the printed
    dicts keep the competition's keys, the objective's vocabulary is the advanced keys, the CSV has a
    column per metric, and a missing image counts 0 on every metric."""
    def image(path: str, **scores: float) -> ImageScore:
        return ImageScore(path, 0, 0, bool(scores), bool(scores), {**dict.fromkeys(METRIC_NAMES, 0.0), **scores})

    full = dict(face=0.8, clip_img=0.6, clip_text=0.3)
    tasks = {f"boy1_{split}": TaskResult(f"boy1_{split}", "refs", "out", [],
                                         [PromptScore(0, "p", 5, [image("a.jpg", **full), image("b.jpg")])])
             for split in ("sim", "edit")}
    advanced = ScoreResult("advanced", "dlib", False, tasks)
    assert advanced.summary == {"sim_face": 0.4, "sim_clip_img": 0.3, "edit_face": 0.4, "edit_clip_img": 0.3,
                                "edit_clip_text": 0.15}
    assert tuple(advanced.summary) == ADVANCED_KEYS == OBJECTIVE_METRICS
    preliminary = ScoreResult("preliminary", "dlib", False, {"boy1": tasks["boy1_sim"]})
    assert preliminary.summary == {"face": 0.4, "img_clip": 0.3, "text_clip": 0.15}
    assert tasks["boy1_sim"].to_dict()["clip_img"] == 0.3
    write_reports([advanced], tmp_path)
    with open(tmp_path / RESULTS_CSV, newline="") as handle:
        header = next(csv.reader(handle))
    assert [column for column in header if column in METRIC_NAMES] == [metric.name for metric in METRICS]
