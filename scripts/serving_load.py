"""Load figure for serving: requests per second and latency percentiles at 1, 4 and 8 concurrent
clients, for the in-process runtime (one Pipeline shared by client threads) and for `vsal serve`
(the Triton server on loopback, gRPC streaming clients). Every request is a fresh clip for both
(the in-process media cache is turned off; the server never caches uploads), greedy decoding.

    .venv/bin/python scripts/serving_load.py PACKAGE [--concurrency 1,4,8] [--requests 4] [--json out.json]

PACKAGE: a model package (e.g. `vsal-export export --output vsal-models/tiny`). Clips are generated
(10 s, 320x240, 25 fps, a stereo tone sweep) unless --clips gives a folder of them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def measure(ask, clips: list[Path], clients: int, per_client: int) -> dict:
    """`clients` threads, each asking `per_client` questions back to back; latency per request."""
    latencies: list[float] = []
    tokens: list[int] = []

    def client(c: int) -> None:
        for r in range(per_client):
            clip = clips[(c * per_client + r) % len(clips)]
            start = time.perf_counter()
            answer = ask(clip)
            latencies.append(time.perf_counter() - start)
            tokens.append(len(answer.token_ids))

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    return {
        "clients": clients,
        "requests": len(latencies),
        "rps": len(latencies) / wall,
        "p50_s": percentile(latencies, 0.5),
        "p90_s": percentile(latencies, 0.9),
        "mean_tokens": statistics.mean(tokens),
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("package", type=Path)
    parser.add_argument("--clips", type=Path, default=None, help="Folder of clips (default: generated).")
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--requests", type=int, default=4, help="Requests per client.")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--modes", default="in-process,server")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from vsal.runtime.log import sayer
    from vsal.runtime.pipeline import Pipeline
    from vsal.runtime.prompt import DecodingOptions
    from vsal.runtime.serving.client import Client
    from vsal.runtime.serving.serve import Server, free_port
    from vsal.runtime.synthetic import write_clip

    say = sayer("serving_load")
    levels = [int(c) for c in args.concurrency.split(",")]
    options = DecodingOptions(num_beams=1, max_new_tokens=args.max_new_tokens)
    prompt = "What happens in the video?"
    with tempfile.TemporaryDirectory(prefix="vsal-load-") as tmp:
        if args.clips:
            clips = sorted(p for p in args.clips.iterdir() if p.is_file())
        else:
            clips = [write_clip(Path(tmp) / f"clip{i}.mp4", seconds=10.0) for i in range(max(levels))]
        rows = []
        modes = args.modes.split(",")
        if "in-process" in modes:
            # media_cache_size 0: every request decodes and encodes its clip, as the server does
            pipeline = Pipeline.load(args.package, provider="cpu", verbose=False, media_cache_size=0)
            pipeline.ask(prompt, video=clips[0], options=options)  # warm-up: sessions load

            def ask_local(clip):
                return pipeline.ask(prompt, video=clip, options=options)

            for n in levels:
                rows.append({"mode": "in-process"} | measure(ask_local, clips, n, args.requests))
                say(str(rows[-1]))
        if "server" in modes:
            with Server(args.package, port=free_port(), quiet=True) as server:
                Client(server.url).ask(prompt, video=clips[0], options=options)  # warm-up

                def ask_server(clip):
                    return Client(server.url, timeout_s=600).ask(prompt, video=clip, options=options)

                for n in levels:
                    rows.append(
                        {"mode": "vsal serve (Triton)"} | measure(ask_server, clips, n, args.requests)
                    )
                    say(str(rows[-1]))
    print("| runtime | clients | requests | req/s | p50 latency | p90 latency |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['mode']} | {r['clients']} | {r['requests']} | {r['rps']:.2f} | {r['p50_s']:.2f} s "
            f"| {r['p90_s']:.2f} s |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
