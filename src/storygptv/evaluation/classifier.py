"""Character and background classifiers of frames, trainable here: the judges of Char-Acc / Char-F1 / BG-Acc / BG-F1.

The paper scores generated frames with an ImageNet Inception-v3 fine-tuned on the dataset's labels (method
notes section 7.1), whose weights are not public. This module is the Hugging Face version of that judge:

- :class:`StoryFrameClassifier`: any ``transformers`` image model (``vision_config``, built with
  ``AutoModel``: a Hub backbone such as ``microsoft/resnet-50`` or a small one from scratch) and a linear
  multi-label head on its pooled features, trained with binary cross-entropy on logits
  (``training_scripts/train_classifier.py``). Its :class:`StoryFrameClassifierConfig` records the label names,
  the task (``"characters"`` or ``"background"``), the input size and the normalisation, so a loaded classifier
  knows what it predicts and how to read an image.
- :func:`classifier_pixel_values`: the one preprocessing, the protocol's ``Resize(R)`` (shorter side) ->
  ``CenterCrop(R)`` -> ImageNet mean / std, written with PIL and torch (no torchvision).
- :func:`classification_scores`: Char-Acc / Char-F1 or BG-Acc / BG-F1 of predictions, through
  :mod:`storygptv.evaluation.metrics` (prediction = sigmoid >= 0.5).
- :func:`score_frames` and :func:`score_story_folder`: the scores of generated frames, given as images or as
  a folder laid out as ``storygptv generate --out FOLDER/<story_id>`` writes it::

      FOLDER/<story_id>/frame_001.png, frame_002.png, ...   (one sub-folder per story, frames from 1)

A classifier for another label set, or a folder with a missing frame, is refused before any image is read.

Example:
    >>> from transformers import ResNetConfig
    >>> config = StoryFrameClassifierConfig(
    ...     vision_config=ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]),
    ...     label_names=["Ava", "Bo", "Cleo"], image_size=32)
    >>> model = StoryFrameClassifier(config)
    >>> model.predict([np.zeros((64, 64, 3), dtype=np.uint8)]).shape
    (1, 3)
"""

# No `from __future__ import annotations`: transformers reads the `config` annotation of the model class.
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import ImageClassifierOutput

from ..cli import frame_file_name
from .metrics import background_accuracy, binarize, character_metrics
from .synthsv import image_to_array

__all__ = [
    "CLASSIFIER_TASKS",
    "EXACT_MATCH_METRIC",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "StoryFrameClassifier",
    "StoryFrameClassifierConfig",
    "check_label_set",
    "classification_scores",
    "classifier_pixel_values",
    "pooled_features",
    "score_frames",
    "score_story_folder",
    "story_folder_frames",
]

#: What a classifier predicts: the frame's characters (multi-hot) or its background (one label, as a vector).
CLASSIFIER_TASKS: tuple[str, ...] = ("characters", "background")
#: The metric that picks the best epoch and names a classifier's accuracy, per task (method notes 7.1-7.2).
EXACT_MATCH_METRIC: dict[str, str] = {"characters": "char_acc", "background": "bg_acc"}
#: torchvision's ImageNet statistics, which the Inception-v3 of the protocol was trained with.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------------ config
@strict
class StoryFrameClassifierConfig(PreTrainedConfig):
    r"""Configuration of :class:`StoryFrameClassifier`.

    Args:
        vision_config: the image model, a config or a dict with ``model_type`` (default: a ResNet); anything
            ``AutoModel.from_config`` builds and calls with ``pixel_values``.
        label_names: the names of the outputs, in the order of the dataset's label vectors
            (:func:`storygptv.data.dataset_label_names`); they also fill ``id2label`` / ``label2id``.
        task: ``"characters"`` (multi-hot ``character_labels``) or ``"background"`` (``background_labels``).
        dataset: the dataset the labels come from (``"synthsv"``, ``"flintstones"``...), for messages and cards.
        image_size: R, the side of the square input (the protocol's 299): shorter side resized to R, then
            centre-cropped.
        image_mean, image_std: per-channel normalisation of the [0, 1] input (default: ImageNet's).
        feature_size: width of the pooled features (found by a forward pass when ``None``).
        threshold: probability from which a label is predicted (0.5: the protocol's ``round(sigmoid)``).
        classifier_dropout: dropout before the head.
        initializer_range: std of the head's normal init.
    """

    model_type = "storygptv_frame_classifier"
    sub_configs_defaults: ClassVar[dict[str, SubConfigSpec]] = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="resnet"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    label_names: list[str] | None = None
    task: Literal["characters", "background"] = "characters"
    dataset: str | None = None
    image_size: int = 299
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    feature_size: int | None = None
    threshold: float = 0.5
    classifier_dropout: float = 0.0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if not self.label_names:
            raise ValueError("`label_names` must name the classifier's outputs (the dataset's label order).")
        self.label_names = [str(n) for n in self.label_names]
        if len(set(self.label_names)) != len(self.label_names):
            raise ValueError(f"`label_names` must be distinct, got {self.label_names}.")
        # The label names are the source of truth; id2label / label2id follow them (what pipelines read).
        self.id2label = dict(enumerate(self.label_names))
        self.label2id = {name: i for i, name in self.id2label.items()}
        self.problem_type = "multi_label_classification"
        if self.task not in CLASSIFIER_TASKS:
            raise ValueError(f"`task` must be one of {list(CLASSIFIER_TASKS)}, got {self.task!r}.")
        self.image_mean = [float(v) for v in (self.image_mean or IMAGENET_MEAN)]
        self.image_std = [float(v) for v in (self.image_std or IMAGENET_STD)]
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError(
                f"`image_mean` and `image_std` need 3 values (std > 0), got {self.image_mean} / {self.image_std}."
            )
        if self.image_size < 8:
            raise ValueError(f"`image_size` must be at least 8, got {self.image_size}.")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"`threshold` must be in (0, 1), got {self.threshold}.")


# ------------------------------------------------------------------------------------------------ input
def _to_pil(image: Any) -> PIL.Image.Image:
    """An RGB PIL image from a path, a PIL image, an undecoded ``datasets.Image`` value, an array or a tensor."""
    if isinstance(image, str | os.PathLike):
        with PIL.Image.open(image) as opened:
            return opened.convert("RGB")
    if isinstance(image, PIL.Image.Image):
        return image.convert("RGB")
    if isinstance(image, dict):  # an undecoded datasets.Image value
        import datasets

        return datasets.Image().decode_example(image).convert("RGB")
    # Arrays and tensors: uint8 or float ([0, 1] or [-1, 1]), channels first or last (the judge's one rule).
    return PIL.Image.fromarray(image_to_array(image, size=None))


def classifier_pixel_values(
    images: Iterable[Any],
    image_size: int,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """``(N, 3, R, R)`` float classifier input: the protocol's ``Resize(R)`` -> ``CenterCrop(R)`` -> normalise.

    The shorter side is resized to R (bilinear, antialiased as PIL does), the centre R x R square is kept
    (torchvision's rounding), and the [0, 1] values are normalised with ``image_mean`` / ``image_std``.

    Args:
        images: file paths, PIL images, undecoded ``datasets.Image`` values, uint8 arrays, or float arrays /
            tensors in [0, 1] or [-1, 1] (channels first or last).
        image_size: R.
        image_mean, image_std: per-channel statistics (ImageNet's by default).
    """
    mean = torch.tensor(image_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(image_std, dtype=torch.float32).view(3, 1, 1)
    tensors = []
    for image in images:
        pil = _to_pil(image)
        width, height = pil.size
        scale = image_size / min(width, height)
        size = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
        if size != pil.size:
            pil = pil.resize(size, resample=PIL.Image.Resampling.BILINEAR)
        left = int(round((size[0] - image_size) / 2.0))
        top = int(round((size[1] - image_size) / 2.0))
        pil = pil.crop((left, top, left + image_size, top + image_size))
        pixels = torch.from_numpy(np.asarray(pil, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        tensors.append((pixels - mean) / std)
    if not tensors:
        return torch.zeros(0, 3, image_size, image_size)
    return torch.stack(tensors)


# ------------------------------------------------------------------------------------------------ model
def pooled_features(outputs: Any) -> torch.Tensor:
    """``(B, D)`` pooled features of an image model's outputs.

    The model's own ``pooler_output`` when it has one (ResNet, ConvNeXt, ViT, DINOv2...); else the mean of
    the last feature map (``(B, D, H, W)``) or of the last hidden states (``(B, T, D)``); ``AutoBackbone``
    outputs pool their last ``feature_maps``.
    """
    pooled = getattr(outputs, "pooler_output", None)
    if pooled is None:
        hidden = getattr(outputs, "last_hidden_state", None)
        if hidden is None:
            feature_maps = getattr(outputs, "feature_maps", None)
            if not feature_maps:
                raise ValueError(
                    f"The image model returned {type(outputs).__name__} without `pooler_output`, "
                    "`last_hidden_state` or `feature_maps`: it cannot be a classifier backbone."
                )
            hidden = feature_maps[-1]
        pooled = hidden.mean(dim=(2, 3)) if hidden.ndim == 4 else hidden.mean(dim=1)
    return pooled.flatten(1)


class StoryFrameClassifierPreTrainedModel(PreTrainedModel):
    """Base class: config class, input name, weight init of the head."""

    config: StoryFrameClassifierConfig
    base_model_prefix = "backbone"
    main_input_name = "pixel_values"
    input_modalities = ("image",)


class StoryFrameClassifier(StoryFrameClassifierPreTrainedModel):
    """An image model + a linear multi-label head: which characters (or which background) a frame shows.

    Args:
        config: the configuration (label names, task, input size, normalisation, the image model).
        backbone: an already built image model to use instead of a new one from ``config.vision_config``
            (:meth:`from_backbone` passes a pretrained one; its weights are left untouched).
    """

    def __init__(self, config: StoryFrameClassifierConfig, backbone: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        if backbone is None:
            backbone = AutoModel.from_config(config.vision_config)
        else:
            # Weights of a pretrained backbone must survive `post_init`.
            for module in backbone.modules():
                module._is_hf_initialized = True
        self.backbone = backbone
        if config.feature_size is None:
            config.feature_size = self._probe_feature_size()
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.feature_size, config.num_labels)
        self.post_init()

    def _probe_feature_size(self) -> int:
        """The pooled width, from one forward pass of a blank image (in eval mode: BatchNorm needs it)."""
        was_training = self.backbone.training
        self.backbone.eval()
        size = self.config.image_size
        try:
            with torch.no_grad():
                outputs = self.backbone(pixel_values=torch.zeros(1, 3, size, size))
        except Exception as error:  # any shape / input error of a foreign model: say what was tried
            raise ValueError(
                f"The image model ({type(self.backbone).__name__}) cannot take a {size}x{size} image as "
                f"`pixel_values` ({type(error).__name__}: {error}). Use an image model, at a size it accepts "
                "(`image_size`, --resolution)."
            ) from error
        finally:
            self.backbone.train(was_training)
        return int(pooled_features(outputs).shape[-1])

    @classmethod
    def from_backbone(
        cls,
        backbone: str | os.PathLike | PreTrainedModel,
        label_names: Sequence[str],
        **config_kwargs: Any,
    ) -> "StoryFrameClassifier":
        """A new classifier (random head) on a pretrained image model.

        Args:
            backbone: a Hub id or local folder of any ``transformers`` image model (``AutoModel``), or the
                model itself.
            label_names: the outputs, in the dataset's label order.
            config_kwargs: the other :class:`StoryFrameClassifierConfig` fields (``task``, ``image_size``,
                ``dataset``...).
        """
        if not isinstance(backbone, PreTrainedModel):
            backbone = AutoModel.from_pretrained(backbone)
        config = StoryFrameClassifierConfig(
            vision_config=backbone.config, label_names=list(label_names), **config_kwargs
        )
        return cls(config, backbone=backbone)

    @property
    def label_names(self) -> list[str]:
        """The names of the outputs, in order."""
        return list(self.config.label_names)

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: Any
    ) -> ImageClassifierOutput:
        """Logits ``(B, num_labels)`` of ``pixel_values`` (:meth:`preprocess`); with ``labels`` (multi-hot
        ``(B, num_labels)``), the binary cross-entropy on logits averaged over batch and labels."""
        features = pooled_features(self.backbone(pixel_values=pixel_values))
        logits = self.classifier(self.dropout(features))
        loss = None
        if labels is not None:
            loss = F.binary_cross_entropy_with_logits(logits.float(), labels.to(logits.device).float())
        return ImageClassifierOutput(loss=loss, logits=logits)

    def preprocess(self, images: Iterable[Any]) -> torch.Tensor:
        """:func:`classifier_pixel_values` with this classifier's size and normalisation."""
        config = self.config
        return classifier_pixel_values(images, config.image_size, config.image_mean, config.image_std)

    @torch.no_grad()
    def predict_proba(self, images: Sequence[Any], batch_size: int = 32) -> np.ndarray:
        """``(N, num_labels)`` probabilities (sigmoid of the logits) of ``images`` (any form
        :func:`classifier_pixel_values` reads), in batches of ``batch_size``, in eval mode."""
        self.eval()
        parameter = next(self.parameters())
        out = [np.zeros((0, self.config.num_labels), dtype=np.float32)]
        for start in range(0, len(images), batch_size):
            pixels = self.preprocess(images[start : start + batch_size])
            logits = self(pixel_values=pixels.to(parameter.device, parameter.dtype)).logits
            out.append(torch.sigmoid(logits.float()).cpu().numpy())
        return np.concatenate(out)

    def predict(self, images: Sequence[Any], batch_size: int = 32) -> np.ndarray:
        """``(N, num_labels)`` boolean predictions: probability >= ``config.threshold``."""
        return binarize(self.predict_proba(images, batch_size), self.config.threshold)


AutoConfig.register(StoryFrameClassifierConfig.model_type, StoryFrameClassifierConfig, exist_ok=True)
AutoModel.register(StoryFrameClassifierConfig, StoryFrameClassifier, exist_ok=True)


# ------------------------------------------------------------------------------------------------ scores
def classification_scores(task: str, predicted: Any, true: Any) -> dict[str, float]:
    """Char-Acc / Char-F1 (``task="characters"``) or BG-Acc / BG-F1 (``"background"``) in percent.

    Both are the protocol's computation on label vectors (method notes 7.2): the accuracy is the share of
    frames whose whole predicted vector equals the truth, F1 is micro-averaged over frames and labels. For
    backgrounds the accuracy is :func:`~storygptv.evaluation.metrics.background_accuracy` (a frame predicted
    with no background is wrong).

    Args:
        task: one of :data:`CLASSIFIER_TASKS`.
        predicted: ``(N, C)`` predictions (bool, 0/1, or probabilities thresholded at 0.5).
        true: ``(N, C)`` label vectors.

    Returns:
        ``{"char_acc", "char_f1"}`` or ``{"bg_acc", "bg_f1"}``, and ``"num_frames"``.
    """
    pred, truth = binarize(predicted), binarize(true)
    scores = character_metrics(pred, truth)
    if task == "characters":
        return {
            "char_acc": scores["char_acc"],
            "char_f1": scores["char_f1"],
            "num_frames": scores["num_frames"],
        }
    if task == "background":
        return {
            "bg_acc": background_accuracy(pred, truth),
            "bg_f1": scores["char_f1"],
            "num_frames": scores["num_frames"],
        }
    raise ValueError(f"Unknown task {task!r}; valid tasks: {list(CLASSIFIER_TASKS)}.")


def _classifier_source(classifier: StoryFrameClassifier | StoryFrameClassifierConfig) -> str:
    config = classifier if isinstance(classifier, PreTrainedConfig) else classifier.config
    return str(getattr(config, "name_or_path", "") or "(a classifier built in memory)")


def check_label_set(
    classifier: StoryFrameClassifier | StoryFrameClassifierConfig,
    label_names: Sequence[str],
    task: str,
    where: str = "the stories",
) -> None:
    """Refuse (``ValueError``) a classifier of another task or label set than the labels it is to score.

    The message names the classifier's folder, the labels only it has, those only the data has, or the
    order when only that differs. Call it before reading any image.

    Args:
        classifier: a classifier or its config.
        label_names: the data's label names in order (:func:`storygptv.data.dataset_label_names`).
        task: the task the classifier is used for (:data:`CLASSIFIER_TASKS`).
        where: how the message names the data ("the stories", a dataset name...).
    """
    config = classifier if isinstance(classifier, PreTrainedConfig) else classifier.config
    source = _classifier_source(classifier)
    if config.task != task:
        raise ValueError(
            f"The classifier {source!r} predicts {config.task}, but it was given as the {task} classifier."
        )
    ours, theirs = list(config.label_names), [str(n) for n in label_names]
    if ours == theirs:
        return
    only_ours = [n for n in ours if n not in theirs]
    only_theirs = [n for n in theirs if n not in ours]
    if not only_ours and not only_theirs:
        detail = f"the same labels in another order (classifier: {ours}; data: {theirs})"
    else:
        detail = (
            f"labels only the classifier has: {only_ours or 'none'}; labels only {where} have: "
            f"{only_theirs or 'none'}"
        )
    trained_on = f" (trained on {config.dataset})" if config.dataset else ""
    raise ValueError(
        f"The {task} classifier {source!r}{trained_on} has {len(ours)} labels, {where} {len(theirs)}: {detail}. "
        "Use a classifier trained on these labels (training_scripts/train_classifier.py)."
    )


def score_frames(
    images: Sequence[Any],
    *,
    classifier: StoryFrameClassifier | None = None,
    character_labels: Any = None,
    character_names: Sequence[str] | None = None,
    background_classifier: StoryFrameClassifier | None = None,
    background_labels: Any = None,
    background_names: Sequence[str] | None = None,
    batch_size: int = 32,
) -> dict[str, float]:
    """Char-Acc / Char-F1 and / or BG-Acc / BG-F1 of frames with known labels, judged by trained classifiers.

    Args:
        images: the frames (paths, PIL images, arrays or tensors: :func:`classifier_pixel_values`).
        classifier: the character classifier (``task="characters"``), or ``None`` for no character scores.
        character_labels: ``(N, C)`` character label vectors of ``images``.
        character_names: the labels' names in order (:func:`storygptv.data.dataset_label_names`); checked
            against the classifier's before any image is read.
        background_classifier: the background classifier, or ``None``.
        background_labels: ``(N, B)`` background label vectors; a frame with an empty vector is left out of
            the background scores (FlintstonesSV frames missing from ``labels_bg.pkl``).
        background_names: the background labels' names in order.
        batch_size: frames per forward pass.

    Returns:
        ``char_acc``, ``char_f1`` and ``num_frames`` with a character classifier; ``bg_acc``, ``bg_f1`` and
        ``num_background_frames`` with a background classifier.
    """
    # 1. Check inputs: the classifiers against the labels, before any image is read.
    if classifier is None and background_classifier is None:
        raise ValueError("Pass a character `classifier` and / or a `background_classifier`.")
    jobs = []
    if classifier is not None:
        if character_names is None or character_labels is None:
            raise ValueError("A character `classifier` needs `character_labels` and `character_names`.")
        check_label_set(classifier, character_names, "characters")
        jobs.append(("characters", classifier, list(character_labels), len(character_names)))
    if background_classifier is not None:
        if background_names is None or background_labels is None:
            raise ValueError("A `background_classifier` needs `background_labels` and `background_names`.")
        check_label_set(background_classifier, background_names, "background")
        jobs.append(("background", background_classifier, list(background_labels), len(background_names)))
    scores: dict[str, float] = {}
    for task, model, labels, width in jobs:
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} frames but {len(labels)} {task} label vectors.")
        keep = [i for i, vector in enumerate(labels) if len(vector) > 0]
        bad = [i for i in keep if len(labels[i]) != width]
        if bad:
            raise ValueError(
                f"Frame {bad[0]} has a {task} label vector of length {len(labels[bad[0]])}, but the labels "
                f"have {width} names."
            )
        if not keep:
            raise ValueError(f"No frame has {task} labels to score.")
        # 2. Classify the labelled frames; 3. score them.
        predicted = model.predict([images[i] for i in keep], batch_size=batch_size)
        result = classification_scores(task, predicted, np.array([labels[i] for i in keep]))
        if task == "background":
            result["num_background_frames"] = result.pop("num_frames")
        scores.update(result)
    return scores


# ------------------------------------------------------------------------------------------------ folders
def _story_rows(stories: Any) -> list[Mapping[str, Any]]:
    """The ``story_id`` and label columns of story rows (a ``datasets.Dataset`` is read without its images)."""
    if hasattr(stories, "select_columns") and hasattr(stories, "with_format"):
        columns = [
            c for c in ("story_id", "character_labels", "background_labels") if c in stories.column_names
        ]
        # No format transform (SynthSV renders its frames in one) and no image column: labels only.
        return list(stories.with_format(None).select_columns(columns))
    return list(stories)


def story_folder_frames(
    folder: str | os.PathLike, stories: Any
) -> tuple[list[Path], list[list[int]], list[list[int]]]:
    """The frame files of generated stories and their labels, checked: every frame must be there.

    Args:
        folder: one sub-folder per story, named by its ``story_id``, holding ``frame_001.png``,
            ``frame_002.png``... (the layout of ``storygptv generate --out FOLDER/<story_id>``).
        stories: the stories' rows in the common schema (a ``datasets.Dataset`` of
            :func:`storygptv.load_story_dataset`, or mappings with ``story_id``, ``character_labels`` and
            optionally ``background_labels``); each story has one frame per ``character_labels`` entry.

    Returns:
        ``(paths, character label vectors, background label vectors)``, one entry per frame.

    Raises:
        FileNotFoundError: the folder, or a frame of a story, is missing (naming the story, the frame and how
            many frames are missing in all).
    """
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"The folder of generated stories {str(root)!r} does not exist.")
    paths: list[Path] = []
    characters: list[list[int]] = []
    backgrounds: list[list[int]] = []
    missing: list[tuple[str, int, Path]] = []
    for row in _story_rows(stories):
        story_id = str(row["story_id"])
        labels = list(row["character_labels"])
        bg = list(row.get("background_labels") or [[] for _ in labels])
        for index, vector in enumerate(labels):
            path = root / story_id / frame_file_name(index)
            if not path.is_file():
                missing.append((story_id, index, path))
            paths.append(path)
            characters.append([int(v) for v in vector])
            backgrounds.append([int(v) for v in (bg[index] if index < len(bg) else [])])
    if missing:
        story_id, index, path = missing[0]
        raise FileNotFoundError(
            f"{str(root)!r}: story {story_id!r} has no frame {index + 1} ({str(path)!r}); {len(missing)} of "
            f"{len(paths)} frames are missing. Each story needs one sub-folder named by its story_id with "
            f"{frame_file_name(0)}, {frame_file_name(1)}, ... (one per frame)."
        )
    if not paths:
        raise ValueError("No stories to score.")
    return paths, characters, backgrounds


def score_story_folder(
    folder: str | os.PathLike,
    stories: Any,
    *,
    classifier: StoryFrameClassifier | None = None,
    character_names: Sequence[str] | None = None,
    background_classifier: StoryFrameClassifier | None = None,
    background_names: Sequence[str] | None = None,
    batch_size: int = 32,
) -> dict[str, float]:
    """Char-Acc / Char-F1 / BG-Acc / BG-F1 of a folder of generated stories against the stories' labels.

    Every check runs before any image is read: the classifiers' tasks and label sets against
    ``character_names`` / ``background_names``, then every frame file (:func:`story_folder_frames`).

    Args:
        folder: ``FOLDER/<story_id>/frame_001.png ...`` (:func:`story_folder_frames`).
        stories: the reference stories (e.g. ``load_story_dataset("synthsv", split="test")``).
        classifier: the character classifier, or ``None``.
        character_names: the dataset's character label names (``dataset_label_names(name, "characters")``).
        background_classifier: the background classifier, or ``None`` (PororoSV has none).
        background_names: the dataset's background label names (``dataset_label_names(name, "background")``).
        batch_size: frames per forward pass.

    Example:
        >>> from storygptv import load_story_dataset
        >>> from storygptv.data import dataset_label_names
        >>> stories = load_story_dataset("synthsv", split="test", num_stories=10)  # doctest: +SKIP
        >>> score_story_folder("generated/", stories, classifier=StoryFrameClassifier.from_pretrained("clf"),
        ...                    character_names=dataset_label_names("synthsv"))  # doctest: +SKIP
        {'char_acc': 92.5, 'char_f1': 97.1, 'num_frames': 40}
    """
    folder_name = str(folder)
    if classifier is not None and character_names is not None:
        check_label_set(classifier, character_names, "characters", where=f"the stories of {folder_name!r}")
    if background_classifier is not None and background_names is not None:
        check_label_set(
            background_classifier, background_names, "background", where=f"the stories of {folder_name!r}"
        )
    paths, characters, backgrounds = story_folder_frames(folder, stories)
    return score_frames(
        paths,
        classifier=classifier,
        character_labels=characters if classifier is not None else None,
        character_names=character_names,
        background_classifier=background_classifier,
        background_labels=backgrounds if background_classifier is not None else None,
        background_names=background_names,
        batch_size=batch_size,
    )
