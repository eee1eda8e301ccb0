"""Quality of a StoryGPT-V pipeline on SynthSV test stories with referential captions.

Every frame is scored by the render-exact SynthSV judge (:mod:`storygptv.evaluation.synthsv`). Variants,
all with the same weights, seeds and referential captions:

- ``full``: StoryGPTVPipeline at its defaults (frame 1 from Char-LDM, later frames from the LLM over the
  generated frames; ``grounding="fuse"`` when the story model has a grounding head);
- ``full_no_grounding``: the same with ``grounding="none"`` (the mapper's conditioning alone);
- ``char_ldm``: Char-LDM on each caption alone (names fused where the caption has them; a pronoun
  caption such as "They are jumping." carries no character);
- ``char_ldm_oracle``: Char-LDM on each caption with its names and setting restored from the labels,
  i.e. what a perfect stage 2 could hand to stage 1 (the stage-1 ceiling);
- ``char_ldm_no_fusion``: Char-LDM on each caption alone without reference images (plain text);
- ``no_interleaved_images``: the full pipeline with the generated frames withheld from the LLM (their
  visual tokens are zeroed), an inference-time stand-in for the paper's caption-only ablation.

Printed per variant: Char-Acc, micro Char-F1, BG-Acc over all frames; Char-Acc over the frames whose
caption uses a pronoun and over those that name their characters; grounding precision / recall of the
characters each frame was drawn with (the pipeline's ``output.characters``; for Char-LDM variants, the
names in the caption it drew); seconds. ``--by_position`` adds Char-Acc by frame position (for long stories,
e.g. ``--frames 12``), to show whether errors compound as generated frames feed the LLM. Char-Acc by the
number of characters in the frame is printed too; ``--four_character_rate`` draws SynthSV's four-character
variant of the same stories (runs of three characters gain a fourth) to fill its last column.

Usage:
    python benchmarks/synthsv_quality.py                              # the embedded default, 100 stories
    python benchmarks/synthsv_quality.py --model runs/storygptv --stories 200 --variants full char_ldm
    python benchmarks/synthsv_quality.py --frames 12 --stories 30 --variants full --by_position
    python benchmarks/synthsv_quality.py --four_character_rate 1 --variants full char_ldm
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import torch

import storygptv
from storygptv import CharLDMPipeline, StoryGPTVPipeline
from storygptv.characters import find_character_mentions
from storygptv.data.synthsv import BACKGROUNDS, CHARACTERS, reference_images, sample_story
from storygptv.evaluation.grounding import grounding_metrics
from storygptv.evaluation.metrics import background_accuracy, character_metrics
from storygptv.evaluation.synthsv import SynthSVJudge
from storygptv.grounding import ground_caption
from storygptv.models.story_context import StoryContext

VARIANTS = (
    "full",
    "full_no_grounding",
    "char_ldm",
    "char_ldm_oracle",
    "char_ldm_no_fusion",
    "no_interleaved_images",
)


def labels(characters: tuple[str, ...]) -> np.ndarray:
    return np.array([int(name in characters) for name in CHARACTERS], dtype=np.int8)


def score(
    judge: SynthSVJudge, frames: list[Any], stories: list[Any], resolved: list[list[str]]
) -> dict[str, Any]:
    """Overall, pronoun-frame, named-frame, per-position and grounding metrics of ``frames``."""
    judged = judge.judge_frames(frames)
    truth = [
        (labels(f.characters), f.background, ref, f.characters, position)
        for s in stories
        for position, (f, ref) in enumerate(zip(s.frames, s.is_referential))
    ]
    pred_chars = np.stack([j.character_labels for j in judged])
    true_chars = np.stack([t[0] for t in truth])
    pronoun = np.array([t[2] for t in truth])
    result: dict[str, Any] = {**character_metrics(pred_chars, true_chars)}
    result["bg_acc"] = background_accuracy([j.background for j in judged], [t[1] for t in truth])
    for name, mask in (("pronoun", pronoun), ("named", ~pronoun)):
        if mask.any():
            result[f"{name}_char_acc"] = character_metrics(pred_chars[mask], true_chars[mask])["char_acc"]
            result[f"{name}_bg_acc"] = background_accuracy(
                [j.background for j, m in zip(judged, mask) if m], [t[1] for t, m in zip(truth, mask) if m]
            )
    positions = np.array([t[4] for t in truth])
    counts = true_chars.sum(1)
    result["char_acc_by_count"] = {
        int(n): character_metrics(pred_chars[counts == n], true_chars[counts == n])["char_acc"]
        for n in np.unique(counts)
    }
    result["char_acc_by_position"] = [
        character_metrics(pred_chars[positions == p], true_chars[positions == p])["char_acc"]
        for p in range(int(positions.max()) + 1)
    ]
    grounding = grounding_metrics(resolved, [t[3] for t in truth])
    result["grounding_precision"], result["grounding_recall"] = grounding["precision"], grounding["recall"]
    if pronoun.any():
        pronoun_grounding = grounding_metrics(
            [r for r, p in zip(resolved, pronoun) if p], [t[3] for t, p in zip(truth, pronoun) if p]
        )
        result["pronoun_grounding_exact"] = pronoun_grounding["exact"]
    result["frames"] = len(truth)
    result["pronoun_frames"] = int(pronoun.sum())
    return result


class WithheldImagesContext(StoryContext):
    """A story context that shows the LLM zeros instead of the generated frames (the caption-only ablation)."""

    def append_frame(self, image_embeds: torch.Tensor, caption: Any) -> None:
        super().append_frame(torch.zeros_like(image_embeds), caption)


def run_story_pipeline(
    pipe: StoryGPTVPipeline, stories, cast, args, withhold_images: bool = False, grounding: str | None = None
) -> tuple[list[Any], list[list[str]]]:
    frames, resolved = [], []
    for index, story in enumerate(stories):
        context = (
            WithheldImagesContext(pipe.story_model, pipe.story_processor, context_window=args.context_window)
            if withhold_images
            else None
        )
        out = pipe(
            list(story.referential_captions),
            characters=cast,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            start_merge_step=args.start_merge_step,
            max_characters=args.max_characters,
            grounding=grounding,
            context_window=None if withhold_images else args.context_window,  # the context has its own
            story_context=context,
            generator=torch.Generator().manual_seed(args.seed + index),
            output_type="np",
        )
        frames.extend(out.images)
        resolved.extend(out.characters)
    return frames, resolved


def run_char_ldm(pipe: CharLDMPipeline, captions: list[str], cast, args) -> tuple[list[Any], list[list[str]]]:
    frames = []
    for start in range(0, len(captions), args.batch_size):
        batch = captions[start : start + args.batch_size]
        out = pipe(
            batch,
            characters=cast,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            start_merge_step=args.start_merge_step,
            max_characters=args.max_characters,
            generator=torch.Generator().manual_seed(args.seed + start),
            output_type="np",
        )
        frames.extend(out.images)
    resolved = [[m.name for m in find_character_mentions(c, CHARACTERS)] for c in captions]
    return frames, resolved


def oracle_captions(stories) -> list[str]:
    """Each referential caption with its characters and setting restored from the story's labels."""
    return [
        ground_caption(caption, frame.characters, frame.background, BACKGROUNDS)
        for story in stories
        for caption, frame in zip(story.referential_captions, story.frames)
    ]


def print_table(results: dict[str, dict[str, Any]], by_position: bool) -> None:
    header = (
        f"| {'variant':<22} | Char-Acc | Char-F1 | BG-Acc | pronoun Char-Acc | named Char-Acc "
        f"| grounding P / R | seconds |"
    )
    print(header)
    print("|" + "|".join("-" * len(part) for part in header.split("|")[1:-1]) + "|")
    for variant, r in results.items():
        grounding = f"{r['grounding_precision']:.1f} / {r['grounding_recall']:.1f}"
        print(
            f"| {variant:<22} | {r['char_acc']:8.1f} | {r['char_f1']:7.1f} | {r['bg_acc']:6.1f} | "
            f"{r.get('pronoun_char_acc', float('nan')):16.1f} | {r.get('named_char_acc', float('nan')):14.1f} | "
            f"{grounding:>15} | {r['seconds']:7.0f} |"
        )
    print()
    for variant, r in results.items():
        cells = ", ".join(f"{n}: {v:.1f}" for n, v in r["char_acc_by_count"].items())
        print(f"{variant}: Char-Acc by characters in the frame: {cells}")
    if by_position:
        print()
        for variant, r in results.items():
            cells = " ".join(f"{v:5.1f}" for v in r["char_acc_by_position"])
            print(f"{variant}: Char-Acc by frame position: {cells}")


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=storygptv.DEFAULT_MODEL, help="a StoryGPTVPipeline folder or Hub id"
    )
    parser.add_argument("--stories", type=int, default=100)
    parser.add_argument("--first_story", type=int, default=0, help="index of the first test story")
    parser.add_argument("--frames", type=int, default=4, help="frames per story")
    parser.add_argument("--split", default="test")
    parser.add_argument(
        "--four_character_rate",
        type=float,
        default=0.0,
        help="draw SynthSV's four-character variant of the stories (0: the standard world)",
    )
    parser.add_argument(
        "--max_characters", type=int, default=None, help="characters fused per caption (default: the fuser's)"
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance_scale", type=float, default=5.0)
    parser.add_argument(
        "--batch_size", type=int, default=32, help="frames per batch for the Char-LDM variants"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--start_merge_step",
        type=int,
        default=None,
        help="first denoising step with the fused / LLM conditioning (default: the pipelines' default)",
    )
    parser.add_argument(
        "--context_window",
        type=int,
        default=None,
        help="story-model variants: keep only the last k frames in the LLM context (default: the whole story)",
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--by_position", action="store_true", help="also print Char-Acc by frame position")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    stories = [
        sample_story(
            i, split=args.split, frames_per_story=args.frames, four_character_rate=args.four_character_rate
        )
        for i in range(args.first_story, args.first_story + args.stories)
    ]
    pipe = StoryGPTVPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    char_ldm = CharLDMPipeline(**{k: v for k, v in pipe.components.items() if not k.startswith("story_")})
    char_ldm.set_progress_bar_config(disable=True)
    size = pipe.image_encoder.config.image_size
    cast = reference_images(size=size)
    judge = SynthSVJudge()
    referential = [c for s in stories for c in s.referential_captions]

    results: dict[str, dict[str, Any]] = {}
    for variant in args.variants:
        start = time.perf_counter()
        if variant == "full":
            frames, resolved = run_story_pipeline(pipe, stories, cast, args)
        elif variant == "full_no_grounding":
            frames, resolved = run_story_pipeline(pipe, stories, cast, args, grounding="none")
        elif variant == "no_interleaved_images":
            frames, resolved = run_story_pipeline(pipe, stories, cast, args, withhold_images=True)
        elif variant == "char_ldm":
            frames, resolved = run_char_ldm(char_ldm, referential, cast, args)
        elif variant == "char_ldm_oracle":
            frames, resolved = run_char_ldm(char_ldm, oracle_captions(stories), cast, args)
        else:
            frames, resolved = run_char_ldm(char_ldm, referential, None, args)
        results[variant] = {**score(judge, frames, stories, resolved), "seconds": time.perf_counter() - start}

    print(
        f"SynthSV {args.split} (four_character_rate {args.four_character_rate}): stories {args.first_story}-{args.first_story + args.stories - 1} x {args.frames} "
        f"frames, referential captions, {args.steps} steps, guidance {args.guidance_scale}, start_merge_step "
        f"{args.start_merge_step}, seed {args.seed}, model {args.model}"
    )
    print_table(results, args.by_position)
    if "full" in results and "char_ldm" in results and "pronoun_char_acc" in results["full"]:
        gain = results["full"]["pronoun_char_acc"] - results["char_ldm"]["pronoun_char_acc"]
        print(f"pronoun frames: full model minus Char-LDM alone = {gain:+.1f} Char-Acc points")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"args": vars(args), "results": results}, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
