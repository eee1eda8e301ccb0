"""Run StoryGPT-V end to end with tiny random components (offline, a few seconds on a CPU).

The weights are random, so the frames are noise: this shows the data flow and the API without any
download. For real pictures use the embedded model (`storygptv generate --story examples/story.txt ...`)
or a trained checkpoint. Usage:
    python examples/tiny_story.py --out outputs/tiny_story
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from storygptv import StoryGPTVPipeline, make_storyboard
from storygptv.testing import tiny_storygptv_components


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="outputs/tiny_story", help="folder for the PNG frames")
    args = parser.parse_args()
    pipe = StoryGPTVPipeline(**tiny_storygptv_components())
    cast = {
        "Fred": np.full((32, 32, 3), (230, 30, 40), np.uint8),
        "Barney": np.full((32, 32, 3), (30, 70, 230), np.uint8),
    }
    captions = ["Fred and Barney are in the yard.", "They start to argue.", "Barney's dog barks at Fred."]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    story = pipe(
        captions,
        characters=cast,
        num_inference_steps=10,
        generator=torch.Generator().manual_seed(0),
        callback_on_frame_end=lambda p, i, image: image.save(out / f"frame_{i + 1:03d}.png"),
    )
    make_storyboard(story.images, captions).save(out / "storyboard.png")
    print(f"wrote {len(captions)} frames and storyboard.png to {out}")


if __name__ == "__main__":
    main()
