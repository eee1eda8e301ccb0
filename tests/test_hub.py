"""Feeling native on the Hub: DiffusionPipeline loading, push_to_hub with cast and card, pulling from the cache."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import yaml
from diffusers import DiffusionPipeline

import storygptv
from storygptv import CharLDMPipeline, StoryGPTVPipeline
from storygptv.testing import tiny_char_ldm_components, tiny_storygptv_components

CAST = {"Fred": np.full((24, 24, 3), 220, np.uint8), "Barney": np.full((24, 24, 3), 30, np.uint8)}
REPO = "me/tiny-story"


def run_python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=environment, capture_output=True, text=True
    )


@pytest.mark.parametrize("pipeline_class", [CharLDMPipeline, StoryGPTVPipeline])
def test_diffusion_pipeline_loads_our_pipelines(tmp_path, pipeline_class):
    components = (
        tiny_char_ldm_components() if pipeline_class is CharLDMPipeline else tiny_storygptv_components()
    )
    pipeline_class(**components).save_pretrained(tmp_path)
    assert type(DiffusionPipeline.from_pretrained(tmp_path)) is pipeline_class


def test_diffusion_pipeline_loads_the_default_whatever_the_import_order(tmp_path):
    for first in ("import storygptv; import diffusers", "import diffusers; import storygptv"):
        code = (
            f"{first}\nfrom diffusers import DiffusionPipeline\n"
            "print(type(DiffusionPipeline.from_pretrained(storygptv.DEFAULT_MODEL)).__name__)"
        )
        result = run_python(code, tmp_path)
        assert result.stdout.strip().endswith("StoryGPTVPipeline"), result.stderr[-2000:]


def test_import_is_lazy_and_help_is_fast(tmp_path):
    code = (
        "import sys, storygptv, storygptv.cli\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'datasets', 'storygptv.training') "
        "if m in sys.modules))"
    )
    assert run_python(code, tmp_path).stdout.strip() == "[]"
    help_text = run_python(
        "import sys; from storygptv.cli import main\n"
        "try:\n    main(['generate', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('heavy:', sorted(m for m in ('torch', 'diffusers') if m in sys.modules))",
        tmp_path,
    ).stdout
    assert "heavy: []" in help_text and "(default: 30)" in help_text and "Ava, Bo, Cleo" in help_text
    code = "import sys\nfrom storygptv import StoryGPTVPipeline\nprint('datasets' in sys.modules)"
    assert run_python(code, tmp_path).stdout.strip() == "False"  # drawing needs no datasets


def hub_cache_from(folder: Path, cache: Path, repo_id: str) -> None:
    """The layout ``huggingface_hub`` leaves after downloading ``repo_id`` at revision ``main``."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


def test_push_writes_cast_and_card_and_the_card_runs_offline_from_the_cache(tmp_path):
    pipe = StoryGPTVPipeline(**tiny_storygptv_components())
    uploaded = tmp_path / "uploaded"

    def fake_upload_folder(*, repo_id, folder_path, **kwargs):
        shutil.copytree(folder_path, uploaded)
        return mock.MagicMock(commit_url=f"https://hub.invalid/{repo_id}/commit/1")

    with (
        mock.patch("huggingface_hub.create_repo", return_value=mock.MagicMock(repo_id=REPO)),
        mock.patch("huggingface_hub.upload_folder", side_effect=fake_upload_folder),
    ):
        url = pipe.push_to_hub(
            REPO, token="dummy", characters=CAST, base_model="org/sd-1-5", dataset="me/stories"
        )
    assert url.endswith("commit/1")
    assert sorted(p.name for p in (uploaded / "characters").iterdir()) == ["Barney.png", "Fred.png"]
    card = (uploaded / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "diffusers" and metadata["pipeline_tag"] == "text-to-image"
    assert metadata["base_model"] == ["org/sd-1-5"] and metadata["datasets"] == ["me/stories"]
    assert metadata["license"] == "apache-2.0" and {"storygptv", "story-visualization"} <= set(
        metadata["tags"]
    )

    # The card's usage snippet runs as written, by repo id, offline, from the local Hub cache.
    snippet = re.search(r"```python\n(.*?)```", card, flags=re.S).group(1)
    assert 'DiffusionPipeline.from_pretrained("me/tiny-story")' in snippet and "Barney and Fred" in snippet
    cache = tmp_path / "hub_cache"
    hub_cache_from(uploaded, cache, REPO)
    result = run_python(snippet, tmp_path, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "frame_1.png").is_file() and "Barney and Fred are standing." in result.stdout


def test_pipeline_from_the_hub_cache_by_repo_id(tmp_path, monkeypatch):
    saved = tmp_path / "saved"
    CharLDMPipeline(**tiny_char_ldm_components()).save_pretrained(saved)
    cache = tmp_path / "cache"
    hub_cache_from(saved, cache, "me/tiny-char-ldm")
    code = (
        "import storygptv\nfrom diffusers import DiffusionPipeline\n"
        "pipe = DiffusionPipeline.from_pretrained('me/tiny-char-ldm')\nprint(type(pipe).__name__)"
    )
    result = run_python(code, tmp_path, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    assert result.stdout.strip().endswith("CharLDMPipeline"), result.stderr[-3000:]
    missing = run_python(
        code.replace("tiny-char-ldm", "never-pushed"), tmp_path, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache)
    )
    assert missing.returncode != 0


def test_default_model_knows_what_the_cli_help_says():
    import json

    from storygptv.cli import DEFAULT_MODEL_LIMITS

    folder = Path(storygptv.DEFAULT_MODEL)
    cast = sorted(p.stem.replace("_", " ") for p in (folder / "characters").glob("*.png"))
    assert ", ".join(cast) in DEFAULT_MODEL_LIMITS
    tokens = json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())["model_max_length"]
    assert f"at most {tokens} tokens" in DEFAULT_MODEL_LIMITS
    story_config = json.loads((folder / "story_model" / "config.json").read_text())
    for setting in story_config.get("grounding_settings") or []:
        assert setting in DEFAULT_MODEL_LIMITS
