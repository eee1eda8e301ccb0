#!/usr/bin/env python
"""Write ``examples/my_stories/``: a tiny story folder with two characters the default model never met.

The frames are drawn by the SynthSV renderer (:mod:`storygptv.data.synthsv`), whose sprites stand in for the
new characters: Nia is drawn as the pink triangle and Rex as the purple diamond. The folder shows every part
of the format (README, "Fine-tune on your own stories"): boxes (story "picnic", "night_walk"), label-map masks ("snowday"), given
referential captions, a ``background`` per frame, the ``characters/`` cast and a ``splits.json``.

    python examples/make_my_stories.py [OUTPUT_DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import PIL.Image

from storygptv.characters import cast_file_stem
from storygptv.data.synthsv import SynthFrame, reference_images, render_frame

#: The new cast and the SynthSV sprite that draws each.
SPRITES = {"Nia": "Fay", "Rex": "Dax"}

#: story id -> frames: (characters, slots, action, background, caption, referential caption or None).
STORIES = {
    "picnic": [
        (("Nia", "Rex"), (0, 2), "standing", "beach", "Nia and Rex are standing in the beach.", None),
        (("Nia", "Rex"), (0, 1), "waving", "beach", "Nia and Rex are waving.", None),
        (("Nia",), (1,), "jumping", "beach", "Nia is jumping in the beach.", None),
        (("Nia",), (2,), "sitting", "beach", "Nia is sitting.", "She is sitting."),
    ],
    "snowday": [
        (("Rex",), (1,), "standing", "snow", "Rex is standing in the snow.", None),
        (("Rex",), (0,), "jumping", "snow", "Rex is jumping.", "He is jumping."),
        (("Rex", "Nia"), (0, 2), "laughing", "snow", "Rex and Nia are laughing in the snow.", None),
    ],
    "night_walk": [
        (("Nia",), (0,), "talking", "night", "Nia is talking in the night.", None),
        (("Nia", "Rex"), (0, 2), "talking", "night", "Nia and Rex are talking.", None),
        (("Nia", "Rex"), (1, 2), "laughing", "night", "Nia and Rex are laughing.", None),
    ],
}
MASKED_STORIES = ("snowday",)
SPLITS = {"train": ["picnic", "snowday"], "validation": ["night_walk"]}


def write_example(out: Path) -> Path:
    """Write the example folder into ``out``; returns it."""
    references = reference_images(size=64)
    (out / "characters").mkdir(parents=True, exist_ok=True)
    for name, sprite in SPRITES.items():
        references[sprite].save(out / "characters" / f"{cast_file_stem(name)}.png")
    lines = []
    for story_id, frames in STORIES.items():
        for position, (names, slots, action, background, caption, referential) in enumerate(frames):
            frame = SynthFrame(tuple(SPRITES[n] for n in names), slots, action, background)
            image, segmentation = render_frame(frame)
            file_name = f"frames/{story_id}/{position}.png"
            (out / file_name).parent.mkdir(parents=True, exist_ok=True)
            image.save(out / file_name)
            entry = {
                "file_name": file_name,
                "story_id": story_id,
                "frame": position,
                "caption": caption,
                "characters": list(names),
            }
            if story_id in MASKED_STORIES:
                entry["mask"] = f"masks/{story_id}/{position}.png"
                (out / entry["mask"]).parent.mkdir(parents=True, exist_ok=True)
                PIL.Image.fromarray(segmentation, mode="L").save(out / entry["mask"])
            else:
                entry["boxes"] = [list(box) for box in frame.boxes]
            entry["background"] = background
            if referential is not None:
                entry["referential_caption"] = referential
            lines.append(json.dumps(entry))
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "splits.json").write_text(json.dumps(SPLITS, indent=2) + "\n", encoding="utf-8")
    return out


if __name__ == "__main__":
    default = Path(__file__).with_name("my_stories")
    print(write_example(Path(sys.argv[1]) if len(sys.argv) > 1 else default))
