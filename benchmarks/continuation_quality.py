"""How well a StoryGPT-V pipeline continues SynthSV stories: grammar and references of the captions it writes.

For each test story, the first ``--given`` referential captions are drawn (the generated frames become the
story model's context), then ``StoryGPTVPipeline.continue_story`` writes and draws ``--continued`` more
frames. Every written caption is checked with SynthSV's caption grammar
(:func:`storygptv.data.synthsv.parse_caption`):

- **grammatical**: the caption is a sentence of the grammar;
- **referentially consistent** (:func:`storygptv.data.synthsv.check_reference`): a pronoun refers to the
  characters of the previous frame ("He" / "She": one character of that pronoun; "They": several), and names
  are known characters. The previous frame of the first continued frame is the last given one (its true
  characters); a later one's is the previous continued caption's characters (its names, or what its pronoun
  referred to).

With ``--grammar`` the captions are written inside the grammar, naming only the story's characters
(``continue_story(..., caption_constraint=caption_prefix_validator(cast))``).

Also printed: how often the subject is a pronoun, how often the caption copies one of the story's earlier
captions, and the frames drawn with the characters the caption means (``output.characters``).

Example::

    python benchmarks/continuation_quality.py --stories 100            # the embedded default model
    python benchmarks/continuation_quality.py --model path/to/pipeline --stories 20 --continued 2
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

import storygptv
from storygptv import StoryGPTVPipeline
from storygptv.data.synthsv import (
    CHARACTERS,
    caption_prefix_validator,
    check_reference,
    parse_caption,
    reference_images,
    sample_stories,
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=storygptv.DEFAULT_MODEL, help="a StoryGPTVPipeline folder or Hub id"
    )
    parser.add_argument("--stories", type=int, default=100, help="test stories (from index 0)")
    parser.add_argument("--given", type=int, default=3, help="frames drawn from the story's captions")
    parser.add_argument("--continued", type=int, default=1, help="frames the model writes and draws")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps per frame")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy captions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--grammar",
        action="store_true",
        help="write the captions inside SynthSV's grammar (caption_constraint=caption_prefix_validator(cast))",
    )
    parser.add_argument(
        "--output", default=None, help="write the figures and every caption to this JSON file"
    )
    args = parser.parse_args(argv)
    if args.given < 1 or args.continued < 1 or args.stories < 1:
        parser.error("--stories, --given and --continued must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    pipe = StoryGPTVPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    refs = reference_images()
    stories = sample_stories(range(args.stories), "test", args.given + args.continued)
    counts = {
        "captions": 0,
        "grammatical": 0,
        "consistent": 0,
        "pronoun": 0,
        "copies": 0,
        "drawn_as_meant": 0,
    }
    rows = []
    start = time.perf_counter()
    for story in stories:
        given = list(story.referential_captions[: args.given])
        cast = {name: refs[name] for name in dict.fromkeys(n for f in story.characters for n in f)}
        generator = torch.Generator().manual_seed(args.seed + story.index)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = pipe.continue_story(
                given,
                num_frames=args.continued,
                characters=cast,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                temperature=args.temperature,
                caption_constraint=caption_prefix_validator(cast) if args.grammar else None,
                generator=generator,
                output_type="latent",
            )
        previous: tuple[str, ...] | None = story.frames[args.given - 1].characters
        for written, drawn_characters in zip(out.written_captions, out.characters):
            parsed = parse_caption(written)
            consistent = (
                parsed is not None and previous is not None and check_reference(parsed, previous, CHARACTERS)
            )
            meant: tuple[str, ...] | None = None
            if consistent:
                meant = parsed.characters if parsed.pronoun is None else previous
            counts["captions"] += 1
            counts["grammatical"] += parsed is not None
            counts["consistent"] += consistent
            counts["pronoun"] += parsed is not None and parsed.pronoun is not None
            counts["copies"] += (
                written in story.referential_captions[: args.given] or written in story.captions
            )
            counts["drawn_as_meant"] += meant is not None and set(drawn_characters) == set(meant)
            rows.append(
                {"story": story.story_id, "given": given, "written": written, "grammatical": parsed is not None,
                 "consistent": consistent, "drawn_characters": drawn_characters}
            )  # fmt: skip
            previous = meant
            given = [*given, written]
    seconds = time.perf_counter() - start
    n = counts["captions"]
    figures = {
        "stories": len(stories),
        "written_captions": n,
        "grammatical_pct": 100 * counts["grammatical"] / n,
        "consistent_pct": 100 * counts["consistent"] / n,
        "consistent_of_grammatical_pct": 100 * counts["consistent"] / max(counts["grammatical"], 1),
        "pronoun_pct": 100 * counts["pronoun"] / n,
        "copies_pct": 100 * counts["copies"] / n,
        "drawn_as_meant_pct": 100 * counts["drawn_as_meant"] / n,
        "seconds_per_story": seconds / len(stories),
    }
    print(json.dumps(figures, indent=2))
    for row in rows[:8]:
        print(
            row["given"][-1],
            "->",
            row["written"],
            "| grammatical:",
            row["grammatical"],
            "consistent:",
            row["consistent"],
        )
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"args": vars(args), "figures": figures, "captions": rows}, f, indent=1)
    return figures


if __name__ == "__main__":
    main()
