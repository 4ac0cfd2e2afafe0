"""Face detection + identity embeddings behind one small interface.

Two backends:

* ``insightface`` -- the competition's scorer: ``FaceAnalysis('buffalo_l')`` with ``det_size=(640, 640)``,
  faces in insightface's own order (first face wins), L2-normalized ArcFace embeddings compared by cosine.
* ``dlib`` -- works offline (``dlib-bin`` + ``face-recognition-models``): HOG detector, 5-point alignment,
  dlib's 128-d ResNet code. HOG also fires on non-faces, so faces come largest box first. dlib codes
  separate people by L2 distance (cosine separates them poorly), mapped to a similarity in [0, 1] by
  ``1 - distance / (2 * 0.6)``: identical = 1, dlib's usual same-person threshold 0.6 = 0.5, >= 1.2 = 0.
  Its numbers are NOT comparable with competition (insightface) numbers.

All images are HxWx3 uint8 **RGB** arrays.
"""
from __future__ import annotations

import abc
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from libs.config import extra_models_dir
from libs.errors import UserError

INSIGHTFACE_MODEL = "buffalo_l"
INSIGHTFACE_HOME = "~/.insightface"  # insightface's own default


def insightface_model_dir(root: str | Path, model_name: str = INSIGHTFACE_MODEL) -> Path:
    """Where `FaceAnalysis(name, root)` looks for the model pack's *.onnx files."""
    return Path(root).expanduser() / "models" / model_name


def insightface_models_present(root: str | Path, model_name: str = INSIGHTFACE_MODEL) -> bool:
    return any(insightface_model_dir(root, model_name).glob("*.onnx"))


def default_insightface_root() -> str:
    """$UNIDIFFUSER_EXTRA_MODELS/insightface when it holds the model pack (the submission image), else ~/.insightface."""
    extra = extra_models_dir()
    if extra is not None and insightface_models_present(extra / "insightface"):
        return str(extra / "insightface")
    return INSIGHTFACE_HOME


INSIGHTFACE_ROOT = default_insightface_root()
INSIGHTFACE_DET_SIZE = (640, 640)
DLIB_SAME_PERSON_DISTANCE = 0.6  # dlib's documented decision threshold for its 128-d face codes
BACKENDS = ("insightface", "dlib")


class FaceModelMissing(UserError):
    """The face models for a backend are not installed; the message says how to get them."""


class FaceModelFailed(UserError):
    """A face model that is installed but cannot be loaded or stops working (damaged or unreadable files, the
    device failing): the message names its files and how to install them again."""


def _runtime_errors() -> tuple[type[BaseException], ...]:
    """What a face model's runtime raises when its files or its device fail, never our own code's bugs:
    onnxruntime's exception types (they derive from Exception, not RuntimeError), dlib's RuntimeError, the OS's."""
    errors: list[type[BaseException]] = [RuntimeError, OSError, MemoryError]
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as ort
    except ImportError:
        return tuple(errors)
    return tuple(errors + [kind for kind in vars(ort).values()
                           if isinstance(kind, type) and issubclass(kind, Exception)])


@dataclass
class DetectedFace:
    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
    score: float
    embedding: np.ndarray | None

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.bbox
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


class FaceBackend(abc.ABC):
    """Detects faces and compares identity embeddings; `detect` returns faces in the order the scorer uses."""

    name: str
    comparable_with_competition: bool
    min_score: float  # weaker detections are not faces (see primary_face)
    files = ""  # where its model files are, for messages
    reinstall = ""  # how to install them again, for messages

    @contextmanager
    def failures(self, doing: str) -> Iterator[None]:
        """Errors of the face model's runtime while `doing` (loading, detecting) as one FaceModelFailed naming
        the model's files and how to install them again."""
        try:
            yield
        except _runtime_errors() as error:
            first = str(error).strip().splitlines()[0].rstrip(".") if str(error).strip() else type(error).__name__
            raise FaceModelFailed(f"the {self.name} face model ({self.files}) failed while {doing}: {first}; its "
                                  f"files may be damaged or unreadable: {self.reinstall}") from error

    @abc.abstractmethod
    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        """Faces in an HxWx3 uint8 RGB image, the one the competition would pick first."""

    @abc.abstractmethod
    def similarity(self, a: np.ndarray, b: np.ndarray) -> float:
        """Identity similarity of two embeddings from this backend (higher = more alike)."""

    def primary_face(self, image: np.ndarray, min_score: float | None = None) -> DetectedFace | None:
        """The one face every step uses (cropping, training's framing, scoring): the first face in `detect`'s
        order (the competition's "first face") among detections scoring at least `min_score` (default: the
        backend's `min_score`), None when there is none."""
        return self.first_face(self.detect(image), min_score)

    def first_face(self, faces: list[DetectedFace], min_score: float | None = None) -> DetectedFace | None:
        """`primary_face`'s rule applied to detections already made (cropping also records every score)."""
        threshold = self.min_score if min_score is None else min_score
        return next((face for face in faces if face.score >= threshold), None)

    def embed_first(self, image: np.ndarray) -> np.ndarray | None:
        """Embedding of the primary face (the competition's rule), None when no face is found."""
        face = self.primary_face(image)
        return face.embedding if face is not None else None


def _check_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
    return np.ascontiguousarray(image)


# --- insightface ---------------------------------------------------------------------------------

def insightface_missing_message(root: str | Path, model_name: str = INSIGHTFACE_MODEL) -> str:
    folder = insightface_model_dir(root, model_name)
    return (
        f"insightface model pack {model_name!r} not found: no *.onnx files in {folder}\n"
        f"  -> with network access, let insightface fetch it once:\n"
        f"       python -c \"from insightface.app import FaceAnalysis; FaceAnalysis(name='{model_name}', root='{root}')\"\n"
        f"     or unzip {model_name}.zip from https://github.com/deepinsight/insightface/releases (model-zoo) into {folder}/\n"
        f"     (point --insightface_root at another folder holding models/{model_name}/ if you keep it elsewhere)\n"
        f"  -> or score offline with --face_backend dlib (its numbers are not comparable with the competition's)"
    )


class InsightFaceBackend(FaceBackend):
    """The competition's face scorer: buffalo_l, det_size 640x640, first face, normalized embedding."""

    name = "insightface"
    comparable_with_competition = True
    min_score = 0.5  # insightface's own detection threshold: faces in `detect` already pass it

    def __init__(self, root: str | Path = INSIGHTFACE_ROOT, model_name: str = INSIGHTFACE_MODEL,
                 det_size: tuple[int, int] = INSIGHTFACE_DET_SIZE, providers: list[str] | None = None):
        if not insightface_models_present(root, model_name):
            raise FaceModelMissing(insightface_missing_message(root, model_name))
        from insightface.app import FaceAnalysis

        self.root = str(Path(root).expanduser())
        self.model_name = model_name
        folder = insightface_model_dir(root, model_name)
        self.files = f"{folder}: {', '.join(sorted(p.name for p in folder.glob('*.onnx')))}"
        self.reinstall = (f"install the pack again (unzip {model_name}.zip from https://github.com/deepinsight/"
                          f"insightface/releases into {folder}/)")
        with self.failures("loading"):
            try:
                self.app = FaceAnalysis(name=model_name, root=self.root, providers=providers)
            except AssertionError as error:  # insightface's own check: no model of the pack detects faces
                raise FaceModelFailed(f"{folder} has no face detection model insightface can use ({self.files}): "
                                      f"{self.reinstall}") from error
            if "recognition" not in self.app.models:
                raise FaceModelMissing(f"{folder} has no recognition model (ArcFace *.onnx)")
            self.app.prepare(ctx_id=0, det_size=tuple(det_size))

    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        bgr = np.ascontiguousarray(_check_rgb(image)[:, :, ::-1])  # insightface works on cv2's BGR order
        with self.failures("detecting faces"):
            found = self.app.get(bgr)
        faces = []
        for face in found:
            embedding = face.normed_embedding
            faces.append(DetectedFace(
                bbox=tuple(float(v) for v in face.bbox[:4]),
                score=float(face.det_score),
                embedding=None if embedding is None else np.asarray(embedding, dtype=np.float32),
            ))
        return faces

    def similarity(self, a: np.ndarray, b: np.ndarray) -> float:
        """Cosine of the (already normalized) ArcFace embeddings, exactly as the competition computes it."""
        return float(np.dot(np.ravel(a), np.ravel(b)))


# --- dlib ----------------------------------------------------------------------------------------

class DlibBackend(FaceBackend):
    """Offline face identity: dlib HOG + 5-point alignment + 128-d ResNet code, largest face first."""

    name = "dlib"
    comparable_with_competition = False
    min_score = 0.3  # HOG returns faint hits on textures (scores ~0.05-0.15); real frontal faces score ~1

    def __init__(self, upsample: int = 1, max_side: int = 1024, num_jitters: int = 1):
        try:
            import dlib
            with warnings.catch_warnings():  # face_recognition_models imports the deprecated pkg_resources
                warnings.simplefilter("ignore")
                import face_recognition_models as frm
        except ImportError as error:
            raise FaceModelMissing(
                f"the dlib face backend needs dlib-bin and face-recognition-models ({error}):\n"
                "  pip install dlib-bin face-recognition-models \"setuptools<81\""
            ) from error
        landmarks, encoder = frm.pose_predictor_five_point_model_location(), frm.face_recognition_model_location()
        self.files = f"{landmarks}, {encoder}"
        self.reinstall = "install them again: pip install --force-reinstall --no-deps face-recognition-models"
        with self.failures("loading"):
            self.detector = dlib.get_frontal_face_detector()
            self.shape_predictor = dlib.shape_predictor(landmarks)
            self.encoder = dlib.face_recognition_model_v1(encoder)
        self.upsample = upsample
        self.max_side = max_side  # big phone photos are shrunk first: HOG time grows with pixel count
        self.num_jitters = num_jitters

    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        import cv2

        image = _check_rgb(image)
        scale = min(1.0, self.max_side / max(image.shape[:2]))
        if scale < 1.0:
            size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
            image = np.ascontiguousarray(cv2.resize(image, size, interpolation=cv2.INTER_AREA))
        faces = []
        with self.failures("detecting faces"):
            rects, scores, _ = self.detector.run(image, self.upsample, 0.0)
            for rect, score in zip(rects, scores):
                shape = self.shape_predictor(image, rect)
                code = np.asarray(self.encoder.compute_face_descriptor(image, shape, self.num_jitters),
                                  dtype=np.float32)
                bbox = tuple(float(v) / scale for v in (rect.left(), rect.top(), rect.right(), rect.bottom()))
                faces.append(DetectedFace(bbox=bbox, score=float(score), embedding=code))
        faces.sort(key=lambda face: face.area, reverse=True)
        return faces

    def similarity(self, a: np.ndarray, b: np.ndarray) -> float:
        """`1 - L2 / 1.2`, clipped to [0, 1]: dlib's same-person threshold (L2 0.6) lands on 0.5."""
        distance = float(np.linalg.norm(np.ravel(a) - np.ravel(b)))
        return float(np.clip(1.0 - distance / (2 * DLIB_SAME_PERSON_DISTANCE), 0.0, 1.0))


# --- selection -----------------------------------------------------------------------------------

def get_face_backend(name: str = "auto", **kwargs) -> FaceBackend:
    """Build a backend by name. "auto" = insightface when its model pack is installed under `root`, else dlib.

    kwargs go to the chosen backend (insightface: root, model_name, det_size, providers;
    dlib: upsample, max_side, num_jitters); those meant for the other backend are ignored.
    """
    insightface_keys = {"root", "model_name", "det_size", "providers"}
    dlib_keys = {"upsample", "max_side", "num_jitters"}
    unknown = set(kwargs) - insightface_keys - dlib_keys
    if unknown:
        raise TypeError(f"unknown face backend options: {sorted(unknown)}")
    if name == "auto":
        root = kwargs.get("root", INSIGHTFACE_ROOT)
        model_name = kwargs.get("model_name", INSIGHTFACE_MODEL)
        if insightface_models_present(root, model_name):
            name = "insightface"
            print(f"face backend: insightface ({insightface_model_dir(root, model_name)})")
        else:
            name = "dlib"
            print(f"face backend: dlib (no insightface {model_name} under {insightface_model_dir(root, model_name)}); "
                  "face scores are NOT comparable with competition numbers")
    if name == "insightface":
        return InsightFaceBackend(**{k: v for k, v in kwargs.items() if k in insightface_keys})
    if name == "dlib":
        return DlibBackend(**{k: v for k, v in kwargs.items() if k in dlib_keys})
    raise ValueError(f"unknown face backend {name!r}; choose one of {', '.join(BACKENDS)} or auto")
