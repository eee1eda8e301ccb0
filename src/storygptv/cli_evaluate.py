"""``storygptv evaluate``: one command from a model (or generated stories) to a Table 1 row.

The parser is built without importing torch or the evaluation code, so ``storygptv --help`` stays fast; the
work is in :mod:`storygptv.evaluation.run` and :mod:`storygptv.evaluation.report`. Every input is checked,
in one ``error:`` line naming the argument or file, before the model loads and before any story is drawn.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

#: The datasets ``storygptv evaluate`` takes (the paper's two benchmarks and SynthSV).
EVALUATION_DATASETS: tuple[str, ...] = ("flintstones", "pororo", "synthsv")

DESCRIPTION = """\
Generate the test stories of a dataset with a model (or read stories generated already), score them and
write OUT/results.json (every metric, the protocol, the seeds, the versions) and OUT/results.md (the paper's
Table 1 row: Char-Acc, Char-F1, BG-Acc, BG-F1 where the dataset has backgrounds, FID; on SynthSV also the
render-exact judge and the grounding metric).

The stories go to --generated_dir (default OUT/stories), one sub-folder per story (frame_001.png, ... and
story.json). A run that stops resumes where it stopped: finished stories are not drawn again. Without
--model, --generated_dir must hold every frame. FID needs --inception (pytorch-fid's
pt_inception-2015-12-05-6726825d.pth); without it FID is skipped, and the reports say so."""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def add_evaluate_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the ``evaluate`` sub-command to the ``storygptv`` parser's sub-parsers."""
    parser = commands.add_parser(
        "evaluate",
        help="generate and score a dataset's test stories; write a JSON and a markdown table",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", default=None, help="a StoryGPTVPipeline folder or Hub id that draws the stories"
    )
    parser.add_argument("--dataset", required=True, choices=EVALUATION_DATASETS, help="the benchmark")
    parser.add_argument(
        "--data_dir",
        default=None,
        help="the downloaded release (FlintstonesSV, PororoSV); SynthSV needs none",
    )
    parser.add_argument("--split", default="test", help="the split to evaluate (default: %(default)s)")
    parser.add_argument("--cache_dir", default=None, help="cache of the loaded release (default: datasets')")
    parser.add_argument(
        "--classifier",
        nargs="+",
        default=[],
        metavar="DIR",
        help="trained frame classifier folder(s) (training_scripts/train_classifier.py): a character one and "
        "optionally a background one; required except on SynthSV",
    )
    parser.add_argument(
        "--inception", default=None, help="FID Inception weights file; without it FID is skipped"
    )
    parser.add_argument(
        "--fid_protocol",
        default="clean",
        help="clean (default: pytorch-fid, every real test frame), storygptv (the paper's eval_all.py, "
        "paired, "
        "batches of 16 stories) or arldm64 (AR-LDM's 64-px resize, paired)",
    )
    parser.add_argument(
        "--fid_real_stories",
        type=_positive_int,
        default=None,
        help="real stories for FID under 'clean' (default: the whole split)",
    )
    parser.add_argument(
        "--stories", type=_positive_int, default=None, help="the first N stories (default: all)"
    )
    parser.add_argument("--out", required=True, help="folder for results.json and results.md")
    parser.add_argument("--generated_dir", default=None, help="the story folder (default: OUT/stories)")
    parser.add_argument(
        "--captions",
        choices=("referential", "plain"),
        default="referential",
        help="draw from the referential captions (pronouns, the paper's setting; default) or the plain ones",
    )
    parser.add_argument("--characters", default=None, help="reference images folder (default: the model's)")
    parser.add_argument(
        "--steps", type=_positive_int, default=30, help="denoising steps (default: %(default)s)"
    )
    parser.add_argument(
        "--guidance_scale",
        "--guidance-scale",
        type=float,
        default=5.0,
        help="guidance (default: %(default)s)",
    )
    parser.add_argument(
        "--grounding", choices=("auto", "fuse", "none"), default="auto", help="as in generate"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="story i is drawn with seed + i (default: %(default)s)"
    )
    parser.add_argument(
        "--batch_size", type=_positive_int, default=32, help="frames per classifier / FID pass"
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda when available)"
    )
    parser.add_argument(
        "--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="model dtype"
    )
    parser.set_defaults(func=evaluate)
    return parser


def _fail(option: str, error: Exception) -> SystemExit:
    return SystemExit(f"error: {option}: {error}")


def _load_dataset(args: argparse.Namespace, num_stories: int | None) -> Any:
    from .data import load_story_dataset

    try:
        return load_story_dataset(
            args.dataset,
            data_dir=args.data_dir,
            split=args.split,
            num_stories=num_stories,
            cache_dir=args.cache_dir,
        )
    except (ValueError, TypeError, FileNotFoundError, OSError) as error:
        raise _fail(f"--dataset {args.dataset} --data_dir {args.data_dir!r}", error) from error


def _cast(args: argparse.Namespace, folder: Path | None, rows: list[dict[str, Any]]) -> dict[str, str]:
    from .cli import read_character_dir

    if args.characters:
        return read_character_dir(args.characters)
    if folder is not None and (folder / "characters").is_dir():
        return read_character_dir(folder / "characters", option=f"the cast of --model {args.model!r}:")
    return {}


def evaluate(args: argparse.Namespace) -> int:
    """Run ``storygptv evaluate`` (see :data:`DESCRIPTION`)."""
    # 1. Arguments that need no file.
    from .evaluation.fid import FID_PROTOCOLS, STORYGPTV_STORY_BATCH, load_fid_inception

    if args.fid_protocol not in FID_PROTOCOLS:
        raise SystemExit(
            f"error: --fid_protocol {args.fid_protocol!r} is unknown; choose one of "
            f"{', '.join(FID_PROTOCOLS)}."
        )
    if args.model is None and args.generated_dir is None:
        raise SystemExit(
            "error: pass --model to draw the stories, or --generated_dir with stories drawn already."
        )
    if not args.classifier and args.dataset != "synthsv":
        raise SystemExit(
            f"error: --classifier is required on {args.dataset} (a character classifier folder)."
        )
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out {str(out)!r} is a file, not a folder.")
    # 2. Files: classifiers (configs only), Inception weights (every key and shape), the model folder.
    from .evaluation.run import (
        GenerationSettings,
        check_classifiers,
        check_generation_settings,
        evaluation_rows,
        read_story_meta,
        score_generated_stories,
    )

    try:
        classifier_dirs = check_classifiers(args.classifier, args.dataset, args.data_dir)
    except (ValueError, FileNotFoundError) as error:
        raise _fail("--classifier", error) from error
    inception = None
    if args.inception is not None:
        try:
            inception = load_fid_inception(args.inception)
        except (ValueError, FileNotFoundError) as error:
            raise _fail("--inception", error) from error
    from .cli import check_device, check_model_folder

    model_folder = check_model_folder(args.model) if args.model else None
    device = check_device(args.device)
    # 3. The stories, and the story folder: its settings (resume) or its frames (read only).
    whole_split = inception is not None and args.fid_protocol == "clean" and args.fid_real_stories is None
    wanted = None if whole_split or args.stories is None else max(args.stories, args.fid_real_stories or 0)
    dataset = _load_dataset(args, wanted)
    try:
        rows = evaluation_rows(dataset, args.stories)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    if inception is not None and args.fid_protocol == "storygptv" and len(rows) < STORYGPTV_STORY_BATCH:
        raise SystemExit(
            "error: --fid_protocol storygptv drops the last incomplete batch of "
            f"{STORYGPTV_STORY_BATCH} stories; "
            f"--stories {len(rows)} leaves none. Evaluate at least {STORYGPTV_STORY_BATCH} stories."
        )
    stories_dir = Path(args.generated_dir) if args.generated_dir else out / "stories"
    caption_column = "referential_captions" if args.captions == "referential" else "captions"
    settings = None
    if args.model is not None:
        grounding = None if args.grounding == "auto" else args.grounding
        settings = GenerationSettings(
            args.model,
            args.dataset,
            args.split,
            caption_column,
            args.steps,
            args.guidance_scale,
            args.seed,
            grounding,
        )
        try:
            check_generation_settings(stories_dir, settings)
        except ValueError as error:
            raise _fail("--generated_dir", error) from error
        characters = _cast(args, model_folder, rows)
    else:
        from .evaluation.classifier import story_folder_frames

        try:
            story_folder_frames(stories_dir, rows)
        except (FileNotFoundError, ValueError) as error:
            raise _fail("--generated_dir", error) from error
    # 4. The long work: classifiers, model, stories, scores.
    from .evaluation.classifier import StoryFrameClassifier

    classifiers = {
        task: StoryFrameClassifier.from_pretrained(path).eval().to(device)
        for task, path in classifier_dirs.items()
    }
    start = time.perf_counter()
    drawn = 0
    if settings is not None:
        drawn = _draw(args, settings, rows, stories_dir, characters, device, start)
    real = None
    if inception is not None:
        count = len(dataset) if args.fid_protocol == "clean" else len(rows)
        real = [list(dataset[i]["images"]) for i in range(count)]
    try:
        scores = score_generated_stories(
            stories_dir,
            rows,
            dataset=args.dataset,
            data_dir=args.data_dir,
            classifiers=classifiers,
            inception=inception,
            fid_protocol=args.fid_protocol,
            real_stories=real,
            seed=args.seed,
            batch_size=args.batch_size,
            device=device,
        )
    except FileNotFoundError as error:
        raise _fail("--generated_dir", error) from error
    from .evaluation.report import package_versions, results_markdown, write_results

    results = {
        "model": args.model or f"(stories in {str(stories_dir)!r})",
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "split": args.split,
        "num_stories": len(rows),
        "stories_dir": str(stories_dir),
        "caption_column": caption_column,
        "generation": settings.to_dict() if settings is not None else None,
        # As recorded by each story (None for a story folder drawn elsewhere, without story.json).
        "seeds": [(read_story_meta(stories_dir / str(row["story_id"])) or {}).get("seed") for row in rows],
        "stories_drawn_by_this_run": drawn,
        "classifiers": {task: str(path) for task, path in classifier_dirs.items()},
        "fid": scores["fid"],
        "grounding_skipped": scores["grounding_skipped"],
        "metrics": scores["metrics"],
        "versions": package_versions(),
    }
    json_path, markdown_path = write_results(results, out)
    print(results_markdown(results))
    print(f"wrote {json_path} and {markdown_path} ({time.perf_counter() - start:.1f} s)")
    return 0


def _draw(
    args: argparse.Namespace,
    settings: Any,
    rows: list[dict[str, Any]],
    stories_dir: Path,
    characters: dict[str, str],
    device: str,
    start: float,
) -> int:
    """Load the model and draw the stories that are not finished in ``stories_dir``."""
    from .evaluation.run import finished_stories

    todo = len(rows) - len(finished_stories(stories_dir, rows)) if stories_dir.is_dir() else len(rows)
    if todo == 0:
        print(f"every story is in {stories_dir} already; nothing to draw")
        return 0
    import torch

    from .cli import load_cast
    from .evaluation.run import generate_stories
    from .pipelines.pipeline_storygptv import StoryGPTVPipeline

    cast: dict[str, Any] = {}
    if characters:
        cast = load_cast(characters, [c for row in rows for c in row[settings.caption_column]])
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.float16 if device.startswith("cuda") else torch.float32)
    )
    try:
        pipe = StoryGPTVPipeline.from_pretrained(args.model, dtype=dtype).to(device)
    except OSError as error:
        raise SystemExit(f"error: --model {args.model!r} could not be loaded: {error}") from error
    pipe.set_progress_bar_config(disable=True)
    if not cast and args.dataset == "synthsv":
        from .data.synthsv import reference_images

        cast = reference_images(size=pipe.image_encoder.config.image_size)

    def report(done: int, total: int, story_id: str) -> None:
        print(
            f"story {done}/{total}: {stories_dir / story_id} ({time.perf_counter() - start:.1f} s)",
            flush=True,
        )

    print(f"drawing {todo} of {len(rows)} stories into {stories_dir}", flush=True)
    return generate_stories(
        pipe, rows, stories_dir, settings, characters=cast, device=device, on_story=report
    )
