"""Face backends: the real offline dlib model on public-domain photos, and insightface's own loading and
detection code driven by a tiny ONNX model pack in buffalo_l's layout (the real pack cannot be had offline)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from libs.face import (DLIB_SAME_PERSON_DISTANCE, DetectedFace, DlibBackend, FaceModelMissing, InsightFaceBackend,
                       get_face_backend)
from libs.tiny_submission import synthetic_face


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


# --- dlib -----------------------------------------------------------------------------------------

def test_dlib_returns_largest_face_first(dlib_backend, public_photos):
    """HOG also fires on the astronaut's mission badge; the face (the bigger box) must come first."""
    faces = dlib_backend.detect(_rgb(public_photos["astronaut"]))
    assert len(faces) >= 2, "expected the face and the badge"
    areas = [face.area for face in faces]
    assert areas == sorted(areas, reverse=True)
    x0, y0, x1, y1 = faces[0].bbox
    assert 150 < (x0 + x1) / 2 < 290 and 50 < (y0 + y1) / 2 < 190, faces[0].bbox  # the face, upper middle
    assert faces[0].embedding.shape == (128,)
    assert not dlib_backend.comparable_with_competition


def test_dlib_prefers_the_largest_face_over_the_most_confident(dlib_backend, public_photos):
    """Astronaut at full size beside a smaller Grace Hopper photo: HOG is surer of the smaller astronaut face,
    the backend must still put the bigger (Grace Hopper) face first."""
    canvas = Image.new("RGB", (1024, 620))
    canvas.paste(public_photos["astronaut"], (0, 0))
    canvas.paste(public_photos["grace_hopper"].resize((300, 352)), (700, 0))
    pixels = _rgb(canvas)
    rects, _, _ = dlib_backend.detector.run(pixels, 1, 0.0)
    assert rects[0].left() < 512, "precondition: HOG ranks the astronaut first"
    faces = dlib_backend.detect(pixels)
    assert faces[0].bbox[0] > 700 and faces[0].area == max(face.area for face in faces)


def test_dlib_finds_no_face_without_one(dlib_backend, public_photos):
    assert dlib_backend.detect(_rgb(public_photos["camera"])) == []
    assert dlib_backend.embed_first(np.full((200, 200, 3), 128, np.uint8)) is None


def test_dlib_boxes_are_in_original_pixels_after_shrinking(public_photos):
    """Large photos are shrunk before HOG; boxes must come back in the caller's pixel coordinates."""
    photo = public_photos["grace_hopper"]
    small = DlibBackend(max_side=300).detect(_rgb(photo))
    full = DlibBackend(max_side=4096).detect(_rgb(photo))
    assert small and full
    np.testing.assert_allclose(small[0].bbox, full[0].bbox, atol=25)


def test_dlib_same_person_scores_higher_than_another_person(dlib_backend, public_photos):
    astronaut = public_photos["astronaut"]
    reference = dlib_backend.embed_first(_rgb(astronaut))
    other = dlib_backend.similarity(reference, dlib_backend.embed_first(_rgb(public_photos["grace_hopper"])))
    augmented = {
        "flip": astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
        "jpeg": _jpeg(astronaut, 30),
        "half size": astronaut.resize((256, 256), Image.BICUBIC),
    }
    for name, image in augmented.items():
        same = dlib_backend.similarity(reference, dlib_backend.embed_first(_rgb(image)))
        assert same > 0.6 and same > other + 0.2, (name, same, other)
    assert 0.0 <= other < 0.5  # different people: beyond dlib's 0.6 distance threshold
    assert dlib_backend.similarity(reference, reference) == pytest.approx(1.0)


def test_dlib_similarity_maps_l2_distance():
    """1 - d / 1.2 clipped to [0, 1]: the 0.6 same-person threshold is 0.5, far apart is 0."""
    backend = DlibBackend.__new__(DlibBackend)  # similarity needs no model
    a = np.zeros(128, np.float32)
    for distance, expected in [(0.0, 1.0), (DLIB_SAME_PERSON_DISTANCE, 0.5), (0.3, 0.75), (1.2, 0.0), (2.0, 0.0)]:
        b = a.copy()
        b[0] = distance
        assert backend.similarity(a, b) == pytest.approx(expected)
        assert backend.similarity(b, a) == pytest.approx(expected)


def test_detect_rejects_non_rgb_arrays(dlib_backend):
    with pytest.raises(ValueError, match="RGB"):
        dlib_backend.detect(np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match="RGB"):
        dlib_backend.detect(np.zeros((64, 64, 3), np.float32))


# --- insightface ----------------------------------------------------------------------------------

def test_insightface_without_models_says_how_to_get_them(tmp_path):
    with pytest.raises(FaceModelMissing) as error:
        get_face_backend("insightface", root=tmp_path)
    message = str(error.value)
    assert str(tmp_path / "models" / "buffalo_l") in message
    assert "--face_backend dlib" in message and "FaceAnalysis(name='buffalo_l'" in message


def test_auto_falls_back_to_dlib_and_says_so(tmp_path, capsys):
    backend = get_face_backend("auto", root=tmp_path)
    assert backend.name == "dlib"
    assert "dlib" in capsys.readouterr().out


def test_unknown_backend_or_option_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown face backend"):
        get_face_backend("opencv")
    with pytest.raises(TypeError, match="det_sise"):
        get_face_backend("dlib", det_sise=(640, 640))


def test_auto_picks_insightface_when_its_pack_is_installed(tiny_insightface_root, capsys):
    backend = get_face_backend("auto", root=tiny_insightface_root)
    assert isinstance(backend, InsightFaceBackend) and backend.comparable_with_competition
    assert "insightface" in capsys.readouterr().out
    assert tuple(backend.app.det_size) == (640, 640)


def test_insightface_detects_and_normalizes(tiny_insightface_root):
    backend = InsightFaceBackend(root=tiny_insightface_root)
    faces = backend.detect(synthetic_face("left"))
    assert len(faces) == 1 and isinstance(faces[0], DetectedFace)
    np.testing.assert_allclose(faces[0].bbox, (320, 320, 352, 352), atol=1)
    assert np.linalg.norm(faces[0].embedding) == pytest.approx(1.0, abs=1e-5)
    assert backend.detect(np.zeros((480, 640, 3), np.uint8)) == []
    left, right = backend.embed_first(synthetic_face("left")), backend.embed_first(synthetic_face("right"))
    assert backend.similarity(left, left) == pytest.approx(1.0, abs=1e-5)
    assert backend.similarity(left, right) < 0  # plain cosine; the scorer clamps at 0


def test_insightface_receives_bgr_like_cv2_imread(tiny_insightface_root):
    """The competition fed cv2.imread (BGR) arrays; our RGB input must reach insightface the same way."""
    backend = InsightFaceBackend(root=tiny_insightface_root)
    image = synthetic_face("left")
    ours = backend.detect(image)[0].embedding
    as_competition = backend.app.get(np.ascontiguousarray(image[:, :, ::-1]))[0].normed_embedding
    wrong_order = backend.app.get(image)[0].normed_embedding
    np.testing.assert_allclose(ours, as_competition, atol=1e-6)
    assert not np.allclose(ours, wrong_order, atol=1e-3)
