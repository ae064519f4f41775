"""Where a package's time goes, op by op: one `vsal run` with ONNX Runtime's profiler on every session.

  python scripts/profile_ops.py PACKAGE [--precision P] [--media CLIP] [--max-new-tokens N] [--top K]

Runs `vsal run PACKAGE` once in a child process with $VSAL_ORT_PROFILE set (runtime.backends.
sessions: each session writes ONNX Runtime's JSON profile when it ends), then sums the kernel times
per graph and op type: per graph its total, and the top K op types of the whole run with their
share. The run includes each session's first run (ONNX Runtime's lazy setup), so treat small
differences with care; `vsal bench` gives the timed medians. Without --media a generated clip is
used (runtime.synthetic). Standard library and the runtime only.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def kernel_times(folder: Path) -> dict[str, collections.Counter]:
    """{graph: Counter(op type -> microseconds)} from the profiles in `folder`."""
    graphs: dict[str, collections.Counter] = {}
    for path in sorted(folder.glob("*.json")):
        graph = path.name.rsplit("_", 3)[0]  # <name>_<date>_<time>_<ms>.json
        times = graphs.setdefault(graph, collections.Counter())
        for event in json.loads(path.read_text()):
            if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
                times[event["args"]["op_name"]] += event["dur"]
    return graphs


def report(graphs: dict[str, collections.Counter], top: int) -> str:
    total = sum(sum(t.values()) for t in graphs.values()) or 1
    lines = ["| graph | kernel ms | share |", "|---|---|---|"]
    for graph, times in sorted(graphs.items(), key=lambda kv: -sum(kv[1].values())):
        ms = sum(times.values()) / 1e3
        lines.append(f"| {graph} | {ms:.1f} | {100 * ms * 1e3 / total:.0f}% |")
    ops = collections.Counter()
    for graph, times in graphs.items():
        for op, us in times.items():
            ops[f"{graph} {op}"] += us
    lines += ["", f"top {top} (graph, op type):", "| graph op | kernel ms | share |", "|---|---|---|"]
    for key, us in ops.most_common(top):
        lines.append(f"| {key} | {us / 1e3:.1f} | {100 * us / total:.0f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package", type=Path)
    parser.add_argument("--precision", default=None)
    parser.add_argument("--media", type=Path, default=None, help="a video (default: a generated clip)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    if not (args.package / "manifest.json").is_file():
        print(f"profile_ops: {args.package}: not a vsal package (no manifest.json)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="vsal-profile-") as tmp:
        media = args.media
        if media is None:
            from vsal.runtime.synthetic import write_clip

            media = Path(tmp) / "clip.mp4"
            write_clip(media)
        folder = Path(tmp) / "profiles"
        entry = "from vsal.runtime.entry import main; main()"  # as the `vsal` command: on huge pages
        command = [sys.executable, "-c", entry, "run", str(args.package)]
        command += ["--video", str(media)]
        command += ["--prompt", "What happens in this clip?", "--max-new-tokens", str(args.max_new_tokens)]
        if args.precision:
            command += ["--precision", args.precision]
        done = subprocess.run(command, env=os.environ | {"VSAL_ORT_PROFILE": str(folder)}, text=True)
        if done.returncode:
            print(f"profile_ops: vsal run failed (exit {done.returncode})", file=sys.stderr)
            return done.returncode
        graphs = kernel_times(folder)
    if not graphs:
        print("profile_ops: no profile was written (no ONNX Runtime session ran)", file=sys.stderr)
        return 1
    print(report(graphs, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
