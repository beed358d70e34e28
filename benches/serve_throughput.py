#!/usr/bin/env python3
"""Aggregate generation throughput of `model-tracer serve`: C clients at
once (1, 2, 4, 8), each asking for 128 greedy tokens, against a server
with --trace off and one with --trace lightweight, measured in turns (off,
lightweight, off, ...) so that a change of the machine's load falls on
both. Prints a Markdown table of generated tokens per second.

    cargo build --release -p model-tracer-cli
    python3 benches/serve_throughput.py [--bin target/release/model-tracer] \
        [--gguf models/SmolLM2-135M-Instruct.Q4_1.gguf] [--rounds 3]"""

import argparse
import concurrent.futures
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates",
                    "model-tracer-cli", "tests"))
import serve_http  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PROMPTS = [
    "Once upon a time, in a small village by the sea,",
    "The history of the Roman Empire begins",
    "Here is a recipe for a simple tomato soup:",
    "The most important rule of writing is",
    "In the year 2150, humanity",
    "A guide to the planets of the solar system:",
    "The old lighthouse keeper said",
    "Ten facts about the ocean:",
]


class Server:
    def __init__(self, binary, gguf, trace, parallel):
        self.proc = subprocess.Popen(
            [binary, "serve", "--gguf", gguf, "--port", "0", "--trace", trace,
             "--parallel", str(parallel), "--ctx", "512", "--keep-traces", "8"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        deadline = time.time() + 120
        self.url = None
        while time.time() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.startswith("listening on "):
                self.url = line.split(" ", 2)[2].strip()
                break
        if self.url is None:
            self.stop()
            sys.exit(f"the {trace} server did not start")

    def stop(self):
        self.proc.kill()
        self.proc.wait(30)


def measure(url, clients, tokens):
    """Generated tokens per second of `clients` requests at once."""
    def one(i):
        r = serve_http.post(url, "/v1/completions", {
            "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": tokens, "temperature": 0,
        }, timeout=600)
        if r.status != 200:
            raise RuntimeError(f"status {r.status}: {r.body[:200]!r}")
        return r.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        generated = sum(pool.map(one, range(clients)))
    return generated / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "model-tracer"))
    ap.add_argument("--gguf", default=os.path.join(ROOT, "models",
                                                   "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    levels = ["off", "lightweight"]
    servers = {lv: Server(args.bin, args.gguf, lv, max(clients)) for lv in levels}
    results = {(lv, c): [] for lv in levels for c in clients}
    try:
        for lv in levels:  # warm-up: page in the weights, grow the buffers
            measure(servers[lv].url, 1, 8)
        for _ in range(args.rounds):
            for c in clients:
                for lv in levels:
                    results[(lv, c)].append(measure(servers[lv].url, c, args.tokens))
    finally:
        for s in servers.values():
            s.stop()
    print(f"{args.tokens} greedy tokens per client, median of {args.rounds} rounds, "
          "generated tokens/s of all clients together\n")
    print("| clients | --trace off | --trace lightweight | lightweight / off |")
    print("| ---: | ---: | ---: | ---: |")
    for c in clients:
        off = statistics.median(results[("off", c)])
        light = statistics.median(results[("lightweight", c)])
        print(f"| {c} | {off:.1f} | {light:.1f} | {light / off:.2f} |")


if __name__ == "__main__":
    main()
