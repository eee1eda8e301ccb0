"""Agreement of trained SynthSV classifiers with the render-exact judge: does the classifier pipeline work?

On SynthSV the characters and the background of a frame can be read exactly from its colours
(:class:`storygptv.evaluation.SynthSVJudge`), so a classifier trained with ``training_scripts/train_classifier.py``
can be checked against that judge: the issue's bar is agreement on at least 95 % of frames. The script

1. loads the classifier folders ``--output_dir/characters`` (and ``--output_dir/background``), or trains them
   first with ``train_classifier.py`` (from scratch, on CPU; an interrupted training resumes where it stopped);
2. classifies ``--frames`` SynthSV test frames (the first ``--frames / 4`` test stories) and, with
   ``--generated_dir``, the frames of generated stories laid out as ``DIR/<story_id>/frame_001.png``
   (the SynthSV test stories of those ids);
3. prints, per task and frame set, the agreement with the judge (frames whose whole label vector is the
   same), and each one's exact-match accuracy against the labels (Char-Acc / BG-Acc), as JSON and as
   markdown rows.

Usage (the measurement of the issue; estimated at under 30 min on 2 CPU cores, most of it training, from
about 0.035 s per optimizer step of the default ResNet at 64 px and batch 32 on one core):

    OMP_NUM_THREADS=2 python benchmarks/classifier_agreement.py --output_dir runs/synthsv-classifiers \
        --resolution 64 --num_train_epochs 8 --background_epochs 2 --frames 4000

    python benchmarks/classifier_agreement.py --output_dir runs/synthsv-classifiers --frames 400 \
        --generated_dir runs/generated-synthsv-test     # trained folders are reused
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

from storygptv import load_story_dataset
from storygptv.data import dataset_label_names, multi_hot
from storygptv.data.synthsv import BACKGROUNDS
from storygptv.evaluation import SynthSVJudge
from storygptv.evaluation.classifier import (
    EXACT_MATCH_METRIC,
    StoryFrameClassifier,
    check_label_set,
    classification_scores,
    story_folder_frames,
)

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("characters", "background")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--output_dir", required=True, help="Holds (or receives) characters/ and background/."
    )
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument(
        "--frames", type=int, default=4000, help="SynthSV test frames to classify (4 per story)."
    )
    parser.add_argument(
        "--generated_dir", default=None, help="Also classify these generated stories' frames."
    )
    parser.add_argument("--batch_size", type=int, default=64, help="Frames per forward pass.")
    g = parser.add_argument_group("training (when a classifier folder is missing)")
    g.add_argument("--resolution", type=int, default=64)
    g.add_argument(
        "--backbone_config",
        default=None,
        help="JSON of a new image model (default: the script's small ResNet).",
    )
    g.add_argument("--num_train_epochs", type=int, default=8, help="Epochs of the character classifier.")
    g.add_argument("--background_epochs", type=int, default=2, help="Epochs of the background classifier.")
    g.add_argument(
        "--learning_rate", type=float, default=1e-3, help="Higher than the protocol's: from scratch."
    )
    g.add_argument("--train_batch_size", type=int, default=32)
    g.add_argument("--num_stories", type=int, default=None, help="Training stories (default: all 20,000).")
    g.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _train_script() -> Any:
    spec = importlib.util.spec_from_file_location(
        "train_classifier", ROOT / "training_scripts" / "train_classifier.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def classifier_for(task: str, args: argparse.Namespace) -> tuple[StoryFrameClassifier, float | None]:
    """The trained classifier of ``task`` (trained first when its folder has none) and the training seconds."""
    folder = Path(args.output_dir) / task
    seconds = None
    if not (folder / "model.safetensors").exists():
        argv = [
            "--dataset", "synthsv", "--task", task, "--output_dir", str(folder),
            "--resolution", str(args.resolution), "--learning_rate", str(args.learning_rate),
            "--train_batch_size", str(args.train_batch_size), "--seed", str(args.seed),
            "--num_train_epochs", str(args.num_train_epochs if task == "characters" else args.background_epochs),
            "--checkpointing_steps", "500", "--checkpoints_total_limit", "1",
            "--resume_from_checkpoint", "latest", "--report_to", "none",
        ]  # fmt: skip
        if args.backbone_config:
            argv += ["--backbone_config", args.backbone_config]
        if args.num_stories:
            argv += ["--num_stories", str(args.num_stories)]
        start = time.perf_counter()
        _train_script().main(argv)
        seconds = time.perf_counter() - start
    classifier = StoryFrameClassifier.from_pretrained(folder)
    check_label_set(classifier, dataset_label_names("synthsv", task), task, where="SynthSV")
    return classifier, seconds


def agreement(
    classifier: StoryFrameClassifier,
    images: list[Any],
    labels: np.ndarray,
    judged: np.ndarray,
    batch_size: int,
) -> dict[str, float]:
    """Agreement with the judge (whole-vector equality, in %) and both scores against ``labels``."""
    task = classifier.config.task
    start = time.perf_counter()
    predicted = classifier.predict(images, batch_size=batch_size)
    seconds = time.perf_counter() - start
    metric = EXACT_MATCH_METRIC[task]
    return {
        "frames": len(images),
        "agreement": 100.0 * float(np.mean(np.all(predicted == judged.astype(bool), axis=1))),
        f"classifier_{metric}": classification_scores(task, predicted, labels)[metric],
        f"judge_{metric}": classification_scores(task, judged, labels)[metric],
        "classify_ms_per_frame": 1000.0 * seconds / max(1, len(images)),
    }


def judge_vectors(images: list[Any]) -> dict[str, np.ndarray]:
    """The judge's character multi-hot and background one-hot (all zero: no background) of each frame."""
    judged = SynthSVJudge().judge_frames(images)
    return {
        "characters": np.stack([j.character_labels for j in judged]),
        "background": np.array(
            [multi_hot([j.background] if j.background else [], BACKGROUNDS) for j in judged]
        ),
    }


def _read_rgb(path: Path) -> PIL.Image.Image:
    with PIL.Image.open(path) as image:
        return image.convert("RGB")


def frame_sets(args: argparse.Namespace) -> dict[str, tuple[list[Any], dict[str, np.ndarray]]]:
    """``{name: (images, {task: labels})}``: SynthSV test frames, and the generated frames if given."""
    stories = load_story_dataset("synthsv", split="test", num_stories=math.ceil(args.frames / 4), seed=0)
    images, chars, backgrounds = [], [], []
    for story in stories:
        images += story["images"]
        chars += story["character_labels"]
        backgrounds += story["background_labels"]
    sets = {
        "synthsv_test": (
            images[: args.frames],
            {
                "characters": np.array(chars[: args.frames]),
                "background": np.array(backgrounds[: args.frames]),
            },
        )
    }
    if args.generated_dir:
        ids = {p.name for p in Path(args.generated_dir).iterdir() if p.is_dir()}
        test = load_story_dataset("synthsv", split="test", seed=0)
        wanted = test.filter(lambda story_id: story_id in ids, input_columns=["story_id"])
        paths, chars, backgrounds = story_folder_frames(args.generated_dir, wanted)
        frames = [_read_rgb(path) for path in paths]  # the judge takes images, not paths
        sets["generated"] = (frames, {"characters": np.array(chars), "background": np.array(backgrounds)})
    return sets


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    classifiers = {task: classifier_for(task, args) for task in args.tasks}
    results: dict[str, Any] = {
        "training_seconds": {task: seconds for task, (_, seconds) in classifiers.items()},
        "classifiers": {task: str(Path(args.output_dir) / task) for task in args.tasks},
    }
    rows = [
        "| frames | task | n | agreement with the judge (%) | classifier acc (%) | judge acc (%) |",
        "|---|---|---|---|---|---|",
    ]
    for name, (images, labels) in frame_sets(args).items():
        judged = judge_vectors(images)
        for task, (classifier, _) in classifiers.items():
            result = agreement(classifier, images, labels[task], judged[task], args.batch_size)
            results[f"{name}/{task}"] = result
            metric = EXACT_MATCH_METRIC[task]
            rows.append(
                f"| {name} | {task} | {result['frames']} | {result['agreement']:.2f} | "
                f"{result[f'classifier_{metric}']:.2f} | {result[f'judge_{metric}']:.2f} |"
            )
    print(json.dumps(results, indent=2))
    print("\n".join(rows))
    return results


if __name__ == "__main__":
    main()
