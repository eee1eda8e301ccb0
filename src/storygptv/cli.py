"""The ``storygptv`` command line: ``storygptv generate --story FILE --out DIR [options]`` and
``storygptv evaluate --model M --dataset D ... --out DIR`` (:mod:`storygptv.cli_evaluate`).

It imports neither torch nor diffusers until a story is really drawn, so ``--help`` answers at once.
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

DESCRIPTION = """\
Turn a story into one image per caption, plus a storyboard.

The story is a text file with one caption per line (lines starting with # are comments), or JSON
{"captions": [...], "characters": {"Name": "image.png"}}. Later captions may use pronouns
("Ava and Bo are standing in the forest." / "They are jumping."): the story model resolves them.
Each frame is written to OUT/frame_NNN.png as soon as it is finished, then OUT/storyboard.png.
An OUT holding an earlier story is refused unless --overwrite. Every problem with the inputs is
reported in one line before the model loads."""

#: What the embedded default model knows (tests check this text against the model folder).
DEFAULT_MODEL_LIMITS = """\
The embedded default model (used without --model) is a small StoryGPT-V trained on SynthSV, a
procedural story world; it draws 64x64 frames and knows only that world:
  characters  Ava, Bo, Cleo, Dax, Eli, Fay, Gus, Hana (reference images ship with the model)
  settings    forest, beach, kitchen, night, snow, desert, lake, cave
  actions     standing, jumping, sitting, talking, laughing, waving
  1 to 3 characters per frame, captions of at most 24 tokens, written like
  "Ava and Bo are jumping in the forest." / "They are sitting." / "She is waving in the lake."
Its measured quality is in benchmarks/README.md and in the model card (default_model/README.md)."""

#: The files a story writes into ``--out`` (an earlier story's are refused unless ``--overwrite``).
FRAME_FILE = re.compile(r"frame_\d{3,}\.png")
STORYBOARD_FILE = "storyboard.png"


def frame_file_name(index: int) -> str:
    """The file of frame ``index`` (0-based) of a story folder: ``frame_001.png`` for the first frame.

    The one rule of the layout ``generate --out`` writes, which the evaluation reads back
    (:func:`storygptv.evaluation.classifier.score_story_folder`).

    Example:
        >>> frame_file_name(0), frame_file_name(11)
        ('frame_001.png', 'frame_012.png')
    """
    return f"frame_{index + 1:03d}.png"


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
        looks_like_path = model.startswith((".", "/", "~")) or model.endswith("/") or model.count("/") != 1
        if looks_like_path:
            raise SystemExit(
                f"error: --model {model!r} does not exist; pass a StoryGPTVPipeline folder or a Hub id "
                "(organisation/name)."
            )
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
        path = out / frame_file_name(index)
        image.save(path)  # each frame is on disk as soon as it is done
        print(f"frame {index + 1}/{len(captions)}: {path} ({time.perf_counter() - start:.1f} s)", flush=True)

    try:
        result = pipe(
            captions,
            characters=cast or None,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            start_merge_step=args.start_merge_step,
            height=args.height,
            width=args.width,
            context_window=args.context_window,
            grounding=None if args.grounding == "auto" else args.grounding,
            generator=torch.Generator(device).manual_seed(args.seed),
            callback_on_frame_end=save_frame,
        )
    except (ValueError, TypeError) as error:  # the pipeline's checks name the argument
        raise SystemExit(f"error: {error}") from error
    make_storyboard(result.images, captions).save(out / STORYBOARD_FILE)
    for number, (caption, drawn) in enumerate(zip(captions, result.captions), start=1):
        if drawn != caption:
            print(f'frame {number}: "{caption}" was drawn as "{drawn}"')
    print(f"wrote {len(captions)} frames and {out / STORYBOARD_FILE} in {time.perf_counter() - start:.1f} s")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="storygptv", description="Consistent story visualisation (StoryGPT-V)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser(
        "generate",
        help="turn a story into one image per caption plus a storyboard",
        description=DESCRIPTION,
        epilog=DEFAULT_MODEL_LIMITS,
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
        "--model",
        default=None,
        help="a StoryGPTVPipeline folder or Hub id (default: the embedded model, see below)",
    )
    gen.add_argument(
        "--characters",
        default=None,
        help="folder of reference images named after their characters (Mr_Slate.png is 'Mr Slate'); default: "
        "the model's own characters/ folder",
    )
    gen.add_argument(
        "--steps", type=_positive_int, default=30, help="denoising steps per frame (default: %(default)s)"
    )
    gen.add_argument(
        "--guidance-scale",
        type=float,
        default=5.0,
        help="classifier-free guidance weight (default: %(default)s)",
    )
    gen.add_argument(
        "--start-merge-step",
        type=int,
        default=None,
        help="first denoising step that uses the character / story conditioning; the earlier steps use the "
        "plain caption (default: half the steps)",
    )
    gen.add_argument("--height", type=_positive_int, default=None, help="frame height (default: the model's)")
    gen.add_argument("--width", type=_positive_int, default=None, help="frame width (default: the model's)")
    gen.add_argument(
        "--context-window",
        type=_positive_int,
        default=None,
        help="earlier frames the story model reads (default: the model's own; the default model reads 4)",
    )
    gen.add_argument(
        "--grounding",
        choices=("auto", "fuse", "none"),
        default="auto",
        help="fuse: write the characters and setting the story model resolves for pronouns into the caption; "
        "none: the story model's conditioning alone; auto (default): fuse when the model can ground",
    )
    gen.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random seed: the same seed draws the same story (default: %(default)s)",
    )
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda when available)")
    gen.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "float16", "bfloat16"],
        help="weights and compute type (default: float16 on CUDA, float32 otherwise)",
    )
    gen.set_defaults(func=generate)
    from .cli_evaluate import add_evaluate_parser

    add_evaluate_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
