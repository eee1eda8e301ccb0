"""The ``storygptv`` command line.

``storygptv generate --story FILE --out DIR [--model ID_OR_DIR] [--characters DIR] [--steps N] [--seed N]``
reads a story (one caption per line, or JSON ``{"captions": [...], "characters": {name: image path}}``),
writes one PNG per frame as soon as it is finished, then ``storyboard.png``. An ``--out`` holding an
earlier story is refused unless ``--overwrite`` (its frames and storyboard are then removed first).
Every problem with the inputs is reported in one line before the model loads.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

#: The files a story writes into ``--out`` (an earlier story's are refused unless ``--overwrite``).
FRAME_FILE = re.compile(r"frame_\d{3,}\.png")
STORYBOARD_FILE = "storyboard.png"


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type (what the user wrote), for error messages."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, int | float) else type(value).__name__)


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")  # a UTF-8 byte-order mark is tolerated
    except UnicodeDecodeError as error:
        raise SystemExit(
            f"error: --story {str(path)!r} is not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8."
        ) from error
    except OSError as error:
        raise SystemExit(
            f"error: --story {str(path)!r} cannot be read ({error.strerror or error})."
        ) from error


def _json_characters(data: dict[str, Any], path: Path) -> dict[str, str]:
    """``{name: image path}`` of a JSON story (relative paths resolved against the story's folder)."""
    raw = data.get("characters")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise SystemExit(
            f"error: 'characters' in --story {str(path)!r} is {_json_type(raw)}; write an object "
            '{"Name": "image.png", ...}.'
        )
    characters = {}
    for name, image in raw.items():
        if not name.strip():
            raise SystemExit(f"error: --story {str(path)!r} has a character with an empty name.")
        if not isinstance(image, str) or not image.strip():
            raise SystemExit(
                f"error: the image of character {name!r} in --story {str(path)!r} is {_json_type(image)}; "
                "write the path of an image file as a string."
            )
        image_path = Path(image)
        characters[name] = str(image_path if image_path.is_absolute() else path.parent / image_path)
    return characters


def _check_captions(captions: list[Any], path: Path) -> list[str]:
    for number, caption in enumerate(captions, start=1):
        if not isinstance(caption, str):
            raise SystemExit(
                f"error: caption {number} of --story {str(path)!r} is {_json_type(caption)} ({caption!r}), "
                "not a string."
            )
        if not caption.strip():
            raise SystemExit(f"error: caption {number} of --story {str(path)!r} is empty.")
    return [c.strip() for c in captions]


def read_story(path: str | Path) -> tuple[list[str], dict[str, str]]:
    """Captions and ``{name: image path}`` from a story file (``.json`` or one caption per line).

    Relative image paths in a JSON story are resolved against the story file's folder. Every problem
    (not UTF-8, bad JSON, captions or characters of the wrong type) is one ``SystemExit`` line.
    """
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"error: --story {str(path)!r} does not exist or is not a file.")
    text = _read_text(path)
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
        characters = _json_characters(data, path)
    else:
        captions = [
            line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
        ]
    if not captions:
        raise SystemExit(
            f"error: --story {str(path)!r} has no captions; write one caption per line (lines starting "
            "with # are comments), or JSON with a non-empty list of strings under 'captions'."
        )
    return _check_captions(captions, path), characters


def read_character_dir(folder: str | Path, option: str = "--characters") -> dict[str, str]:
    """``{name: path}`` of the reference images in ``folder``, by the library's cast-folder rule
    (:func:`storygptv.characters.read_cast_folder`: the file name is the character name, underscores
    stand for spaces, so ``Mr_Slate.png`` is "Mr Slate"). A problem is one ``SystemExit`` line naming
    ``option``."""
    from .characters import read_cast_folder

    try:
        return {name: str(path) for name, path in read_cast_folder(folder).items()}
    except (NotADirectoryError, ValueError) as error:
        raise SystemExit(f"error: {option} {error}") from error


def check_model_folder(model: str) -> Path | None:
    """For a local pipeline folder, check ``model_index.json``, every component it names and their files
    (:func:`storygptv.loading.check_model_folder`); ``None`` for a Hub id."""
    from .loading import ModelLoadingError
    from .loading import check_model_folder as check_folder

    folder = Path(model)
    if not folder.exists():
        return None  # a Hub id: from_pretrained reports problems itself
    if not folder.is_dir():
        raise SystemExit(f"error: --model {model!r} is a file; pass a StoryGPTVPipeline folder or a Hub id.")
    try:
        check_folder(folder)
    except ModelLoadingError as error:
        raise SystemExit(f"error: --model {model!r}: {error}") from error
    return folder


def prepare_output(out: Path, overwrite: bool) -> list[Path]:
    """Create ``--out`` and return the frames and storyboard of an earlier story in it.

    They are refused (``SystemExit``) unless ``overwrite``: the caller deletes them before writing, so a
    short story never sits next to the last frames of a longer one.
    """
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out {str(out)!r} is a file, not a folder.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SystemExit(
            f"error: --out {str(out)!r} cannot be created ({error.strerror or error})."
        ) from error
    if not os.access(out, os.W_OK | os.X_OK):
        raise SystemExit(f"error: --out {str(out)!r} is not writable.")
    old = sorted(p for p in out.iterdir() if FRAME_FILE.fullmatch(p.name) or p.name == STORYBOARD_FILE)
    if old and not overwrite:
        raise SystemExit(
            f"error: --out {str(out)!r} already holds an earlier story ({', '.join(p.name for p in old[:3])}"
            f"{', ...' if len(old) > 3 else ''}); pass --overwrite to replace it, or choose another folder."
        )
    return old


def check_device(device: str | None) -> str:
    """The ``--device`` to run on (default: cuda when available); ``SystemExit`` when it is not available."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as error:
        raise SystemExit(
            f"error: --device {device!r} is not a device name (cpu, cuda, cuda:1, mps, ...)."
        ) from error
    if parsed.type == "cpu":
        return device
    backend = torch.backends.mps if parsed.type == "mps" else getattr(torch, parsed.type, None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise SystemExit(f"error: --device {device!r} is not available on this machine; use --device cpu.")
    count = getattr(getattr(torch, parsed.type, None), "device_count", None)
    if parsed.index is not None and count is not None and parsed.index >= count():
        raise SystemExit(f"error: --device {device!r}: this machine has {count()} {parsed.type} device(s).")
    return device


def load_cast(characters: dict[str, str], captions: list[str]) -> dict[str, Any]:
    """The reference images of the characters the captions name (the library's name matching: whole
    words, any run of spaces), loaded now so that a bad image fails before the model loads."""
    from .characters import find_character_mentions, load_character_image

    named = {m.name for caption in captions for m in find_character_mentions(caption, characters)}
    try:
        return {name: load_character_image(path, name) for name, path in characters.items() if name in named}
    except (TypeError, ValueError) as error:
        raise SystemExit(f"error: {error}") from error


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
        characters = read_character_dir(folder / "characters", option=f"the cast of --model {model!r}:")
    device = check_device(args.device)
    out = Path(args.out)
    earlier_story = prepare_output(out, args.overwrite)
    cast = load_cast(characters, captions)

    import torch

    from .pipelines.pipeline_storygptv import StoryGPTVPipeline
    from .storyboard import make_storyboard

    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.float16 if device.startswith("cuda") else torch.float32)
    )
    start = time.perf_counter()
    try:
        pipe = StoryGPTVPipeline.from_pretrained(model, dtype=dtype).to(device)
    except OSError as error:  # ModelLoadingError (a local folder), or a Hub id that cannot be fetched
        raise SystemExit(f"error: --model {model!r} could not be loaded: {error}") from error
    for path in earlier_story:  # --overwrite: the earlier story goes only once the new one can start
        path.unlink()

    def save_frame(pipeline: Any, index: int, image: Any) -> None:
        image.save(out / f"frame_{index + 1:03d}.png")  # each frame is on disk as soon as it is done

    kwargs: dict[str, Any] = {}
    if args.steps is not None:
        kwargs["num_inference_steps"] = args.steps
    if args.guidance_scale is not None:
        kwargs["guidance_scale"] = args.guidance_scale
    result = pipe(
        captions,
        characters=cast or None,
        generator=torch.Generator(device).manual_seed(args.seed),
        context_window=args.context_window,
        callback_on_frame_end=save_frame,
        **kwargs,
    )
    make_storyboard(result.images, captions).save(out / STORYBOARD_FILE)
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
        "--overwrite",
        action="store_true",
        help="replace the frames and storyboard of an earlier story in --out",
    )
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
