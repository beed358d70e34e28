#!/usr/bin/env python3
"""Aggregate generation throughput of `model-tracer serve`: C clients at
once (1, 2, 4, 8), each asking for 128 greedy tokens, against a server
with --trace off and one with --trace lightweight, measured in turns (off,
lightweight, off, ...) so that a change of the machine's load falls on
both. With --llama-server PATH, llama.cpp's own server on the same file
(--threads as ours, --parallel as many slots as the most clients, the
same context per slot) is measured in the same turns. Prints a Markdown table
of generated tokens per second.

    cargo build --release -p model-tracer-cli
    bash benches/build_llama_server.sh     # for --llama-server; prints its path
    python3 benches/serve_throughput.py [--bin target/release/model-tracer] \
        [--gguf models/SmolLM2-135M-Instruct.Q4_1.gguf] [--rounds 3] \
        [--llama-server target/llama-server/build/bin/llama-server]"""

import argparse
import concurrent.futures
import os
import socket
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
    def __init__(self, binary, gguf, trace, parallel, threads):
        self.proc = subprocess.Popen(
            [binary, "serve", "--gguf", gguf, "--port", "0", "--trace", trace,
             "--parallel", str(parallel), "--ctx", "512", "--keep-traces", "8",
             "--threads", str(threads)],
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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """llama.cpp's `llama-server` on 127.0.0.1: `threads` threads,
    `parallel` slots of 512 positions each, ready once GET /health answers
    200."""

    def __init__(self, binary, gguf, parallel, threads):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port),
             "-t", str(threads), "-tb", str(threads), "--parallel", str(parallel),
             "-c", str(512 * parallel),
             "--no-webui"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                sys.exit("llama-server exited at start")
            try:
                if serve_http.request(self.url, "GET", "/health", timeout=5).status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        sys.exit("llama-server did not start")

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
    ap.add_argument("--llama-server", help="llama.cpp's llama-server binary, measured beside")
    ap.add_argument("--threads", type=int, default=1, help="threads of every server (default 1)")
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    levels = ["off", "lightweight"]
    servers = {lv: Server(args.bin, args.gguf, lv, max(clients), args.threads) for lv in levels}
    if args.llama_server:
        levels.append("llama-server")
        servers["llama-server"] = LlamaServer(args.llama_server, args.gguf, max(clients),
                                              args.threads)
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
          f"{args.threads} thread(s) per server, generated tokens/s of all clients together; "
          f"load average {os.getloadavg()[0]:.1f} at the end\n")
    llama = "llama-server" in levels
    print("| clients | --trace off | --trace lightweight | lightweight / off |"
          + (f" llama-server -t {args.threads} | off / llama-server |" if llama else ""))
    print("| ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if llama else ""))
    one = statistics.median(results[("off", clients[0])])
    for c in clients:
        off = statistics.median(results[("off", c)])
        light = statistics.median(results[("lightweight", c)])
        row = f"| {c} | {off:.1f} | {light:.1f} | {light / off:.3f} |"
        if llama:
            ls = statistics.median(results[("llama-server", c)])
            row += f" {ls:.1f} | {off / ls:.2f} |"
        print(row)
    last = statistics.median(results[("off", clients[-1])])
    print(f"\n--trace off: {clients[-1]} clients give {last / one:.2f}x the tokens/s of {clients[0]}")
    if llama:
        a = statistics.median(results[("llama-server", clients[0])])
        b = statistics.median(results[("llama-server", clients[-1])])
        print(f"llama-server: {clients[-1]} clients give {b / a:.2f}x the tokens/s of {clients[0]}")


if __name__ == "__main__":
    main()
