#!/usr/bin/env python3
"""Scrape latency of `model-tracer serve`'s GET /metrics: the server idle,
then while C streaming clients (8) each generate T greedy tokens (128),
with a scrape every I seconds (0.05) on one kept-alive connection, as
Prometheus scrapes. Prints median, p99 and largest latency (request sent
to body read) of each phase, the samples a scrape holds, and the
machine's load average before and after.

    cargo build --release -p model-tracer-cli
    python3 benches/serve_scrape.py [--bin target/release/model-tracer] \
        [--gguf models/SmolLM2-135M-Instruct.Q4_1.gguf] [--clients 8] \
        [--tokens 128] [--interval 0.05] [--trace lightweight]"""

import argparse
import http.client
import os
import statistics
import subprocess
import sys
import threading
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


def start(args):
    proc = subprocess.Popen(
        [args.bin, "serve", "--gguf", args.gguf, "--host", "127.0.0.1", "--port", "0",
         "--trace", args.trace, "--parallel", str(args.clients), "--ctx", "512",
         "--keep-traces", "8"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("listening on "):
            return proc, line.split(" ", 2)[2].strip()
    proc.kill()
    proc.wait(30)
    sys.exit("the server did not start")


class Scraper:
    """GET /metrics every `interval` seconds on one connection."""

    def __init__(self, url, interval):
        host, port = serve_http.split(url)
        self.conn = http.client.HTTPConnection(host, port, timeout=30)
        self.interval = interval
        self.samples = 0

    def scrape(self):
        t = time.perf_counter()
        self.conn.request("GET", "/metrics")
        r = self.conn.getresponse()
        body = r.read()
        took = time.perf_counter() - t
        if r.status != 200:
            raise RuntimeError(f"/metrics answered {r.status}")
        self.samples = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
        return took

    def run(self, until):
        out = []
        while not until():
            out.append(self.scrape())
            time.sleep(self.interval)
        return out


def summary(name, times):
    times = sorted(times)
    p99 = times[min(len(times) - 1, int(round(0.99 * (len(times) - 1))))]
    print(f"| {name} | {len(times)} | {statistics.median(times) * 1e3:.2f} | "
          f"{p99 * 1e3:.2f} | {times[-1] * 1e3:.2f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "model-tracer"))
    ap.add_argument("--gguf", default=os.path.join(ROOT, "models",
                                                   "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--interval", type=float, default=0.05)
    ap.add_argument("--idle-scrapes", type=int, default=200)
    ap.add_argument("--trace", default="lightweight")
    args = ap.parse_args()
    load = os.getloadavg()
    proc, url = start(args)
    try:
        serve_http.wait_health(url, lambda h: h["status"] == "ok", "the server")
        # One request first, so that the health families have their series.
        r = serve_http.post(url, "/v1/completions",
                            {"prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0})
        assert r.status == 200, r.status
        scraper = Scraper(url, args.interval)
        idle = [scraper.scrape() for _ in range(args.idle_scrapes)]
        streams = [
            serve_http.Stream(url, "/v1/completions", {
                "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.tokens,
                "temperature": 0})
            for i in range(args.clients)
        ]
        t0 = time.perf_counter()
        busy = scraper.run(lambda: all(not s.thread.is_alive() for s in streams))
        wall = time.perf_counter() - t0
        for s in streams:
            s.join()
            assert s.status == 200 and s.done, (s.status, s.error)
        health = serve_http.health(url)
    finally:
        proc.kill()
        proc.wait(30)
    print(f"{args.clients} streaming clients x {args.tokens} tokens in {wall:.1f} s, "
          f"trace {args.trace}; a scrape holds {scraper.samples} samples; "
          f"finished {health['finished']}")
    print("| phase | scrapes | median ms | p99 ms | max ms |")
    print("|---|---|---|---|---|")
    summary("idle", idle)
    summary(f"{args.clients} clients streaming", busy)
    print("load average (1, 5, 15 min) before: %.2f %.2f %.2f, after: %.2f %.2f %.2f; %d cores"
          % (*load, *os.getloadavg(), os.cpu_count()))


if __name__ == "__main__":
    main()
