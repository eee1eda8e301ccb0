"""Model cards of every folder the package exports or pushes: one writer, templates in ``storygptv/hub_cards/``.

==================== =================================================== ============ ====================
template             folder                                              library_name pipeline_tag
==================== =================================================== ============ ====================
``char_ldm``         a Char-LDM pipeline (``train_char_ldm.py``)         diffusers    text-to-image
``storygptv``        a whole StoryGPT-V pipeline (``train_storygptv``)   diffusers    text-to-image
``vae``              an ``AutoencoderKL`` (``train_vae.py``)             diffusers    (none)
``story_model``      the stage-2 story model alone (``--save_story...``) transformers (none)
``text_lm``          a small causal LM (``train_text_lm.py``)            transformers text-generation
``frame_classifier`` a frame classifier (``train_classifier.py``)        transformers image-classification
==================== =================================================== ============ ====================

The templates are Jinja templates for ``huggingface_hub.ModelCard.from_template``; they receive
``card_data``, ``model_name``, ``repo_id``, ``base_model``, ``dataset``, ``hyperparameters`` and ``metrics``
(markdown tables), and any further fields a script passes.
"""

from __future__ import annotations

import importlib.resources
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["DATASET_TITLES", "card_dataset_name", "example_captions", "markdown_table", "write_model_card"]

#: ``(library_name, pipeline_tag)`` of each template's folder.
CARD_KINDS: dict[str, tuple[str, str | None]] = {
    "char_ldm": ("diffusers", "text-to-image"),
    "storygptv": ("diffusers", "text-to-image"),
    "vae": ("diffusers", None),
    "story_model": ("transformers", None),
    "text_lm": ("transformers", "text-generation"),
    "frame_classifier": ("transformers", "image-classification"),
}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def _template_text(template_name: str) -> str:
    name = template_name if template_name.endswith(".md") else f"{template_name}.md"
    folder = importlib.resources.files("storygptv").joinpath("hub_cards")
    resource = folder.joinpath(name)
    if not resource.is_file():
        available = sorted(p.name for p in folder.iterdir() if p.name.endswith(".md"))
        raise ValueError(f"Unknown model-card template {template_name!r}; available: {available}.")
    return resource.read_text(encoding="utf-8")


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list | tuple):
        return " ".join(str(v) for v in value)
    return str(value)


def markdown_table(rows: Mapping[str, Any] | None, header: str, empty: str, code_keys: bool = False) -> str:
    """A two-column markdown table (``| header | value |``) of ``rows``, or ``empty`` when there are none.
    Floats keep 6 significant digits; lists are joined by spaces; ``code_keys`` writes keys as code."""
    if not rows:
        return empty
    body = "\n".join(f"| {f'`{k}`' if code_keys else k} | {_format_value(v)} |" for k, v in rows.items())
    return f"| {header} | value |\n|---|---|\n{body}"


#: How model cards name the built-in datasets (``--dataset``).
DATASET_TITLES: dict[str, str] = {"flintstones": "FlintstonesSV", "pororo": "PororoSV", "synthsv": "SynthSV"}


def card_dataset_name(
    dataset: str | None, train_dataset_path: str | None = None, data_dir: str | None = None
) -> str:
    """The training data as model cards name it: the stories of ``train_dataset_path`` (a ``save_to_disk``
    folder, which replaces ``--dataset``) or of the story folder ``data_dir`` (``--dataset folder``) by the
    folder's name, else the dataset's title ("FlintstonesSV", "SynthSV").

    Example:
        >>> card_dataset_name("synthsv"), card_dataset_name("folder", data_dir="data/my_stories/")
        ('SynthSV', 'my_stories (story folder)')
        >>> card_dataset_name("synthsv", train_dataset_path="/data/stories_v2")
        'stories_v2 (datasets save_to_disk folder)'
    """
    if train_dataset_path:
        return f"{Path(train_dataset_path).name} (datasets save_to_disk folder)"
    if dataset == "folder" and data_dir:
        return f"{Path(data_dir).name} (story folder)"
    return DATASET_TITLES.get(str(dataset), str(dataset or "(unspecified)"))


def example_captions(names: Sequence[str]) -> list[str]:
    """A short story for a card's usage snippet, naming the first characters of a cast.

    >>> example_captions(["Ava", "Bo", "Cleo"])
    ['Ava and Bo are standing.', 'They are talking.', 'Ava is waving.']
    """
    names = list(names)
    if len(names) >= 2:
        return [f"{names[0]} and {names[1]} are standing.", "They are talking.", f"{names[0]} is waving."]
    return [f"{names[0]} is standing.", f"{names[0]} is waving."] if names else []


def write_model_card(
    folder: str | os.PathLike,
    template_name: str,
    *,
    repo_id: str | None = None,
    base_model: str | Sequence[str | None] | None = None,
    dataset: str | Sequence[str] | None = None,
    hyperparameters: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    license: str = "apache-2.0",
    tags: Sequence[str] = (),
    **fields: Any,
) -> Any:
    """Write ``folder/README.md`` from the package template ``storygptv/hub_cards/<template_name>.md``.

    Metadata: ``library_name`` and ``pipeline_tag`` of the template's kind (:data:`CARD_KINDS`), ``tags``
    (storygptv, story-visualization, the library for diffusers folders, then ``tags``), ``license``,
    ``inference: false``, ``base_model`` (Hub ids only: local folders are named in the text, never in the
    metadata) and ``datasets`` (Hub ids only). The template receives ``repo_id``, ``model_name`` (the repo
    id, or the folder's name), ``base_model``, ``dataset``, ``hyperparameters`` and ``metrics`` (markdown
    tables), and ``fields``. Returns the ``huggingface_hub.ModelCard``.
    """
    from huggingface_hub import ModelCard, ModelCardData

    text = _template_text(template_name)
    library_name, pipeline_tag = CARD_KINDS.get(template_name.removesuffix(".md"), ("diffusers", None))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bases = [base_model] if isinstance(base_model, str) else [b for b in base_model or [] if b]
    hub_bases = [b for b in bases if b and not Path(b).exists() and _HUB_ID.match(b)]
    datasets_ = [dataset] if isinstance(dataset, str) else list(dataset or [])
    all_tags = ["storygptv", "story-visualization"] + (["diffusers"] if library_name == "diffusers" else [])
    all_tags += [t for t in tags if t not in all_tags]
    data = ModelCardData(
        library_name=library_name,
        pipeline_tag=pipeline_tag,
        license=license,
        tags=all_tags,
        base_model=hub_bases or None,
        datasets=[d for d in datasets_ if "/" in d] or None,
        inference=False,
    )
    model_name = repo_id or fields.pop("model_name", None) or folder.name
    if (folder / "characters").is_dir() and "example_captions" not in fields:
        from .characters import read_cast_folder

        try:
            captions = example_captions(list(read_cast_folder(folder / "characters")))
        except ValueError:  # an empty cast folder
            captions = []
        if captions:
            fields["example_captions"] = repr(captions).replace("'", '"')
            fields.setdefault("example_caption", repr(captions[0]).replace("'", '"'))
    card = ModelCard.from_template(
        data,
        template_str=text,
        repo_id=repo_id or model_name,
        model_name=model_name,
        base_model=", ".join(bases) or "(trained from scratch)",
        dataset=", ".join(datasets_) or "(unspecified)",
        hyperparameters=markdown_table(hyperparameters, "option", "(none recorded)", code_keys=True),
        metrics=markdown_table(metrics, "metric", "(not evaluated)"),
        **fields,
    )
    card.save(str(folder / "README.md"))
    return card
