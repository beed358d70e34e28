#!/usr/bin/env python3
"""Soak test of `model-tracer serve`: N requests, good, bad and hanging up,
a few at a time. At the end every sequence slot is free and the queue
empty, the server's resident memory is within 5% of what it was after the
first 100 requests, and no status other than the documented ones came back.

    model-tracer serve --port 8080 --ctx 512 --keep-traces 8 &
    python3 benches/serve_soak.py --url http://127.0.0.1:8080 --pid $! [--requests 2000]

(--pid: the server's process id, for VmRSS in /proc/PID/status.)"""

import argparse
import collections
import concurrent.futures
import http.client
import json
import os
import random
import sys
import threading
import time

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates",
                    "model-tracer-cli", "tests"))
import serve_http  # noqa: E402

# 200: answered; 400/404/405/413: bad input; 503: queue full (retry later).
DOCUMENTED = {200, 400, 404, 405, 413, 503}
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
WORDS = "the cat sat on a mat and looked at the moon while rain fell softly".split()


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def prompt(rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 24)))


def good(rng):
    n = rng.randint(1, 8)
    sampling = {"temperature": rng.choice([0, 0.7, 1.0]), "seed": rng.randint(0, 99),
                "max_tokens": n}
    if rng.random() < 0.1:
        sampling["model_trace"] = {"level": "full"}
    if rng.random() < 0.2:
        sampling["stop"] = [rng.choice(WORDS)]
    if rng.random() < 0.5:
        return CHAT, dict(sampling, messages=[{"role": "user", "content": prompt(rng)}])
    return COMPLETIONS, dict(sampling, prompt=prompt(rng))


BAD = [
    ("POST", CHAT, b'{"messages": ['),
    ("POST", CHAT, b'{"messages": []}'),
    ("POST", CHAT, b'{"messages": [{"role": "user", "content": "\xff"}]}'),
    ("POST", COMPLETIONS, b'{"prompt": 3}'),
    ("POST", COMPLETIONS, b'{"prompt": "a", "max_tokens": 0}'),
    ("POST", COMPLETIONS, b'{"prompt": "a", "max_tokens": 100000000}'),
    ("POST", COMPLETIONS, b"x" * (1 << 21)),
    ("GET", CHAT, None),
    ("GET", "/v1/traces/nope", None),
    ("POST", "/v1/elsewhere", b"{}"),
]


def one(url, i, seed):
    """Request i: its status, or 'hung up'."""
    rng = random.Random(seed * 100_003 + i)
    r = rng.random()
    if r < 0.2:
        method, path, body = rng.choice(BAD)
        return serve_http.request(url, method, path, body, timeout=120).status
    path, body = good(rng)
    if r < 0.35:
        # hang up: after the first chunk of a stream, or right after sending
        host, port = serve_http.split(url)
        conn = http.client.HTTPConnection(host, port, timeout=60)
        streaming = rng.random() < 0.5
        payload = dict(body, stream=streaming, max_tokens=32)
        conn.request("POST", path, body=json.dumps(payload).encode(),
                     headers={"Content-Type": "application/json"})
        if streaming:
            resp = conn.getresponse()
            if resp.status == 200:
                resp.readline()
        conn.close()
        return "hung up"
    if rng.random() < 0.5:
        s = serve_http.Stream(url, path, body, timeout=120).join(180)
        if s.status == 200 and not s.done:
            raise AssertionError(f"request {i}: the stream ended without [DONE]: {s.error}")
        return s.status
    reply = serve_http.post(url, path, body, timeout=120)
    if reply.status == 200:
        doc = reply.json()
        assert doc["usage"]["completion_tokens"] <= body["max_tokens"], doc
        assert "model_trace" in doc
    return reply.status


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    warm = min(100, args.requests)
    statuses = collections.Counter()
    lock = threading.Lock()
    t0 = time.time()

    def batch(start, end):
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            for status in pool.map(lambda i: one(args.url, i, args.seed), range(start, end)):
                with lock:
                    statuses[status] += 1

    batch(0, warm)
    serve_http.wait_health(args.url, lambda h: h["slots"]["busy"] == 0 and h["queued"] == 0,
                           "the server to be idle after the first requests")
    rss_warm = rss_kib(args.pid)
    store_warm = serve_http.health(args.url)["traces"]["bytes"]
    batch(warm, args.requests)
    h = serve_http.wait_health(
        args.url, lambda h: h["slots"]["busy"] == 0 and h["queued"] == 0,
        "every slot to be free", timeout=60)
    rss_end = rss_kib(args.pid)
    store_end = h["traces"]["bytes"]
    elapsed = time.time() - t0
    print(f"{args.requests} requests in {elapsed:.1f} s, {args.clients} clients: "
          f"{dict(sorted(statuses.items(), key=str))}")
    print(f"health: {h}")
    growth = (rss_end - rss_warm) / rss_warm
    print(f"VmRSS after {warm} requests {rss_warm} KiB, after {args.requests}: {rss_end} KiB "
          f"({100 * growth:+.2f}%); the kept traces' rows {store_warm // 1024} KiB, then "
          f"{store_end // 1024} KiB")
    unknown = {s for s in statuses if s != "hung up" and s not in DOCUMENTED}
    failures = []
    if unknown:
        failures.append(f"undocumented statuses {unknown}")
    if statuses[200] == 0:
        failures.append("no request succeeded")
    if h["slots"]["busy"] != 0 or h["slots"]["free"] != h["slots"]["total"]:
        failures.append(f"slots still busy: {h['slots']}")
    if abs(growth) > 0.05:
        failures.append(f"resident memory moved {100 * growth:+.2f}% (over 5%)")
    if failures:
        sys.exit("serve_soak.py FAILED: " + "; ".join(failures))
    print("serve_soak.py: every slot free, memory flat, only documented statuses")


if __name__ == "__main__":
    main()
