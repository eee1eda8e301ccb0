"""The reports of ``storygptv evaluate``: ``results.json`` (everything) and ``results.md`` (Table 1's row).

The markdown table has the columns of the paper's Table 1: Char-Acc, Char-F1, BG-Acc and BG-F1 where the
dataset has backgrounds (not PororoSV), FID; on SynthSV it adds the render-exact judge (Char-Acc, Char-F1,
BG-Acc) and the grounding metric (F1 and exact match of the characters the model resolved per frame). Under
the table: the FID protocol, the stories, the seeds, the generation settings and the package versions. A
metric that was not computed shows as ``-`` with the reason below the table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["RESULTS_JSON", "RESULTS_MARKDOWN", "package_versions", "results_markdown", "write_results"]

RESULTS_JSON = "results.json"
RESULTS_MARKDOWN = "results.md"
_DATASET_TITLES = {"flintstones": "FlintstonesSV", "pororo": "PororoSV", "synthsv": "SynthSV"}
#: ``(metric key, column title)``; the arrows say which way is better, as in the paper.
_PAPER_COLUMNS = (
    ("char_acc", "Char-Acc ↑"),
    ("char_f1", "Char-F1 ↑"),
    ("bg_acc", "BG-Acc ↑"),
    ("bg_f1", "BG-F1 ↑"),
)
_SYNTHSV_COLUMNS = (
    ("judge_char_acc", "Judge Char-Acc ↑"),
    ("judge_char_f1", "Judge Char-F1 ↑"),
    ("judge_bg_acc", "Judge BG-Acc ↑"),
    ("grounding_f1", "Grounding F1 ↑"),
    ("grounding_exact", "Grounding exact ↑"),
)


def package_versions() -> dict[str, str | None]:
    """The installed versions of storygptv, torch, transformers and diffusers (``None`` when missing)."""
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {}
    for name in ("storygptv", "torch", "transformers", "diffusers"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def _columns(dataset: str) -> list[tuple[str, str]]:
    columns = [c for c in _PAPER_COLUMNS if dataset != "pororo" or not c[0].startswith("bg_")]
    columns.append(("fid", "FID ↓"))
    if dataset == "synthsv":
        columns.extend(_SYNTHSV_COLUMNS)
    return columns


def _count(number: int, one: str, many: str) -> str:
    return f"{number} {one if number == 1 else many}"


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"


def results_markdown(results: Mapping[str, Any]) -> str:
    """The markdown report of a ``results.json`` dict: one Table 1 row and the protocol below it."""
    dataset = results["dataset"]
    metrics = results["metrics"]
    columns = _columns(dataset)
    title = _DATASET_TITLES.get(dataset, dataset)
    header = "| Model | " + " | ".join(name for _, name in columns) + " |"
    rule = "|---|" + "|".join("---:" for _ in columns) + "|"
    row = f"| {results['model']} | " + " | ".join(_cell(metrics.get(key)) for key, _ in columns) + " |"
    fid = results["fid"]
    generation = results.get("generation") or {}
    lines = [
        f"## {title} ({results['split']} split, {_count(results['num_stories'], 'story', 'stories')}, "
        f"{_count(metrics['num_frames'], 'frame', 'frames')})",
        "",
        header,
        rule,
        row,
        "",
        f"- FID protocol: `{fid['fid_protocol']}`"
        + (
            f" ({fid['reason']}: FID skipped)"
            if fid.get("skipped")
            else f" ({fid['num_generated_frames']} generated / {fid['num_real_frames']} real frames"
            + (
                f", {_count(fid['num_dropped_stories'], 'tail story', 'tail stories')} dropped"
                if fid.get("num_dropped_stories")
                else ""
            )
            + "); FIDs of different protocols are not comparable"
        ),
        f"- Classifiers: characters `{results['classifiers'].get('characters') or '-'}`, background "
        f"`{results['classifiers'].get('background') or '-'}`",
        f"- Captions: `{results['caption_column']}`; stories: `{results['stories_dir']}`",
    ]
    if generation:
        lines.append(
            f"- Generation: {_count(generation['steps'], 'step', 'steps')}, guidance "
            f"{generation['guidance_scale']}, grounding "
            f"{generation['grounding'] or 'default'}; story i drawn with seed {generation['seed']} + i "
            f"(seeds {results['seeds'][0]}-{results['seeds'][-1]}, see results.json)"
        )
    if dataset == "synthsv":
        lines.append(
            "- Judge: the render-exact SynthSV judge (no classifier); grounding: the characters the model "
            "resolved per frame against the labels"
            + (f" (skipped: {results['grounding_skipped']})" if results.get("grounding_skipped") else "")
        )
    versions = ", ".join(
        f"{name} {version or 'not installed'}" for name, version in results["versions"].items()
    )
    lines.append(f"- Versions: {versions}")
    return "\n".join(lines) + "\n"


def write_results(results: Mapping[str, Any], out: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` into ``out``; return their paths."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, markdown_path = folder / RESULTS_JSON, folder / RESULTS_MARKDOWN
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    markdown_path.write_text(results_markdown(results))
    return json_path, markdown_path
