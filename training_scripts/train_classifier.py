#!/usr/bin/env python
"""Train a character (or background) classifier of story frames: the judge of Char-Acc / Char-F1 (BG-Acc / BG-F1).

The protocol of StoryGPT-V and StoryDALL-E (method notes 7.1): frames read at 299 px (shorter side resized,
centre crop, ImageNet mean / std), a linear multi-label head, binary cross-entropy on logits, Adam at 1e-4
with batches of 32, and the weights of the evaluation with the best exact-match accuracy on the validation
frames (Char-Acc, or BG-Acc with ``--task background``). The paper fine-tunes an ImageNet Inception-v3; here
the image model is any ``transformers`` one:

- ``--backbone_name_or_path``: a Hub id or local folder loaded with ``AutoModel`` (``microsoft/resnet-50``,
  ``facebook/convnext-tiny-224``, ``facebook/dinov2-small``... at a ``--resolution`` the model accepts);
- ``--backbone_config``: a new model from scratch, a JSON file or inline JSON object of ``AutoConfig`` fields
  with ``model_type`` (default: the small ResNet of :data:`DEFAULT_BACKBONE_CONFIG`, for small data such as
  SynthSV);
- ``--pretrained_model_name_or_path``: a classifier folder written by this script, trained further (its
  labels must be the data's).

Labels: the loaders' ``character_labels`` (``--task characters``) or ``background_labels`` (``--task
background``: FlintstonesSV with ``labels_bg.pkl``, SynthSV, a story folder naming settings; frames without
a background label are left out), named by :func:`storygptv.data.dataset_label_names`.

    python training_scripts/train_classifier.py --dataset synthsv --output_dir runs/synthsv-chars \
        --resolution 64 --num_train_epochs 3 --learning_rate 1e-3

    python training_scripts/train_classifier.py --dataset flintstones --data_dir data/flintstones \
        --task background --backbone_name_or_path microsoft/resnet-50 --num_train_epochs 50

The output folder loads with ``StoryFrameClassifier.from_pretrained(output_dir)``
(``storygptv.evaluation``), whose ``score_story_folder`` scores generated stories with it. The validation
history is in ``validation.json`` and the model card. Same infrastructure as the other scripts: checkpoints
(which carry the best weights so far), ``--resume_from_checkpoint latest`` (exact), trackers, ``accelerate
launch``, ``--push_to_hub``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from storygptv.evaluation.classifier import (
    CLASSIFIER_TASKS,
    EXACT_MATCH_METRIC,
    StoryFrameClassifier,
    StoryFrameClassifierConfig,
    check_label_set,
    classification_scores,
    classifier_pixel_values,
)
from storygptv.training.accelerate_setup import init_trackers, make_accelerator, setup_logging
from storygptv.training.arguments import run_settings, training_arg_parser
from storygptv.training.checkpoints import dump_rank_hash, save_checkpoint
from storygptv.training.checks import TrainingSetupError, check_dataset
from storygptv.training.data import (
    ResumableBatchSampler,
    load_train_stories,
    make_train_dataloader,
    next_batch,
)
from storygptv.training.hub import hub_repo_id, push_folder_to_hub, scrub_local_paths
from storygptv.training.loop import (
    StepLogger,
    finish_training,
    make_lr_scheduler,
    make_optimizer,
    optimizer_step,
    seed_micro_step,
)
from storygptv.training.model_cards import card_dataset_name, write_model_card
from storygptv.training.resume import find_resume_checkpoint, resume_training

logger = logging.getLogger("train_classifier")

#: The small from-scratch image model: a 4-stage basic-block ResNet (about 0.3 M parameters).
DEFAULT_BACKBONE_CONFIG: dict[str, Any] = {
    "model_type": "resnet",
    "embedding_size": 16,
    "hidden_sizes": [16, 32, 64, 128],
    "depths": [1, 1, 1, 1],
    "layer_type": "basic",
}
#: The frame column of each task's label vectors.
LABEL_COLUMNS: dict[str, str] = {"characters": "character_labels", "background": "background_labels"}
#: The protocol's input side (Inception-v3's 299 px).
DEFAULT_RESOLUTION = 299
VALIDATION_FILE = "validation.json"


# ---------------------------------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = training_arg_parser(
        __doc__,
        allow_abbrev=False,
        learning_rate=1e-4,
        train_batch_size=32,
        adam_weight_decay=0.0,  # the protocol's Adam
        lr_scheduler="constant",
        output_dir="outputs/classifier",
    )
    g = parser.add_argument_group("classifier")
    g.add_argument(
        "--task",
        choices=CLASSIFIER_TASKS,
        default="characters",
        help="What the classifier predicts: the frame's characters or its background.",
    )
    g.add_argument(
        "--backbone_name_or_path",
        default=None,
        help="Hub id or local folder of a transformers image model (AutoModel) to start from.",
    )
    g.add_argument(
        "--backbone_config",
        default=None,
        help="JSON file or inline JSON object of AutoConfig fields (with model_type) of a new image model "
        "trained from scratch (default: a small ResNet).",
    )
    g.add_argument(
        "--label_names",
        nargs="+",
        default=None,
        help="Names of the label vector's entries, in order (default: those of --dataset; needed with "
        "--train_dataset_path stories of another dataset).",
    )
    g.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="Input side R: shorter side resized to R, centre crop R x R (default: 299, the protocol's; a "
        "--pretrained_model_name_or_path classifier keeps its own).",
    )
    g.add_argument("--random_flip", action="store_true", help="Random horizontal flips (seeded).")
    g.add_argument("--classifier_dropout", type=float, default=0.0, help="Dropout before the linear head.")
    g.add_argument(
        "--num_train_epochs",
        type=int,
        default=None,
        help="Train this many epochs of the training frames (replaces --max_train_steps).",
    )
    g.add_argument(
        "--validation_steps",
        type=int,
        default=None,
        help="Evaluate every N optimizer steps (default: once per epoch) and after the last one.",
    )
    g.add_argument(
        "--num_validation_frames", type=int, default=None, help="Evaluate on the first N validation frames."
    )
    g.add_argument("--eval_batch_size", type=int, default=64, help="Frames per forward pass in evaluation.")
    args = parser.parse_args(argv)
    if args.backbone_name_or_path and args.backbone_config:
        parser.error(
            "Pass --backbone_name_or_path (a pretrained image model) or --backbone_config (a new one)."
        )
    if args.pretrained_model_name_or_path and (args.backbone_name_or_path or args.backbone_config):
        parser.error("--pretrained_model_name_or_path (a classifier) comes with its own image model.")
    if args.resolution is not None and args.resolution < 8:
        parser.error("--resolution must be at least 8.")
    for name in ("num_train_epochs", "validation_steps", "num_validation_frames"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1.")
    return args


def backbone_config(args: argparse.Namespace) -> dict[str, Any] | None:
    """The ``AutoConfig`` fields of a new image model (``--backbone_config`` or the default), or ``None``
    when the run starts from pretrained weights."""
    if args.backbone_name_or_path or args.pretrained_model_name_or_path:
        return None
    if not args.backbone_config:
        return dict(DEFAULT_BACKBONE_CONFIG)
    value = args.backbone_config
    try:
        config = json.loads(Path(value).read_text() if os.path.isfile(value) else value)
    except (OSError, ValueError) as error:
        raise TrainingSetupError(
            f"--backbone_config {value!r} is neither a JSON file nor inline JSON: {error}"
        ) from error
    if not isinstance(config, dict) or "model_type" not in config:
        raise TrainingSetupError(
            f"--backbone_config {value!r} must be a JSON object with a `model_type` (e.g. "
            f"{json.dumps(DEFAULT_BACKBONE_CONFIG)})."
        )
    from transformers import AutoConfig

    try:
        AutoConfig.for_model(**config)
    except (ValueError, TypeError, KeyError) as error:  # an unknown model_type, inconsistent fields
        raise TrainingSetupError(f"--backbone_config {value!r}: {error}") from error
    return config


def label_names(args: argparse.Namespace) -> list[str]:
    """The names of the label vector: ``--label_names``, else those of ``--dataset``."""
    if args.label_names:
        return list(args.label_names)
    from storygptv.data import dataset_label_names

    try:
        return list(dataset_label_names(args.dataset, args.task, args.data_dir))
    except (ValueError, FileNotFoundError) as error:
        raise TrainingSetupError(f"--task {args.task} on --dataset {args.dataset}: {error}") from error


# ---------------------------------------------------------------------------------------------- model
def check_pretrained_classifier(args: argparse.Namespace, names: list[str]) -> None:
    """A ``--pretrained_model_name_or_path`` classifier must predict ``--task`` over the data's labels (its config
    is read, not its weights)."""
    try:
        config = StoryFrameClassifierConfig.from_pretrained(args.pretrained_model_name_or_path)
    except (OSError, ValueError) as error:
        raise TrainingSetupError(
            f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path!r} is not a classifier folder "
            f"written by this script: {error}"
        ) from error
    try:
        check_label_set(config, names, args.task, where=f"the {args.dataset} frames")
    except ValueError as error:
        raise TrainingSetupError(f"--pretrained_model_name_or_path: {error}") from error


def build_classifier(args: argparse.Namespace, names: list[str]) -> StoryFrameClassifier:
    """The classifier of the run: a saved classifier, a pretrained image model + a new head, or a new model."""
    fields = {
        "label_names": names,
        "task": args.task,
        "dataset": card_dataset_name(args.dataset, args.train_dataset_path, args.data_dir),
        "image_size": args.resolution or DEFAULT_RESOLUTION,
        "classifier_dropout": args.classifier_dropout,
    }
    if args.pretrained_model_name_or_path:
        model = StoryFrameClassifier.from_pretrained(args.pretrained_model_name_or_path)
        if args.resolution:
            model.config.image_size = args.resolution
        return model
    if args.backbone_name_or_path:
        try:
            return StoryFrameClassifier.from_backbone(args.backbone_name_or_path, **fields)
        except ValueError as error:  # an image model that does not take the frames
            raise TrainingSetupError(
                f"--backbone_name_or_path {args.backbone_name_or_path!r}: {error}"
            ) from error
    try:
        return StoryFrameClassifier(StoryFrameClassifierConfig(vision_config=backbone_config(args), **fields))
    except (ValueError, TypeError) as error:  # unknown model_type, inconsistent fields, a non-image model
        raise TrainingSetupError(f"--backbone_config: {error}") from error


# ---------------------------------------------------------------------------------------------- data
class FrameLabelCollator:
    """Frame rows -> ``pixel_values`` (the classifier's preprocessing) and float ``labels`` (random flips
    from a reseedable generator)."""

    def __init__(
        self, config: StoryFrameClassifierConfig, label_column: str, random_flip: bool = False
    ) -> None:
        self.config = config
        self.label_column = label_column
        self.random_flip = random_flip
        self.rng = np.random.default_rng(0)

    def reseed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, frames: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        c = self.config
        pixels = classifier_pixel_values(
            [f["image"] for f in frames], c.image_size, c.image_mean, c.image_std
        )
        if self.random_flip:
            flip = torch.from_numpy(self.rng.random(len(frames)) < 0.5)
            pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
        labels = torch.tensor([f[self.label_column] for f in frames], dtype=torch.float32)
        return {"pixel_values": pixels, "labels": labels}


def labelled_frames(stories: Any, label_column: str, width: int, what: str) -> Any:
    """The frame rows of ``stories`` that carry a label vector, checked to have ``width`` entries."""
    from storygptv.data import story_frames

    frames = story_frames(stories)
    frames = frames.filter(lambda vector: len(vector) > 0, input_columns=[label_column])
    if len(frames) == 0:
        raise TrainingSetupError(f"No {what} frame has `{label_column}`: nothing to train or evaluate on.")
    found = len(frames.select_columns([label_column])[0][label_column])
    if found != width:
        raise TrainingSetupError(
            f"The {what} frames' `{label_column}` have {found} entries, but there are {width} label names; "
            "pass the data's names with --label_names."
        )
    return frames


class BestEvaluation:
    """The evaluations of the run, the best one by ``metric`` and the weights it was made with.

    It is registered for checkpointing (accelerate's custom state), so a checkpoint holds the best weights
    of the run so far and a resumed run exports the best of its whole history. Ties keep the earlier
    evaluation (the protocol's ``acc > best``).
    """

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.history: list[dict[str, float]] = []
        self.best: dict[str, float] | None = None
        self.weights: dict[str, torch.Tensor] | None = None

    def update(self, step: int, metrics: dict[str, float], model: torch.nn.Module) -> bool:
        """Record the evaluation at ``step``; keep ``model``'s weights when it beats the best. Returns whether it did."""
        entry = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self.history.append(entry)
        if self.best is not None and entry[self.metric] <= self.best[self.metric]:
            return False
        self.best = entry
        self.weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "history": self.history, "best": self.best, "weights": self.weights}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.metric, self.history = state["metric"], list(state["history"])
        self.best, self.weights = state["best"], state["weights"]


@torch.no_grad()
def evaluate(
    model: StoryFrameClassifier, loader: torch.utils.data.DataLoader, task: str, device: torch.device
) -> dict[str, float]:
    """Exact-match accuracy and micro F1 (``classification_scores``) and the mean ``loss`` on the validation frames."""
    model.eval()
    probabilities, labels, losses = [], [], []
    for batch in loader:
        out = model(pixel_values=batch["pixel_values"].to(device), labels=batch["labels"].to(device))
        probabilities.append(torch.sigmoid(out.logits.float()).cpu().numpy())
        labels.append(batch["labels"].numpy())
        losses.append(float(out.loss) * len(batch["labels"]))
    scores = classification_scores(task, np.concatenate(probabilities), np.concatenate(labels))
    count = scores.pop("num_frames")
    return {**scores, "loss": sum(losses) / count}


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train; returns ``output_dir``, ``global_step``, ``best`` (the best evaluation), ``history`` and the logs."""
    args = parse_args(argv)
    setup_logging()
    # Every check that can fail runs before the long work.
    check_dataset(args.dataset, args.data_dir, args.train_dataset_path)
    names = label_names(args)
    if args.pretrained_model_name_or_path:
        check_pretrained_classifier(args, names)
    new_backbone = backbone_config(args)
    settings = run_settings(
        args,
        {
            "task": args.task,
            "label_names": names,
            "resolution": args.resolution,
            "backbone_name_or_path": args.backbone_name_or_path,
            "backbone_config": new_backbone,
            "random_flip": args.random_flip,
            "classifier_dropout": args.classifier_dropout,
            "validation_steps": args.validation_steps,
            "num_validation_frames": args.num_validation_frames,
        },
    )
    resume_path = find_resume_checkpoint(
        args.resume_from_checkpoint,
        args.output_dir,
        settings,
        overwrite=args.overwrite_output_dir,
        allow_changed_settings=args.allow_changed_settings,
    )
    label_column = LABEL_COLUMNS[args.task]
    source = {
        "data_dir": args.data_dir,
        "seed": args.seed,
        "num_stories": args.num_stories,
        "train_dataset_path": args.train_dataset_path,
        **args.dataset_options,
    }
    frames = labelled_frames(load_train_stories(args.dataset, **source), label_column, len(names), "training")
    try:
        val_stories = load_train_stories(args.dataset, split="validation", **source)
        val_frames = labelled_frames(val_stories, label_column, len(names), "validation")
    except (ValueError, FileNotFoundError, KeyError) as error:
        warnings.warn(
            f"No validation frames ({error}); the best evaluation is picked on the training frames.",
            stacklevel=1,
        )
        val_frames = frames
    if args.num_validation_frames is not None:
        val_frames = val_frames.select(range(min(args.num_validation_frames, len(val_frames))))

    accelerator = make_accelerator(
        args.output_dir,
        logging_dir=args.logging_dir,
        report_to=args.report_to,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        train_batch_size=args.train_batch_size,
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(args.seed)
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    model = build_classifier(args, names)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    sampler = ResumableBatchSampler(
        len(frames), args.train_batch_size, seed=args.seed, num_replicas=world, rank=rank
    )
    steps_per_epoch = max(1, sampler.batches_per_epoch // args.gradient_accumulation_steps)
    if args.num_train_epochs is not None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    validation_steps = args.validation_steps or steps_per_epoch
    optimizer = make_optimizer(
        params,
        learning_rate=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        device=accelerator.device,
    )
    lr_scheduler = make_lr_scheduler(
        args.lr_scheduler,
        optimizer,
        total_steps=args.max_train_steps,
        warmup_steps=args.lr_warmup_steps,
        num_processes=world,
        step_size=args.lr_step_size,
        step_gamma=args.lr_step_gamma,
    )
    prepared, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    # Checkpointed with the run: the best weights so far survive an interruption.
    tracker = BestEvaluation(EXACT_MATCH_METRIC[args.task])
    accelerator.register_for_checkpointing(tracker)
    global_step = resume_training(
        accelerator,
        resume_path,
        sampler,
        output_dir=args.output_dir,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        overwrite=args.overwrite_output_dir,
        log=logger.info,
    )
    collator = FrameLabelCollator(model.config, label_column, args.random_flip)
    dataloader = make_train_dataloader(
        frames, sampler, collator, seed=args.seed, num_workers=args.dataloader_num_workers
    )
    # Every process evaluates every validation frame: the same numbers everywhere, so no broadcast is needed.
    val_loader = torch.utils.data.DataLoader(
        val_frames,
        batch_size=args.eval_batch_size,
        collate_fn=FrameLabelCollator(model.config, label_column),
        num_workers=args.dataloader_num_workers,
    )
    init_trackers(accelerator, args.tracker_project_name or "train_classifier", vars(args))
    accelerator.print(
        f"Classifier ({args.task}, {len(names)} labels): {len(frames)} training frames, {len(val_frames)} "
        f"validation frames, {steps_per_epoch} steps/epoch, {sum(p.numel() for p in params) / 1e6:.2f} M "
        f"parameters, {args.max_train_steps} steps."
    )
    unwrapped = accelerator.unwrap_model(prepared)

    # The loop of every training script (storygptv.training.loop).
    steps = StepLogger(
        accelerator,
        args.max_train_steps,
        initial_step=global_step,
        accumulation_steps=args.gradient_accumulation_steps,
        logging_steps=args.logging_steps,
    )
    data_iter = iter(dataloader)
    micro = sampler.start_batch
    while global_step < args.max_train_steps:
        batch = next_batch(data_iter, micro)
        seed_micro_step(args.seed, "dropout", micro, rank)  # dropout of the head and the image model
        with accelerator.accumulate(prepared):
            out = prepared(
                pixel_values=batch["pixel_values"].to(accelerator.device),
                labels=batch["labels"].to(accelerator.device),
            )
            optimizer_step(accelerator, out.loss, optimizer, lr_scheduler, params, args.max_grad_norm)
        steps.add(loss=out.loss)
        micro += 1
        if not accelerator.sync_gradients:
            continue
        # One optimizer step done.
        global_step += 1
        steps.end_step(global_step, lr_scheduler.get_last_lr()[0])
        # Evaluate before checkpointing, so that the checkpoint of this step holds its evaluation.
        if global_step % validation_steps == 0 or global_step == args.max_train_steps:
            metrics = evaluate(unwrapped, val_loader, args.task, accelerator.device)
            if tracker.update(global_step, metrics, unwrapped):
                logger.info(
                    "Step %d: best %s so far, %.2f", global_step, tracker.metric, metrics[tracker.metric]
                )
            accelerator.log({f"val_{k}": v for k, v in metrics.items()}, step=global_step)
            unwrapped.train()
        if global_step % args.checkpointing_steps == 0 or global_step == args.max_train_steps:
            save_checkpoint(
                accelerator, args.output_dir, global_step, settings, total_limit=args.checkpoints_total_limit
            )
        if global_step == args.debug_interrupt_at_step:
            raise KeyboardInterrupt(f"--debug_interrupt_at_step {global_step}")
    steps.close()

    accelerator.wait_for_everyone()
    if tracker.weights is not None:
        unwrapped.load_state_dict(tracker.weights)  # the best evaluation's weights, not the last step's
    if args.debug_dump_rank_hash:
        dump_rank_hash(args.output_dir, rank, unwrapped)
    result = {
        "output_dir": args.output_dir,
        **steps.summary(),
        "best": tracker.best,
        "history": tracker.history,
    }
    if accelerator.is_main_process:
        output_dir = Path(args.output_dir)
        unwrapped.save_pretrained(output_dir)
        scrub_local_paths(output_dir)
        record = {"metric": tracker.metric, "steps_per_epoch": steps_per_epoch, "best": tracker.best}
        (output_dir / VALIDATION_FILE).write_text(
            json.dumps({**record, "history": tracker.history}, indent=2)
        )
        write_classifier_card(args, output_dir, unwrapped, tracker, steps_per_epoch, len(val_frames))
        if args.push_to_hub:
            result["hub_commit"] = push_folder_to_hub(
                output_dir,
                hub_repo_id(args.hub_model_id, output_dir),
                token=args.hub_token,
                private=args.hub_private or None,
            )
    finish_training(accelerator, args.output_dir, steps)
    return result


def write_classifier_card(
    args: argparse.Namespace,
    folder: Path,
    model: StoryFrameClassifier,
    tracker: BestEvaluation,
    steps_per_epoch: int,
    num_validation_frames: int,
) -> None:
    """README.md of the classifier folder (the ``frame_classifier`` template: transformers, image-classification)."""
    keys = (
        "task", "resolution", "learning_rate", "adam_weight_decay", "lr_scheduler", "train_batch_size",
        "gradient_accumulation_steps", "max_train_steps", "random_flip", "classifier_dropout", "seed",
    )  # fmt: skip
    hyper = {k: getattr(args, k) for k in keys} | {"resolution": model.config.image_size}
    hyper["image model"] = model.config.vision_config.model_type
    hyper["parameters"] = f"{sum(p.numel() for p in model.parameters()):,}"
    best = dict(tracker.best or {})
    metrics: dict[str, Any] = {"validation frames": num_validation_frames}
    if best:
        step = best.pop("step")
        metrics |= {"best step": step, "best epoch": f"{step / steps_per_epoch:.2f}"}
        metrics |= {k.replace("_", " "): v for k, v in best.items()}
    metric_names = "Char-Acc / Char-F1" if args.task == "characters" else "BG-Acc / BG-F1"
    names = model.config.label_names
    shown = ", ".join(names[:20]) + (f", ... ({len(names) - 20} more)" if len(names) > 20 else "")
    write_model_card(
        folder,
        "frame_classifier",
        repo_id=args.hub_model_id,
        base_model=args.backbone_name_or_path or args.pretrained_model_name_or_path,
        dataset=card_dataset_name(args.dataset, args.train_dataset_path, args.data_dir),
        hyperparameters=hyper,
        metrics=metrics,
        tags=["image-classification"],
        task=args.task,
        metric_names=metric_names,
        image_size=model.config.image_size,
        num_labels=len(names),
        label_names=shown,
    )


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except TrainingSetupError as error:
        sys.exit(f"error: {error}")
