"""Run Char-LDM on a short story with tiny random components (offline, a few seconds on a CPU).

The weights are random, so the images are noise: this shows the data flow and the API. Usage:
    python examples/tiny_story.py --out outputs/tiny_story
"""

import argparse
from pathlib import Path

import numpy as np
import torch

from storygptv import CharLDMPipeline
from storygptv.testing import tiny_char_ldm_components


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="outputs/tiny_story", help="folder for the PNG frames")
    args = parser.parse_args()
    pipe = CharLDMPipeline(**tiny_char_ldm_components())
    cast = {
        "Fred": np.full((32, 32, 3), (230, 30, 40), np.uint8),
        "Barney": np.full((32, 32, 3), (30, 70, 230), np.uint8),
    }
    captions = ["Fred and Barney are in the yard.", "Barney's dog barks at Fred."]
    images = pipe(
        captions, characters=cast, num_inference_steps=10, generator=torch.Generator().manual_seed(0)
    ).images
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(images):
        image.save(out / f"frame_{index:03d}.png")
    print(f"wrote {len(images)} frames to {out}")


if __name__ == "__main__":
    main()
