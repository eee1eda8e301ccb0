"""An LLM director: a story written as prose becomes a script of frames for :class:`StoryGPTVPipeline`.

"Ava and Bo went to the forest. They jumped over a log." -> one frame per beat, each with a caption, the
characters of the cast it shows, its setting and (optionally) a layout box per character. Any transformers
causal LM with a chat template writes the script as JSON; the answer is checked against a schema and the cast,
and a malformed answer is sent back with the error, up to ``max_retries`` times::

    director = StoryDirector.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
    script = director("Ava and Bo went to the forest. They jumped over a log.", cast=["Ava", "Bo"])
    images = pipe(script.captions, characters=refs).images

The JSON answer (:data:`SCRIPT_FORMAT`)::

    {"frames": [{"caption": "Ava and Bo are standing in the forest.", "characters": ["Ava", "Bo"],
                 "setting": "forest", "boxes": {"Ava": [0.1, 0.5, 0.4, 0.9], "Bo": [0.6, 0.5, 0.9, 0.9]}}]}

How the output is kept to JSON. By default (``constrained=True``) the code writes the JSON's structure and the
model only fills in the values: free text for the captions, a likelihood-ranked choice among the allowed
continuations for everything else (cast names, settings, frame count, box coordinates); see
:mod:`storygptv.script_decoding`. With ``constrained=False`` (or a ``generate_fn``), the model writes the whole
answer under cheap constraints that work with any model and tokenizer:

- the assistant turn is pre-filled with the opening of the object (``{"frames": [``), so the model starts
  inside the JSON;
- generation stops as soon as the first top-level object is closed (a string-aware brace count);
- the first complete object of the answer is parsed (text around it is ignored), then validated:
  ``frames`` a non-empty list (of ``num_frames`` frames when given), ``caption`` a non-empty string,
  ``characters`` names of the cast (matched case-insensitively, written as the cast spells them; cast
  members the caption names are added), ``setting`` a string or null (one of ``settings`` when given),
  ``boxes`` ``{name: [x1, y1, x2, y2]}`` of the frame's characters with ``0 <= x1 < x2 <= 1`` and likewise y.

Example:
    >>> answers = iter(['{"frames": [{"caption": "Zed waves.", "characters": ["Zed"]}]}',
    ...                 '{"frames": [{"caption": "Ava waves.", "characters": ["Ava"], "setting": "forest"}]}'])
    >>> director = StoryDirector(generate_fn=lambda messages: next(answers), max_retries=1)
    >>> script = director("Ava waved in the forest.", cast=["Ava", "Bo"])
    >>> script.captions, script.characters, script.settings, script.attempts
    (['Ava waves.'], [['Ava']], ['forest'], 2)
    >>> script.errors
    ["frames[0].characters[0]: 'Zed' is not in the cast ['Ava', 'Bo']"]
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "SCRIPT_FORMAT",
    "DirectorError",
    "ScriptValidationError",
    "StoryDirector",
    "StoryScript",
    "build_director_messages",
    "parse_story_script",
    "split_sentences",
]

#: The JSON the director asks for (shown to the model with the cast's own names).
SCRIPT_FORMAT = (
    '{"frames": [{"caption": "<one sentence that names the characters shown>", '
    '"characters": ["<names from the cast>"], "setting": "<where, or null>"}]}'
)
_BOXES_FORMAT = ', "boxes": {"<name>": [x1, y1, x2, y2]}'
#: The start of the answer written into the assistant turn before the model continues.
DEFAULT_PREFILL = '{"frames": ['

Box = tuple[float, float, float, float]
Messages = list[dict[str, str]]


class ScriptValidationError(ValueError):
    """One answer of the model is not a valid script; the message names the offending item."""


class DirectorError(ValueError):
    """No answer of the model was a valid script after all retries.

    Attributes:
        errors: the validation error of each answer, in order.
        answers: the answers, in order.
    """

    def __init__(self, message: str, errors: list[str], answers: list[str]) -> None:
        super().__init__(message)
        self.errors, self.answers = errors, answers


@dataclass
class StoryScript:
    """A story as frames: what :class:`~storygptv.pipelines.pipeline_storygptv.StoryGPTVPipeline` draws.

    Attributes:
        captions: one caption per frame (``pipe(script.captions, characters=...)``).
        characters: per frame, the names of the cast it shows (as the cast spells them).
        settings: per frame, its setting, or None.
        boxes: per frame, ``{name: (x1, y1, x2, y2)}`` in [0, 1] image coordinates; None when the answer gave
            no boxes at all.
        attempts: the answers the model needed (1: valid on the first try).
        errors: the validation errors of the rejected answers.
        answer: the accepted answer, as the model wrote it.

    Example:
        >>> script = StoryScript(["Ava waves."], [["Ava"]], ["forest"])
        >>> script.pipeline_inputs({"Ava": "ava.png", "Bo": "bo.png"})
        {'captions': ['Ava waves.'], 'characters': {'Ava': 'ava.png'}}
    """

    captions: list[str]
    characters: list[list[str]]
    settings: list[str | None]
    boxes: list[dict[str, Box]] | None = None
    attempts: int = 1
    errors: list[str] = field(default_factory=list)
    answer: str = ""

    def __len__(self) -> int:
        return len(self.captions)

    def pipeline_inputs(self, references: Mapping[str, Any]) -> dict[str, Any]:
        """``{"captions", "characters"}`` for ``pipe(**script.pipeline_inputs(references))``: the reference
        images of the characters the script shows (a character without a reference is a clear error)."""
        used = list(dict.fromkeys(name for frame in self.characters for name in frame))
        missing = [name for name in used if name not in references]
        if missing:
            raise KeyError(
                f"The script shows {missing} but `references` has no image for them; pass a reference image "
                f"for every cast member (given: {sorted(references)})."
            )
        return {"captions": list(self.captions), "characters": {name: references[name] for name in used}}


# ---------------------------------------------------------------------------------------------- prompt
def split_sentences(story: str) -> list[str]:
    """The sentences of ``story``: split after ``.``, ``!`` or ``?`` and white space, but not after a title
    (Mr., Mrs., Ms., Dr., St., Prof., Jr., Sr.) or an initial ("J. Smith").

    Example:
        >>> split_sentences("Ava and Bo went to the forest. They jumped!  Bo laughed.")
        ['Ava and Bo went to the forest.', 'They jumped!', 'Bo laughed.']
        >>> split_sentences("Fred met Mr. Slate at the quarry. They talked.")
        ['Fred met Mr. Slate at the quarry.', 'They talked.']
    """
    parts = re.split(r"(?<=[.!?])\s+", story.strip())
    sentences: list[str] = []
    for part in parts:
        if sentences and _NOT_A_SENTENCE_END.search(sentences[-1]):
            sentences[-1] += " " + part
        else:
            sentences.append(part)
    return [sentence.strip() for sentence in sentences if sentence.strip()]


#: Words whose final period does not end a sentence: titles and single-letter initials.
_NOT_A_SENTENCE_END = re.compile(r"(?:^|\s)(?:Mr|Mrs|Ms|Dr|St|Prof|Jr|Sr|[A-Z])\.$")


def _cast_names(cast: Iterable[str] | Mapping[str, Any]) -> list[str]:
    names = list(cast.keys() if isinstance(cast, Mapping) else cast)
    if not names or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(
            f"`cast` must name at least one character (a list of names, or a dict of reference images), got "
            f"{names!r}."
        )
    return names


#: The worked example shown to the model before the story (its names are not in any cast on purpose: the
#: model must take the names from the cast, not from the example).
EXAMPLE_STORY = "Nia and Tom walked to the beach. They sat down. Tom laughed."
EXAMPLE_FRAMES: list[dict[str, Any]] = [
    {"caption": "Nia and Tom are walking on the beach.", "characters": ["Nia", "Tom"], "setting": "beach"},
    {"caption": "Nia and Tom are sitting on the beach.", "characters": ["Nia", "Tom"], "setting": "beach"},
    {"caption": "Tom is laughing.", "characters": ["Tom"], "setting": "beach"},
]
_EXAMPLE_BOXES = [
    {"Nia": [0.1, 0.5, 0.4, 0.9], "Tom": [0.6, 0.5, 0.9, 0.9]},
    {"Nia": [0.1, 0.6, 0.4, 0.9], "Tom": [0.6, 0.6, 0.9, 0.9]},
    {"Tom": [0.35, 0.5, 0.65, 0.9]},
]


def _request(story: str, cast: Sequence[str], settings: Sequence[str] | None, frames: str) -> str:
    lines = [
        f"Cast: {', '.join(cast)}.",
        *([f"Settings: {', '.join(settings)} (or null)."] if settings else []),
        f"Frames: {frames}.",
        f"Story: {story.strip()}",
    ]
    return "\n".join(lines)


def build_director_messages(
    story: str,
    cast: Sequence[str],
    settings: Sequence[str] | None = None,
    num_frames: int | None = None,
    with_boxes: bool = False,
    with_sentences: bool = False,
) -> Messages:
    """The chat messages that ask a model for the script of ``story``: the instructions (system), a worked
    example (:data:`EXAMPLE_STORY`, a user and an assistant turn), then the story (user). With
    ``with_sentences``, each frame of the example starts with the sentence it draws (``"sentence"``), as the
    constrained decoder writes them.

    Example:
        >>> messages = build_director_messages("Ava waved.", ["Ava", "Bo"], num_frames=1)
        >>> [m["role"] for m in messages], "Cast: Ava, Bo." in messages[-1]["content"]
        (['system', 'user', 'assistant', 'user'], True)
    """
    system = (
        "You are a storyboard director. You split a story into frames for an illustrator: one frame per "
        "sentence. For each frame write a short caption in the present tense that names its characters, the "
        "characters shown (only names from the cast) and the setting (null if unknown)."
        + (
            " Also give each character a box [x1, y1, x2, y2] with coordinates between 0 and 1."
            if with_boxes
            else ""
        )
        + " Answer with one JSON object and nothing else, in this format: "
        + SCRIPT_FORMAT.replace("}]}", (_BOXES_FORMAT if with_boxes else "") + "}]}")
    )
    example_frames = [
        {
            **({"sentence": sentence} if with_sentences else {}),
            **frame,
            **({"boxes": boxes} if with_boxes else {}),
        }
        for sentence, frame, boxes in zip(split_sentences(EXAMPLE_STORY), EXAMPLE_FRAMES, _EXAMPLE_BOXES)
    ]
    example_settings = ["beach", "park"] if settings else None
    frames = "one per sentence" if num_frames is None else f"exactly {num_frames}"
    example_count = "one per sentence" if num_frames is None else "exactly 3"
    return [
        {"role": "system", "content": system},
        {
            "role": "user",
            "content": _request(EXAMPLE_STORY, ["Nia", "Tom"], example_settings, example_count),
        },
        {"role": "assistant", "content": json.dumps({"frames": example_frames})},
        {"role": "user", "content": _request(story, cast, settings, frames)},
    ]


def retry_message(error: str) -> dict[str, str]:
    """The user turn that sends a validation error back to the model."""
    return {
        "role": "user",
        "content": f"That answer is not valid: {error}. Answer again with the corrected JSON object only.",
    }


# ---------------------------------------------------------------------------------------------- parsing
def json_object_end(text: str, start: int = 0) -> int | None:
    """Index just after the first complete top-level JSON object of ``text[start:]`` (None if not closed).

    Braces inside strings (with escapes) do not count.

    Example:
        >>> json_object_end('x {"a": "}"} y')
        12
    """
    begin = text.find("{", start)
    if begin < 0:
        return None
    depth, in_string, escaped = 0, False, False
    for i in range(begin, len(text)):
        char = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _extract_json(answer: str) -> Any:
    begin = answer.find("{")
    if begin < 0:
        raise ScriptValidationError(f"the answer is not JSON (no '{{' in {answer[:80]!r})")
    end = json_object_end(answer, begin)
    if end is None:
        raise ScriptValidationError(
            "the answer is not JSON: the object is never closed (a missing '}' or ']')"
        )
    try:
        return json.loads(answer[begin:end])
    except json.JSONDecodeError as err:
        raise ScriptValidationError(f"the answer is not JSON: {err.msg} at character {err.pos}") from None


def _canonical(name: Any, cast: Sequence[str], where: str) -> str:
    if not isinstance(name, str):
        raise ScriptValidationError(f"{where}: must be a name (a string), got {name!r}")
    by_key = {n.casefold(): n for n in cast}
    found = by_key.get(name.strip().casefold())
    if found is None:
        raise ScriptValidationError(f"{where}: {name!r} is not in the cast {list(cast)}")
    return found


def _box(value: Any, where: str) -> Box:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 4
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        raise ScriptValidationError(f"{where}: must be [x1, y1, x2, y2] (four numbers), got {value!r}")
    x1, y1, x2, y2 = (float(v) for v in value)
    if not all(0.0 <= v <= 1.0 for v in (x1, y1, x2, y2)):
        raise ScriptValidationError(f"{where}: {list(value)} is out of [0, 1]")
    if not (x1 < x2 and y1 < y2):
        raise ScriptValidationError(f"{where}: {list(value)} needs x1 < x2 and y1 < y2")
    return (x1, y1, x2, y2)


def parse_story_script(
    answer: str,
    cast: Sequence[str] | Mapping[str, Any],
    settings: Sequence[str] | None = None,
    num_frames: int | None = None,
    with_boxes: bool = False,
) -> StoryScript:
    """Parse and validate one answer of the model (see the module doc for the rules).

    Raises:
        ScriptValidationError: naming the offending item, e.g. ``frames[1].boxes['Bo']: [0.2, 0.1, 1.4, 0.9]
        is out of [0, 1]``.

    Example:
        >>> parse_story_script('{"frames": [{"caption": "They jump.", "characters": ["ava", "Bo"]}]}',
        ...                    cast=["Ava", "Bo"]).characters
        [['Ava', 'Bo']]
    """
    from .characters import find_character_mentions

    cast = _cast_names(cast)
    data = _extract_json(answer)
    if not isinstance(data, dict) or "frames" not in data:
        raise ScriptValidationError('the answer must be an object with a "frames" list')
    frames = data["frames"]
    if not isinstance(frames, list) or not frames:
        raise ScriptValidationError('"frames" must be a non-empty list of frames')
    if num_frames is not None and len(frames) != num_frames:
        raise ScriptValidationError(f'"frames" has {len(frames)} frames; exactly {num_frames} are needed')
    known_settings = {s.casefold(): s for s in settings or []}
    captions, characters, scene, boxes, any_boxes = [], [], [], [], False
    for i, frame in enumerate(frames):
        where = f"frames[{i}]"
        if not isinstance(frame, dict):
            raise ScriptValidationError(f"{where}: must be an object with a caption, got {frame!r}")
        caption = frame.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise ScriptValidationError(f"{where}.caption: must be a non-empty string, got {caption!r}")
        listed = frame.get("characters", [])
        if not isinstance(listed, list):
            raise ScriptValidationError(f"{where}.characters: must be a list of names, got {listed!r}")
        names = [_canonical(n, cast, f"{where}.characters[{j}]") for j, n in enumerate(listed)]
        names += [m.name for m in find_character_mentions(caption, cast)]  # named in the caption
        names = list(dict.fromkeys(names))
        setting = frame.get("setting")
        if setting is not None:
            if not isinstance(setting, str):
                raise ScriptValidationError(f"{where}.setting: must be a string or null, got {setting!r}")
            setting = setting.strip() or None
            if setting is not None and known_settings:
                if setting.casefold() not in known_settings:
                    raise ScriptValidationError(
                        f"{where}.setting: {setting!r} is not one of {list(settings or [])} (or null)"
                    )
                setting = known_settings[setting.casefold()]
        frame_boxes = frame.get("boxes")
        parsed_boxes: dict[str, Box] = {}
        if frame_boxes is not None:
            any_boxes = True
            if not isinstance(frame_boxes, dict):
                raise ScriptValidationError(
                    f"{where}.boxes: must be an object {{name: [x1, y1, x2, y2]}}, got {frame_boxes!r}"
                )
            for name, value in frame_boxes.items():
                canonical = _canonical(name, cast, f"{where}.boxes[{name!r}]")
                if canonical not in names:
                    raise ScriptValidationError(
                        f"{where}.boxes[{name!r}]: {canonical!r} is not among the frame's characters {names}"
                    )
                parsed_boxes[canonical] = _box(value, f"{where}.boxes[{name!r}]")
        if with_boxes:
            missing = [n for n in names if n not in parsed_boxes]
            if missing:
                raise ScriptValidationError(f"{where}.boxes: no box for {missing}")
        captions.append(caption.strip())
        characters.append(names)
        scene.append(setting)
        boxes.append(parsed_boxes)
    return StoryScript(captions, characters, scene, boxes if any_boxes else None, answer=answer)


# ---------------------------------------------------------------------------------------------- director
class StoryDirector:
    """Writes a :class:`StoryScript` from prose with a chat LLM, retrying malformed answers.

    Args:
        model: any transformers causal LM (``AutoModelForCausalLM``); its tokenizer needs a chat template.
        tokenizer: the model's tokenizer.
        generate_fn: instead of ``model`` / ``tokenizer``, a function ``messages -> answer text`` (another
            backend, or scripted answers in tests).
        max_retries: answers sent back with their error before giving up (``0``: one try).
        max_new_tokens: the longest answer (unconstrained only; a constrained caption is at most
            ``max_caption_tokens``).
        generation_kwargs: more ``model.generate`` arguments of the first try (default greedy:
            ``{"do_sample": False}``).
        retry_generation_kwargs: those of the retries (default: sampling, ``{"do_sample": True, "temperature":
            0.7, "top_p": 0.9}``, so that a retry is not the greedy answer again; seed torch for reproducibility). With ``constrained``, they drive the
            captions, and a ``temperature`` with ``do_sample`` also samples the choices (names, settings, boxes).
        prefill: the start of the answer written into the assistant turn (``""``: none; unconstrained only).
        constrained: write the JSON's structure in code and let the model fill in the values
            (:class:`~storygptv.script_decoding.ScriptDecoder`): the answer is always JSON of the right shape
            with names from the cast. ``False``: the model writes the whole answer (:meth:`generate`).
        max_caption_tokens: with ``constrained``, the longest caption in tokens.

    Example:
        >>> director = StoryDirector(generate_fn=lambda m: '{"frames": [{"caption": "Bo sits."}]}')
        >>> director("Bo sat down.", cast=["Ava", "Bo"]).characters
        [['Bo']]
    """

    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = None,
        *,
        generate_fn: Callable[[Messages], str] | None = None,
        max_retries: int = 2,
        max_new_tokens: int = 512,
        generation_kwargs: Mapping[str, Any] | None = None,
        retry_generation_kwargs: Mapping[str, Any] | None = None,
        prefill: str = DEFAULT_PREFILL,
        constrained: bool = True,
        max_caption_tokens: int = 40,
    ) -> None:
        if generate_fn is None and (model is None or tokenizer is None):
            raise ValueError(
                "Pass a causal LM and its tokenizer (`StoryDirector(model, tokenizer)`, or "
                "`StoryDirector.from_pretrained(name)`), or a `generate_fn(messages) -> str`."
            )
        if generate_fn is not None and model is not None:
            raise ValueError("Pass either `model` / `tokenizer` or `generate_fn`, not both.")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"`max_retries` must be an integer >= 0, got {max_retries!r}.")
        if max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be >= 1, got {max_new_tokens!r}.")
        if tokenizer is not None and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "The tokenizer has no chat template; use an instruct model, or set `tokenizer.chat_template` "
                "to a Jinja template that writes the messages."
            )
        self.model, self.tokenizer, self.generate_fn = model, tokenizer, generate_fn
        self.max_retries, self.max_new_tokens, self.prefill = max_retries, max_new_tokens, prefill
        self.constrained = constrained
        self.decoder = None
        if model is not None and constrained:
            from .script_decoding import ScriptDecoder

            self.decoder = ScriptDecoder(model, tokenizer, max_caption_tokens=max_caption_tokens)
        self.generation_kwargs = {"do_sample": False, **(generation_kwargs or {})}
        self.retry_generation_kwargs = dict(
            retry_generation_kwargs
            if retry_generation_kwargs is not None
            else {"do_sample": True, "temperature": 0.7, "top_p": 0.9}
        )
        if constrained and model is not None:
            # the decoder sets these itself: a caption ends at its closing quote or after max_caption_tokens
            owned = {"max_new_tokens", "stopping_criteria", "pad_token_id"}
            clash = sorted(owned & {*self.generation_kwargs, *self.retry_generation_kwargs})
            if clash:
                raise ValueError(
                    f"With `constrained=True` the decoder sets {clash} itself; remove them from "
                    "`generation_kwargs` / `retry_generation_kwargs` (`max_caption_tokens` bounds a caption)."
                )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        gguf_file: str | None = None,
        director_kwargs: Mapping[str, Any] | None = None,
        **model_kwargs: Any,
    ) -> StoryDirector:
        """Load a chat model and its tokenizer (``gguf_file``: a GGUF checkpoint in that folder or repo).

        Example:
            >>> director = StoryDirector.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")  # doctest: +SKIP
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        extra = {"gguf_file": gguf_file} if gguf_file is not None else {}
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **extra)
        model = AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, **extra, **model_kwargs)
        return cls(model.eval(), tokenizer, **dict(director_kwargs or {}))

    # ------------------------------------------------------------------ generation
    def generate(self, messages: Messages, retry: bool = False) -> str:
        """The model's answer to ``messages`` (with the pre-filled start, which is part of the answer);
        ``retry`` uses ``retry_generation_kwargs``."""
        if self.generate_fn is not None:
            return self.generate_fn(messages)
        from .script_decoding import generate_until

        tokenizer, prefill = self.tokenizer, self.prefill
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + prefill

        def json_closed(text: str) -> bool:
            """The first top-level object of the answer is closed."""
            text = prefill + text
            return text.lstrip().startswith("{") and json_object_end(text) is not None

        kwargs = self.retry_generation_kwargs if retry else self.generation_kwargs
        return prefill + generate_until(
            self.model, tokenizer, prompt, json_closed, self.max_new_tokens, kwargs
        )

    # ------------------------------------------------------------------ call
    def __call__(
        self,
        story: str,
        cast: Sequence[str] | Mapping[str, Any],
        *,
        settings: Sequence[str] | None = None,
        num_frames: int | None = None,
        with_boxes: bool = False,
    ) -> StoryScript:
        """The script of ``story``.

        Args:
            story: the story as prose.
            cast: the characters allowed (names, or the ``{name: reference image}`` dict given to the pipeline).
            settings: the settings allowed (None: any).
            num_frames: the number of frames wanted. None: one per sentence (:func:`split_sentences`); the
                constrained decoder then writes exactly that many, an unconstrained model decides.
            with_boxes: ask for (and require) a layout box per character of every frame.

        Raises:
            DirectorError: no valid answer after ``max_retries`` retries; its message names the offending item
                of the last answer, ``.errors`` / ``.answers`` hold every try.
        """
        if not isinstance(story, str) or not story.strip():
            raise ValueError(f"`story` must be a non-empty string of prose, got {story!r}.")
        if num_frames is not None and (
            isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1
        ):
            raise ValueError(f"`num_frames` must be None or an integer >= 1, got {num_frames!r}.")
        names = _cast_names(cast)
        # The constrained decoder writes each frame's sentence before the model's caption when the frames are
        # the sentences: a small model then rewrites the sentence in front of it instead of recalling the story.
        sentences = split_sentences(story) if self.decoder is not None else []
        if num_frames is not None and num_frames != len(sentences):
            sentences = []
        messages = build_director_messages(story, names, settings, num_frames, with_boxes, bool(sentences))
        errors: list[str] = []
        answers: list[str] = []
        for _ in range(self.max_retries + 1):
            retry = bool(answers)
            if self.decoder is not None:
                answer = self.decoder.write(
                    messages,
                    names,
                    settings,
                    num_frames,
                    with_boxes,
                    self.retry_generation_kwargs if retry else self.generation_kwargs,
                    sentences=sentences or None,
                )
            else:
                answer = self.generate(messages, retry=retry)
            answers.append(answer)
            try:
                script = parse_story_script(answer, names, settings, num_frames, with_boxes)
            except ScriptValidationError as err:
                errors.append(str(err))
                messages = [*messages, {"role": "assistant", "content": answer}, retry_message(str(err))]
                continue
            script.attempts, script.errors = len(answers), errors
            return script
        raise DirectorError(
            f"The director's model gave no valid script in {len(answers)} tries; the last answer: {errors[-1]}. "
            "Raise `max_retries`, use a larger instruct model, or simplify the story.",
            errors,
            answers,
        )
