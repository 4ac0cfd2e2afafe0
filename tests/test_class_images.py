"""libs.class_images.sources / tools/class_images.py: CelebA selection on a small fake CelebA folder built here (official and Kaggle
layouts), the class-set loader's checks, and class image generation when libs.sample.pipeline is present."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from entrypoints import run_entry
from libs.config import REPO_ROOT
from libs.class_images.folder import ClassSetError, load_class_set
from libs.class_images.sources import generate_class_images, import_celeba, read_celeba_attribute
from libs.flags import overrides
from tools import class_images


def main(argv: list[str]) -> int:
    return run_entry(class_images, argv)

ATTRIBUTES = ["5_o_Clock_Shadow", "Arched_Eyebrows", "Male", "Young"]
N_PEOPLE = 40


def _male(index: int) -> int:
    """Every third person is a woman: 13 women and 27 men (26 with an image) among 40."""
    return -1 if index % 3 == 0 else 1


@pytest.fixture()
def celeba(tmp_path: Path) -> Path:
    """The official layout: img_align_celeba/*.jpg and list_attr_celeba.txt (count line, names, padded rows).

    000040.jpg is listed but missing, so it must never be picked.
    """
    root = tmp_path / "celeba"
    images = root / "img_align_celeba"
    images.mkdir(parents=True)
    rows = []
    for index in range(1, N_PEOPLE + 1):
        name = f"{index:06d}.jpg"
        if index != N_PEOPLE:
            Image.new("RGB", (18, 22), (index * 6, 255 - index * 6, index % 7 * 30)).save(images / name)
        values = [-1, 1 if index % 2 else -1, _male(index), 1]
        rows.append(name + " " + " ".join(f"{v:2d}" for v in values))
    (root / "list_attr_celeba.txt").write_text(f"{N_PEOPLE}\n" + " ".join(ATTRIBUTES) + " \n" + "\n".join(rows) + "\n")
    return root


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_celeba_picks_the_right_gender_and_aligns_files(celeba: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "class_data"
    assert main(["celeba", "--celeba_dir", str(celeba), "-o", str(out), "-n", "6", "--seed", "3"]) == 0
    male = read_celeba_attribute(celeba / "list_attr_celeba.txt")
    assert male["000003.jpg"] == -1 and male["000004.jpg"] == 1
    for word, want in (("boy", 1), ("girl", -1)):
        names = _lines(out / word / "images.txt")
        assert len(names) == 6 and len(set(names)) == 6
        assert all(male[name] == want for name in names)
        assert "000040.jpg" not in names
        assert _lines(out / word / "caption.txt") == [f"a photo of a {word}"] * 6
        assert sorted(p.name for p in (out / word / "images").iterdir()) == sorted(names)
        for name in names:  # real copies of the CelebA files
            assert (out / word / "images" / name).read_bytes() == (celeba / "img_align_celeba" / name).read_bytes()
        pairs = load_class_set(out / word)
        assert [(p.name, c) for p, c in pairs] == [(n, f"a photo of a {word}") for n in names]
    printed = capsys.readouterr().out
    assert "boy: 6 images" in printed and "girl: 6 images" in printed


def test_celeba_selection_is_seeded(celeba: Path, tmp_path: Path) -> None:
    first = [p.name for p, _ in import_celeba(celeba, tmp_path / "a", "girl", n=5, seed=7)]
    again = [p.name for p, _ in import_celeba(celeba, tmp_path / "b", "girl", n=5, seed=7)]
    other = [p.name for p, _ in import_celeba(celeba, tmp_path / "c", "girl", n=5, seed=8)]
    assert first == again and first != other
    # re-selecting into the same folder leaves no files of the old selection behind
    import_celeba(celeba, tmp_path / "a", "girl", n=5, seed=8)
    assert sorted(p.name for p in (tmp_path / "a" / "images").iterdir()) == sorted(other)


def test_celeba_caption_template_and_kaggle_layout(celeba: Path, tmp_path: Path) -> None:
    kaggle = tmp_path / "kaggle"
    (kaggle / "img_align_celeba").mkdir(parents=True)
    (celeba / "img_align_celeba").rename(kaggle / "img_align_celeba" / "img_align_celeba")
    rows = [line.split() for line in _lines(celeba / "list_attr_celeba.txt")[2:]]
    csv_lines = ["image_id," + ",".join(ATTRIBUTES)] + [",".join(row) for row in rows]
    (kaggle / "list_attr_celeba.csv").write_text("\n".join(csv_lines) + "\n")
    pairs = import_celeba(kaggle, tmp_path / "man", "man", n=4, seed=0, caption="a close-up portrait of a {}")
    male = read_celeba_attribute(kaggle / "list_attr_celeba.csv")
    assert len(pairs) == 4 and all(male[p.name] == 1 for p, _ in pairs)
    assert {caption for _, caption in pairs} == {"a close-up portrait of a man"}


def test_celeba_errors_are_clear(celeba: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ClassSetError, match=r"asked for 20 girl images but .* only 13 with Male=-1"):
        import_celeba(celeba, tmp_path / "girl", "girl", n=20)
    with pytest.raises(ClassSetError, match="no CelebA attribute file"):
        import_celeba(tmp_path, tmp_path / "x", "boy", n=1)
    with pytest.raises(ClassSetError, match="has no CelebA gender"):
        import_celeba(celeba, tmp_path / "x", "cat", n=1)
    assert main(["celeba", "--celeba_dir", str(tmp_path / "nowhere"), "-o", str(tmp_path / "out")]) == 2
    assert f"CelebA folder not found: {tmp_path / 'nowhere'}" in capsys.readouterr().err


def test_unreadable_celeba_images_are_replaced(celeba: Path, tmp_path: Path) -> None:
    seeded = [p.name for p, _ in import_celeba(celeba, tmp_path / "a", "boy", n=5, seed=1)]
    (celeba / "img_align_celeba" / seeded[0]).write_bytes(b"broken")
    again = [p.name for p, _ in import_celeba(celeba, tmp_path / "b", "boy", n=5, seed=1)]
    assert len(again) == 5 and seeded[0] not in again and set(seeded[1:]) <= set(again)


def test_load_class_set_checks_alignment_and_files(tmp_path: Path) -> None:
    folder = tmp_path / "boy"
    (folder / "images").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (8, 8)).save(folder / "images" / name)
    with pytest.raises(ClassSetError, match="images.txt not found"):
        load_class_set(folder)
    (folder / "images.txt").write_text("a.jpg\nb.jpg\n")
    (folder / "caption.txt").write_text("a photo of a boy\n")
    with pytest.raises(ClassSetError, match="has 2 lines but .*caption.txt has 1"):
        load_class_set(folder)
    (folder / "caption.txt").write_text("a photo of a boy\n\na photo of a boy\n")
    with pytest.raises(ClassSetError, match="line 2 is empty"):
        load_class_set(folder)
    (folder / "caption.txt").write_text("a photo of a boy\r\na photo of a boy\r\n\n")
    assert load_class_set(folder) == [(folder / "images" / "a.jpg", "a photo of a boy"),
                                      (folder / "images" / "b.jpg", "a photo of a boy")]
    (folder / "images" / "b.jpg").unlink()
    with pytest.raises(ClassSetError, match=r"1 image\(s\) listed .* do not exist: .*b\.jpg"):
        load_class_set(folder)
    with pytest.raises(ClassSetError, match="class image folder not found"):
        load_class_set(tmp_path / "girl")


def test_command_line_entry_point(celeba: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`python tools/class_images.py celeba ...`, as a separate process from another folder."""
    done = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "class_images.py"), "celeba", "--celeba_dir",
                           str(celeba), "--class_word", "woman", "-n", "3", "-o", str(tmp_path / "out")],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "woman: 3 images" in done.stdout
    assert len(load_class_set(tmp_path / "out" / "woman")) == 3


def test_generate_writes_n_images_and_resumes(tiny_config, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    config_file = tmp_path / "tiny_here.py"  # the tiny config, pointing at this session's tiny world
    config_file.write_text("from configs.tiny import get_config as tiny\n\n\ndef get_config():\n    config = tiny()\n"
                           + "".join(f"    config.paths.{key} = {value!r}\n" for key, value in tiny_config.paths.items())
                           + "    return config\n")
    out = tmp_path / "class_data"
    assert main(["generate", "--config", str(config_file), "--class_word", "boy", "girl", "-n", "2", "--steps", "2",
                 "--seed", "5", "-o", str(out), "--device", "cpu", "--batch_size", "2"]) == 0
    assert "boy: 2 images" in capsys.readouterr().out
    for word in ("boy", "girl"):
        pairs = load_class_set(out / word)
        assert [(p.name, c) for p, c in pairs] == [(f"0000{i}.jpg", f"a photo of a {word}") for i in range(2)]
        with Image.open(pairs[0][0]) as image:
            assert image.size == (tiny_config.resolution, tiny_config.resolution) and image.mode == "RGB"
    folder = out / "boy"
    first = np.asarray(Image.open(folder / "images" / "00001.jpg"), dtype=np.float32)
    (folder / "images" / "00001.jpg").unlink()
    kept = (folder / "images" / "00000.jpg").stat().st_mtime_ns
    tiny_config.sample.steps = 2
    pairs = generate_class_images(tiny_config, folder, "boy", n=3, seed=5, device="cpu", batch_size=2)
    assert [p.name for p, _ in pairs] == ["00000.jpg", "00001.jpg", "00002.jpg"]
    assert (folder / "images" / "00000.jpg").stat().st_mtime_ns == kept  # resumed, not redone
    redone = np.asarray(Image.open(folder / "images" / "00001.jpg"), dtype=np.float32)
    assert np.abs(redone - first).mean() < 1.0  # same seed per index, same picture
    third = np.asarray(Image.open(folder / "images" / "00002.jpg"), dtype=np.float32)
    assert np.abs(third - first).mean() > 5.0  # another index, another seed
    with pytest.raises(ClassSetError, match="made differently"):
        generate_class_images(tiny_config, folder, "boy", n=3, seed=6, device="cpu")


@pytest.mark.parametrize("flag, value, message", [("--steps", "0", "--steps: must be >= 1, got 0"),
                                                  ("--scale", "nan", "--scale: must be a finite number")])
def test_generate_sampling_flags_come_from_the_config_with_their_ranges(flag: str, value: str, message: str,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """--steps / --scale are config.sample's keys: an out-of-range value is a usage error (exit 2), not a traceback."""
    with pytest.raises(SystemExit) as exit_info:
        class_images.parse_args(["generate", flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert overrides(class_images.parse_args(["generate", "--steps", "7", "--scale", "3"])) == {"sample.steps": 7,
                                                                                             "sample.scale": 3.0}
