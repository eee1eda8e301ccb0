"""One evaluation run: generate (or read) the test stories of a dataset, score them, write the table.

This is the library behind ``storygptv evaluate`` (:mod:`storygptv.cli_evaluate`). The pieces, in the order
the command uses them, so that every bad input is refused before any long work:

1. :func:`check_classifiers`: the classifier folders' configs (task and label set) against the dataset's
   labels (:func:`storygptv.data.dataset_label_names`), without loading a weight.
2. :func:`storygptv.evaluation.fid.load_fid_inception` checks every key and shape of the Inception file.
3. :func:`evaluation_rows`: the stories to evaluate (text and labels only, no image is read).
4. :func:`check_generation_settings`: a story folder generated with other settings is refused, so a resumed
   run never mixes stories of two models or two seeds.
5. :func:`generate_stories`: the stories not finished yet, written one sub-folder per story::

       STORIES/<story_id>/frame_001.png ... (cli.frame_file_name)
       STORIES/<story_id>/story.json        (captions, seed, resolved characters; written last)
       STORIES/generation.json              (the run's settings)

   A story is finished when its ``story.json`` and every frame exist; an interrupted run regenerates only the
   story it was drawing.
6. :func:`score_generated_stories`: Char-Acc / Char-F1 / BG-Acc / BG-F1 with the trained classifiers, FID
   under the named protocol, and on SynthSV the render-exact judge and the grounding metric.

The JSON and markdown reports are written by :mod:`storygptv.evaluation.report`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..cli import frame_file_name
from ..cli_evaluate import EVALUATION_DATASETS

__all__ = [
    "EVALUATION_DATASETS",
    "GENERATION_FILE",
    "STORY_FILE",
    "GenerationSettings",
    "check_classifiers",
    "check_generation_settings",
    "evaluation_rows",
    "finished_stories",
    "generate_stories",
    "read_story_meta",
    "score_generated_stories",
]

#: Per story: its captions, seed and resolved characters, written after its last frame.
STORY_FILE = "story.json"
#: Per story folder: the settings every story in it was generated with.
GENERATION_FILE = "generation.json"
#: Columns read for evaluation (no image column: the frames are read only where a metric needs them).
_TEXT_COLUMNS = (
    "story_id",
    "captions",
    "referential_captions",
    "is_referential",
    "characters",
    "character_labels",
    "background",
    "background_labels",
)


@dataclass(frozen=True)
class GenerationSettings:
    """What the generated stories of one folder were drawn with; a resumed run must use the same.

    Attributes:
        model: the pipeline folder or Hub id.
        dataset / split: where the stories come from.
        caption_column: ``"referential_captions"`` (pronouns, the paper's setting) or ``"captions"``.
        steps / guidance_scale / grounding: the pipeline's settings (``grounding=None``: its default).
        seed: story ``i`` of the split is drawn with ``torch.Generator().manual_seed(seed + i)``.
    """

    model: str
    dataset: str
    split: str
    caption_column: str
    steps: int
    guidance_scale: float
    seed: int
    grounding: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict."""
        return asdict(self)


# ------------------------------------------------------------------------------------------------ checks
def check_classifiers(
    paths: Sequence[str | os.PathLike], dataset: str, data_dir: str | os.PathLike | None = None
) -> dict[str, Path]:
    """``{task: folder}`` of classifier folders, each checked against the dataset's labels from its config.

    No weight is loaded. Each folder's :class:`~storygptv.evaluation.classifier.StoryFrameClassifierConfig`
    says its task (characters or background); its label names must be the dataset's, in order.

    Raises:
        FileNotFoundError: a folder does not exist or has no ``config.json``.
        ValueError: a folder is not a frame classifier, two folders have the same task, the dataset has no
            labels of a classifier's task (PororoSV backgrounds), or the label sets differ (the message names
            the folder and the labels only one side has).
    """
    from ..data import dataset_label_names
    from .classifier import StoryFrameClassifierConfig, check_label_set

    found: dict[str, Path] = {}
    for raw in paths:
        folder = Path(raw)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{str(folder)!r} is not a classifier folder (no config.json); pass the output_dir of "
                "training_scripts/train_classifier.py."
            )
        try:
            config = StoryFrameClassifierConfig.from_pretrained(folder)
        except Exception as error:  # another model type, or a broken config
            raise ValueError(f"{str(folder)!r} is not a StoryFrameClassifier folder ({error}).") from error
        config.name_or_path = str(folder)
        task = config.task
        if task in found:
            raise ValueError(
                f"{str(found[task])!r} and {str(folder)!r} are both {task} classifiers; pass one."
            )
        try:
            names = dataset_label_names(dataset, task, data_dir)
        except ValueError as error:
            raise ValueError(f"{str(folder)!r} is a {task} classifier, but {error}") from error
        check_label_set(config, names, task, where=f"the {dataset} stories")
        found[task] = folder
    return found


def evaluation_rows(dataset: Any, num_stories: int | None = None) -> list[dict[str, Any]]:
    """The first ``num_stories`` rows of a story dataset: text and label columns, no image decoded."""
    if num_stories is not None and num_stories > len(dataset):
        raise ValueError(f"--stories {num_stories}: the split has only {len(dataset)} stories.")
    subset = dataset if num_stories is None else dataset.select(range(num_stories))
    columns = [c for c in _TEXT_COLUMNS if c in subset.column_names]
    return [dict(row) for row in subset.with_format(None).select_columns(columns)]


def check_generation_settings(stories_dir: str | os.PathLike, settings: GenerationSettings) -> None:
    """Refuse (``ValueError``) a story folder whose ``generation.json`` records other settings, or a folder
    that holds files but no ``generation.json`` (stories drawn elsewhere: drawing would overwrite them)."""
    root = Path(stories_dir)
    path = root / GENERATION_FILE
    if root.exists() and not root.is_dir():
        raise ValueError(f"{str(root)!r} is a file, not a folder.")
    if not path.is_file():
        if root.is_dir() and any(root.iterdir()):
            raise ValueError(
                f"{str(root)!r} holds files but no {GENERATION_FILE}, so its stories were not drawn by this "
                "command; score them without --model, or draw into an empty folder."
            )
        return
    try:
        earlier = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{str(path)!r} cannot be read ({error}); delete it to start the folder afresh."
        ) from error
    ours = settings.to_dict()
    differ = [
        f"{key}: {earlier.get(key)!r} there, {value!r} now"
        for key, value in ours.items()
        if earlier.get(key) != value
    ]
    if differ:
        raise ValueError(
            f"{str(stories_dir)!r} holds stories generated with other settings ({'; '.join(differ)}); use "
            "another folder, or the same settings to resume."
        )


# ------------------------------------------------------------------------------------------------ stories
def read_story_meta(story_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The ``story.json`` of a generated story, or ``None`` when it is absent or unreadable."""
    path = Path(story_dir) / STORY_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def finished_stories(stories_dir: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> set[str]:
    """The ``story_id`` of every story with its ``story.json`` and all its frames on disk."""
    root = Path(stories_dir)
    done = set()
    for row in rows:
        folder = root / str(row["story_id"])
        frames = len(row["character_labels"])
        if read_story_meta(folder) is not None and all(
            (folder / frame_file_name(i)).is_file() for i in range(frames)
        ):
            done.add(str(row["story_id"]))
    return done


def _write_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary file, so an interruption never leaves half a file."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2))
    temporary.replace(path)


def generate_stories(
    pipe: Any,
    rows: Sequence[Mapping[str, Any]],
    stories_dir: str | os.PathLike,
    settings: GenerationSettings,
    *,
    characters: Mapping[str, Any] | None = None,
    device: str = "cpu",
    on_story: Callable[[int, int, str], None] | None = None,
) -> int:
    """Draw every story of ``rows`` that is not finished in ``stories_dir``; return how many were drawn.

    Args:
        pipe: a :class:`~storygptv.StoryGPTVPipeline`.
        rows: the stories (:func:`evaluation_rows`); row ``i`` is drawn with seed ``settings.seed + i``.
        stories_dir: the story folder (see the module docstring); created when needed.
        settings: what the stories are drawn with; written to ``generation.json`` before the first story.
        characters: ``{name: reference image}`` of the cast.
        device: the device of the random generator.
        on_story: called as ``on_story(done, total, story_id)`` after each story drawn.
    """
    import torch

    from ..characters import find_character_mentions

    cast = dict(characters or {})
    root = Path(stories_dir)
    root.mkdir(parents=True, exist_ok=True)
    check_generation_settings(root, settings)
    _write_json(root / GENERATION_FILE, settings.to_dict())
    done = finished_stories(root, rows)
    todo = [(i, row) for i, row in enumerate(rows) if str(row["story_id"]) not in done]
    for count, (index, row) in enumerate(todo, start=1):
        story_id = str(row["story_id"])
        folder = root / story_id
        folder.mkdir(parents=True, exist_ok=True)  # PororoSV story ids hold a '/'
        (folder / STORY_FILE).unlink(missing_ok=True)  # an unfinished story is drawn again, whole
        captions = [str(c) for c in row[settings.caption_column]]
        seed = settings.seed + index
        # The cast of this story only: the names its captions mention (the library's name matching).
        named = {m.name for caption in captions for m in find_character_mentions(caption, list(cast))}
        output = pipe(
            captions,
            characters={name: image for name, image in cast.items() if name in named} or None,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance_scale,
            grounding=settings.grounding,
            generator=torch.Generator(device).manual_seed(seed),
        )
        for frame, image in enumerate(output.images):
            image.save(folder / frame_file_name(frame))
        meta = {
            "story_id": story_id,
            "index": index,
            "seed": seed,
            "captions": captions,
            "drawn_captions": list(output.captions or captions),
            "characters": [list(c) for c in output.characters] if output.characters is not None else None,
        }
        _write_json(folder / STORY_FILE, meta)  # last: the story is finished
        if on_story is not None:
            on_story(count, len(todo), story_id)
    return len(todo)


def _load_frames(stories_dir: Path, rows: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
    import PIL.Image

    stories = []
    for row in rows:
        folder = stories_dir / str(row["story_id"])
        frames = []
        for index in range(len(row["character_labels"])):
            with PIL.Image.open(folder / frame_file_name(index)) as image:
                frames.append(image.convert("RGB"))
        stories.append(frames)
    return stories


# ------------------------------------------------------------------------------------------------ scores
def score_generated_stories(
    stories_dir: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    *,
    dataset: str,
    data_dir: str | os.PathLike | None = None,
    classifiers: Mapping[str, Any] | None = None,
    inception: Any = None,
    fid_protocol: str = "clean",
    real_stories: Sequence[Sequence[Any]] | None = None,
    seed: int = 0,
    batch_size: int = 32,
    device: str | None = None,
) -> dict[str, Any]:
    """Every metric of the generated stories in ``stories_dir`` (all frames must be there).

    Args:
        stories_dir: the story folder.
        rows: the reference stories (:func:`evaluation_rows`).
        dataset / data_dir: the dataset, for its label names.
        classifiers: ``{"characters": StoryFrameClassifier, "background": StoryFrameClassifier}`` (either may
            be absent).
        inception: a loaded FID Inception network, or ``None`` to skip FID.
        fid_protocol: one of :data:`~storygptv.evaluation.fid.FID_PROTOCOLS`.
        real_stories: the real stories' frames for FID (the whole split under ``"clean"``; under the paired
            protocols, the ground truth of ``rows`` in order).
        seed: the seed of the paired protocols' random choice of a clip frame.
        batch_size: frames per classifier / Inception forward pass.
        device: where FID runs.

    Returns:
        ``{"metrics": {...}, "fid": {...}, "grounding_skipped": reason or None}``; metric names: ``char_acc``,
        ``char_f1``, ``bg_acc``, ``bg_f1``, ``fid`` and on SynthSV ``judge_char_acc``, ``judge_char_f1``,
        ``judge_bg_acc``, ``grounding_precision``, ``grounding_recall``, ``grounding_f1``,
        ``grounding_exact``, ``referential_grounding_exact``.
    """
    from ..data import dataset_label_names
    from .classifier import score_story_folder, story_folder_frames

    root = Path(stories_dir)
    story_folder_frames(root, rows)  # every frame is there, or FileNotFoundError naming the first missing
    metrics: dict[str, Any] = {
        "num_stories": len(rows),
        "num_frames": sum(len(r["character_labels"]) for r in rows),
    }
    classifiers = dict(classifiers or {})
    if classifiers:
        names = {task: list(dataset_label_names(dataset, task, data_dir)) for task in classifiers}
        scores = score_story_folder(
            root,
            rows,
            classifier=classifiers.get("characters"),
            character_names=names.get("characters"),
            background_classifier=classifiers.get("background"),
            background_names=names.get("background"),
            batch_size=batch_size,
        )
        metrics.update({k: v for k, v in scores.items() if k != "num_frames"})
    generated = _load_frames(root, rows) if (inception is not None or dataset == "synthsv") else None
    fid: dict[str, Any] = {"fid_protocol": fid_protocol, "skipped": inception is None}
    if inception is not None:
        from .fid import compute_fid

        result = compute_fid(
            generated,
            real_stories,
            inception=inception,
            fid_protocol=fid_protocol,
            batch_size=batch_size,
            device=device,
            seed=seed,
            progress=False,
        )
        fid.update(result.to_dict())
        metrics["fid"] = result.fid
    else:
        fid["reason"] = "no Inception weights were given (--inception)"
    grounding_skipped = None
    if dataset == "synthsv":
        from .grounding import score_story_grounding
        from .synthsv import score_stories

        judged = score_stories(generated, rows)
        metrics.update({f"judge_{k}": v for k, v in judged.items() if k != "num_frames"})
        predicted = [(read_story_meta(root / str(r["story_id"])) or {}).get("characters") for r in rows]
        if all(p is not None for p in predicted):
            overall = score_story_grounding(rows, predicted)
            metrics.update({f"grounding_{k}": overall[k] for k in ("precision", "recall", "f1", "exact")})
            if any(any(r.get("is_referential") or []) for r in rows):
                referential = score_story_grounding(rows, predicted, frames="referential")
                metrics["referential_grounding_exact"] = referential["exact"]
        else:
            grounding_skipped = (
                f"some stories in {str(root)!r} have no resolved characters in their {STORY_FILE}"
            )
    return {"metrics": metrics, "fid": fid, "grounding_skipped": grounding_skipped}
