"""SynthSV: a procedural, referential story-visualisation world rendered exactly on the fly.

SynthSV is a tiny benchmark in which every frame is drawn by a deterministic renderer, so the
characters and background shown in a generated frame can be judged exactly
(:mod:`storygptv.evaluation.synthsv`), and in which later captions refer to characters by pronoun, so
a model must resolve "She" / "They" from the story context, as in StoryGPT-V's extended Flintstones
and Pororo sets.

The spec is fixed (evaluation tools outside the package rely on it):

* **Canvas** 64x64 RGB; rows 0-39 are the background's sky colour, rows 40-63 its ground colour.
* **Backgrounds** (sky; ground): forest (110,160,110; 55,95,45), beach (150,200,240; 235,215,160),
  kitchen (225,215,195; 150,105,75), night (25,30,70; 60,60,80), snow (200,220,240; 250,250,252),
  desert (245,205,150; 205,150,85), lake (175,215,235; 70,140,150), cave (95,85,75; 60,55,50).
* **Characters** (pronoun, colour, sprite in a 16x16 box): Ava (she, 230,30,40, filled circle),
  Bo (he, 30,70,230, filled square), Cleo (she, 250,220,20, filled triangle apex up), Dax (he,
  140,40,190, filled diamond), Eli (he, 255,140,0, plus sign whose arms are 6 px thick, i.e. the
  centre columns 5-10 and rows 5-10 of the box), Fay (she, 255,110,190, filled triangle apex down),
  Gus (he, 0,200,200, bar 8 wide and 16 tall, centred: box columns 4-11), Hana (she, 120,230,30,
  ring of outer radius 8 and hole radius 4).
* **Layout**: 1-3 characters per frame in distinct slots drawn at random among box left x = 6, 24,
  42 (the opt-in four-character variant puts four side by side at x = 0, 16, 32, 48; see
  :mod:`~storygptv.data.synthsv.sampling`). The box top is y = 36 (box 16x16) for standing, talking, laughing and waving, y = 24 for
  jumping; sitting squashes the box to 16 wide by 10 tall with top y = 42. Boxes are half-open
  ``[x1, x2) x [y1, y2)`` pixel ranges and never overlap.
* **Captions**: ``<subject> <is|are> <action>[ in the <background>].`` with subject ``A``,
  ``A and B``, ``A, B and C`` (or ``A, B, C and D`` in the four-character variant); actions standing, jumping, sitting, talking, laughing, waving.

Sprites are rasterised at pixel centres in box-normalised coordinates ``u, v`` in ``[-1, 1]``
(``u = (2x + 1 - w) / w``), with integer arithmetic so there is no floating-point ambiguity on
edges: circle ``u^2 + v^2 <= 1``; square: the whole box; triangle apex up ``2|u| <= v + 1``
(apex down ``2|u| <= 1 - v``); diamond ``|u| + |v| <= 1``; plus ``|u| <= 6/16 or |v| <= 6/16``;
bar ``|u| <= 1/2``; ring ``1/4 <= u^2 + v^2 <= 1``. A sitting sprite is the same shape rasterised in
the 16x10 box (vertically squashed).

How stories are drawn (caption order, set changes, referential captions, determinism and disjoint
splits) is fixed in :mod:`storygptv.data.synthsv.sampling`.

Datasets: :func:`load_synthsv` returns rows in the package's common story schema. The non-streaming
:class:`datasets.Dataset` stores the cheap spec columns (``images`` and ``segmentation`` hold null
placeholders) and renders frames in a format transform, so loading the 20,000 training stories
takes about 2.5 s of CPU (validation 0.15 s, test 0.3 s); ``ds[i]``, slicing, iteration and
``ds["images"]`` return PIL images (rendering costs about 1 ms per story of 4 frames). Replacing the
transform with ``ds.set_transform(fn)`` drops the rendering: compose instead, e.g.
``ds.set_transform(lambda b: fn(render_synthsv_batch(b)))``, or call :func:`materialize_synthsv` to
store real images (e.g. before ``push_to_hub``).

The package's ``__all__`` is its public API; the submodules are its layers:
:mod:`~storygptv.data.synthsv.spec` (the world as data), :mod:`~storygptv.data.synthsv.render`,
:mod:`~storygptv.data.synthsv.rng` (counter-based random numbers),
:mod:`~storygptv.data.synthsv.sampling`, :mod:`~storygptv.data.synthsv.story` and
:mod:`~storygptv.data.synthsv.dataset`.

Example:
    >>> story = sample_story(0, split="validation")
    >>> len(story.frames), story.captions[0] == story.frames[0].caption
    (4, True)
"""

from .dataset import load_synthsv, materialize_synthsv, synthsv_features
from .grammar import ParsedCaption, caption_prefix_validator, check_reference, parse_caption, story_prose
from .render import reference_images, render_frame, render_synthsv_batch
from .sampling import split_of_captions
from .spec import (
    ACTIONS,
    BACKGROUND_COLORS,
    BACKGROUNDS,
    CANVAS_SIZE,
    CHARACTER_COLORS,
    CHARACTERS,
    FOUR_SLOT_X,
    PRONOUNS,
    REFERENCE_GREY,
    SHAPES,
    SLOT_X,
    SPLIT_SIZES,
    SynthFrame,
    character_box,
    make_caption,
)
from .story import SynthStory, sample_stories, sample_story

__all__ = [
    "ACTIONS",
    "BACKGROUNDS",
    "BACKGROUND_COLORS",
    "CANVAS_SIZE",
    "CHARACTERS",
    "CHARACTER_COLORS",
    "FOUR_SLOT_X",
    "PRONOUNS",
    "ParsedCaption",
    "caption_prefix_validator",
    "REFERENCE_GREY",
    "SHAPES",
    "SLOT_X",
    "SPLIT_SIZES",
    "SynthFrame",
    "SynthStory",
    "character_box",
    "check_reference",
    "load_synthsv",
    "make_caption",
    "materialize_synthsv",
    "parse_caption",
    "reference_images",
    "render_frame",
    "render_synthsv_batch",
    "sample_stories",
    "sample_story",
    "split_of_captions",
    "story_prose",
    "synthsv_features",
]
