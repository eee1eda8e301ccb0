"""The calibration harness of the SynthSV judge (``storygptv.evaluation.synthsv_calibration``)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest

from storygptv.data.synthsv import render_frame
from storygptv.evaluation.synthsv import SynthSVJudge
from storygptv.evaluation.synthsv_calibration import (
    CONDITIONS,
    NOISE_KINDS,
    calibration_report,
    degrade,
    noise_image,
    random_frames,
)


def test_report_covers_every_condition_and_noise_kind():
    report = calibration_report(num_frames=12, num_noise=3, seed=1)
    assert set(report) == set(CONDITIONS) | {f"noise_{kind}" for kind in NOISE_KINDS}
    for condition in CONDITIONS:  # the calibrated range: every frame judged exactly
        assert report[condition]["char_exact"] == 100.0
        assert report[condition]["background"] == 100.0
        assert report[condition]["min_present"] >= SynthSVJudge().min_pixels > report[condition]["max_absent"]
    for kind in NOISE_KINDS:
        assert report[f"noise_{kind}"]["no_character"] == 100.0


def test_report_is_reproducible_and_takes_a_judge():
    strict = SynthSVJudge(min_pixels=10_000)  # sees no character at all
    report = calibration_report(num_frames=4, num_noise=2, seed=3, judge=strict)
    assert report["clean"]["char_exact"] == 0.0
    assert calibration_report(num_frames=4, num_noise=2, seed=3) == calibration_report(
        num_frames=4, num_noise=2, seed=3
    )


def test_degrade_conditions():
    image = render_frame(random_frames(1, seed=0)[0])[0]
    rng = np.random.default_rng(0)
    assert degrade(image, "clean", rng) is image
    assert degrade(image, "upsample_bicubic", rng).size == (256, 256)
    noisy = np.asarray(degrade(image, "noise20", rng), dtype=np.int16)
    assert 0 < np.abs(noisy - np.asarray(image, dtype=np.int16)).mean() < 30
    with pytest.raises(ValueError, match="valid conditions"):
        degrade(image, "fog", rng)


def test_noise_images():
    rng = np.random.default_rng(0)
    for kind in NOISE_KINDS:
        image = noise_image(kind, rng, size=32)
        assert isinstance(image, PIL.Image.Image) and image.size == (32, 32) and image.mode == "RGB"
    with pytest.raises(ValueError, match="valid kinds"):
        noise_image("pink", rng)
