"""Training data: photos read upright, framed without squashing (face-aware when a box is known), clear
errors naming the file, class sets with their captions, and an image cache equal to encoding on the spot."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from libs.class_images.folder import write_class_set
from libs.models.loading import load_autoencoder, load_image_encoder
from libs.train import ImageEncoder, LatentSource, TrainImage, load_class_images, load_instance_images, square_crop
from libs.photos import CROPS_FILE, list_images, open_image
from libs.photos import PhotoError as DataError
from libs.photos import face_boxes as read_face_boxes


def test_exif_orientation_and_transparency(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees: a portrait
    Image.new("RGB", (40, 20), "red").save(tmp_path / "rotated.jpg", exif=exif)
    assert open_image(tmp_path / "rotated.jpg").size == (20, 40)

    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    rgba.save(tmp_path / "cutout.png")
    image = open_image(tmp_path / "cutout.png")
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (10, 20, 30)
    assert image.getpixel((5, 5)) == (255, 255, 255)  # removed background becomes white, not black


def test_square_crop_keeps_the_aspect_ratio():
    # red channel = x coordinate: a squashed image would span 0..199, a kept aspect ratio the middle half
    ramp = np.tile(np.arange(200, dtype=np.uint8), (100, 1))
    image = Image.fromarray(np.stack([ramp, np.zeros_like(ramp), np.zeros_like(ramp)], axis=-1))
    crop = np.asarray(square_crop(image, 50))
    assert crop.shape == (50, 50, 3)
    assert abs(int(crop[25, 0, 0]) - 50) <= 3 and abs(int(crop[25, -1, 0]) - 148) <= 3


def _portrait_with_face(size=(100, 200), face=(20, 10, 60, 50)) -> Image.Image:
    image = Image.new("RGB", size, (128, 128, 128))
    image.paste((255, 0, 0), face)
    return image


def _red_fraction(image: Image.Image) -> float:
    pixels = np.asarray(image).astype(int)
    return float(((pixels[..., 0] > 200) & (pixels[..., 1] < 60)).mean())


def test_face_box_from_crops_json_moves_the_crop_to_the_face(tmp_path):
    # the data-preparation layout: crops.json keyed by source photo, face_box in the crop's pixels
    folder = tmp_path / "crops"
    folder.mkdir()
    _portrait_with_face().save(folder / "me.jpg", quality=95)
    entry = {"output": "me.jpg", "status": "face", "face_box": [20, 10, 60, 50], "source_face_box": [40, 20, 120, 100],
             "crop_box": [0, 0, 200, 400]}
    (folder / CROPS_FILE).write_text(json.dumps({"settings": {}, "photos": {"IMG_1.jpeg": entry}}))

    assert read_face_boxes(folder) == {"me.jpg": (20.0, 10.0, 60.0, 50.0)}
    (framed,) = load_instance_images(folder, 50, crop="face", min_side=32)
    assert framed.crop == "face (crops.json)"
    assert _red_fraction(framed.image) > 0.1
    (centred,) = load_instance_images(folder, 50, crop="center", min_side=32)
    assert _red_fraction(centred.image) < 0.01  # a centre crop of this portrait cuts the face off


def test_crops_written_by_the_preparation_step_are_read(tmp_path, public_photos):
    from libs.preprocess import CropSettings, crop_subject

    source, output = tmp_path / "raw", tmp_path / "crop"
    source.mkdir()
    public_photos["grace_hopper"].save(source / "hopper.jpg")
    crop_subject(source, output, CropSettings(size=(96, 160), rembg=False, face_backend="dlib"))
    boxes = read_face_boxes(output)
    assert set(boxes) == {"hopper.jpg"}
    x0, y0, x1, y1 = boxes["hopper.jpg"]
    assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 160
    (framed,) = load_instance_images(output, 64, crop="face", min_side=32)
    assert framed.crop == "face (crops.json)"


def test_detected_face_frames_a_photo_without_crops_json(tmp_path, public_photos):
    folder = tmp_path / "photos"
    folder.mkdir()
    photo = public_photos["grace_hopper"]  # 512 x 600, face in the upper half
    photo.save(folder / "hopper.png")
    (framed,) = load_instance_images(folder, 64, crop="face", min_side=32)
    assert framed.crop in ("face (dlib)", "face (insightface)")
    top_aligned = photo.resize((64, 75), Image.LANCZOS).crop((0, 0, 64, 64))
    assert np.array_equal(np.asarray(framed.image), np.asarray(top_aligned))
    assert not np.array_equal(np.asarray(framed.image), np.asarray(square_crop(photo, 64)))

    public_photos["camera"].save(folder / "camera.png")  # a person, but no frontal face
    framed = {image.path.name: image.crop for image in load_instance_images(folder, 64, crop="face", min_side=32)}
    assert framed["camera.png"] == "center (no face found)"


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="not found"):
        list_images(tmp_path / "missing")
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="is a file"):
        list_images(tmp_path / "file.jpg")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="it is empty"):
        list_images(empty)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"no photos .* notes\.txt"):
        list_images(notes)


def test_unreadable_and_tiny_images_are_named(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (64, 64), "blue").save(folder / "good.jpg")
    (folder / "broken.jpeg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match=r"cannot read image .*broken\.jpeg"):
        load_instance_images(folder, 32, crop="center", min_side=16)
    (folder / "broken.jpeg").unlink()
    Image.new("RGB", (10, 12), "blue").save(folder / "thumb.webp")
    with pytest.raises(DataError, match=r"thumb\.webp is too small \(10x12\)"):
        load_instance_images(folder, 32, crop="center", min_side=16)


def _class_set(folder: Path, count: int, size=(48, 40)) -> Path:
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"{i:03d}.jpg" for i in range(count)]
    for name in names:
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / "images" / name)
    write_class_set(folder, names, [f"a photo of a boy, number {i}" for i in range(count)], {"source": "test"})
    return folder


def test_class_set_captions_and_shortfall(tmp_path):
    class_dir = _class_set(tmp_path / "boy", 3)
    images, warning = load_class_images(class_dir, 32, num_images=5, min_side=16)
    assert [image.caption for image in images] == [f"a photo of a boy, number {i}" for i in range(3)]
    assert all(image.image.size == (32, 32) for image in images)
    assert "holds 3 images, fewer than --num_class_images 5" in warning
    assert "python tools/class_images.py" in warning
    images, warning = load_class_images(class_dir, 32, num_images=2, min_side=16, class_prompt="a boy")
    assert warning is None and [image.caption for image in images] == ["a boy", "a boy"]
    with pytest.raises(DataError, match="no_prior_preservation"):
        load_class_images(tmp_path / "girl", 32, num_images=2)


class CountingEncoder(ImageEncoder):
    calls = 0

    def __call__(self, images):
        self.calls += len(images)
        return super().__call__(images)


@pytest.fixture()
def encoder(tiny_config) -> CountingEncoder:
    return CountingEncoder(load_autoencoder(tiny_config), load_image_encoder(tiny_config), "cpu")


def test_cache_equals_encoding_on_the_spot_and_survives_on_disk(tmp_path, public_photos, encoder):
    images = [TrainImage(Path(f"{name}.jpg"), square_crop(photo, 64), "center")
              for name, photo in public_photos.items()]
    views = torch.tensor([0, 5, 3, 1])
    cached = LatentSource(images, hflip=True, encoder=encoder, batch_size=4, cache_dir=tmp_path / "cache",
                          cache_key="k")
    assert len(cached) == 6 and encoder.calls == 6
    assert np.array_equal(np.asarray(cached.view(1)), np.asarray(ImageOps.mirror(images[0].image)))
    on_the_spot = LatentSource(images, hflip=True, encoder=encoder, cached=False)
    for a, b in zip(cached.lookup(views), on_the_spot.lookup(views)):
        assert a.shape[0] == 4
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    encoder.calls = 0
    from_disk = LatentSource(images, hflip=True, encoder=encoder, cache_dir=tmp_path / "cache", cache_key="k")
    assert encoder.calls == 0
    for a, b in zip(cached.lookup(views), from_disk.lookup(views)):
        assert torch.equal(a, b)
    LatentSource(images, hflip=True, encoder=encoder, cache_dir=tmp_path / "cache", cache_key="other encoders")
    assert encoder.calls == 6  # another key (e.g. another VAE file) is encoded anew
