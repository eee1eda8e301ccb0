"""Start-up time of the command line and of ``import storygptv``, against ``python -c "import torch"``.

Each command runs in a fresh interpreter, ``--repeats`` times, interleaved; the table gives the median wall time
and the ratio to importing torch alone (measured side by side in one run).

Usage:
    python benchmarks/startup.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "storygptv --help": [sys.executable, "-m", "storygptv.cli", "--help"],
    "storygptv generate --help": [sys.executable, "-m", "storygptv.cli", "generate", "--help"],
    "python -c 'import storygptv'": [sys.executable, "-c", "import storygptv"],
    "from storygptv import StoryGPTVPipeline": [
        sys.executable,
        "-c",
        "from storygptv import StoryGPTVPipeline",
    ],
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeats):
        for name, command in COMMANDS.items():
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["python -c 'import torch'"])
    print(f"median of {args.repeats} runs each, fresh interpreters")
    print("| command | seconds | ratio to `import torch` |")
    print("|---|---|---|")
    for name, values in times.items():
        print(f"| `{name}` | {statistics.median(values):.2f} | {statistics.median(values) / base:.2f} |")


if __name__ == "__main__":
    main()
