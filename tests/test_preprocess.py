"""libs.preprocess and tools/crop.py on real public-domain photos with the offline dlib face detector, and
the real rembg code path with tiny ONNX segmentation models built here."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from libs import preprocess
from entrypoints import run_entry
from libs.config import REPO_ROOT
from libs.photos import list_images, person_masks
from libs.preprocess import CropSettings, center_crop_box, crop_dataset, face_crop_box
from tools import crop


def main(argv: list[str]) -> int:
    return run_entry(crop, argv)

# dlib's box for Eileen Collins' face in skimage's astronaut (the badge below it is a weaker, smaller hit)
ASTRONAUT_FACE = (175, 76, 265, 166)
DLIB = ["--face_backend", "dlib"]


class _HalfMask(torch.nn.Module):
    """A u2net-shaped segmenter (1x3x320x320 -> 1x1x320x320) that keeps the right half of any image."""

    def __init__(self) -> None:
        super().__init__()
        mask = torch.zeros(1, 1, 320, 320)
        mask[..., 160:] = 1.0
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask + 0.0 * x[:, :1]


@pytest.fixture(scope="module")
def half_mask_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rembg_model") / "half_mask.onnx"
    torch.onnx.export(_HalfMask(), (torch.zeros(1, 3, 320, 320),), str(path),
                      input_names=["input.1"], output_names=["output"], dynamo=False)
    return path


@pytest.fixture()
def rembg_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty rembg model folder, so nothing from ~/.u2net or ~/.rembg is used."""
    home = tmp_path / "rembg_home"
    home.mkdir()
    monkeypatch.setenv("REMBG_HOME", str(home))
    monkeypatch.delenv("U2NET_HOME", raising=False)
    return home


@pytest.fixture()
def train_data(tmp_path: Path, public_photos: dict[str, Image.Image]) -> Path:
    """train_data/person/ with the three public photos in three of the accepted formats."""
    folder = tmp_path / "train_data" / "person"
    folder.mkdir(parents=True)
    public_photos["astronaut"].save(folder / "astronaut.jpg", quality=95)
    public_photos["grace_hopper"].save(folder / "grace_hopper.png")
    public_photos["camera"].save(folder / "camera.jpeg", quality=95)
    return tmp_path / "train_data"


def _crops(out: Path, subject: str = "person") -> dict:
    return json.loads((out / subject / "crops.json").read_text())


def _contains(outer: list[float], inner: list[float]) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]


def _mean_abs(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).mean())


# --- geometry ------------------------------------------------------------------------------------

def test_face_crop_box_frames_the_face_with_the_output_aspect() -> None:
    box = face_crop_box((200, 100, 300, 200), (1000, 1200), (512, 768), face_scale=3.0, face_y=0.4)
    width, height = box[2] - box[0], box[3] - box[1]
    assert height == pytest.approx(300) and width / height == pytest.approx(512 / 768)
    assert (box[0] + box[2]) / 2 == pytest.approx(250)  # centred on the face horizontally
    assert (150 - box[1]) / height == pytest.approx(0.4)  # face centre 40% down


def test_face_crop_box_shrinks_then_slides_inside_the_photo() -> None:
    # a face near the top-left corner of a small photo: the 3x box (300 px) does not fit in 240 px
    box = face_crop_box((10, 5, 110, 105), (240, 400), (512, 512), face_scale=3.0, face_y=0.4)
    assert box[2] - box[0] == pytest.approx(240) and box[3] - box[1] == pytest.approx(240)
    assert box[0] >= 0 and box[1] >= 0 and box[2] <= 240 and box[3] <= 400
    assert _contains(list(box), [10, 5, 110, 105])
    # a face wider than the photo allows at this aspect: the box keeps the face and pads the rest
    wide = face_crop_box((0, 50, 200, 150), (200, 400), (512, 256), face_scale=1.0, face_y=0.5)
    assert _contains(list(wide), [0, 50, 200, 150]) and (wide[2] - wide[0]) / (wide[3] - wide[1]) == pytest.approx(2)


def test_center_crop_box_is_the_largest_centred_box() -> None:
    assert center_crop_box((600, 400), (512, 512)) == pytest.approx((100, 0, 500, 400))
    assert center_crop_box((400, 600), (256, 512)) == pytest.approx((50, 0, 350, 600))


def test_settings_reject_nonsense() -> None:
    with pytest.raises(preprocess.PreprocessError, match="face_scale"):
        CropSettings(face_scale=0.5)
    with pytest.raises(preprocess.PreprocessError, match="rembg_model_path"):
        CropSettings(rembg_model="u2net", rembg_model_path="/tmp/model.onnx")


# --- cropping real photos ------------------------------------------------------------------------

def test_crop_finds_faces_and_writes_crops_and_metadata(train_data: Path, tmp_path: Path,
                                                        public_photos: dict[str, Image.Image],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "train_data_crop"
    assert main(["-i", str(train_data), "-o", str(out), "--no_rembg", *DLIB]) == 0
    meta = _crops(out)
    assert meta["settings"]["size"] == [512, 512] and meta["settings"]["rembg"] is False
    photos = meta["photos"]
    for name in ("astronaut.jpg", "grace_hopper.png"):
        entry = photos[name]
        assert entry["status"] == "face" and entry["backend"] == "dlib" and entry["score"] > 0.3
        assert _contains(entry["crop_box"], entry["source_face_box"])
        assert _contains([0, 0, 512, 512], entry["face_box"])  # the face box is in the crop's pixels
        width, height = entry["crop_box"][2] - entry["crop_box"][0], entry["crop_box"][3] - entry["crop_box"][1]
        assert width == pytest.approx(height, abs=0.05)
        with Image.open(out / "person" / entry["output"]) as crop:
            assert crop.size == (512, 512) and crop.mode == "RGB" and crop.format == "JPEG"
    assert photos["astronaut.jpg"]["source_face_box"] == pytest.approx(ASTRONAUT_FACE, abs=12)  # the face, not the badge
    assert photos["astronaut.jpg"]["output"] == "astronaut.jpg"
    assert photos["grace_hopper.png"]["output"] == "grace_hopper.jpg"  # same stem, always JPEG
    # the pixels really come from the recorded box
    expected = public_photos["astronaut"].resize((512, 512), Image.Resampling.LANCZOS,
                                                 box=tuple(photos["astronaut.jpg"]["crop_box"]))
    assert _mean_abs(Image.open(out / "person" / "astronaut.jpg"), expected) < 4
    # camera has no frontal face: reported, and center-cropped by default
    assert photos["camera.jpeg"]["status"] == "center" and photos["camera.jpeg"]["face_box"] is None
    assert photos["camera.jpeg"]["crop_box"] == [0, 0, 512, 512]
    assert all(entry["mask"] is None for entry in photos.values())  # no background removal, no person masks
    assert not (out / "person" / "masks").exists() and person_masks(out / "person") == {}
    assert (out / "person" / "camera.jpg").is_file()
    printed = capsys.readouterr().out
    assert "no face found: camera.jpeg (center-cropped)" in printed
    assert "2 around a face, 1 center-cropped" in printed


def test_framing_and_size_are_configurable(train_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "crop"
    args = ["-i", str(train_data / "person"), "-o", str(out), "--no_rembg", *DLIB,
            "--size", "256x384", "--face_scale", "2.5", "--face_y", "0.3"]
    assert main(args) == 0  # -i may be a single subject folder: crops go straight into -o
    entry = json.loads((out / "crops.json").read_text())["photos"]["grace_hopper.png"]
    x0, y0, x1, y1 = entry["crop_box"]
    fx0, fy0, fx1, fy1 = entry["source_face_box"]
    assert (x1 - x0) / (y1 - y0) == pytest.approx(256 / 384, rel=1e-3)
    assert (y1 - y0) == pytest.approx(2.5 * max(fx1 - fx0, fy1 - fy0), rel=1e-3)
    assert ((fy0 + fy1) / 2 - y0) / (y1 - y0) == pytest.approx(0.3, abs=1e-3)
    with Image.open(out / "grace_hopper.jpg") as crop:
        assert crop.size == (256, 384)


def test_weak_detections_are_ignored(tmp_path: Path, public_photos: dict[str, Image.Image]) -> None:
    folder = tmp_path / "train_data" / "person"
    folder.mkdir(parents=True)
    public_photos["astronaut"].save(folder / "astronaut.png")
    out = tmp_path / "crop"
    assert main(["-i", str(tmp_path / "train_data"), "-o", str(out), "--no_rembg", *DLIB,
                 "--min_face_score", "50"]) == 0
    entry = _crops(out)["photos"]["astronaut.png"]
    assert entry["status"] == "center" and entry["face_box"] is None and entry["min_face_score"] == 50
    assert len(entry["detection_scores"]) == 2  # the face and the badge were seen, both below the bar


def test_no_face_skip_writes_nothing_but_reports_it(train_data: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "crop"
    assert main(["-i", str(train_data), "-o", str(out), "--no_rembg", *DLIB, "--no_face", "skip"]) == 0
    entry = _crops(out)["photos"]["camera.jpeg"]
    assert entry["status"] == "skipped" and entry["output"] is None
    assert not (out / "person" / "camera.jpg").exists()
    assert "no face found: camera.jpeg (skipped" in capsys.readouterr().out


def test_nothing_processable_exits_non_zero(tmp_path: Path, public_photos: dict[str, Image.Image],
                                            capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "train_data" / "nobody"
    folder.mkdir(parents=True)
    public_photos["camera"].save(folder / "camera.png")
    assert main(["-i", str(tmp_path / "train_data"), "-o", str(tmp_path / "out"),
                 "--no_rembg", *DLIB, "--no_face", "skip"]) == 2
    assert "no crop could be made" in capsys.readouterr().err


def test_rerun_skips_up_to_date_photos_and_redoes_changed_ones(train_data: Path, tmp_path: Path,
                                                               public_photos: dict[str, Image.Image]) -> None:
    out = tmp_path / "crop"
    settings = CropSettings(rembg=False, face_backend="dlib")
    first = crop_dataset(train_data, out, settings)
    assert sorted(first[0].fresh) == ["astronaut.jpg", "camera.jpeg", "grace_hopper.png"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "person").glob("*.jpg")}

    os.utime(train_data / "person" / "astronaut.jpg")  # touched, same bytes: still up to date
    second = crop_dataset(train_data, out, settings)
    assert second[0].fresh == []
    assert {p.name: p.stat().st_mtime_ns for p in (out / "person").glob("*.jpg")} == mtimes
    assert second[0].entries == first[0].entries

    public_photos["astronaut"].transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(train_data / "person" / "astronaut.jpg")
    (out / "person" / "camera.jpg").unlink()  # a deleted output is remade
    third = crop_dataset(train_data, out, settings)
    assert sorted(third[0].fresh) == ["astronaut.jpg", "camera.jpeg"]
    face = third[0].entries["astronaut.jpg"]["source_face_box"]
    assert face[0] == pytest.approx(512 - ASTRONAUT_FACE[2], abs=12)  # the flipped face was re-detected

    fourth = crop_dataset(train_data, out, CropSettings(rembg=False, face_backend="dlib", size=(256, 256)))
    assert len(fourth[0].fresh) == 3  # new settings redo everything
    with Image.open(out / "person" / "grace_hopper.jpg") as crop:
        assert crop.size == (256, 256)

    (train_data / "person" / "grace_hopper.png").unlink()
    fifth = crop_dataset(train_data, out, CropSettings(rembg=False, face_backend="dlib", size=(256, 256)))
    assert not (out / "person" / "grace_hopper.jpg").exists()  # its source is gone
    assert "grace_hopper.png" not in fifth[0].entries and fifth[0].removed


def test_exif_orientation_is_applied(tmp_path: Path, public_photos: dict[str, Image.Image]) -> None:
    folder = tmp_path / "train_data" / "person"
    folder.mkdir(parents=True)
    # stored sideways with the EXIF tag that says "rotate 90 CW to view" (orientation 6)
    sideways = public_photos["grace_hopper"].transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways.save(folder / "rotated.jpg", exif=exif, quality=95)
    out = tmp_path / "crop"
    crop_dataset(tmp_path / "train_data", out, CropSettings(rembg=False, face_backend="dlib"))
    entry = _crops(out)["photos"]["rotated.jpg"]
    assert entry["image_size"] == [512, 600] and entry["status"] == "face"


# --- background removal with rembg ---------------------------------------------------------------

def test_rembg_custom_model_replaces_the_background(train_data: Path, tmp_path: Path, half_mask_onnx: Path,
                                                    rembg_home: Path, public_photos: dict[str, Image.Image]) -> None:
    out = tmp_path / "removed"
    assert main(["-i", str(train_data), "-o", str(out), *DLIB,
                 "--rembg_model_path", str(half_mask_onnx)]) == 0  # the file lives outside REMBG_HOME
    meta = _crops(out)
    entry = meta["photos"]["astronaut.jpg"]
    assert entry["status"] == "face" and entry["rembg"] == "u2net_custom"
    assert meta["settings"]["rembg_model"] == "u2net_custom"
    assert meta["settings"]["rembg_model_path"] == str(half_mask_onnx)
    original = public_photos["astronaut"].resize((512, 512), Image.Resampling.LANCZOS, box=tuple(entry["crop_box"]))
    with Image.open(out / "person" / "astronaut.jpg") as after:
        assert after.size == (512, 512)
        assert np.asarray(after)[:, :240].min() >= 245  # the model's background half became white
        assert _mean_abs(after.crop((272, 0, 512, 512)), original.crop((272, 0, 512, 512))) < 4  # person half kept


def test_rembg_keeps_each_crops_person_mask(train_data: Path, tmp_path: Path, half_mask_onnx: Path,
                                            rembg_home: Path, public_photos: dict[str, Image.Image]) -> None:
    out = tmp_path / "removed"
    green = (0, 200, 0)
    assert main(["-i", str(train_data), "-o", str(out), *DLIB, "--bg_color", "0,200,0",
                 "--rembg_model_path", str(half_mask_onnx)]) == 0
    folder = out / "person"
    photos = _crops(out)["photos"]
    assert person_masks(folder) == {f"{stem}.jpg": folder / "masks" / f"{stem}.png"
                                    for stem in ("astronaut", "camera", "grace_hopper")}
    for entry in photos.values():
        assert entry["mask"] == f"masks/{Path(entry['output']).stem}.png"
        with Image.open(folder / entry["output"]) as crop_file, Image.open(folder / entry["mask"]) as mask_file:
            assert mask_file.format == "PNG" and mask_file.mode == "L" and mask_file.size == crop_file.size
            crop, mask = np.asarray(crop_file).astype(int), np.asarray(mask_file)
        assert set(np.unique(mask)) >= {0, 255}
        assert (mask[:, :240] == 0).all() and (mask[:, 272:] == 255).all()  # the model keeps the right half
        assert np.abs(crop[mask == 0] - green).mean() < 2  # background pixels are the colour (JPEG aside)
    entry = photos["astronaut.jpg"]
    original = public_photos["astronaut"].resize((512, 512), Image.Resampling.LANCZOS, box=tuple(entry["crop_box"]))
    crop = Image.open(folder / "astronaut.jpg")
    assert _mean_abs(crop.crop((272, 0, 512, 512)), original.crop((272, 0, 512, 512))) < 4  # person where mask is 255
    # training lists the folder flat: crops only, never a mask
    assert [p.name for p in list_images(folder)] == ["astronaut.jpg", "camera.jpg", "grace_hopper.jpg"]

    # a crop box reaching past the photo: that margin is background in the mask too
    wide = tmp_path / "wide"
    settings = CropSettings(face_backend="dlib", size=(1024, 128), face_scale=1.0, rembg_model="u2net_custom",
                            rembg_model_path=str(half_mask_onnx), bg_color=green)
    (report,) = crop_dataset(train_data, wide, settings)
    entry = report.entries["astronaut.jpg"]
    x0, _, x1, _ = entry["crop_box"]
    assert x0 < 0 and x1 > 512
    right_margin = round((x1 - 512) / (x1 - x0) * 1024)
    mask = np.asarray(Image.open(wide / "person" / entry["mask"]))
    assert mask.shape == (128, 1024) and (mask[:, 1024 - right_margin + 1:] == 0).all()
    assert (mask[:, 600:1024 - right_margin - 1] == 255).all()  # the photo's right half, inside the box

    # stale crops take their masks with them; a run without background removal keeps no masks
    (train_data / "person" / "grace_hopper.png").unlink()
    (report,) = crop_dataset(train_data, out, CropSettings(face_backend="dlib", rembg_model="u2net_custom",
                                                           rembg_model_path=str(half_mask_onnx), bg_color=green))
    assert not (folder / "grace_hopper.jpg").exists() and not (folder / "masks" / "grace_hopper.png").exists()
    assert "mask: masks/grace_hopper.png (from grace_hopper.png)" in report.removed
    assert sorted(p.name for p in (folder / "masks").iterdir()) == ["astronaut.png", "camera.png"]
    (report,) = crop_dataset(train_data, out, CropSettings(face_backend="dlib", rembg=False))
    assert sorted(report.fresh) == ["astronaut.jpg", "camera.jpeg"]
    assert all(entry["mask"] is None for entry in report.entries.values()) and person_masks(folder) == {}
    assert list((folder / "masks").iterdir()) == [] and (folder / "astronaut.jpg").is_file()


def test_a_deleted_mask_redoes_its_crop(train_data: Path, tmp_path: Path, half_mask_onnx: Path,
                                        rembg_home: Path) -> None:
    settings = CropSettings(face_backend="dlib", rembg_model="u2net_custom", rembg_model_path=str(half_mask_onnx))
    crop_dataset(train_data, tmp_path / "out", settings)
    (tmp_path / "out" / "person" / "masks" / "camera.png").unlink()
    (report,) = crop_dataset(train_data, tmp_path / "out", settings)
    assert report.fresh == ["camera.jpeg"] and (tmp_path / "out" / "person" / "masks" / "camera.png").is_file()


def test_rembg_named_model_from_the_model_folder(half_mask_onnx: Path, rembg_home: Path) -> None:
    target = rembg_home / "models" / "u2net" / "u2net.onnx"
    target.parent.mkdir(parents=True)
    target.write_bytes(half_mask_onnx.read_bytes())
    remover = preprocess.BackgroundRemover("u2net", bg_color=(0, 255, 0))
    cutout = remover(Image.new("RGB", (64, 48), (10, 20, 30)))
    cut, mask = np.asarray(cutout.image), np.asarray(cutout.mask)
    assert cut.shape == (48, 64, 3) and cutout.mask.mode == "L" and mask.shape == (48, 64)
    assert (np.abs(cut[:, :28].astype(int) - [0, 255, 0]) <= 1).all()  # background: the chosen colour
    assert (np.abs(cut[:, 36:].astype(int) - [10, 20, 30]) <= 2).all()  # foreground: untouched
    # the mask is the alpha the colour was composited with: exactly the colour where it is 0, the photo at 255
    assert (mask[:, :28] == 0).all() and (mask[:, 36:] == 255).all()
    assert (cut[mask == 0] == [0, 255, 0]).all() and (cut[mask == 255] == [10, 20, 30]).all()


def test_missing_rembg_model_says_what_to_download(train_data: Path, tmp_path: Path, rembg_home: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    for variable in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")  # no download can succeed, network or not
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert main(["-i", str(train_data), "-o", str(tmp_path / "out"), *DLIB]) == 2  # the default model
    err = capsys.readouterr().err
    model = preprocess.DEFAULT_REMBG_MODEL
    target = rembg_home / "models" / model / f"{model}.onnx"
    assert re.search(rf"-> download https://\S+\.onnx\n\s+and save it as {re.escape(str(target))}\n", err), err
    assert "--no_rembg" in err and not (tmp_path / "out" / "person" / "astronaut.jpg").exists()


# --- bad input -----------------------------------------------------------------------------------

def test_bad_input_is_reported_and_the_rest_processed(train_data: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    folder = train_data / "person"
    (folder / "notes.txt").write_text("not a photo")
    (folder / "fake.jpg").write_text("not a jpeg either")
    data = (folder / "astronaut.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "astronaut.webp").write_bytes(data)  # same stem as astronaut.jpg -> would overwrite its crop
    (train_data / "empty").mkdir()
    out = tmp_path / "crop"
    assert main(["-i", str(train_data), "-o", str(out), "--no_rembg", *DLIB]) == 0
    printed = capsys.readouterr().out
    assert f"error: cannot read image {folder / 'fake.jpg'}" in printed
    assert f"error: cannot read image {folder / 'truncated.jpg'}" in printed
    assert f"ignored (not .jpg/.jpeg/.png/.webp): {folder / 'notes.txt'}" in printed
    assert "would overwrite astronaut.jpg" in printed
    assert f"no photos (.jpg, .jpeg, .png, .webp) in {train_data / 'empty'}" in printed
    photos = _crops(out)["photos"]
    assert photos["fake.jpg"]["status"] == "error" and photos["truncated.jpg"]["status"] == "error"
    assert sorted(p.name for p in (out / "person").glob("*.jpg")) == ["astronaut.jpg", "camera.jpg", "grace_hopper.jpg"]


def test_missing_input_folder_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-i", str(tmp_path / "nowhere"), "-o", str(tmp_path / "out"), "--no_rembg"]) == 2
    assert f"input folder not found: {tmp_path / 'nowhere'}" in capsys.readouterr().err
    (tmp_path / "bare").mkdir()
    assert main(["-i", str(tmp_path / "bare"), "-o", str(tmp_path / "out"), "--no_rembg"]) == 2
    assert "no subject folders" in capsys.readouterr().err


def test_cropping_into_the_photo_folder_is_refused(train_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (train_data / "person" / "astronaut.jpg").read_bytes()
    assert main(["-i", str(train_data), "-o", str(train_data), "--no_rembg", *DLIB]) == 2
    assert "crops would replace the photos" in capsys.readouterr().err
    assert (train_data / "person" / "astronaut.jpg").read_bytes() == before


def test_command_line_entry_point(train_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`python tools/crop.py ...` as a user runs it: a separate process, from another folder."""
    out = tmp_path / "crop"
    done = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "crop.py"), "-i", str(train_data), "-o", str(out),
                           "--no_rembg", *DLIB, "--no_face", "skip"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    printed = done.stdout
    assert "person: 2 crops" in printed and "total: 2 crops for 1 subject(s)" in printed
    assert sorted(p.name for p in (out / "person").iterdir()) == ["astronaut.jpg", "crops.json", "grace_hopper.jpg"]
