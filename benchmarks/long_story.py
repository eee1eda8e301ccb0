"""Per-frame wall time and peak memory of StoryGPTVPipeline on a long story.

With the whole story in the LLM context, the KV cache carried from frame to frame keeps the LLM work of
frame n proportional to its new tokens, so per-frame time should stay flat. The script prints, for
frames 1..N, the wall time, the peak memory during the frame (CPU: peak RSS, reset per frame through
/proc/self/clear_refs; CUDA: torch's peak allocated), the LLM tokens processed for the frame, and the
ratio of the mean time of the last 10 frames to that of the first 10 (frame 1, which has no LLM call,
is excluded from the first 10).

With ``--max-context-tokens`` the story outgrows the LLM's token budget: a block of the oldest frames is then
dropped at once (down to half the budget) and the cache rebuilt once per block, so per-frame cost stays flat
past the budget too; the number of rebuilds is printed.

Usage:
    python benchmarks/long_story.py --frames 100                    # tiny components, whole story
    python benchmarks/long_story.py --frames 100 --context-window 8
    python benchmarks/long_story.py --frames 500 --max-context-tokens 1024   # a story that overflows
    python benchmarks/long_story.py --model path/to/pipeline --device cuda --dtype float16
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from storygptv.pipelines.pipeline_storygptv import StoryGPTVPipeline


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--steps", type=int, default=2, help="denoising steps per frame")
    parser.add_argument("--context-window", type=int, default=None)
    parser.add_argument(
        "--max-context-tokens",
        type=int,
        default=None,
        help="LLM token budget of the story (default: the model's)",
    )
    parser.add_argument(
        "--model", default=None, help="a pipeline folder or Hub id (default: tiny components)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dtype = getattr(torch, args.dtype)
    if args.model:
        pipe = StoryGPTVPipeline.from_pretrained(args.model, dtype=dtype)
    else:
        from storygptv.testing.storygptv import tiny_storygptv_components

        pipe = StoryGPTVPipeline(**tiny_storygptv_components())
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    pipe = pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    if args.max_context_tokens is not None:
        pipe.story_model.config.max_context_tokens = args.max_context_tokens
    cuda = args.device.startswith("cuda")

    pattern = [
        "Ava and Bo are standing in the forest.",
        "They are jumping.",
        "Ava is waving.",
        "She is laughing.",
    ]
    captions = [pattern[i % len(pattern)] for i in range(args.frames)]
    cast = {
        "Ava": np.full((32, 32, 3), (230, 30, 40), np.uint8),
        "Bo": np.full((32, 32, 3), (30, 70, 230), np.uint8),
    }

    times: list[float] = []
    peaks: list[float] = []
    tokens: list[int] = []
    clock = {"t": 0.0, "tokens": 0}

    def begin_frame() -> None:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_rss()
        clock["t"] = time.perf_counter()

    def on_frame_end(p, index, image) -> None:
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - clock["t"])
        peaks.append(torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mib())
        total = p.story_context.llm_tokens_total
        tokens.append(total - clock["tokens"])
        clock["tokens"] = total
        begin_frame()

    begin_frame()
    output = pipe(
        captions,
        characters=cast,
        num_inference_steps=args.steps,
        generator=torch.Generator(args.device).manual_seed(0),
        context_window=args.context_window,
        output_type="np",
        callback_on_frame_end=on_frame_end,
    )

    unit = "peak CUDA MiB" if cuda else "peak RSS MiB"
    print(
        f"frames={args.frames} steps={args.steps} context_window={args.context_window} "
        f"budget={pipe.story_model.config.context_token_budget} device={args.device} dtype={args.dtype}"
    )
    print(f"{'frame':>5} {'ms':>9} {unit:>14} {'LLM tokens':>10}")
    for index, (t, peak, n) in enumerate(zip(times, peaks, tokens), start=1):
        print(f"{index:>5} {t * 1000:>9.1f} {peak:>14.1f} {n:>10}")
    if len(times) >= 21:
        first, last = statistics.mean(times[1:11]), statistics.mean(times[-10:])
        print(
            f"mean ms frames 2-11: {first * 1000:.1f}; last 10: {last * 1000:.1f}; ratio last/first = {last / first:.3f}"
        )
        print(f"peak memory frame 2: {peaks[1]:.1f} MiB; last frame: {peaks[-1]:.1f} MiB")
        print(
            f"LLM tokens per frame, frames 2-11: {statistics.mean(tokens[1:11]):.0f}; last 10: "
            f"{statistics.mean(tokens[-10:]):.0f}"
        )
    state = output.story_context
    print(
        f"frames dropped from the context: {state.num_frames_dropped}; cache rebuilds: {state.num_rebuilds}"
    )


if __name__ == "__main__":
    main()
