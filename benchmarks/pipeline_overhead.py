"""Time per image of our pipelines against a plain diffusers ``StableDiffusionPipeline`` with the same UNet.

All pipelines share the embedded default's VAE, text encoder, tokenizer, UNet and scheduler, and draw the same
captions with the same number of steps, one image at a time; the table gives the mean seconds per image and
the ratio to plain Stable Diffusion, measured side by side in one run (interleaved rounds, median of rounds):

- ``stable_diffusion``: ``StableDiffusionPipeline`` on the caption (no characters);
- ``char_ldm_text``: ``CharLDMPipeline`` on the caption without reference images;
- ``char_ldm_fused``: ``CharLDMPipeline`` with the cast's reference images fused at the names;
- ``story_per_frame``: ``StoryGPTVPipeline`` on 4-frame stories (per frame: LLM, grounding, fusion, denoising,
  and the CLIP encoding of the finished frame for the story context).

Usage:
    python benchmarks/pipeline_overhead.py --rounds 3 --steps 30
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import StableDiffusionPipeline

import storygptv
from storygptv import CharLDMPipeline, StoryGPTVPipeline
from storygptv.data.synthsv import reference_images, sample_story


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=storygptv.DEFAULT_MODEL)
    parser.add_argument("--stories", type=int, default=4, help="4-frame stories per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    story_pipe = StoryGPTVPipeline.from_pretrained(args.model)
    char_ldm = CharLDMPipeline(
        **{k: v for k, v in story_pipe.components.items() if not k.startswith("story_")}
    )
    plain = StableDiffusionPipeline(
        vae=story_pipe.vae,
        text_encoder=story_pipe.text_encoder,
        tokenizer=story_pipe.tokenizer,
        unet=story_pipe.unet,
        scheduler=story_pipe.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    for pipe in (story_pipe, char_ldm, plain):
        pipe.set_progress_bar_config(disable=True)
    stories = [sample_story(i, split="test") for i in range(args.stories)]
    captions = [c for s in stories for c in s.captions]
    cast = reference_images(size=story_pipe.image_encoder.config.image_size)
    steps = {"num_inference_steps": args.steps, "guidance_scale": 5.0}

    def run_plain():
        for i, caption in enumerate(captions):
            plain(caption, generator=torch.Generator().manual_seed(i), output_type="np", **steps)

    def run_char_ldm(characters):
        for i, caption in enumerate(captions):
            char_ldm(
                caption,
                characters=characters,
                generator=torch.Generator().manual_seed(i),
                output_type="np",
                **steps,
            )

    def run_story():
        for i, s in enumerate(stories):
            story_pipe(list(s.referential_captions), characters=cast, generator=torch.Generator().manual_seed(i),
                       output_type="np", **steps)  # fmt: skip

    variants = {
        "stable_diffusion": run_plain,
        "char_ldm_text": lambda: run_char_ldm(None),
        "char_ldm_fused": lambda: run_char_ldm(cast),
        "story_per_frame": run_story,
    }
    with torch.no_grad():
        run_plain()  # warm-up
        rounds: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                rounds[name].append(timed(fn) / len(captions))
    base = statistics.median(rounds["stable_diffusion"])
    print(
        f"{len(captions)} images per variant and round, {args.rounds} rounds, {args.steps} steps, model {args.model}"
    )
    print("| variant | s / image (median of rounds) | ratio to StableDiffusionPipeline |")
    print("|---|---|---|")
    for name, values in rounds.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {median / base:.2f} |")


if __name__ == "__main__":
    main()
