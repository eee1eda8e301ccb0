"""Quality of a StoryGPT-V pipeline on SynthSV test stories with referential captions.

Every frame is scored by the render-exact SynthSV judge (:mod:`storygptv.evaluation.synthsv`). Variants,
all with the same weights, seeds and referential captions:

- ``full``: StoryGPTVPipeline (frame 1 from Char-LDM, later frames from the LLM over generated frames);
- ``char_ldm``: Char-LDM on each caption alone (names fused where the caption has them; a pronoun
  caption such as "They are jumping." carries no character);
- ``char_ldm_no_fusion``: Char-LDM on each caption alone without reference images (plain text);
- ``no_interleaved_images``: the full pipeline with the generated frames withheld from the LLM (their
  visual tokens are zeroed), an inference-time stand-in for the paper's caption-only ablation.

Printed per variant: Char-Acc, micro Char-F1, BG-Acc over all frames, and Char-Acc / BG-Acc over the
frames whose caption uses a pronoun.

Usage:
    python benchmarks/synthsv_quality.py                              # the embedded default, 100 stories
    python benchmarks/synthsv_quality.py --model runs/storygptv --stories 200 --variants full char_ldm
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch

import storygptv
from storygptv import CharLDMPipeline, StoryGPTVPipeline
from storygptv.data.synthsv import CHARACTERS, reference_images, sample_story
from storygptv.evaluation.metrics import background_accuracy, character_metrics
from storygptv.evaluation.synthsv import SynthSVJudge

VARIANTS = ("full", "char_ldm", "char_ldm_no_fusion", "no_interleaved_images")


def labels(characters: tuple[str, ...]) -> np.ndarray:
    return np.array([int(name in characters) for name in CHARACTERS], dtype=np.int8)


def score(judge: SynthSVJudge, frames: list[Any], stories: list[Any]) -> dict[str, float]:
    """Overall and pronoun-frame metrics of ``frames`` (flattened over ``stories``)."""
    judged = judge.judge_frames(frames)
    truth = [
        (labels(f.characters), f.background, ref)
        for s in stories
        for f, ref in zip(s.frames, s.is_referential)
    ]
    pred_chars = np.stack([j.character_labels for j in judged])
    true_chars = np.stack([t[0] for t in truth])
    pronoun = np.array([t[2] for t in truth])
    result = {**character_metrics(pred_chars, true_chars)}
    result["bg_acc"] = background_accuracy([j.background for j in judged], [t[1] for t in truth])
    if pronoun.any():
        result["pronoun_char_acc"] = character_metrics(pred_chars[pronoun], true_chars[pronoun])["char_acc"]
        result["pronoun_bg_acc"] = background_accuracy(
            [j.background for j, p in zip(judged, pronoun) if p], [t[1] for t, p in zip(truth, pronoun) if p]
        )
    result["frames"] = len(truth)
    result["pronoun_frames"] = int(pronoun.sum())
    return result


def run_story_pipeline(
    pipe: StoryGPTVPipeline, stories, cast, args, withhold_images: bool = False
) -> list[Any]:
    original = pipe.story_model.append_frame
    if withhold_images:
        pipe.story_model.append_frame = lambda state, embeds, caption: original(
            state, torch.zeros_like(embeds), caption
        )
    frames = []
    try:
        for index, story in enumerate(stories):
            out = pipe(
                list(story.referential_captions),
                characters=cast,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance_scale,
                start_merge_step=args.start_merge_step,
                generator=torch.Generator().manual_seed(args.seed + index),
                output_type="np",
            )
            frames.extend(out.images)
    finally:
        pipe.story_model.append_frame = original
    return frames


def run_char_ldm(pipe: CharLDMPipeline, stories, cast, args) -> list[Any]:
    captions = [c for s in stories for c in s.referential_captions]
    frames = []
    for start in range(0, len(captions), args.batch_size):
        batch = captions[start : start + args.batch_size]
        out = pipe(
            batch,
            characters=cast,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            start_merge_step=args.start_merge_step,
            generator=torch.Generator().manual_seed(args.seed + start),
            output_type="np",
        )
        frames.extend(out.images)
    return frames


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=storygptv.DEFAULT_MODEL, help="a StoryGPTVPipeline folder or Hub id"
    )
    parser.add_argument("--stories", type=int, default=100)
    parser.add_argument("--frames", type=int, default=4, help="frames per story")
    parser.add_argument("--split", default="test")
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
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    stories = [sample_story(i, split=args.split, frames_per_story=args.frames) for i in range(args.stories)]
    pipe = StoryGPTVPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    char_ldm = CharLDMPipeline(**{k: v for k, v in pipe.components.items() if not k.startswith("story_")})
    char_ldm.set_progress_bar_config(disable=True)
    size = pipe.image_encoder.config.image_size
    cast = reference_images(size=size)
    judge = SynthSVJudge()

    results: dict[str, dict[str, float]] = {}
    for variant in args.variants:
        start = time.perf_counter()
        if variant == "full":
            frames = run_story_pipeline(pipe, stories, cast, args)
        elif variant == "no_interleaved_images":
            frames = run_story_pipeline(pipe, stories, cast, args, withhold_images=True)
        elif variant == "char_ldm":
            frames = run_char_ldm(char_ldm, stories, cast, args)
        else:
            frames = run_char_ldm(char_ldm, stories, None, args)
        results[variant] = {**score(judge, frames, stories), "seconds": time.perf_counter() - start}

    print(
        f"SynthSV {args.split}: {args.stories} stories x {args.frames} frames, referential captions, "
        f"{args.steps} steps, guidance {args.guidance_scale}, start_merge_step {args.start_merge_step}, "
        f"seed {args.seed}, model {args.model}"
    )
    header = (
        f"| {'variant':<22} | Char-Acc | Char-F1 | BG-Acc | pronoun Char-Acc | pronoun BG-Acc | seconds |"
    )
    print(header)
    print("|" + "|".join("-" * (len(part)) for part in header.split("|")[1:-1]) + "|")
    for variant, r in results.items():
        print(
            f"| {variant:<22} | {r['char_acc']:8.1f} | {r['char_f1']:7.1f} | {r['bg_acc']:6.1f} | "
            f"{r.get('pronoun_char_acc', float('nan')):16.1f} | {r.get('pronoun_bg_acc', float('nan')):14.1f} | "
            f"{r['seconds']:7.0f} |"
        )
    if "full" in results and "char_ldm" in results and "pronoun_char_acc" in results["full"]:
        gain = results["full"]["pronoun_char_acc"] - results["char_ldm"]["pronoun_char_acc"]
        print(f"pronoun frames: full model minus Char-LDM alone = {gain:+.1f} Char-Acc points")
    return results


if __name__ == "__main__":
    main()
