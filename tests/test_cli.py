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
