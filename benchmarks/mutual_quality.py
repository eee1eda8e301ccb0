"""What DreamStory's mutual attention (``consistency="mutual"``) does to SynthSV stories, with the embedded default.

Each variant draws the same referential SynthSV test stories with the same seeds (one generator seed per story):

- ``stage2``: ``StoryGPTVPipeline`` at its defaults (the story LLM resolves the pronouns);
- ``stage2_mutual``: the same with ``consistency="mutual"``, masks from the drawn characters' cross-attention at an
  early step (no layout given);
- ``stage2_mutual_boxes``: the same with the ground-truth character boxes as ``character_masks`` (a user or a
  director that gives the layout);
- ``char_ldm``: ``CharLDMPipeline`` on each caption alone (no LLM: a pronoun caption names nobody);
- ``char_ldm_mutual``: Char-LDM with ``consistency="mutual"`` and attention masks (only named characters get one);
- ``char_ldm_mutual_boxes``: Char-LDM with mutual attention from the portraits inside the ground-truth boxes: the
  boxes say who is where, the caption may still say "They" (DreamStory's setting without its LLM director).

The cast is every SynthSV character's reference image (the portraits), as in ``synthsv_quality.py``. Besides the
test stories (1-3 characters per frame), ``--quartets`` adds two-frame stories with four characters ("Ava, Bo,
Cleo and Dax are standing in the lake." / "They are jumping."; boxes side by side at x = 0, 16, 32, 48: the layout
of SynthSV's four-character variant), for the 4-character row.

Printed per variant: Char-Acc over all frames and by the number of characters in the frame (1-4), pronoun-frame
Char-Acc, the SynthSV consistency figures (:func:`storygptv.evaluation.synthsv.character_consistency`: silhouette
IoU of a character between frames of its story, colour drift in RGB units, IoU with its own sprite) and seconds per
frame (wall time of the variant over its frames; run variants in one process to compare them).

Usage:
    python benchmarks/mutual_quality.py --stories 100 --quartets 25 --threads 1
    python benchmarks/mutual_quality.py --variants stage2 stage2_mutual --stories 20 --json out.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
import warnings
from typing import Any

import numpy as np
import torch

import storygptv
from storygptv import CharLDMPipeline, StoryGPTVPipeline
from storygptv.data.synthsv import ACTIONS, BACKGROUNDS, CHARACTERS, reference_images, sample_story
from storygptv.data.synthsv.spec import character_box, make_caption
from storygptv.evaluation.metrics import character_metrics
from storygptv.evaluation.synthsv import SynthSVJudge, character_consistency

VARIANTS = (
    "stage2",
    "stage2_mutual",
    "stage2_mutual_boxes",
    "char_ldm",
    "char_ldm_mutual",
    "char_ldm_mutual_boxes",
)


class ProbeStory:
    """A story to draw: referential captions, the truth per frame (characters, boxes) and which frames use pronouns."""

    def __init__(
        self, captions: list[str], characters: list[tuple[str, ...]], boxes: list[dict], pronoun: list[bool]
    ):
        self.captions, self.characters, self.boxes, self.pronoun = captions, characters, boxes, pronoun


def synthsv_stories(count: int, split: str = "test") -> list[ProbeStory]:
    stories = []
    for index in range(count):
        story = sample_story(index, split=split)
        stories.append(
            ProbeStory(
                list(story.referential_captions),
                [frame.characters for frame in story.frames],
                [dict(zip(frame.characters, frame.boxes)) for frame in story.frames],
                list(story.is_referential),
            )
        )
    return stories


def quartet_stories(count: int, seed: int = 1234) -> list[ProbeStory]:
    """Two frames with four characters side by side: named, then "They"."""
    rng = random.Random(seed)
    stories = []
    for _ in range(count):
        cast = tuple(sorted(rng.sample(CHARACTERS, 4), key=CHARACTERS.index))
        first, second = rng.sample(ACTIONS, 2)
        background = rng.choice(BACKGROUNDS)

        def boxes(action: str, cast: tuple[str, ...] = cast) -> dict[str, tuple[int, int, int, int]]:
            return {name: character_box(i, action, four=True) for i, name in enumerate(cast)}

        stories.append(
            ProbeStory(
                [make_caption(cast, first, background), make_caption("They", second)],
                [cast, cast],
                [boxes(first), boxes(second)],
                [False, True],
            )
        )
    return stories


def draw(
    variant: str, story_pipe, char_ldm, story: ProbeStory, cast, seed: int, steps: int, weight: float = 1.0
) -> list[np.ndarray]:
    common = {
        "characters": cast,
        "num_inference_steps": steps,
        "generator": torch.Generator().manual_seed(seed),
        "output_type": "np",
        "max_characters": max(3, max(len(c) for c in story.characters)),
    }
    if variant.endswith("_mutual"):
        common.update(consistency="mutual", mutual_attention_weight=weight)
    elif variant.endswith("_mutual_boxes"):
        common.update(consistency="mutual", character_masks=story.boxes, mutual_attention_weight=weight)
    pipe = story_pipe if variant.startswith("stage2") else char_ldm
    return list(pipe(story.captions, **common).images)


def score(judge: SynthSVJudge, stories: list[ProbeStory], frames: list[list[np.ndarray]]) -> dict[str, Any]:
    flat = [frame for story_frames in frames for frame in story_frames]
    judged = judge.judge_frames(flat)
    pred = np.stack([j.character_labels for j in judged])
    truth = np.stack(
        [[int(name in chars) for name in CHARACTERS] for story in stories for chars in story.characters]
    ).astype(np.int8)
    counts = truth.sum(1)
    pronoun = np.array([p for story in stories for p in story.pronoun])
    result: dict[str, Any] = {"char_acc": character_metrics(pred, truth)["char_acc"], "frames": len(flat)}
    for count in range(1, 5):
        chosen = counts == count
        result[f"char_acc_{count}"] = (
            character_metrics(pred[chosen], truth[chosen])["char_acc"] if chosen.any() else float("nan")
        )
        result[f"frames_{count}"] = int(chosen.sum())
    result["pronoun_char_acc"] = character_metrics(pred[pronoun], truth[pronoun])["char_acc"]
    result.update(character_consistency(frames, judge))
    return result


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=storygptv.DEFAULT_MODEL, help="a StoryGPTVPipeline folder or Hub id"
    )
    parser.add_argument("--stories", type=int, default=100, help="SynthSV test stories (4 frames each)")
    parser.add_argument("--quartets", type=int, default=25, help="two-frame stories with four characters")
    parser.add_argument("--split", default="test", help="SynthSV split of the stories (tune on validation)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--mutual_attention_weight", type=float, default=1.0, help="the pipelines' `mutual_attention_weight`"
    )
    parser.add_argument("--seed", type=int, default=0, help="story i uses seed + i")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    # every story is drawn with the whole cast: Char-LDM's warning about the cast members a caption does not name
    # would fill the log
    warnings.filterwarnings("ignore", message="Characters .* are not named in the caption")
    if args.threads:
        torch.set_num_threads(args.threads)

    story_pipe = StoryGPTVPipeline.from_pretrained(args.model)
    story_pipe.set_progress_bar_config(disable=True)
    char_ldm = CharLDMPipeline(
        **{k: v for k, v in story_pipe.components.items() if not k.startswith("story_")}
    )
    char_ldm.set_progress_bar_config(disable=True)
    cast = reference_images(size=story_pipe.image_encoder.config.image_size)
    stories = synthsv_stories(args.stories, args.split) + quartet_stories(args.quartets)
    judge = SynthSVJudge()

    results: dict[str, dict[str, Any]] = {}
    for variant in args.variants:
        start = time.perf_counter()
        frames = [
            draw(
                variant,
                story_pipe,
                char_ldm,
                story,
                cast,
                args.seed + index,
                args.steps,
                args.mutual_attention_weight,
            )
            for index, story in enumerate(stories)
        ]
        seconds = time.perf_counter() - start
        results[variant] = {
            **score(judge, stories, frames),
            "seconds_per_frame": seconds / sum(map(len, frames)),
        }
        print(f"{variant}: {json.dumps({k: round(v, 3) for k, v in results[variant].items()})}", flush=True)

    print(
        f"\nSynthSV {args.split} stories 0-{args.stories - 1} x 4 frames + {args.quartets} four-character stories x 2 "
        f"frames, {args.steps} steps, mutual_attention_weight {args.mutual_attention_weight}, seeds {args.seed}+i, "
        f"model {args.model}"
    )
    header = (
        "| variant | Char-Acc | 1 char | 2 chars | 3 chars | 4 chars | pronoun Char-Acc | silhouette IoU "
        "| colour drift | sprite IoU | s / frame |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for variant, r in results.items():
        print(
            f"| {variant} | {r['char_acc']:.1f} | {r['char_acc_1']:.1f} | {r['char_acc_2']:.1f} | "
            f"{r['char_acc_3']:.1f} | {r['char_acc_4']:.1f} | {r['pronoun_char_acc']:.1f} | "
            f"{r['silhouette_iou']:.1f} | {r['color_drift']:.1f} | {r['sprite_iou']:.1f} | "
            f"{r['seconds_per_frame']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "results": results}, handle, indent=1)
    return results


if __name__ == "__main__":
    main()
