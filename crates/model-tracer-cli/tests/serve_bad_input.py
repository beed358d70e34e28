"""Bad input to `model-tracer serve`, in raw HTTP, while other requests
stream: each gets its 4xx and OpenAI's error object, the streams finish.

    python3 serve_bad_input.py --url http://127.0.0.1:PORT [--mode matrix|queue]

`queue` expects a server started with --parallel 1 --queue 1: a request
beyond the queue is answered 503 with Retry-After, and clients that hang
up free their sequence and their place in the queue at once."""

import argparse
import json
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve_http  # noqa: E402

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "Tell me a long story about a cat."}]


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"ok: {what}", flush=True)


def error_object(reply, status, what):
    check(reply.status == status, f"{what}: status {reply.status} (want {status})")
    body = reply.json()
    err = body.get("error")
    check(isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}
          and isinstance(err["message"], str) and err["message"],
          f"{what}: an error object {err}")
    return err


def matrix(url):
    streams = [
        serve_http.Stream(url, CHAT, {"messages": USER, "max_tokens": 48, "temperature": 0}),
        serve_http.Stream(url, COMPLETIONS, {"prompt": "Once upon a time", "max_tokens": 48,
                                             "temperature": 0.7, "seed": 3}),
        serve_http.Stream(url, CHAT, {"messages": USER, "max_tokens": 48, "temperature": 0,
                                      "stream_options": {"include_usage": True}}),
    ]
    for s in streams:
        s.started.wait(60)
    ctx = serve_http.health(url)["context"]
    long_prompt = "hello " * (ctx + 10)
    cases = [
        # (what, path, method, body, status, param)
        ("malformed JSON", CHAT, "POST", b'{"messages": [', 400, None),
        ("not an object", CHAT, "POST", b"[1, 2]", 400, None),
        ("empty body", COMPLETIONS, "POST", b"", 400, None),
        ("invalid UTF-8", CHAT, "POST", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}',
         400, None),
        ("missing messages", CHAT, "POST", {"model": "m"}, 400, "messages"),
        ("empty messages", CHAT, "POST", {"messages": []}, 400, "messages"),
        ("messages of the wrong type", CHAT, "POST", {"messages": "hi"}, 400, "messages"),
        ("a message without content", CHAT, "POST", {"messages": [{"role": "user"}]}, 400,
         "messages[0].content"),
        ("an unknown role", CHAT, "POST", {"messages": [{"role": "wizard", "content": "x"}]}, 400,
         "messages[0].role"),
        ("a prompt of the wrong type", COMPLETIONS, "POST", {"prompt": 42}, 400, "prompt"),
        ("a missing prompt", COMPLETIONS, "POST", {}, 400, "prompt"),
        ("max_tokens 0", COMPLETIONS, "POST", {"prompt": "hi", "max_tokens": 0}, 400,
         "max_tokens"),
        ("max_tokens negative", COMPLETIONS, "POST", {"prompt": "hi", "max_tokens": -1}, 400,
         "max_tokens"),
        ("max_tokens above the context", COMPLETIONS, "POST",
         {"prompt": "hi", "max_tokens": 10 ** 12}, 400, "max_tokens"),
        ("max_tokens a string", COMPLETIONS, "POST", {"prompt": "hi", "max_tokens": "9"}, 400,
         "max_tokens"),
        ("a prompt longer than the context", COMPLETIONS, "POST", {"prompt": long_prompt}, 400,
         "prompt"),
        ("temperature out of range", CHAT, "POST", {"messages": USER, "temperature": 9}, 400,
         "temperature"),
        ("top_p of the wrong type", CHAT, "POST", {"messages": USER, "top_p": [1]}, 400, "top_p"),
        ("stop of the wrong type", CHAT, "POST", {"messages": USER, "stop": {"a": 1}}, 400, "stop"),
        ("stream of the wrong type", CHAT, "POST", {"messages": USER, "stream": "yes"}, 400,
         "stream"),
        ("an unknown trace level", CHAT, "POST",
         {"messages": USER, "model_trace": {"level": "everything"}}, 400, "model_trace.level"),
        ("a body over the size limit", CHAT, "POST", b"x" * (2 << 20), 413, None),
        ("an unknown route", "/v1/nothing", "POST", {"messages": USER}, 404, None),
        ("an unknown route (GET)", "/v2", "GET", None, 404, None),
        ("an unknown trace id", "/v1/traces/cmpl-nope", "GET", None, 404, None),
        ("an unknown trace's report", "/v1/traces/cmpl-nope/report", "GET", None, 404, None),
        ("a wrong method", CHAT, "GET", None, 405, None),
        ("a wrong method (DELETE)", "/v1/models", "DELETE", None, 405, None),
    ]
    for what, path, method, body, status, param in cases:
        try:
            reply = serve_http.request(url, method, path, body, timeout=60)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise AssertionError(f"{what}: the connection failed: {e}")
        err = error_object(reply, status, what)
        if param is not None:
            check(err["param"] == param, f"{what}: param {err['param']!r}")
        if status == 400:
            check(err["type"] == "invalid_request_error", f"{what}: {err['type']}")
    check(all(s.thread.is_alive() or s.done for s in streams), "the streams went on meanwhile")
    for s in streams:
        s.join()
        check(s.status == 200 and s.done and s.error is None, "a stream ran to [DONE]")
        check(s.finish_reason() in ("stop", "length") and s.text(),
              f"with text and a finish_reason ({s.finish_reason()}, {len(s.text())} chars)")
        check(s.model_trace() is not None, "and model_trace in its last chunk")
    h = serve_http.health(url)
    check(h["status"] == "ok", "the server is healthy after it all")
    reply = serve_http.post(url, COMPLETIONS, {"prompt": "Hi", "max_tokens": 2})
    check(reply.status == 200 and reply.json()["usage"]["completion_tokens"] <= 2,
          "and still answers")


def requests(m, status, reason):
    """Completion requests of the samples `m` with that status and reason."""
    return m.get(("model_tracer_completion_requests_total",
                  (("finish_reason", reason), ("status", status))), 0)


def queue(url):
    h = serve_http.health(url)
    check(h["slots"]["total"] == 1 and h["queue"]["capacity"] == 1,
          "a server of one slot and a queue of one")
    long = {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0}
    a = serve_http.Stream(url, COMPLETIONS, long)
    serve_http.wait_health(url, lambda h: h["slots"]["busy"] == 1 and h["queued"] == 0,
                           "the first request to run")
    # Its prompt has run once its first token is out: its cache holds
    # positions from then on.
    deadline = time.time() + 60
    while not a.chunks and time.time() < deadline:
        time.sleep(0.01)
    check(bool(a.chunks), "the first request streams a token")
    b = serve_http.Stream(url, COMPLETIONS, long)
    serve_http.wait_health(url, lambda h: h["queued"] == 1, "the second to wait")
    m = serve_http.metrics(url)
    running, waiting, kv = (m[(name, ())] for name in (
        "model_tracer_requests_running", "model_tracer_requests_waiting",
        "model_tracer_kv_cache_usage_ratio"))
    check((running, waiting) == (1, 1), f"/metrics: one runs, one waits: {running}, {waiting}")
    context = h["context"]
    check(0 < kv <= 1, f"/metrics: the running one holds {kv * context:.0f} of {context} positions")
    reply = serve_http.post(url, COMPLETIONS, {"prompt": "Hi", "max_tokens": 2})
    err = error_object(reply, 503, "a request beyond the queue")
    check(reply.headers.get("retry-after") == "1" or reply.headers.get("Retry-After") == "1",
          "503 says when to retry")
    check(err["code"] == "queue_full", "the error says the queue is full")
    # hang up on both: the running one frees its slot at the next step, the
    # waiting one is dropped when its turn comes
    before = time.time()
    b.close()
    a.close()
    serve_http.wait_health(url, lambda h: h["slots"]["busy"] == 0 and h["queued"] == 0,
                           "the slot and the queue to free", timeout=30)
    check(True, f"clients that hung up freed everything in {time.time() - before:.2f} s")
    h = serve_http.health(url)
    check(h["abandoned"] == 2, f"both counted as abandoned: {h}")
    reply = serve_http.post(url, COMPLETIONS, {"prompt": "Hi", "max_tokens": 2})
    check(reply.status == 200, "the next request runs")
    finish = reply.json()["choices"][0]["finish_reason"]

    # /metrics counted each request by what its client got
    m = serve_http.metrics(url)
    check(requests(m, "503", "error") == 1, "/metrics: the request beyond the queue, 503")
    check(requests(m, "200", "abort") == 2, "/metrics: the two streams hung up on, 200 then abort")
    check(requests(m, "200", finish) == 1, f"/metrics: the last request, 200 {finish}")
    served = {k[1]: v for k, v in m.items() if k[0] == "model_tracer_completion_requests_total"}
    check(sum(served.values()) == 4, f"/metrics: four requests in all: {served}")
    gauges = [m[(name, ())] for name in ("model_tracer_requests_running",
                                         "model_tracer_requests_waiting",
                                         "model_tracer_kv_cache_usage_ratio")]
    check(gauges == [0, 0, 0], f"/metrics: nothing runs or waits, the KV cache is empty: {gauges}")
    itl = m[("model_tracer_inter_token_latency_seconds_count", ())]
    ttft = m[("model_tracer_time_to_first_token_seconds_count", ())]
    check(itl >= 1 and ttft == 2,
          f"/metrics: latencies of the text sent: {itl:.0f} gaps, {ttft:.0f} first tokens")

    # a client of a whole response that hangs up got nothing: 499
    host, port = serve_http.split(url)
    sock = socket.create_connection((host, port), timeout=30)
    body = json.dumps(long).encode()
    sock.sendall(b"POST " + COMPLETIONS.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    serve_http.wait_health(url, lambda h: h["slots"]["busy"] == 1, "the whole request to run")
    sock.close()
    serve_http.wait_health(url, lambda h: h["slots"]["busy"] == 0, "its slot to free", timeout=30)
    m = serve_http.metrics(url)
    check(requests(m, "499", "abort") == 1, "/metrics: the whole response hung up on, 499 abort")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--mode", default="matrix", choices=["matrix", "queue"])
    args = ap.parse_args()
    {"matrix": matrix, "queue": queue}[args.mode](args.url)
    print(f"serve_bad_input.py {args.mode}: every check passed")


if __name__ == "__main__":
    main()
