"""The demo app (``python -m storygptv.app``): its checks of the page's fields, its frame-by-frame stream, and
the page itself driven in a real headless Chromium through selenium.

The browser test needs Gradio and selenium (``pip install -e ".[demo]"``) and Debian's ``chromium`` and
``chromium-driver``; without them it is skipped, saying what is missing. It saves a screenshot of the page
to the path in ``STORYGPTV_DEMO_SCREENSHOT`` (``docs/demo.png`` to refresh the README's picture), else to
pytest's temporary folder.
"""

from __future__ import annotations

import importlib.util
import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

import storygptv
from storygptv import app

REPO = Path(__file__).resolve().parents[1]
STORY = app.EXAMPLE_STORY.splitlines()
BROWSER_TIMEOUT_S = 120  # the whole wait for the storyboard, on a loaded machine
START_TIMEOUT_S = 90  # the server's start (imports of torch, diffusers, Gradio)
SCREENSHOT = os.environ.get("STORYGPTV_DEMO_SCREENSHOT")
# Few denoising steps keep the browser test fast; the screenshot for the README shows the default.
STEPS = app.DEFAULT_STEPS if SCREENSHOT else 4
#: A picture to upload: one of the default model's reference images.
PICTURE = Path(storygptv.DEFAULT_MODEL) / "characters" / "Ava.png"


# --------------------------------------------------------------------------------------------------
# The page's checks, without Gradio
# --------------------------------------------------------------------------------------------------
def test_module_imports_without_gradio_and_says_what_to_install():
    code = (
        "import sys; sys.modules['gradio'] = None\n"  # as if Gradio were not installed
        "import storygptv.app as app\n"
        "assert 'torch' not in sys.modules, 'importing the app module imports torch'\n"
        "app.main(['--port', '7860'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert result.returncode == 1, result.stderr
    assert 'pip install "storygptv[demo]"' in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "fields, field, words",
    [
        ({"story": ""}, app.STORY_FIELD, "empty"),
        ({"story": "  \n# a comment\n\n"}, app.STORY_FIELD, "empty"),
        ({"story": "Ava is waving.\n" * (app.MAX_FRAMES + 1)}, app.STORY_FIELD, "at most"),
        ({"selected": ["Zed"]}, app.CAST_FIELD, "Zed"),
        ({"upload": "PICTURE", "upload_name": "  "}, app.NAME_FIELD, "empty"),
        ({"upload_name": "Zed"}, app.UPLOAD_FIELD, "missing"),
        ({"upload": "NOT_AN_IMAGE", "upload_name": "Zed"}, app.UPLOAD_FIELD, "notes.png"),
        ({"seed": None}, app.SEED_FIELD, "empty"),
        ({"seed": 1.5}, app.SEED_FIELD, "whole number"),
        ({"seed": -1}, app.SEED_FIELD, "range"),
        ({"steps": 0}, app.STEPS_FIELD, "range"),
    ],
)
def test_bad_fields_are_named(tmp_path, fields, field, words):
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("these are notes, not a picture")
    files = {"PICTURE": str(PICTURE), "NOT_AN_IMAGE": str(not_an_image)}
    request = {"story": app.EXAMPLE_STORY, "selected": [], "upload": None, "upload_name": ""}
    request |= {"seed": 0, "steps": 3} | fields
    request["upload"] = files.get(request["upload"], request["upload"])
    with pytest.raises(app.InputError) as caught:
        app.check_request(cast={"Ava": None}, **request)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")
    assert words in str(caught.value)
    assert str(tmp_path) not in str(caught.value)  # the user sees the file's name, not the server's path


def test_uploaded_character_joins_the_cast(tmp_path):
    cast = {"Ava": PIL.Image.new("RGB", (8, 8)), "Bo": PIL.Image.new("RGB", (8, 8))}
    request = app.check_request(
        "Zed and Ava are jumping.\nThey are waving.", ["Ava"], str(PICTURE), " Zed ", 3, 7, cast
    )
    assert request.captions == ["Zed and Ava are jumping.", "They are waving."]
    assert sorted(request.characters) == ["Ava", "Zed"]
    assert request.characters["Zed"].mode == "RGB"
    assert (request.seed, request.steps, request.notes) == (3, 7, [])
    unnamed = app.check_request("Ava is jumping.", [], str(PICTURE), "Bo", 0, 1, cast)
    assert any("replaces" in note for note in unnamed.notes)
    assert any("not named in the story" in note for note in unnamed.notes)


def test_draw_streams_frames_then_the_storyboard():
    demo = app.StoryApp()
    updates = list(demo.draw(app.EXAMPLE_STORY, ["Ava", "Bo", "Cleo"], None, "", 0, 2))
    # First the outputs are cleared, then one update per finished frame, then the storyboard.
    assert [len(frames) for frames, *_ in updates] == [0, 1, 2, 3, 3]
    assert [board is not None for _, board, _, _ in updates] == [False] * 4 + [True]
    frames, board, drawn, status = updates[-1]
    assert [image.size for image, _ in frames] == [(64, 64)] * 3
    assert drawn.splitlines()[1].startswith("2. ") and "jumping" in drawn
    assert status.startswith("Drew 3 frames")
    assert board.width > 3 * 64
    pipe = demo.pipeline()
    assert pipe is demo.pipeline()  # loaded once
    # The page draws what the pipeline (and the CLI) draws for the same story, cast and seed.
    expected = pipe(
        STORY,
        characters={n: demo.cast[n] for n in ("Ava", "Bo", "Cleo")},
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    )
    for (image, _), reference in zip(frames, expected.images):
        np.testing.assert_array_equal(np.asarray(image), np.asarray(reference))
    # A bad field clears every output (nothing half-drawn) and says which field.
    assert list(demo.draw("\n", [], None, "", 0, 2)) == [
        (
            [],
            None,
            "",
            f"**Error.** {app.STORY_FIELD}: is empty; write one caption per line, such as: {STORY[0]}",
        )
    ]


def test_demo_attribute_and_a_missing_model():
    gr = pytest.importorskip("gradio", reason='Gradio not installed (pip install -e ".[demo]")')
    assert isinstance(app.demo, gr.Blocks)  # built on first access, for Spaces and `gradio` reload mode
    with pytest.raises(SystemExit, match="does not exist") as caught:
        app.main(["--model", "./no/such/model"])
    assert str(caught.value).startswith("error: ") and "\n" not in str(caught.value)


# --------------------------------------------------------------------------------------------------
# The page in a real browser
# --------------------------------------------------------------------------------------------------
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def _browser_missing() -> str | None:
    missing = [name for name in ("gradio", "selenium") if importlib.util.find_spec(name) is None]
    if missing:
        return f'{" and ".join(missing)} not installed (pip install -e ".[demo]")'
    absent = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if absent:
        return f"{', '.join(absent)} not found (apt-get install chromium chromium-driver)"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``python -m storygptv.app`` on a free port; stopped at the end (its log is shown on failure)."""
    log_path = tmp_path_factory.mktemp("app") / "app.log"
    port = _free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "storygptv.app", "--host", "127.0.0.1", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"the app exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the app did not answer within {START_TIMEOUT_S} s:\n{log_path.read_text()}")
            time.sleep(0.5)
        yield url, log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _fetch_image(src: str) -> PIL.Image.Image:
    with urllib.request.urlopen(src, timeout=30) as response:
        return PIL.Image.open(io.BytesIO(response.read())).copy()


BROWSER_MISSING = _browser_missing()


@pytest.mark.skipif(BROWSER_MISSING is not None, reason=f"browser test: {BROWSER_MISSING}")
def test_page_draws_a_story_in_a_browser(server, browser, tmp_path):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, log_path = server

    def find(selector: str) -> object:
        return browser.find_element(By.CSS_SELECTOR, selector)

    def count(selector: str) -> int:
        return len(browser.find_elements(By.CSS_SELECTOR, selector))

    def type_into(selector: str, text: str) -> None:
        field = find(selector)
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(Keys.DELETE)
        if text:
            field.send_keys(text)

    def wait_for(condition, what: str, timeout: float = 30) -> None:
        try:
            WebDriverWait(browser, timeout, poll_frequency=0.2).until(condition)
        except TimeoutException:
            pytest.fail(
                f"{what} did not happen within {timeout} s; status: {find('#status').text!r}\n"
                f"app log:\n{log_path.read_text()[-3000:]}"
            )

    def status_says(*words: str):
        return lambda driver: all(word in find("#status").text for word in words)

    browser.get(url)
    wait_for(ec.element_to_be_clickable((By.CSS_SELECTOR, "#draw")), "the page loading", 60)
    assert find("#story textarea").get_attribute("value") == app.EXAMPLE_STORY  # the example is prefilled
    assert count("#cast input[type=checkbox]") == 8

    # Bad input: the status names the field, and nothing is drawn.
    type_into("#story textarea", "")
    find("#draw").click()
    wait_for(status_says("Story", "empty"), "the empty-story message")
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("these are notes, not a picture")
    type_into("#story textarea", app.EXAMPLE_STORY)
    find("#upload input[type=file]").send_keys(str(not_an_image))
    wait_for(lambda driver: count("#upload a[download='notes.png']") == 1, "the upload")
    find("#draw").click()
    wait_for(status_says(app.NAME_FIELD, "empty"), "the empty-name message")
    type_into("#upload-name textarea", "Zed")
    find("#draw").click()
    wait_for(status_says(app.UPLOAD_FIELD, "notes.png", "not an image"), "the not-an-image message")
    assert count("#frames img") == 0 and count("#storyboard img") == 0

    # A 3-frame story: the frames, then the storyboard and the captions as drawn.
    browser.refresh()
    wait_for(ec.element_to_be_clickable((By.CSS_SELECTOR, "#draw")), "the page reloading", 60)
    type_into("#steps input[type=number]", str(STEPS))
    find("#steps input[type=number]").send_keys(Keys.TAB)
    wait_for(
        lambda driver: find("#steps input[type=range]").get_attribute("value") == str(STEPS),
        "setting the steps",
    )
    find("#draw").click()
    wait_for(lambda driver: count("#storyboard img") == 1, "the storyboard", BROWSER_TIMEOUT_S)
    wait_for(status_says("Drew 3 frames", f"{STEPS} steps"), "the final status")
    frames = browser.find_elements(By.CSS_SELECTOR, "#frames img")
    assert len(frames) == 3
    for number, element in enumerate(frames, start=1):
        image = _fetch_image(element.get_attribute("src"))
        assert (image.size, image.mode) == ((64, 64), "RGB"), f"frame {number}"
        pixels = np.asarray(image, dtype=np.float32)
        assert pixels.std() > 5, f"frame {number} is blank"
    board = _fetch_image(find("#storyboard img").get_attribute("src"))
    assert board.mode == "RGB" and board.width > 3 * 64
    drawn = find("#drawn textarea").get_attribute("value").splitlines()
    assert len(drawn) == 3 and all(line.startswith(f"{n}. ") for n, line in enumerate(drawn, start=1))
    assert drawn[0] == f"1. {STORY[0]}" and "jumping" in drawn[1]

    # A screenshot of the whole page.
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1280, min(height + 40, 2400))
    browser.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.5)
    shot = PIL.Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
    target = Path(SCREENSHOT or tmp_path / "demo.png")
    target.parent.mkdir(parents=True, exist_ok=True)
    shot.quantize(colors=128, method=PIL.Image.Quantize.MEDIANCUT).save(target, optimize=True)
    assert target.stat().st_size < 300_000
