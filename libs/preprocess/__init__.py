"""Turn raw subject photos into training crops: EXIF-upright RGB, background removed, head-and-shoulders
framing around the detected face, the training size without squashing the aspect ratio; with background
removal, each crop's person mask in `masks/`. The command line is tools/crop.py.

settings.py: CropSettings and the crop code version; geometry.py: where a crop sits and how it is rendered;
background.py: rembg sessions and the cut-out; crop.py: the run over photo folders and its crops.json.
"""
from libs.preprocess.background import BackgroundRemover, Cutout
from libs.preprocess.crop import (SubjectReport, crop_dataset, crop_photo, crop_subject, find_subjects,
                                  summarize)
from libs.preprocess.geometry import box_in_crop, center_crop_box, clip_box, face_crop_box, render_crop
from libs.preprocess.settings import CROP_VERSION, DEFAULT_REMBG_MODEL, CropSettings, PreprocessError

__all__ = [
    "BackgroundRemover", "CROP_VERSION", "CropSettings", "Cutout", "DEFAULT_REMBG_MODEL", "PreprocessError",
    "SubjectReport", "box_in_crop", "center_crop_box", "clip_box", "crop_dataset", "crop_photo", "crop_subject",
    "face_crop_box", "find_subjects", "render_crop", "summarize",
]
