"""`model-tracer serve` through the `openai` Python package: chat and
completions, streaming and not, against `model-tracer run` on the same
prompts; concurrent requests; stop strings; seeds; each request's trace.

    python3 serve_openai.py --url http://127.0.0.1:PORT --bin model-tracer \
        --gguf MODEL [--mode main|inject]

Exits non-zero with the first failed check."""

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile

import openai

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve_http  # noqa: E402

SYSTEM = "You are a helpful assistant."
QUESTION = "What is the capital of France?"
PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at",
    "1, 2, 3, 4,",
    "The quick brown fox",
    "In the beginning",
]


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"ok: {what}", flush=True)


def run_ids(args, flag, text, max_tokens):
    """The generated ids and text of `model-tracer run` (greedy)."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "run.json")
        subprocess.run(
            [args.bin, "run", "--gguf", args.gguf, flag, text, "--max-tokens",
             str(max_tokens), "--trace", "off", "--json", out],
            check=True, stdout=subprocess.DEVNULL, timeout=300)
        with open(out) as f:
            doc = json.load(f)
    return doc["generated_ids"], doc["generated_text"]


def trace_of(response):
    """The `model_trace` extension of a response object."""
    extra = response.model_extra or {}
    return extra.get("model_trace")


def complete(client, prompt, max_tokens, **kw):
    r = client.completions.create(model="m", prompt=prompt, max_tokens=max_tokens,
                                  temperature=0, **kw)
    return r.choices[0].text, trace_of(r)["generated_ids"], r


def main_checks(args, client):
    models = client.models.list()
    check(len(models.data) == 1 and models.data[0].id, "GET /v1/models names the model")

    # chat, not streamed, against `run --chat` (whose default system message is SYSTEM)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    r = client.chat.completions.create(model="m", messages=messages, max_tokens=16, temperature=0)
    trace = trace_of(r)
    ids, text = run_ids(args, "--chat", QUESTION, 16)
    check(trace["generated_ids"] == ids,
          f"greedy chat ids equal those of `run --chat` ({len(ids)} tokens)")
    eog = "<|im_end|>"
    check(r.choices[0].message.content == text.removesuffix(eog),
          f"chat text {r.choices[0].message.content!r} is run's")
    check(r.choices[0].finish_reason == ("stop" if text.endswith(eog) else "length"),
          "finish_reason follows the end-of-turn token")
    check(r.usage.completion_tokens == len(ids) and r.usage.prompt_tokens > 0
          and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens,
          "usage counts the prompt and the generated tokens")
    check(trace["level"] == "lightweight" and trace["forwards"]
          == r.usage.prompt_tokens + r.usage.completion_tokens - 1,
          "model_trace: one forward per position run")
    check(trace["id"] == r.id, "model_trace names the request id")

    # the same chat, streamed
    chunks = list(client.chat.completions.create(
        model="m", messages=messages, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    check(streamed == r.choices[0].message.content, "a streamed chat has the same text")
    check(chunks[0].choices[0].delta.role == "assistant", "the first chunk names the role")
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    check(finish == [r.choices[0].finish_reason], "one chunk carries the finish_reason")
    last = chunks[-1]
    check(last.usage is not None and last.usage.completion_tokens == len(ids),
          "include_usage: the last chunk has the usage")
    check(trace_of(last)["generated_ids"] == ids, "the last chunk carries model_trace")

    # completions against `run --prompt`
    solo = {}
    for p in PROMPTS:
        text, got, _ = complete(client, p, 12)
        solo[p] = (text, got)
    ids, text = run_ids(args, "--prompt", PROMPTS[1], 12)
    check(solo[PROMPTS[1]][1] == ids, "greedy completion ids equal those of `run --prompt`")
    check(solo[PROMPTS[1]][0] == text.removesuffix(eog), "and so does its text")

    # 8 at once, each what it gets alone
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = {p: pool.submit(complete, client, p, 12) for p in PROMPTS}
        together = {p: f.result(timeout=600) for p, f in futures.items()}
    for p in PROMPTS:
        if together[p][1] != solo[p][1]:
            raise AssertionError(f"{p!r}: {together[p][1]} together, {solo[p][1]} alone")
    check(True, "8 concurrent requests each get the tokens they get alone")

    # streamed completion, and a stop string that falls inside the text
    stream = client.completions.create(model="m", prompt=PROMPTS[0], max_tokens=12,
                                       temperature=0, stream=True)
    chunks = list(stream)
    check("".join(c.choices[0].text for c in chunks if c.choices) == solo[PROMPTS[0]][0],
          "a streamed completion has the text of the whole one")
    full_text = solo[PROMPTS[1]][0]
    words = full_text.split(" ")
    check(len(words) > 3, f"the text to cut has words: {full_text!r}")
    stop = " " + words[3]
    want = full_text[:full_text.index(stop)]
    text, _, r = complete(client, PROMPTS[1], 12, stop=[stop, "\u2603never"])
    check(text == want and r.choices[0].finish_reason == "stop",
          f"stop {stop!r} cuts the text to {want!r}")
    chunks = list(client.completions.create(model="m", prompt=PROMPTS[1], max_tokens=12,
                                            temperature=0, stop=stop, stream=True))
    got = "".join(c.choices[0].text for c in chunks if c.choices)
    check(got == want, "streaming holds back the stop string and sends the text before it")

    # seeded sampling
    a = complete(client, PROMPTS[2], 10, seed=7)  # temperature 0 again: ignore seed
    draws = []
    for _ in range(2):
        r = client.completions.create(model="m", prompt=PROMPTS[2], max_tokens=10,
                                      temperature=1.0, top_p=0.9, seed=1234)
        draws.append(trace_of(r)["generated_ids"])
    check(draws[0] == draws[1], "the same seed samples the same tokens")
    check(a[1] == solo[PROMPTS[2]][1][:10], "greedy does not depend on the seed")

    # the request's trace, as JSON Lines rows
    _, _, r = complete(client, PROMPTS[4], 6)
    trace = trace_of(r)
    rows = serve_http.request(args.url, "GET", trace["trace"])
    check(rows.status == 200, "GET /v1/traces/{id} answers")
    lines = [json.loads(line) for line in rows.body.decode().splitlines()]
    check(len(lines) == trace["forwards"], f"one row per forward ({len(lines)})")
    check([row["position"] for row in lines] == list(range(len(lines))),
          "the rows are positions 0, 1, ...")
    check(all("act_layer" in row and "act_std" in row for row in lines),
          "the rows are the tracer's JSON Lines schema")
    check(lines[-1]["model"]["layers"] == 30, "each row names the model")

    # a full trace and its report
    r = client.completions.create(model="m", prompt=PROMPTS[5], max_tokens=6, temperature=0,
                                  extra_body={"model_trace": {"level": "full"}})
    trace = trace_of(r)
    check(trace["level"] == "full", "a request can ask for a full trace")
    check(trace["generated_ids"] == solo[PROMPTS[5]][1][:6],
          "the Full model generates the same tokens")
    report = serve_http.request(args.url, "GET", trace["report"])
    check(report.status == 200 and report.headers.get("content-type", "").startswith("text/html")
          and report.body.startswith(b"<!DOCTYPE html>") and b"attention" in report.body,
          f"GET /v1/traces/{{id}}/report is the HTML report ({len(report.body)} bytes)")
    rows = serve_http.request(args.url, "GET", trace["trace"]).body.decode().splitlines()
    check(all(json.loads(x)["attn_layer"] for x in rows[-1:]),
          "a full trace's rows hold attention")


def inject_checks(args, client):
    r = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": QUESTION}], max_tokens=4, temperature=0)
    trace = trace_of(r)
    first = trace["first_anomaly"]
    check(trace["anomalies"] > 0 and first is not None, "the injected fault is an anomaly")
    check(first["layer"] == 7 and first["kind"] == "nan" and first["position"] == 0,
          f"first anomaly at layer 7: {first}")
    check(set(first) >= {"position", "layer", "stage", "kind"}, "in run --json's shape")
    chunks = list(client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": QUESTION}], max_tokens=4,
        temperature=0, stream=True))
    check(trace_of(chunks[-1])["first_anomaly"]["layer"] == 7,
          "the stream's last chunk says so too")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--bin", required=True)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--mode", default="main", choices=["main", "inject"])
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.url + "/v1", api_key="none", timeout=300,
                           max_retries=0)
    {"main": main_checks, "inject": inject_checks}[args.mode](args, client)
    print(f"serve_openai.py {args.mode}: every check passed")


if __name__ == "__main__":
    main()
