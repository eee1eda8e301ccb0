"""Draw the storyboards of ``docs/modes.md`` with the embedded default model (about a minute on a CPU).

    python docs/make_mode_figures.py            # writes docs/mode_*.png

- ``mode_mutual.png``: a story whose later captions only say "They" / "She", drawn by Char-LDM alone (top row) and
  by Char-LDM with ``consistency="mutual"`` and a box per character, at weight 1 and 64 (the rows below): the
  boxes say who is where, the portraits what they look like.
- ``mode_four.png``: a story with four characters in a frame, then "They", drawn by the story pipeline (the UNet
  was fine-tuned on SynthSV's four-character variant).
- ``mode_continue.png``: the README story's first two captions, then two frames the story model writes itself
  (``continue_story`` inside SynthSV's caption grammar).
"""

from __future__ import annotations

from pathlib import Path

import PIL.Image
import torch

import storygptv
from storygptv import CharLDMPipeline, StoryGPTVPipeline, make_storyboard
from storygptv.data.synthsv import caption_prefix_validator, reference_images
from storygptv.evaluation.synthsv import SynthSVJudge

HERE = Path(__file__).parent
MUTUAL_STORY = ["Ava and Bo are standing in the forest.", "They are jumping in the forest.", "She is waving."]
MUTUAL_BOXES = [  # (x0, y0, x1, y1) in pixels of the 64x64 frame
    {"Ava": (6, 36, 22, 52), "Bo": (42, 36, 58, 52)},
    {"Ava": (6, 24, 22, 40), "Bo": (42, 24, 58, 40)},
    {"Ava": (24, 36, 40, 52)},
]
FOUR_STORY = [
    "Ava, Bo, Cleo and Dax are standing in the lake.",
    "They are jumping.",
    "Eli is waving in the lake.",
    "Bo, Fay, Gus and Hana are sitting in the snow.",
    "They are laughing.",
]


def stack(top: PIL.Image.Image, bottom: PIL.Image.Image) -> PIL.Image.Image:
    board = PIL.Image.new("RGB", (max(top.width, bottom.width), top.height + bottom.height), "white")
    board.paste(top, (0, 0))
    board.paste(bottom, (0, top.height))
    return board


def main() -> None:
    story_pipe = StoryGPTVPipeline.from_pretrained(storygptv.DEFAULT_MODEL)
    char_ldm = CharLDMPipeline(
        **{k: v for k, v in story_pipe.components.items() if not k.startswith("story_")}
    )
    refs = reference_images()
    cast = {"Ava": refs["Ava"], "Bo": refs["Bo"]}

    # The same captions and noise, with and without mutual attention inside the boxes.
    rows = []
    for label, kwargs in (
        ("Char-LDM", {}),
        ("+ mutual", {"consistency": "mutual", "character_masks": MUTUAL_BOXES}),
        (
            "+ mutual, weight 64",
            {"consistency": "mutual", "character_masks": MUTUAL_BOXES, "mutual_attention_weight": 64.0},
        ),
    ):
        images = char_ldm(
            MUTUAL_STORY, characters=cast, generator=torch.Generator().manual_seed(0), **kwargs
        ).images
        rows.append(make_storyboard(images, [f"{label}: {c}" for c in MUTUAL_STORY], frame_size=160))
    board = rows[0]
    for row in rows[1:]:
        board = stack(board, row)
    board.save(HERE / "mode_mutual.png")

    # Four characters in a frame, and "They" for all four.
    story = story_pipe(FOUR_STORY, characters=refs, generator=torch.Generator().manual_seed(0))
    drawn = [f"{c} [drawn with {', '.join(who)}]" for c, who in zip(FOUR_STORY, story.characters)]
    make_storyboard(story.images, drawn, columns=len(FOUR_STORY), frame_size=160).save(HERE / "mode_four.png")
    judge = SynthSVJudge()
    print("four characters, judged:", [sorted(judge.judge_frame(image).characters) for image in story.images])

    # The README story's start, then two frames the story model writes.
    start = ["Ava and Bo are standing in the forest.", "They are jumping."]
    story = story_pipe(start, characters=cast, generator=torch.Generator().manual_seed(0))
    more = story_pipe.continue_story(
        story,
        num_frames=2,
        characters=cast,
        caption_constraint=caption_prefix_validator(cast),
        generator=torch.Generator().manual_seed(1),
    )
    captions = [*start, *(f"(written) {c}" for c in more.written_captions)]
    make_storyboard([*story.images, *more.images], captions, frame_size=160).save(HERE / "mode_continue.png")
    print("written:", more.written_captions, "drawn as:", more.captions)


if __name__ == "__main__":
    main()
