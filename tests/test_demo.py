"""`make demo` end to end: crop -> train.py -> sample.py -> score.py on the tiny world (slow: ~2 min)."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from tools.demo import DEMO_PROMPTS, SUBJECT, augmented_views, run_demo


def test_augmented_views_are_distinct_photos():
    image = Image.new("RGB", (64, 80), (10, 20, 30))
    image.paste((200, 0, 0), (0, 0, 20, 80))
    views = augmented_views(image)
    assert len(views) == 5
    assert len({v.tobytes() for v in views}) == 5


@pytest.mark.slow
def test_demo_pipeline_produces_every_artefact(tmp_path):
    artefacts = run_demo(tmp_path / "demo", train_step=4, sample_steps=3)
    crops = sorted(artefacts["crops"].glob("*.jpg"))
    assert len(crops) == 5
    crop_meta = json.loads((artefacts["crops"] / "crops.json").read_text())
    assert all(p["status"] == "face" for p in crop_meta["photos"].values())  # dlib finds the astronaut's face

    personalization = artefacts["personalization"]
    assert {"personalization.json", "uvit_lora.safetensors", "token_embeddings.safetensors"} <= {
        p.name for p in personalization.iterdir()}

    images = sorted(p.name for p in artefacts["images"].glob("*-*.jpg"))
    assert images == [f"{i}-{k:03}.jpg" for i in range(len(DEMO_PROMPTS)) for k in range(3)]
    assert artefacts["grid"].is_file()

    assert artefacts["run report"].is_file()  # train.py's report.html, printed by the demo with the score report
    results = json.loads((artefacts["report"].parent / "score_results.json").read_text())
    assert SUBJECT in json.dumps(results)
    html = artefacts["report"].read_text()
    assert "0-000.jpg" in html
