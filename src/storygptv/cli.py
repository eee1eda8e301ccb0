"""The ``storygptv`` command line.

``storygptv generate --story FILE --out DIR [--model ID_OR_DIR] [--characters DIR] [--steps N] [--seed N]``
reads a story (one caption per line, or JSON ``{"captions": [...], "characters": {name: image path}}``),
writes one PNG per frame as soon as it is finished, then ``storyboard.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_story(path: str | Path) -> tuple[list[str], dict[str, str]]:
    """Captions and ``{name: image path}`` from a story file (``.json`` or one caption per line).

    Relative image paths in a JSON story are resolved against the story file's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: --story {str(path)!r} does not exist or is not a file.")
    text = path.read_text(encoding="utf-8")
    characters: dict[str, str] = {}
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise SystemExit(f"error: --story {str(path)!r} is not valid JSON ({error}).") from error
        if isinstance(data, list):
            data = {"captions": data}
        if not isinstance(data, dict) or not isinstance(data.get("captions"), list):
            raise SystemExit(
                f"error: --story {str(path)!r} must hold a list of captions or an object "
                '{"captions": [...], "characters": {"Name": "image.png"}}.'
            )
        captions = data["captions"]
        for name, image in (data.get("characters") or {}).items():
            image_path = Path(image)
            characters[name] = str(image_path if image_path.is_absolute() else path.parent / image_path)
    else:
        captions = [
            line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
        ]
    if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
        raise SystemExit(
            f"error: --story {str(path)!r} has no captions; write one caption per line (lines starting "
            "with # are comments), or JSON with a non-empty list of strings under 'captions'."
        )
    return [c.strip() for c in captions], characters


def read_character_dir(folder: str | Path) -> dict[str, str]:
    """``{name: path}`` for the images in ``folder``; the file name is the character name.

    Underscores in file names stand for spaces: ``Mr_Slate.png`` is "Mr Slate".
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SystemExit(f"error: --characters {str(folder)!r} is not a folder.")
    found = {
        p.stem.replace("_", " "): str(p)
        for p in sorted(folder.iterdir())
        if p.suffix.lower() in IMAGE_SUFFIXES
    }
    if not found:
        raise SystemExit(
            f"error: --characters {str(folder)!r} holds no image ({', '.join(IMAGE_SUFFIXES)}); name each "
            "reference image after its character, e.g. Fred.png."
        )
    return found


def check_model_folder(model: str) -> Path | None:
    """For a local pipeline folder, check ``model_index.json`` and every component folder it names."""
    folder = Path(model)
    if not folder.exists():
        return None  # a Hub id: from_pretrained reports problems itself
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise SystemExit(
            f"error: --model {model!r} has no model_index.json; pass a StoryGPTVPipeline folder."
        )
    index = json.loads(index_file.read_text())
    missing = [
        name
        for name, value in index.items()
        if not name.startswith("_")
        and isinstance(value, list)
        and value[0] is not None
        and not (folder / name).is_dir()
    ]
    if missing:
        raise SystemExit(
            f"error: --model {model!r} lacks the component folder(s) {missing} named in model_index.json; "
            "save the pipeline again with save_pretrained."
        )
    return folder


def generate(args: argparse.Namespace) -> int:
    captions, characters = read_story(args.story)
    if args.characters:
        characters.update(read_character_dir(args.characters))

    import storygptv

    model = args.model or storygptv.DEFAULT_MODEL
    if model == storygptv.DEFAULT_MODEL and not Path(model).is_dir():
        raise SystemExit(
            f"error: the embedded default model is missing from this installation ({model}); reinstall "
            "storygptv or pass --model."
        )
    folder = check_model_folder(model)
    if not characters and folder is not None and (folder / "characters").is_dir():
        # Pipelines may ship reference images for their cast (the embedded default does).
        characters = read_character_dir(folder / "characters")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch

    from .pipelines.pipeline_storygptv import StoryGPTVPipeline
    from .storyboard import make_storyboard

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = (
        getattr(torch, args.dtype) if args.dtype else (torch.float16 if device == "cuda" else torch.float32)
    )
    start = time.perf_counter()
    pipe = StoryGPTVPipeline.from_pretrained(model, dtype=dtype).to(device)
    named = {
        name: path for name, path in characters.items() if any(name.lower() in c.lower() for c in captions)
    }

    def save_frame(pipeline: Any, index: int, image: Any) -> None:
        image.save(out / f"frame_{index + 1:03d}.png")  # each frame is on disk as soon as it is done

    kwargs: dict[str, Any] = {}
    if args.steps is not None:
        kwargs["num_inference_steps"] = args.steps
    if args.guidance_scale is not None:
        kwargs["guidance_scale"] = args.guidance_scale
    result = pipe(
        captions,
        characters=named or None,
        generator=torch.Generator(device).manual_seed(args.seed),
        context_window=args.context_window,
        callback_on_frame_end=save_frame,
        **kwargs,
    )
    make_storyboard(result.images, captions).save(out / "storyboard.png")
    print(f"wrote {len(captions)} frames and storyboard.png to {out} in {time.perf_counter() - start:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="storygptv", description="Consistent story visualisation (StoryGPT-V)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser(
        "generate",
        help="turn a story into one image per caption plus a storyboard",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("--story", required=True, help="a .txt file (one caption per line) or a .json story")
    gen.add_argument("--out", required=True, help="output folder for frame_NNN.png and storyboard.png")
    gen.add_argument(
        "--model", default=None, help="a StoryGPTVPipeline folder or Hub id (default: the embedded model)"
    )
    gen.add_argument("--characters", default=None, help="folder of reference images named after characters")
    gen.add_argument(
        "--steps", type=int, default=None, help="denoising steps per frame (default: the model's)"
    )
    gen.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance weight")
    gen.add_argument("--context-window", type=int, default=None, help="frames of history the LLM reads")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    gen.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    gen.set_defaults(func=generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
