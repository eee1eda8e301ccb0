"""The one loop idiom (``storygptv.training.loop``) and the denoising pieces (``storygptv.training.diffusion``)."""

from __future__ import annotations

import math

import pytest
import torch

from storygptv.training.accelerate_setup import make_accelerator
from storygptv.training.checks import TrainingSetupError
from storygptv.training.diffusion import (
    LatentCache,
    min_snr_weights,
    noisy_latents_and_target,
    sample_latents,
)
from storygptv.training.loop import (
    StepLogger,
    make_lr_scheduler,
    make_optimizer,
    optimizer_step,
    perplexity,
    seed_micro_step,
)


def _run_idiom(tmp_path, accumulation: int, micro_steps: int, **schedule):
    """The loop of every script on a 1-parameter model; returns the LR seen by each micro-step's update and
    the LR after each optimizer step."""
    accelerator = make_accelerator(str(tmp_path), report_to="none", gradient_accumulation_steps=accumulation)
    model = torch.nn.Linear(1, 1, bias=False)
    optimizer = make_optimizer(model.parameters(), learning_rate=1.0, weight_decay=0.0)
    lr_scheduler = make_lr_scheduler(
        schedule.pop("name"), optimizer, num_processes=accelerator.num_processes, **schedule
    )
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    accelerator.step = 0
    used, after_steps = [], []
    for _ in range(micro_steps):
        with accelerator.accumulate(model):
            used.append(optimizer.param_groups[0]["lr"])
            loss = model(torch.ones(1, 1)).sum()
            optimizer_step(accelerator, loss, optimizer, lr_scheduler, model.parameters(), 1.0)
        if accelerator.sync_gradients:
            after_steps.append(lr_scheduler.get_last_lr()[0])
    return used, after_steps


def test_schedules_count_optimizer_steps_whatever_the_accumulation(tmp_path):
    """Linear warm-up over 2 optimizer steps, then linear decay to 0 at step 4 (diffusers' "linear")."""
    expected = [0.5, 1.0, 0.5, 0.0]  # after optimizer steps 1..4
    for accumulation in (1, 3):
        used, after = _run_idiom(
            tmp_path, accumulation, 4 * accumulation, name="linear", total_steps=4, warmup_steps=2
        )
        assert after == pytest.approx(expected)
        # Every micro-step of an optimizer step sees the same LR: it changes only after an optimizer step.
        per_step = [used[i : i + accumulation] for i in range(0, len(used), accumulation)]
        assert [set(lrs) for lrs in per_step] == [{0.0}, {0.5}, {1.0}, {0.5}]


def test_warmup_step_schedule_by_hand():
    """The reference schedule: linear warm-up over 2 steps, then x0.1 every 3 steps."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_lr_scheduler("warmup_step", optimizer, total_steps=9, warmup_steps=2, step_size=3)
    lrs = []
    for _ in range(7):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.1, 0.1, 0.1, 0.01])
    # Prepared on 2 processes, accelerate steps it twice per optimizer step: the counts are doubled.
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_lr_scheduler(
        "warmup_step", optimizer, total_steps=9, warmup_steps=2, step_size=3, num_processes=2
    )
    for _ in range(2 * 3):
        optimizer.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.1)
    with pytest.raises(TrainingSetupError, match="Unknown --lr_scheduler 'cosine_typo'"):
        make_lr_scheduler("cosine_typo", optimizer, total_steps=9)


def test_adamw_is_fused_where_torch_has_the_kernel():
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    weight, bias = torch.nn.Parameter(torch.randn(3, 3)), torch.nn.Parameter(torch.zeros(3))
    groups = [{"params": [weight]}, {"params": [bias], "weight_decay": 0.0}]
    optimizer = make_optimizer(groups, learning_rate=0.1, weight_decay=0.5, device="cpu")
    assert bool(optimizer.defaults["fused"]) == ("cpu" in _get_fused_kernels_supported_devices())
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.5, 0.0]  # a group keeps its own
    plain = make_optimizer([torch.nn.Parameter(torch.zeros(1))], learning_rate=0.1, device="meta")
    assert not plain.defaults["fused"]
    # Deterministic: the same gradients give the same weights in two runs.
    results = []
    for _ in range(2):
        p = torch.nn.Parameter(torch.ones(4, 4))
        opt = make_optimizer([p], learning_rate=0.1)
        for step in range(3):
            p.grad = torch.full_like(p, float(step + 1))
            opt.step()
        results.append(p.detach().clone())
    assert torch.equal(*results)


def test_micro_step_seeds_are_pure_functions():
    a = seed_micro_step(3, "noise", 7, 0)
    x = torch.rand(2)
    b = seed_micro_step(3, "noise", 7, 0)
    assert torch.equal(x, torch.rand(2))  # torch's global generator too (dropout)
    assert torch.equal(torch.randn(3, generator=a), torch.randn(3, generator=b))
    c = seed_micro_step(3, "noise", 7, 1)
    assert not torch.equal(
        torch.randn(3, generator=seed_micro_step(3, "noise", 7, 0)), torch.randn(3, generator=c)
    )


def test_step_logger_means_over_micro_steps(tmp_path):
    accelerator = make_accelerator(str(tmp_path), report_to="none")
    steps = StepLogger(accelerator, total_steps=4, accumulation_steps=2, logging_steps=2, derived=perplexity)
    steps.add(loss=torch.tensor(1.0))
    steps.add(loss=torch.tensor(3.0))
    assert steps.end_step(1, lr=0.1) is None  # not a logging step
    steps.add(loss=torch.tensor(2.0))
    steps.add(loss=torch.tensor(2.0))
    logs = steps.end_step(2, lr=0.2)
    assert logs["loss"] == pytest.approx(2.0) and logs["ppl"] == pytest.approx(math.exp(2.0))
    assert logs["lr"] == 0.2 and logs["step_time_s"] >= 0
    steps.add(loss=torch.tensor(5.0))
    assert steps.end_step(4, lr=0.0)["loss"] == pytest.approx(2.5)  # the last step always logs
    summary = steps.summary()
    assert summary["global_step"] == 4 and len(steps.step_times) == 3
    steps.close()


# ------------------------------------------------------------------------------------------ diffusion
def test_noise_targets_and_min_snr():
    from diffusers import DDPMScheduler

    latents = torch.randn(3, 4, 8, 8)
    eps_scheduler = DDPMScheduler(num_train_timesteps=1000)
    noisy, steps, target = noisy_latents_and_target(eps_scheduler, latents, torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(latents.shape, generator=generator)
    assert torch.equal(target, noise)
    assert torch.equal(steps, torch.randint(0, 1000, (3,), generator=generator))
    torch.testing.assert_close(noisy, eps_scheduler.add_noise(latents, noise, steps))
    v_scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    _, steps, velocity = noisy_latents_and_target(v_scheduler, latents, torch.Generator().manual_seed(0))
    torch.testing.assert_close(velocity, v_scheduler.get_velocity(latents, noise, steps))
    weights = min_snr_weights(eps_scheduler, torch.tensor([0, 999]), gamma=5.0)
    assert weights[0] < 1.0 and weights[1] == pytest.approx(1.0)  # low noise: high SNR is damped
    assert (min_snr_weights(v_scheduler, torch.tensor([0, 999]), 5.0) < weights + 1e-6).all()


def test_latent_cache_samples_the_posterior_the_vae_gives(tmp_path):
    from storygptv.testing import tiny_vae

    torch.manual_seed(0)
    vae = tiny_vae().eval()
    pixels = torch.rand(5, 3, 32, 32) * 2 - 1
    path = tmp_path / "latent_cache.safetensors"
    fingerprint = {"vae": "tiny", "frames": 5}
    assert LatentCache.build(path, vae, lambda i: pixels[i], 5, fingerprint=fingerprint, batch_size=5)
    assert not LatentCache.build(path, vae, lambda i: pixels[i], 5, fingerprint=fingerprint)  # reused
    cache = LatentCache(path)
    indices = torch.tensor([3, 0, 3])
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
    mean, std = cache.posterior(indices)
    assert torch.equal(mean, dist.mean[indices]) and torch.equal(std, dist.std[indices])
    # A step's sample equals diffusers' own posterior sample with the same generator, scaled.
    cached = cache.sample(indices, torch.Generator().manual_seed(1), vae.config, "cpu")
    with torch.no_grad():
        own = vae.encode(pixels[indices]).latent_dist.sample(generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(cached, own * vae.config.scaling_factor, rtol=1e-5, atol=1e-6)
    again = sample_latents(mean, std, torch.Generator().manual_seed(1), vae.config)
    assert torch.equal(cached, again)
    with pytest.raises(IndexError, match="not in the latent cache"):
        cache.posterior(torch.tensor([5]))
    # Another VAE (or other data) rebuilds the cache.
    assert LatentCache.build(path, vae, lambda i: pixels[i] * 0, 5, fingerprint={"vae": "other", "frames": 5})
    assert not torch.equal(LatentCache(path).posterior(indices)[0], mean)
