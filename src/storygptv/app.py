"""A Gradio demo of StoryGPT-V: type a story, pick or upload its characters, watch the frames arrive.

Run it with::

    pip install -e ".[demo]"
    python -m storygptv.app                      # the embedded default model, on http://127.0.0.1:7860
    python -m storygptv.app --model ./my-pipeline --host 0.0.0.0 --port 8080

As a Hugging Face Space (``sdk: gradio``), the Space's ``app.py`` is ``from storygptv.app import main; main()``
(Spaces set ``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT``, which the defaults follow). The page is also the
module attribute ``demo`` (a ``gradio.Blocks`` built on first access for the default model, or for the model
in ``STORYGPTV_MODEL``), for ``gradio`` reload mode or to embed in a larger app.

Importing this module imports neither Gradio nor torch; without Gradio, running it says what to install.
The pipeline is loaded once (in the background as the server starts, or at the first request) and shared by
every request; requests are drawn one at a time.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import html
import io
import math
import os
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["EXAMPLE_STORY", "InputError", "StoryApp", "StoryRequest", "build_demo", "main"]

#: The story the page opens with (the default model's SynthSV world).
EXAMPLE_STORY = "Ava and Bo are standing in the forest.\nThey are jumping.\nCleo is waving in the forest."
EXAMPLES = [
    EXAMPLE_STORY,
    "Dax is sitting on the beach.\nHe is laughing.\nFay and Dax are talking on the beach.",
    "Hana and Gus are walking in the snow.\nThey are waving.\nShe is jumping.",
]
DEFAULT_SEED = 0
DEFAULT_STEPS = 30
MAX_STEPS = 100
#: The longest story the page draws in one go.
MAX_FRAMES = 16
INSTALL_HINT = 'the demo needs Gradio, which is not installed; run: pip install "storygptv[demo]"'

# The names of the page's fields, as the error messages name them.
STORY_FIELD = "Story"
CAST_FIELD = "Characters from the model's cast"
UPLOAD_FIELD = "Your character's reference image"
NAME_FIELD = "Your character's name"
SEED_FIELD = "Seed"
STEPS_FIELD = "Denoising steps"

CSS = "#frames img, #storyboard img { image-rendering: pixelated; }"


def _import_gradio() -> Any:
    try:
        import gradio
    except ImportError as error:
        raise ImportError(f"storygptv.app: {INSTALL_HINT}") from error
    return gradio


class InputError(ValueError):
    """A problem with one field of the page; the message names the field."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


@dataclass
class StoryRequest:
    """A checked request: the captions, the chosen reference images, seed, steps and notes for the user."""

    captions: list[str]
    characters: dict[str, Any]
    seed: int
    steps: int
    notes: list[str] = field(default_factory=list)


def _whole_number(value: Any, field: str, low: int, high: int | None = None) -> int:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise InputError(field, "is empty; enter a whole number.")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(field, f"{value!r} is not a number; enter a whole number.") from None
    if not math.isfinite(number) or not number.is_integer():
        raise InputError(field, f"{value!r} is not a whole number.")
    if number < low or (high is not None and number > high):
        limits = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise InputError(field, f"{int(number)} is out of range; enter a whole number {limits}.")
    return int(number)


def parse_story(story: str | None) -> list[str]:
    """The captions of the story box: one per non-empty line (lines starting with # are comments)."""
    lines = [line.strip() for line in (story or "").splitlines()]
    captions = [line for line in lines if line and not line.startswith("#")]
    if not captions:
        raise InputError(
            STORY_FIELD, f"is empty; write one caption per line, such as: {EXAMPLE_STORY.splitlines()[0]}"
        )
    if len(captions) > MAX_FRAMES:
        raise InputError(
            STORY_FIELD,
            f"has {len(captions)} captions; this page draws at most {MAX_FRAMES} frames at a time.",
        )
    return captions


def check_request(
    story: str | None,
    selected: Sequence[str] | None,
    upload: str | Path | None,
    upload_name: str | None,
    seed: Any,
    steps: Any,
    cast: dict[str, Any],
) -> StoryRequest:
    """Check every field of the page before anything is drawn; an :class:`InputError` names the field."""
    from .characters import find_character_mentions, load_character_image

    captions = parse_story(story)
    unknown = [name for name in selected or [] if name not in cast]
    if unknown:
        raise InputError(CAST_FIELD, f"{unknown} are not in the model's cast ({', '.join(cast) or 'none'}).")
    characters = {name: cast[name] for name in selected or []}
    notes = []
    name = (upload_name or "").strip()
    if upload and not name:
        raise InputError(NAME_FIELD, "is empty; give the name the story uses for the uploaded character.")
    if name and not upload:
        raise InputError(UPLOAD_FIELD, f"is missing; upload a picture of {name}, or clear the name.")
    if upload:
        file_name = Path(upload).name
        try:
            image = load_character_image(Path(upload), name)
        except (OSError, TypeError, ValueError) as error:
            if isinstance(error.__cause__, OSError):  # not an image file at all (or a truncated one)
                problem = (
                    f"{file_name!r} is not an image that can be read; upload a PNG or JPEG picture of {name}."
                )
            else:  # an image, but not a usable one (too large, empty, ...): the library's message says why
                problem = str(error).replace(str(upload), file_name)
            raise InputError(UPLOAD_FIELD, problem) from error
        if name in cast:
            notes.append(f"Your picture of {name} replaces the cast's {name}.")
        characters[name] = image
        if not any(find_character_mentions(caption, [name]) for caption in captions):
            notes.append(f"{name} is not named in the story, so the uploaded picture is not used.")
    seed = _whole_number(seed, SEED_FIELD, 0, 2**63 - 1)
    steps = _whole_number(steps, STEPS_FIELD, 1, MAX_STEPS)
    return StoryRequest(captions, characters, seed, steps, notes)


def _drawn_text(captions: Sequence[str], drawn: Sequence[str]) -> str:
    """One numbered line per frame: the caption as drawn, and the caption as written when it differs."""
    lines = []
    for number, (caption, resolved) in enumerate(zip(captions, drawn), start=1):
        lines.append(f"{number}. {resolved}" + (f'   (written: "{caption}")' if resolved != caption else ""))
    return "\n".join(lines)


def _cast_strip(cast: dict[str, Any], size: int = 48) -> str:
    """The cast's reference pictures in a row, each with its name (HTML with inline PNGs)."""
    figures = []
    for name, image in cast.items():
        thumbnail = image.copy()
        thumbnail.thumbnail((2 * size, 2 * size))
        png = io.BytesIO()
        thumbnail.save(png, format="PNG")
        source = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode("ascii")
        figures.append(
            f'<figure style="margin:0;text-align:center"><img src="{source}" alt="{html.escape(name)}" '
            f'width="{size}" height="{size}" style="image-rendering:pixelated;border-radius:4px">'
            f'<figcaption style="font-size:smaller">{html.escape(name)}</figcaption></figure>'
        )
    return f'<div style="display:flex;flex-wrap:wrap;gap:8px">{"".join(figures)}</div>'


class _Stopped(Exception):
    """Raised inside the pipeline's step callback when the page stops listening (the user left)."""


class StoryApp:
    """The demo's state: the model, its cast, and the pipeline (loaded once, shared by every request)."""

    def __init__(self, model: str | None = None, device: str | None = None) -> None:
        from . import DEFAULT_MODEL

        self.model = str(model or DEFAULT_MODEL)
        self.device = device
        self._pipe: Any = None
        self._load_lock = threading.Lock()
        self._run_lock = threading.Lock()
        self._cast: dict[str, Any] | None = None

    @property
    def cast(self) -> dict[str, Any]:
        """``{name: reference image}`` of the model's ``characters/`` folder (empty when it ships none)."""
        if self._cast is None:
            from .characters import load_cast

            try:
                self._cast = load_cast(self.model)
            except FileNotFoundError:
                self._cast = {}
        return self._cast

    def pipeline(self) -> Any:
        """The pipeline, loaded on first use (float16 on CUDA, float32 otherwise)."""
        with self._load_lock:
            if self._pipe is None:
                import torch

                from .cli import check_device
                from .pipelines.pipeline_storygptv import StoryGPTVPipeline

                device = check_device(self.device)
                dtype = torch.float16 if device.startswith("cuda") else torch.float32
                pipe = StoryGPTVPipeline.from_pretrained(self.model, dtype=dtype).to(device)
                pipe.set_progress_bar_config(disable=True)
                self._pipe = pipe
            return self._pipe

    def preload(self) -> threading.Thread:
        """Load the pipeline in a background thread (a failure is reported again at the first request)."""

        def load() -> None:
            try:
                self.pipeline()
            except BaseException as error:  # reported to the user by the request that needs the pipeline
                print(f"storygptv.app: the model could not be loaded yet: {error}", flush=True)

        thread = threading.Thread(target=load, name="storygptv-preload", daemon=True)
        thread.start()
        return thread

    def _used_cast(self, pipe: Any, request: StoryRequest) -> dict[str, Any]:
        """The chosen characters the story can show: those it names, and (when the story model resolves
        pronouns to characters) those it can resolve."""
        from .characters import find_character_mentions

        config = pipe.story_model.config
        resolvable = set(config.grounding_characters or []) if config.has_grounding_head else set()
        return {
            name: image
            for name, image in request.characters.items()
            if name in resolvable or any(find_character_mentions(c, [name]) for c in request.captions)
        }

    def stream(self, request: StoryRequest) -> Iterator[tuple[str, Any]]:
        """Draw ``request`` in a worker thread; yields ``("frame", image)`` as each frame finishes, then
        ``("done", output)`` or ``("error", exception)``. Closing the iterator stops the drawing."""
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        stop = threading.Event()

        def on_step(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if stop.is_set():
                raise _Stopped
            return kwargs

        def work() -> None:
            try:
                import torch

                with self._run_lock:
                    pipe = self.pipeline()
                    output = pipe(
                        request.captions,
                        characters=self._used_cast(pipe, request) or None,
                        num_inference_steps=request.steps,
                        generator=torch.Generator(pipe.device).manual_seed(request.seed),
                        callback_on_step_end=on_step,
                        callback_on_frame_end=lambda pipe, index, image: events.put(("frame", image)),
                    )
                events.put(("done", output))
            except BaseException as error:
                events.put(("error", error))

        worker = threading.Thread(target=work, name="storygptv-draw", daemon=True)
        worker.start()
        try:
            while True:
                kind, value = events.get()
                yield kind, value
                if kind != "frame":
                    return
        finally:
            stop.set()

    def draw(
        self,
        story: str | None,
        selected: Sequence[str] | None,
        upload: str | None,
        upload_name: str | None,
        seed: Any,
        steps: Any,
    ) -> Iterator[tuple[list[tuple[Any, str]], Any, str, str]]:
        """The page's event: yields ``(frames, storyboard, captions as drawn, status)`` once per finished
        frame, then with the storyboard. A bad field or a failure clears every output and says why."""
        start = time.perf_counter()
        try:
            request = check_request(story, selected, upload, upload_name, seed, steps, self.cast)
        except InputError as error:
            yield self._failed(str(error))
            return
        frames: list[tuple[Any, str]] = []
        total = len(request.captions)
        yield frames, None, "", f"Drawing frame 1 of {total}..."
        for kind, value in self.stream(request):
            if kind == "frame":
                frames = [*frames, (value, request.captions[len(frames)])]
                more = f"drawing frame {len(frames) + 1} of {total}..." if len(frames) < total else "done"
                yield frames, None, "", f"Frame {len(frames)} of {total} finished; {more}"
            elif kind == "error":
                if isinstance(value, OSError | SystemExit):  # the model folder, Hub id or device
                    yield self._failed(f"The model {self.model!r} could not be loaded: {value}")
                    return
                if not isinstance(value, Exception):
                    raise value
                # The pipeline's checks name the argument; anything else is named by its type.
                plain = isinstance(value, ValueError | TypeError)
                yield self._failed(
                    f"The story could not be drawn: {'' if plain else type(value).__name__ + ': '}{value}"
                )
                return
            else:
                from .storyboard import make_storyboard

                output = value
                storyboard = make_storyboard(output.images, request.captions)
                frames = [(image, caption) for image, caption in zip(output.images, output.captions)]
                status = (
                    f"Drew {total} frame{'s' * (total != 1)} in {time.perf_counter() - start:.1f} s "
                    f"(seed {request.seed}, {request.steps} steps)."
                )
                yield (
                    frames,
                    storyboard,
                    _drawn_text(request.captions, output.captions),
                    " ".join([status, *request.notes]),
                )

    @staticmethod
    def _failed(message: str) -> tuple[list[Any], None, str, str]:
        """Every output cleared (nothing half-drawn), the message in the status box and a pop-up."""
        with contextlib.suppress(ImportError):  # called outside the page: no pop-up
            _import_gradio().Warning(message)
        return [], None, "", f"**Error.** {message}"

    def build(self) -> Any:
        """The page, a ``gradio.Blocks`` (not launched)."""
        gr = _import_gradio()
        from . import DEFAULT_MODEL
        from .cli import DEFAULT_MODEL_LIMITS

        cast = self.cast
        names = list(cast)
        about = (
            "Write a story, one caption per line: later captions may use pronouns (*They*, *She*), which the "
            "story model resolves. Pick the characters, press **Draw the story**, and the frames appear as "
            "they finish, then the storyboard and the captions as drawn."
        )
        with gr.Blocks(
            title="StoryGPT-V", analytics_enabled=os.environ.get("GRADIO_ANALYTICS_ENABLED") == "True"
        ) as demo:
            gr.Markdown(f"# StoryGPT-V: consistent story visualisation\n{about}")
            with gr.Row():
                with gr.Column(scale=1):
                    story = gr.Textbox(
                        value=EXAMPLE_STORY, lines=5, max_lines=MAX_FRAMES, label=STORY_FIELD, elem_id="story"
                    )
                    gr.Examples(examples=[[example] for example in EXAMPLES], inputs=[story], label="Stories")
                    selected = gr.CheckboxGroup(choices=names, value=names, label=CAST_FIELD, elem_id="cast")
                    if cast:
                        gr.HTML(_cast_strip(cast), elem_id="cast-pictures")
                    with gr.Row():
                        upload = gr.File(label=UPLOAD_FIELD, type="filepath", height=120, elem_id="upload")
                        upload_name = gr.Textbox(
                            label=NAME_FIELD, placeholder="e.g. Zed", elem_id="upload-name"
                        )
                    with gr.Row():
                        seed = gr.Number(
                            value=DEFAULT_SEED, precision=0, minimum=0, label=SEED_FIELD, elem_id="seed"
                        )
                        steps = gr.Slider(
                            1, MAX_STEPS, value=DEFAULT_STEPS, step=1, label=STEPS_FIELD, elem_id="steps"
                        )
                    button = gr.Button("Draw the story", variant="primary", elem_id="draw")
                with gr.Column(scale=2):
                    status = gr.Markdown("Ready.", elem_id="status")
                    frames = gr.Gallery(
                        label="Frames (as they finish)",
                        columns=4,
                        height=280,
                        allow_preview=False,
                        format="png",
                        elem_id="frames",
                    )
                    storyboard = gr.Image(
                        label="Storyboard", type="pil", format="png", interactive=False, elem_id="storyboard"
                    )
                    drawn = gr.Textbox(
                        label="Captions as drawn (pronouns resolved)",
                        lines=3,
                        interactive=False,
                        elem_id="drawn",
                    )
            if self.model == DEFAULT_MODEL:
                gr.Markdown(f"```\n{DEFAULT_MODEL_LIMITS}\n```")
            else:
                gr.Markdown(f"Model: `{self.model}`")
            button.click(
                self.draw,
                inputs=[story, selected, upload, upload_name, seed, steps],
                outputs=[frames, storyboard, drawn, status],
                concurrency_limit=1,
            )
        return demo


def build_demo(model: str | None = None, device: str | None = None) -> Any:
    """The demo page for ``model`` (default: the embedded model), a ``gradio.Blocks`` to ``launch()``."""
    return StoryApp(model, device).build()


def __getattr__(name: str) -> Any:
    if name == "demo":  # built on first access, so that importing the module needs no Gradio
        value = build_demo(os.environ.get("STORYGPTV_MODEL") or None)
        globals()["demo"] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m storygptv.app",
        description="A web page (Gradio) to draw stories with StoryGPT-V: the frames appear as they finish, "
        "then the storyboard.",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="a StoryGPTVPipeline folder or Hub id (default: the embedded model)",
    )
    parser.add_argument(
        "--host",
        default=None,
        help="address to listen on, e.g. 0.0.0.0 for every interface (default: $GRADIO_SERVER_NAME or 127.0.0.1)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help="port (default: $GRADIO_SERVER_PORT or the first free from 7860)",
    )
    parser.add_argument(
        "--share", action="store_true", help="also open a temporary public link through Gradio's servers"
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda when available)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _import_gradio()
    except ImportError as error:
        raise SystemExit(f"error: {error}") from None
    from .cli import check_device, check_model_folder

    app = StoryApp(args.model, args.device)
    check_model_folder(app.model)  # one clear line for a missing or broken folder, before the server starts
    app.device = check_device(args.device)
    app.preload()
    demo = app.build()
    demo.queue().launch(server_name=args.host, server_port=args.port, share=args.share, css=CSS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
