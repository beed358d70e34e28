"""`GET /metrics` of `model-tracer serve`, from Python.

    python3 serve_metrics.py requests --url URL --requests N --out FILE
        N non-streaming chat completions (max_tokens 4) through the
        `openai` package; FILE gets their count and token usage (JSON).
    python3 serve_metrics.py prometheus --prometheus URL --sent FILE \\
        --origin-layer L --origin-stage S --rms-series K [--timeout SECONDS]
        Waits (at most SECONDS) until a Prometheus server that scrapes the
        server answers, through its query API, what the requests of FILE
        must have left: each corrupted at (L, S), K activation RMS series,
        the token counts, the statuses.
    python3 serve_metrics.py parse --url URL --doc features.md --rms-series K
        Sends completions (whole, streamed, one refused), then parses the
        server's /metrics with the Prometheus client's OpenMetrics parser
        and checks its families, types and labels against the tables of
        features.md's "Fleet metrics".

Exits non-zero with the first failed check."""

import argparse
import json
import os
import re
import sys
import time
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve_http  # noqa: E402

STATUSES = {"200", "400", "404", "405", "413", "415", "422", "499", "500", "503", "other"}
FINISH = {"stop", "length", "abort", "error"}
CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"ok: {what}", flush=True)


def chat(n):
    return {
        "messages": [{"role": "user", "content": f"Count to {n + 3}."}],
        "max_tokens": 4,
        "temperature": 0,
    }


def requests_mode(args):
    import openai

    client = openai.OpenAI(base_url=args.url + "/v1", api_key="-", timeout=120, max_retries=0)
    prompt = completion = 0
    for i in range(args.requests):
        r = client.chat.completions.create(model="m", **chat(i))
        check(r.choices[0].finish_reason in ("stop", "length"), f"request {i} finished")
        prompt += r.usage.prompt_tokens
        completion += r.usage.completion_tokens
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"requests": args.requests, "prompt_tokens": prompt,
                   "completion_tokens": completion}, f)


def query(base, expr):
    url = base + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise AssertionError(f"{expr}: {body}")
    return body["data"]["result"]


def value(series):
    return float(series["value"][1])


def prometheus_mode(args):
    with open(args.sent, encoding="utf-8") as f:
        sent = json.load(f)
    n = sent["requests"]
    conditions = {
        "the target is up": lambda: [value(s) for s in query(args.prometheus, 'up{job="model-tracer"}')] == [1.0],
        f"every request corrupted at layer {args.origin_layer} {args.origin_stage}": lambda: [
            (s["metric"].get("origin_layer"), s["metric"].get("origin_stage"), value(s))
            for s in query(args.prometheus, "model_tracer_requests_corrupted_total")
        ] == [(args.origin_layer, args.origin_stage, float(n))],
        f"{args.rms_series} activation RMS series, one per (layer, stage)": lambda: (
            lambda rs: len(rs) == args.rms_series
            and len({(s["metric"]["layer"], s["metric"]["stage"]) for s in rs}) == args.rms_series
        )(query(args.prometheus, "model_tracer_activation_rms")),
        "the health families counted every request": lambda: [
            value(s) for s in query(args.prometheus, "model_tracer_requests_total")
        ] == [float(n)],
        f"{sent['completion_tokens']} generated tokens, as the responses say": lambda: [
            value(s) for s in query(args.prometheus, "model_tracer_generation_tokens_total")
        ] == [float(sent["completion_tokens"])],
        f"{sent['prompt_tokens']} prompt tokens, as the responses say": lambda: [
            value(s) for s in query(args.prometheus, "model_tracer_prompt_tokens_total")
        ] == [float(sent["prompt_tokens"])],
        f"{n} requests answered 200": lambda: [
            value(s) for s in query(args.prometheus, 'sum(model_tracer_completion_requests_total{status="200"})')
        ] == [float(n)],
        f"{n} first tokens timed": lambda: [
            value(s) for s in query(args.prometheus, "model_tracer_time_to_first_token_seconds_count")
        ] == [float(n)],
        "nothing runs or waits, the KV caches are empty": lambda: [
            [value(s) for s in query(args.prometheus, family)]
            for family in ("model_tracer_requests_running", "model_tracer_requests_waiting",
                           "model_tracer_kv_cache_usage_ratio")
        ] == [[0.0], [0.0], [0.0]],
    }
    deadline = time.time() + args.timeout
    pending = dict(conditions)
    while True:
        for what, cond in list(pending.items()):
            try:
                if cond():
                    check(True, what)
                    del pending[what]
            except (OSError, KeyError, ValueError):
                pass
        if not pending:
            return
        if time.time() > deadline:
            raise AssertionError(
                f"within {args.timeout} s, Prometheus never showed: {sorted(pending)}")
        time.sleep(0.5)


def documented(doc):
    """(family, type, labels) of every row of the tables of features.md's
    "Fleet metrics"; a counter's family without its `_total`."""
    text = open(doc, encoding="utf-8").read()
    start = text.index("\n## Fleet metrics")
    end = text.find("\n## ", start + 1)
    out = {}
    for line in text[start:end].splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) < 4 or not re.fullmatch(r"`model_tracer_\w+`", cells[1]):
            continue
        name, kind = cells[1].strip("`"), cells[2]
        if kind == "counter":
            name = name.removesuffix("_total")
        labels = {l.strip().strip("`") for l in cells[3].split(",")} - {"—", ""}
        out[name] = (kind, labels)
    return out


def parse_mode(args):
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    url = args.url
    for i in range(2):
        r = serve_http.post(url, "/v1/chat/completions", chat(i))
        check(r.status == 200, f"whole completion {i}: {r.status}")
    s = serve_http.Stream(url, "/v1/chat/completions", chat(2)).join()
    check(s.status == 200 and s.done, "a streamed completion")
    r = serve_http.post(url, "/v1/chat/completions", "{not json")
    check(r.status == 400, f"a body that is not JSON gets 400: {r.status}")
    r = serve_http.request(url, "POST", "/metrics", "")
    check(r.status == 405 and r.json()["error"]["code"] == "method_not_allowed",
          f"POST /metrics gets 405 and the error object: {r.status} {r.body[:200]!r}")

    r = serve_http.request(url, "GET", "/metrics", timeout=30)
    check(r.status == 200, "GET /metrics answers 200")
    ctype = {k.lower(): v for k, v in r.headers.items()}.get("content-type")
    check(ctype == CONTENT_TYPE, f"its content type is OpenMetrics': {ctype}")
    text = r.body.decode("utf-8")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    doc = documented(args.doc)
    check(len(doc) >= 18, f"features.md documents {len(doc)} families")
    check(set(families) == set(doc),
          f"the scrape has the documented families: only scraped {sorted(set(families) - set(doc))}, "
          f"only documented {sorted(set(doc) - set(families))}")
    for name, (kind, labels) in sorted(doc.items()):
        f = families[name]
        check(f.type == kind, f"{name} is a {kind}: {f.type}")
        for sample in f.samples:
            got = set(sample.labels) - {"le"}
            if got != labels:
                raise AssertionError(f"{sample.name} has the labels {sorted(got)}, not {sorted(labels)}")
        check(True, f"{name}'s samples have the labels {sorted(labels)}")
    rms = families["model_tracer_activation_rms"].samples
    check(len(rms) == args.rms_series, f"{len(rms)} activation RMS series")
    statuses = {}
    for sample in families["model_tracer_completion_requests"].samples:
        if not sample.name.endswith("_total"):
            continue
        st, fin = sample.labels["status"], sample.labels["finish_reason"]
        check(st in STATUSES and fin in FINISH, f"a bounded label pair {st} {fin}")
        statuses[(st, fin)] = statuses.get((st, fin), 0) + sample.value
    check(statuses.get(("400", "error")) == 1, f"the refused request: {statuses}")
    ok = sum(v for (st, fin), v in statuses.items() if st == "200" and fin in ("stop", "length"))
    check(ok == 3, f"three answered 200: {statuses}")
    corrupted = families["model_tracer_requests_corrupted"].samples
    check([(s.labels, s.value) for s in corrupted if s.name.endswith("_total")]
          == [({"origin_layer": "7", "origin_stage": "post_attn"}, 3.0)],
          f"the traced requests are corrupted at layer 7: {corrupted}")
    buckets = [s for s in families["model_tracer_time_to_first_token_seconds"].samples
               if s.name.endswith("_bucket")]
    bounds = [s.labels["le"] for s in buckets]
    check(bounds[0] == "0.001" and bounds[-2] == "10.0" and bounds[-1] == "+Inf",
          f"time to first token buckets 1 ms to 10 s: {bounds}")
    check(buckets[-1].value == 3, f"three first tokens timed: {buckets[-1].value}")


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="mode", required=True)
    a = sub.add_parser("requests")
    a.add_argument("--url", required=True)
    a.add_argument("--requests", type=int, default=3)
    a.add_argument("--out", required=True)
    b = sub.add_parser("prometheus")
    b.add_argument("--prometheus", required=True)
    b.add_argument("--sent", required=True)
    b.add_argument("--origin-layer", required=True)
    b.add_argument("--origin-stage", required=True)
    b.add_argument("--rms-series", type=int, required=True)
    b.add_argument("--timeout", type=float, default=60)
    c = sub.add_parser("parse")
    c.add_argument("--url", required=True)
    c.add_argument("--doc", required=True)
    c.add_argument("--rms-series", type=int, required=True)
    args = p.parse_args()
    {"requests": requests_mode, "prometheus": prometheus_mode, "parse": parse_mode}[args.mode](args)


if __name__ == "__main__":
    main()
