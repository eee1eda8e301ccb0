"""Seconds per frame of ``consistency="mutual"`` (MMSA + MMCA) against the stock story pipeline.

Draws the same story with the embedded default model (``storygptv.DEFAULT_MODEL``, 64x64 SynthSV frames) three
ways, side by side in one run (interleaved rounds, median of rounds):

- ``stock``: ``consistency=None``;
- ``mutual_cache``: ``consistency="mutual", mutual_attention="cache"``: the portraits' keys / values are recorded
  once per story (one UNet pass over the portraits per step, included in the time) and reused by every frame;
- ``mutual_recompute``: ``mutual_attention="recompute"``: the portraits are denoised in the same batch as every
  frame, at every step.

Every frame of the story has one or two characters with boxes, so every frame pays the mutual attention.

Usage:
    python benchmarks/mutual_attention.py --frames 4 --steps 10 --rounds 3 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import storygptv
from storygptv import StoryGPTVPipeline
from storygptv.data.synthsv import reference_images

STORY = [
    ("Ava and Bo are standing in the forest.", {"Ava": (0.0, 0.2, 0.5, 1.0), "Bo": (0.5, 0.2, 1.0, 1.0)}),
    ("Ava is waving.", {"Ava": (0.25, 0.1, 0.75, 1.0)}),
    ("Bo is jumping.", {"Bo": (0.25, 0.0, 0.75, 0.8)}),
    ("Ava and Bo are sitting.", {"Ava": (0.0, 0.3, 0.5, 1.0), "Bo": (0.5, 0.3, 1.0, 1.0)}),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=4, help="frames per story (cycles the 4 captions)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per frame")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    pipe = StoryGPTVPipeline.from_pretrained(storygptv.DEFAULT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    refs = reference_images()
    cast = {"Ava": refs["Ava"], "Bo": refs["Bo"]}
    captions = [STORY[i % len(STORY)][0] for i in range(args.frames)]
    masks = [STORY[i % len(STORY)][1] for i in range(args.frames)]
    variants = {
        "stock": {},
        "mutual_cache": {"consistency": "mutual", "character_masks": masks, "mutual_attention": "cache"},
        "mutual_recompute": {
            "consistency": "mutual",
            "character_masks": masks,
            "mutual_attention": "recompute",
        },
    }

    def draw(kwargs: dict) -> float:
        start = time.perf_counter()
        pipe(
            captions,
            characters=cast,
            num_inference_steps=args.steps,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
            **kwargs,
        )
        return (time.perf_counter() - start) / args.frames

    draw(variants["stock"])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, kwargs in variants.items():
            times[name].append(draw(kwargs))
    base = statistics.median(times["stock"])
    print(f"frames={args.frames} steps={args.steps} rounds={args.rounds} threads={torch.get_num_threads()}")
    print(f"{'variant':<18} {'s/frame':>8} {'x stock':>8}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<18} {median:>8.3f} {median / base:>8.2f}")


if __name__ == "__main__":
    main()
