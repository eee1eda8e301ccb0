import io
import json

import numpy as np
import PIL.Image
import pytest

import storygptv
from storygptv.cli import main, read_story
from storygptv.pipelines.pipeline_storygptv import StoryGPTVPipeline
from storygptv.testing.storygptv import tiny_storygptv_components


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    StoryGPTVPipeline(**tiny_storygptv_components()).save_pretrained(folder)
    characters = folder / "characters"
    characters.mkdir()
    for name, colour in {"Fred": (230, 30, 40), "Barney": (30, 70, 230), "Mr_Slate": (0, 200, 0)}.items():
        PIL.Image.fromarray(np.full((16, 16, 3), colour, np.uint8)).save(characters / f"{name}.png")
    return folder


def test_generate_writes_frames_and_storyboard(tmp_path, model_dir):
    story = tmp_path / "story.txt"
    story.write_text(
        "# a comment\nFred and Barney are in the yard.\n\nThey start to argue.\nMr Slate shouts.\n"
    )
    out = tmp_path / "out"
    assert (
        main(
            ["generate", "--story", str(story), "--out", str(out), "--model", str(model_dir), "--steps", "2"]
        )
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "frame_001.png",
        "frame_002.png",
        "frame_003.png",
        "storyboard.png",
    ]
    assert PIL.Image.open(out / "frame_001.png").size == (32, 32)
    board = PIL.Image.open(out / "storyboard.png")
    assert board.width > 3 * 128


def test_generate_is_reproducible_with_seed(tmp_path, model_dir):
    story = tmp_path / "story.txt"
    story.write_text("Fred is here.\nHe waves.\n")
    outs = []
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        out = tmp_path / name
        main(
            [
                "generate",
                "--story",
                str(story),
                "--out",
                str(out),
                "--model",
                str(model_dir),
                "--steps",
                "2",
                "--seed",
                seed,
            ]
        )
        outs.append(np.asarray(PIL.Image.open(out / "frame_002.png")))
    assert np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[0], outs[2])


def test_json_story_with_character_paths(tmp_path):
    image = tmp_path / "imgs" / "wilma.png"
    image.parent.mkdir()
    PIL.Image.new("RGB", (8, 8)).save(image)
    story = tmp_path / "s.json"
    story.write_text(
        json.dumps({"captions": ["Wilma sings.", "She smiles."], "characters": {"Wilma": "imgs/wilma.png"}})
    )
    captions, characters = read_story(story)
    assert captions == ["Wilma sings.", "She smiles."]
    assert characters == {"Wilma": str(image)}


@pytest.mark.parametrize(
    ("content", "suffix", "match"),
    [
        ("# only a comment\n\n", ".txt", "has no captions"),
        ('{"captions": []}', ".json", "has no captions"),
        ("{not json", ".json", "not valid JSON"),
        ('{"story": 1}', ".json", "must hold a list of captions"),
    ],
)
def test_bad_story_files(tmp_path, content, suffix, match):
    story = tmp_path / f"story{suffix}"
    story.write_text(content)
    with pytest.raises(SystemExit, match=match):
        main(["generate", "--story", str(story), "--out", str(tmp_path / "o")])


def test_missing_component_is_reported_before_loading(tmp_path, model_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    shutil.rmtree(broken / "unet")
    story = tmp_path / "s.txt"
    story.write_text("Fred is here.\n")
    with pytest.raises(SystemExit, match=r"lacks the component folder\(s\) \['unet'\]"):
        main(["generate", "--story", str(story), "--out", str(tmp_path / "o"), "--model", str(broken)])
    with pytest.raises(SystemExit, match="no model_index.json"):
        main(["generate", "--story", str(story), "--out", str(tmp_path / "o"), "--model", str(tmp_path)])
    with pytest.raises(SystemExit, match="--story .* does not exist"):
        main(["generate", "--story", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="is not a folder"):
        main(
            [
                "generate",
                "--story",
                str(story),
                "--out",
                str(tmp_path / "o"),
                "--characters",
                str(tmp_path / "x"),
            ]
        )
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="holds no image"):
        main(
            [
                "generate",
                "--story",
                str(story),
                "--out",
                str(tmp_path / "o"),
                "--characters",
                str(tmp_path / "empty"),
            ]
        )


def test_default_model_constant_points_into_the_package():
    assert storygptv.DEFAULT_MODEL.endswith("default_model")
    assert storygptv.DEFAULT_MODEL.startswith(str(__import__("pathlib").Path(storygptv.__file__).parent))


# --------------------------------------------------------------------------------- the CLI never mixes stories
def _generate(story, out, model_dir, *extra):
    return main(
        [
            "generate",
            "--story",
            str(story),
            "--out",
            str(out),
            "--model",
            str(model_dir),
            "--steps",
            "1",
            *extra,
        ]
    )


def test_out_with_an_earlier_story_is_refused_unless_overwrite(tmp_path, model_dir):
    long_story, short_story = tmp_path / "long.txt", tmp_path / "short.txt"
    long_story.write_text("Fred is here.\nBarney comes.\nThey talk.\n")
    short_story.write_text("Barney is alone.\nHe sleeps.\n")
    out = tmp_path / "out"
    _generate(long_story, out, model_dir)
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(SystemExit, match=r"already holds an earlier story \(frame_001.png, .*--overwrite"):
        _generate(short_story, out, model_dir)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched
    _generate(short_story, out, model_dir, "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == [
        "frame_001.png",
        "frame_002.png",
        "notes.txt",
        "storyboard.png",
    ]
    old_board = PIL.Image.open(io.BytesIO(before["storyboard.png"]))
    assert PIL.Image.open(out / "storyboard.png").width < old_board.width  # the new, 2-frame storyboard


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the model is loaded: the errors below must come first."""

    def boom(*args, **kwargs):
        raise AssertionError("the model was loaded before the input error was reported")

    monkeypatch.setattr(StoryGPTVPipeline, "from_pretrained", boom)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ({"captions": ["Fred."], "characters": ["Fred.png"]}, r"'characters' in --story .* is a list"),
        ({"captions": ["Fred."], "characters": {"Fred": 3}}, r"image of character 'Fred' .* is a number"),
        ({"captions": ["Fred."], "characters": {"Fred": None}}, r"image of character 'Fred' .* is null"),
        ({"captions": ["Fred.", 3]}, r"caption 2 of --story .* is a number \(3\), not a string"),
        ({"captions": ["Fred.", {"text": "x"}]}, r"caption 2 .* is an object"),
        ({"captions": ["Fred.", "  "]}, r"caption 2 .* is empty"),
    ],
)
def test_bad_json_stories_are_one_line_before_loading(tmp_path, model_dir, no_model_load, content, match):
    story = tmp_path / "story.json"
    story.write_text(json.dumps(content))
    with pytest.raises(SystemExit, match=match) as error:
        _generate(story, tmp_path / "o", model_dir)
    assert "\n" not in str(error.value)


def test_other_input_errors_come_before_loading(tmp_path, model_dir, no_model_load):
    import shutil

    story = tmp_path / "s.txt"
    story.write_text("Fred is here.\n")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Fred mange une crêpe.\n".encode("latin-1"))
    with pytest.raises(SystemExit, match=r"is not UTF-8 text .*save it as UTF-8"):
        _generate(latin1, tmp_path / "o", model_dir)
    for index_text, match in (("[1, 2]", "holds a JSON list"), ("{oops", "is not valid JSON")):
        broken = tmp_path / f"model{len(index_text)}"
        shutil.copytree(model_dir, broken)
        (broken / "model_index.json").write_text(index_text)
        with pytest.raises(SystemExit, match=rf"--model .*model_index.json.* {match}"):
            _generate(story, tmp_path / "o", broken)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(SystemExit, match=r"--out .*a_file' is a file"):
        _generate(story, a_file, model_dir)
    with pytest.raises(SystemExit, match=r"--out .*sub' cannot be created"):
        _generate(story, a_file / "sub", model_dir)
    with pytest.raises(SystemExit, match=r"--device 'cuda:7' is not available|this machine has"):
        _generate(story, tmp_path / "o", model_dir, "--device", "cuda:7")
    with pytest.raises(SystemExit, match=r"--device 'gpu0' is not a device name"):
        _generate(story, tmp_path / "o", model_dir, "--device", "gpu0")
    (tmp_path / "refs").mkdir()
    (tmp_path / "refs" / "Fred.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit, match=r"reference image of 'Fred' could not be read"):
        _generate(story, tmp_path / "o", model_dir, "--characters", str(tmp_path / "refs"))


def test_cast_filter_uses_the_library_name_matching(tmp_path):
    from storygptv.cli import load_cast

    image = tmp_path / "ref.png"
    PIL.Image.new("RGB", (4, 4), (10, 20, 30)).save(image)
    cast = load_cast(
        {"Mr Slate": str(image), "Bo": str(image), "Fred": str(image)},
        ["Mr  Slate and Fred talk.", "Both laugh."],
    )
    assert sorted(cast) == ["Fred", "Mr Slate"]  # "Mr  Slate" (two spaces) kept, "Bo" not found in "Both"
    assert cast["Fred"].getpixel((0, 0)) == (10, 20, 30)


def test_character_folder_uses_the_library_cast_rule(tmp_path):
    from storygptv.cli import read_character_dir

    refs = tmp_path / "refs"
    refs.mkdir()
    for name in ("Mr_Slate.png", "Fred.jpg"):
        PIL.Image.new("RGB", (4, 4)).save(refs / name)
    assert read_character_dir(refs) == {
        "Fred": str(refs / "Fred.jpg"),
        "Mr Slate": str(refs / "Mr_Slate.png"),
    }
    PIL.Image.new("RGB", (4, 4)).save(refs / "Fred.png")
    with pytest.raises(SystemExit, match=r"error: --characters .* holds two images of 'Fred'"):
        read_character_dir(refs)
