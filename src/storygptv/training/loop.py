"""The one training-loop idiom of every ``training_scripts/`` script, and its pieces.

Every script's loop reads the same way (the diffusers examples' idiom, one micro-batch per iteration)::

    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    global_step = resume_training(accelerator, resume_path, sampler, ...)
    data_iter, micro = iter(loader), sampler.start_batch
    while global_step < max_train_steps:
        batch = next_batch(data_iter, micro)
        generator = seed_micro_step(seed, "noise", micro, rank)    # noise, timesteps, dropout of micro
        with accelerator.accumulate(model):
            loss = ...
            optimizer_step(accelerator, loss, optimizer, lr_scheduler, params, max_grad_norm)
        steps.add(loss=loss)
        micro += 1
        if not accelerator.sync_gradients:
            continue
        global_step += 1                                           # one optimizer step is done
        ...  # EMA, steps.end_step(...) (progress and logs), checkpoint, validation

LR-scheduler semantics (written down here only): every schedule counts **optimizer steps**
(``--lr_warmup_steps``, ``--max_train_steps``, ``--lr_step_size``), and the learning rate changes once per
optimizer step, after it, whatever ``--gradient_accumulation_steps`` and the number of processes. The
scheduler is given to ``accelerator.prepare``, whose wrapper ignores ``step()`` on micro-steps that do not
synchronise and, on those that do, steps the wrapped scheduler once per process; so
:func:`make_lr_scheduler` multiplies the step counts by ``num_processes`` (as the diffusers examples do). A
resumed run restores the scheduler with the rest of accelerate's state.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from .checks import TrainingSetupError
from .data import derive_seed, step_generator

__all__ = [
    "StepLogger",
    "finish_training",
    "make_ema",
    "make_lr_scheduler",
    "make_optimizer",
    "optimizer_step",
    "perplexity",
    "seed_micro_step",
]


def _fused_adamw_devices() -> tuple[str, ...]:
    """Device types with a fused AdamW kernel in this torch (CUDA always; CPU, MPS, XPU since torch 2.4)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # a torch without the helper: only CUDA is known to have fused kernels
        return ("cuda",)
    return tuple(_get_fused_kernels_supported_devices())


def make_optimizer(
    params: Iterable[Any],
    *,
    learning_rate: float,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 1e-2,
    eps: float = 1e-8,
    device: torch.device | str | None = None,
) -> torch.optim.AdamW:
    """``AdamW`` over ``params`` (tensors, or parameter groups: groups that set their own ``weight_decay``
    keep it), fused where torch has a fused kernel for ``device`` (``accelerator.device``, where the
    parameters will be; default CPU).

    The fused kernel updates all parameters in one launch: on CUDA the standard choice, and on the CPU
    (torch >= 2.4) 2-4x faster than the per-parameter loop and than ``foreach``, which is slower than the
    loop there for mid-sized tensors. It is deterministic, so a resumed run still ends bit-identical to an
    uninterrupted one (its numbers differ from the loop's in the last bits, so compare runs of one kind).
    """
    params = list(params)
    tensors = [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]
    supported = _fused_adamw_devices()
    # Older torch checks the parameters' current device when the optimizer is built (before `prepare`).
    fused = torch.device(device if device is not None else "cpu").type in supported and all(
        p.device.type in supported and p.is_floating_point() for p in tensors
    )
    return torch.optim.AdamW(
        params, lr=learning_rate, betas=betas, weight_decay=weight_decay, eps=eps, fused=fused or None
    )


def make_lr_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    warmup_steps: int = 0,
    num_processes: int = 1,
    step_size: int | None = None,
    step_gamma: float = 0.1,
) -> Any:
    """The LR schedule ``name`` in optimizer steps, to be given to ``accelerator.prepare`` (module docstring).

    Args:
        name: ``--lr_scheduler``: a diffusers schedule (``"constant"``, ``"constant_with_warmup"``,
            ``"linear"``, ``"cosine"``, ``"cosine_with_restarts"``, ``"polynomial"``...), or ``"warmup_step"``
            (the StoryGPT-V reference: linear warm-up, then x ``step_gamma`` every ``step_size`` steps).
        optimizer: the optimizer whose learning rate it sets.
        total_steps: ``--max_train_steps``.
        warmup_steps: ``--lr_warmup_steps``.
        num_processes: ``accelerator.num_processes`` (the prepared scheduler steps once per process).
        step_size, step_gamma: ``--lr_step_size`` / ``--lr_step_gamma`` of ``"warmup_step"``.
    """
    warmup = warmup_steps * num_processes
    if name == "warmup_step":
        size = max(1, step_size or total_steps) * num_processes

        def factor(step: int) -> float:
            ramp = min(1.0, step / warmup) if warmup > 0 else 1.0
            return ramp * step_gamma ** (step // size)

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    from diffusers.optimization import SchedulerType, get_scheduler

    known = [t.value for t in SchedulerType]
    if name not in known:
        raise TrainingSetupError(f"Unknown --lr_scheduler {name!r}; choose one of {known + ['warmup_step']}.")
    return get_scheduler(
        name, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=total_steps * num_processes
    )


def optimizer_step(
    accelerator: Any,
    loss: torch.Tensor,
    optimizer: Any,
    lr_scheduler: Any,
    parameters: Iterable[torch.nn.Parameter],
    max_grad_norm: float | None,
) -> None:
    """Inside ``accelerator.accumulate``: backward; on a synchronising micro-step, clip the gradients of
    ``parameters`` to ``max_grad_norm`` (``--max_grad_norm``; no clipping when it is 0, negative or
    ``None``); then step the (prepared) optimizer and LR scheduler, which only act on synchronising
    micro-steps, and zero the gradients."""
    accelerator.backward(loss)
    if accelerator.sync_gradients and max_grad_norm is not None and max_grad_norm > 0:
        accelerator.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def seed_micro_step(seed: int, stream: str, micro: int, rank: int) -> torch.Generator:
    """Seed micro-step ``micro`` of process ``rank``: torch's global generator (dropout...) from
    ``(seed, "torch", micro, rank)``; returns the generator of ``(seed, stream, micro, rank)`` for its noise
    and timesteps. Both are pure functions of the arguments, so a resumed run draws the same numbers."""
    generator = step_generator(seed, stream, micro, rank)
    torch.manual_seed(derive_seed(seed, "torch", micro, rank))
    return generator


class StepLogger:
    """Per-optimizer-step bookkeeping of a loop: running loss means, step times, the progress bar, the logs.

    :meth:`add` takes a micro-step's losses; :meth:`end_step`, after each optimizer step, advances the bar
    and, every ``logging_steps`` steps and at the last one, averages the step's losses over the processes
    (a collective: every process calls it), adds ``lr`` and ``step_time_s`` (wall time since the previous
    optimizer step, data loading included) and logs them to the trackers.

    Args:
        accelerator: the run's ``Accelerator``.
        total_steps: ``--max_train_steps``.
        derived: optional function of the logged means returning more values to log (e.g. perplexity).
        initial_step: the step a resumed run starts from.
        accumulation_steps: ``--gradient_accumulation_steps`` (a step's loss is the mean of its micro-steps).
        logging_steps: ``--logging_steps``.
    """

    def __init__(
        self,
        accelerator: Any,
        total_steps: int,
        *,
        derived: Callable[[dict[str, float]], Mapping[str, float]] | None = None,
        initial_step: int = 0,
        accumulation_steps: int = 1,
        logging_steps: int = 1,
    ) -> None:
        from tqdm.auto import tqdm

        self.accelerator, self.derived = accelerator, derived
        self.total_steps, self.accumulation_steps = total_steps, accumulation_steps
        self.logging_steps = max(1, logging_steps)
        self.bar = tqdm(
            range(total_steps),
            initial=initial_step,
            desc="Steps",
            disable=not accelerator.is_local_main_process,
        )
        self.sums: dict[str, float] = {}
        self.last_logs: dict[str, float] = {}
        self.step_times: list[float] = []
        self.global_step = int(initial_step)
        self._tick = time.perf_counter()

    def add(self, **values: torch.Tensor) -> None:
        """Add a micro-step's losses (scalar tensors), each divided by the accumulation steps."""
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value.detach()) / self.accumulation_steps

    def end_step(self, global_step: int, lr: float) -> dict[str, float] | None:
        """Close optimizer step ``global_step`` (learning rate ``lr``); returns the logs when it logged."""
        now = time.perf_counter()
        self.step_times.append(now - self._tick)
        self._tick = now
        self.global_step = global_step
        self.bar.update(1)
        logs = None
        if global_step % self.logging_steps == 0 or global_step == self.total_steps:
            keys = sorted(self.sums)
            device = self.accelerator.device
            means = self.accelerator.reduce(torch.tensor([self.sums[k] for k in keys], device=device), "mean")
            logs = {k: float(v) for k, v in zip(keys, means.tolist())}
            if self.derived is not None:
                logs.update(self.derived(logs))
            logs |= {"lr": float(lr), "step_time_s": self.step_times[-1]}
            self.accelerator.log(logs, step=global_step)
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in logs.items() if "loss" in k})
            self.last_logs = logs
        self.sums = {}
        return logs

    @property
    def mean_step_time(self) -> float | None:
        """Mean wall time of this session's optimizer steps (``None`` before the first one)."""
        return sum(self.step_times) / len(self.step_times) if self.step_times else None

    def summary(self) -> dict[str, Any]:
        """``global_step``, the last ``logs`` and ``mean_step_time_s`` of this session."""
        return {
            "global_step": self.global_step,
            "logs": self.last_logs,
            "mean_step_time_s": self.mean_step_time,
        }

    def close(self) -> None:
        self.bar.close()


def make_ema(parameters: Iterable[torch.nn.Parameter], decay: float = 0.999, **kwargs: Any) -> Any:
    """A diffusers ``EMAModel`` over ``parameters``: move it to the device and register it with
    ``accelerator.register_for_checkpointing``; ``ema.step(params)`` after each optimizer step,
    ``ema.copy_to(params)`` before the final export."""
    from diffusers.training_utils import EMAModel

    return EMAModel(list(parameters), decay=decay, **kwargs)


def finish_training(accelerator: Any, output_dir: str, steps: StepLogger) -> None:
    """Wait for every process, end the trackers and print the run's summary line."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if steps.mean_step_time is not None:
        accelerator.print(
            f"Done: {steps.global_step} steps, mean {steps.mean_step_time:.3f} s/step this session; "
            f"final model in {output_dir}."
        )


def perplexity(logs: Mapping[str, float]) -> dict[str, float]:
    """``{"ppl": exp(loss)}`` of a language model's logged mean loss (capped at exp(20))."""
    return {"ppl": math.exp(min(float(logs["loss"]), 20.0))}
