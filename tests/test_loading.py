"""Loading errors name the component and the file (``storygptv.loading``, ``CharLDMPipeline.from_pretrained``)."""

import json
import shutil

import pytest

from storygptv import CharLDMPipeline
from storygptv.loading import ModelLoadingError, check_model_folder, load_checked
from storygptv.pipelines.pipeline_storygptv import StoryGPTVPipeline
from storygptv.testing import tiny_char_ldm_components
from storygptv.testing.storygptv import tiny_storygptv_components


@pytest.fixture(scope="module")
def story_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("story") / "pipe"
    StoryGPTVPipeline(**tiny_storygptv_components()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def char_ldm_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("char_ldm") / "pipe"
    CharLDMPipeline(**tiny_char_ldm_components(0)).save_pretrained(folder)
    return folder


@pytest.fixture
def copy_of(tmp_path):
    def make(folder):
        target = tmp_path / "copy"
        shutil.copytree(folder, target)
        return target

    return make


def _cut(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _set_config(path, **values):
    config = json.loads(path.read_text())
    config.update(values)
    path.write_text(json.dumps(config))


def test_intact_folders_load(story_dir, char_ldm_dir):
    assert isinstance(StoryGPTVPipeline.from_pretrained(story_dir), StoryGPTVPipeline)
    assert isinstance(CharLDMPipeline.from_pretrained(char_ldm_dir), CharLDMPipeline)


@pytest.mark.parametrize(
    ("damage", "pattern"),
    [
        (lambda d: shutil.rmtree(d / "fuser"), r"lacks the component folder\(s\) \['fuser'\]"),
        (
            lambda d: (d / "story_model" / "config.json").unlink(),
            r"'story_model'.*story_model'?: config.json is missing",
        ),
        (
            lambda d: _cut(d / "unet" / "diffusion_pytorch_model.safetensors"),
            r"component 'unet'.*diffusion_pytorch_model.safetensors is not a complete safetensors file",
        ),
        (
            lambda d: (d / "story_model" / "model.safetensors").write_bytes(b""),
            r"component 'story_model'.*model.safetensors is empty \(0 bytes\)",
        ),
        (
            lambda d: (d / "vae" / "diffusion_pytorch_model.safetensors").unlink(),
            r"component 'vae'.*has no weight file",
        ),
        (
            lambda d: shutil.rmtree(d / "story_tokenizer") or (d / "story_tokenizer").mkdir(),
            r"'story_tokenizer'.*empty",
        ),
        (lambda d: (d / "model_index.json").write_text("[1, 2]"), r"model_index.json' holds a JSON list"),
        (lambda d: (d / "model_index.json").write_text("{oops"), r"model_index.json' is not valid JSON"),
        (
            lambda d: _set_config(d / "model_index.json", unet="diffusers"),
            r"malformed: component 'unet' is 'diffusers'",
        ),
    ],
)
def test_damaged_story_folder_is_named_before_loading(story_dir, copy_of, damage, pattern):
    folder = copy_of(story_dir)
    damage(folder)
    with pytest.raises(ModelLoadingError, match=pattern):
        StoryGPTVPipeline.from_pretrained(folder)


@pytest.mark.parametrize(
    ("component", "values", "file"),
    [
        ("unet", {"cross_attention_dim": 48}, "diffusion_pytorch_model.safetensors"),
        ("fuser", {"image_embed_dim": 48}, "diffusion_pytorch_model.safetensors"),
        ("text_encoder", {"hidden_size": 48}, "model.safetensors"),
    ],
)
def test_config_shapes_that_do_not_match_the_weights_name_the_component(
    char_ldm_dir, copy_of, component, values, file
):
    folder = copy_of(char_ldm_dir)
    _set_config(folder / component / "config.json", **values)
    with pytest.raises(ModelLoadingError) as error:
        CharLDMPipeline.from_pretrained(folder)
    message = str(error.value)
    assert f"Cannot load component {component!r}" in message
    assert str(folder / component / "config.json") in message and str(folder / component / file) in message


def test_components_passed_in_are_not_checked(char_ldm_dir, copy_of):
    folder = copy_of(char_ldm_dir)
    unet = CharLDMPipeline.from_pretrained(char_ldm_dir).unet
    shutil.rmtree(folder / "unet")
    assert CharLDMPipeline.from_pretrained(folder, unet=unet).unet is unet
    with pytest.raises(ModelLoadingError, match=r"\['unet'\]"):
        check_model_folder(folder)


def test_hub_ids_skip_the_local_check():
    calls = []

    def fake_load(source, **kwargs):
        calls.append((source, kwargs))
        raise OSError("offline")

    with pytest.raises(OSError, match="offline") as error:
        load_checked(fake_load, "someone/some-pipeline", revision="main")
    assert not isinstance(error.value, ModelLoadingError)
    assert calls == [("someone/some-pipeline", {"revision": "main"})]
