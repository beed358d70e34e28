#!/usr/bin/env python3
"""Prompt evaluation and generation speed of llama.cpp, the reference decoder
and the candle model, side by side: the same GGUF file, the same 256-token
prompt (or prompts of each length `--prompt-len` lists), one thread each,
interleaved rounds in one run.

llama.cpp runs in this process through the `llama-cpp-python` package
(`pip install llama-cpp-python`, which builds llama.cpp from source); its
times are llama.cpp's own performance counters (`llama_perf_context`: prompt
evaluation and generation separately, as its command-line tools print
them). The two Rust engines run as `model-tracer run --trace off`, whose
`--json` output holds the same two times. The prompt is llama.cpp's
tokenization of a fixed English text (repeated as often as a long prompt
needs), cut to 256 tokens; the script checks that `model-tracer` tokenizes
the cut text to the same ids. Every engine's context holds the longest
prompt and the generated tokens.

    cargo build --release --bin model-tracer
    python3 benches/compare_llama_cpp.py            # after bash .ci/fetch-model
    python3 benches/compare_llama_cpp.py --prompt-len 256,1000,4000 \
        --engines llama.cpp,reference,reference-f16 --rounds 3   # long context
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

TEXT = (
    "The history of Paris spans more than two thousand years. The Parisii, a "
    "Celtic people, settled on an island in the Seine around the third century "
    "before our era; the Romans conquered the basin in 52 BC and built Lutetia "
    "on the left bank, with its forum, baths and an amphitheatre. In the Middle "
    "Ages the city became the seat of the Capetian kings, the largest town of "
    "western Europe and a centre of learning, its university drawing scholars "
    "from every country. Notre-Dame rose on the island from 1163, the Louvre "
    "began as a fortress under Philip Augustus, and the walls were rebuilt "
    "again and again as the city outgrew them. The Revolution of 1789 began "
    "here with the storming of the Bastille; Napoleon crowned himself emperor "
    "in the cathedral; and in the nineteenth century Baron Haussmann cut the "
    "wide boulevards, parks and sewers that shape the city today. The Eiffel "
    "Tower, built for the Exposition of 1889, was meant to stand for twenty "
    "years and became the symbol of the city. Occupied from 1940 to 1944, Paris "
    "was liberated in August 1944, and in the decades after the war it grew "
    "into a metropolis of more than ten million people, with new towns, a ring "
    "road, high-speed trains and one of the busiest airports of the world, "
    "while its old centre kept the look the nineteenth century gave it. Today "
    "the city is a capital of fashion, art, science and diplomacy, the home of "
    "UNESCO and the OECD, and one of the most visited places on earth."
)


def llama_cpp_round(llm, llama_cpp, ids, generate):
    """One prompt evaluation and `generate` greedy tokens; llama.cpp's own
    counters. Returns (prompt s, prompt positions, generation s, forwards,
    generated ids)."""
    llm.reset()
    ctx = llm._ctx.ctx
    llama_cpp.llama_perf_context_reset(ctx)
    out = []
    for tok in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, reset=True):
        out.append(tok)
        if len(out) == generate:
            break
    perf = llama_cpp.llama_perf_context(ctx)
    return (
        perf.t_p_eval_ms / 1e3,
        perf.n_p_eval,
        perf.t_eval_ms / 1e3,
        perf.n_eval,
        out,
    )


def engine_args(engine):
    """model-tracer's flags for an engine name: `reference`, `reference-f16`
    (the reference decoder with an f16 KV cache, llama.cpp's cache type),
    `candle`."""
    if engine == "reference":
        return []
    if engine == "reference-f16":
        return ["--kv-type", "f16"]
    return ["--engine", engine]


def program_round(program, gguf, text, generate, engine, ids, threads, ctx):
    """One `model-tracer run --trace off`; its own timing."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "run.json")
        cmd = [program, "run", "--gguf", gguf, "--prompt", text, "--trace", "off",
               "--max-tokens", str(generate), "--ctx", str(ctx), "--json", path,
               "--threads", str(threads)] + engine_args(engine)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd[:3])} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        with open(path) as f:
            run = json.load(f)
    if run["prompt_ids"] != ids:
        sys.exit(f"{engine}: model-tracer tokenized the prompt otherwise than llama.cpp")
    t = run["timing"]
    return (t["prompt_eval_s"], t["prompt_positions"], t["generation_s"],
            t["generation_forwards"], run["generated_ids"])


def top2(logits):
    """(best id, best logit, second id, second logit) of a logit vector."""
    best = second = None
    for i, v in enumerate(logits):
        if best is None or v > logits[best]:
            best, second = i, best
        elif second is None or v > logits[second]:
            second = i
    return best, float(logits[best]), second, float(logits[second])


def llama_cpp_margin(llm, ids, generated, step):
    """llama.cpp's top two tokens and their logits where it chose
    `generated[step]`: the prompt and the tokens before, evaluated anew."""
    import numpy as np
    llm.reset()
    llm.eval(ids + generated[:step])
    # Without logits_all the package keeps no logits of its own: read the
    # context's, those of the last evaluated position.
    logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
    return top2(logits.tolist())


def program_margin(program, gguf, text, engine, step, ctx):
    """The engine's top two tokens and their logits where it chose its
    generated token `step`: the last layer of the logit lens of a `Full`
    trace (the lens tracks the final top 3, and the last layer's row is the
    model's own logits)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "run.jsonl")
        json_path = os.path.join(tmp, "run.json")
        cmd = [program, "run", "--gguf", gguf, "--prompt", text, "--trace", "full",
               "--max-tokens", str(step + 1), "--ctx", str(ctx), "--jsonl", path,
               "--json", json_path]
        cmd += engine_args(engine)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd[:3])} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        with open(json_path) as f:
            run = json.load(f)
        position = len(run["prompt_ids"]) + step - 1
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    row = next((r for r in rows if r.get("position") == position), None)
    if row is None or not row.get("lens_layer"):
        sys.exit(f"{engine}: no logit-lens record at position {position}")
    last = max(row["lens_layer"])
    final = sorted(((float(l), t) for t, ly, l in
                    zip(row["lens_token"], row["lens_layer"], row["lens_logit"]) if ly == last),
                   reverse=True)
    (l1, t1), (l2, t2) = final[0], final[1]
    return t1, l1, t2, l2


def agreement(results, engines, args, llm, ids, text, ctx):
    """Where each pair of engines' greedy tokens part, with both engines'
    top-two margins at that step: a parting at a near-tie (a margin of a few
    hundredths of a logit) is rounding, not a bug. llama.cpp's margin comes
    from evaluating the prompt and the tokens before as one batch, which
    need not round as its token-by-token generation did."""
    margins = {}

    def margin(side, step):
        if (side, step) not in margins:
            if side == "llama.cpp":
                margins[side, step] = llama_cpp_margin(llm, ids, results[side][0][4], step)
            else:
                margins[side, step] = program_margin(args.program, args.gguf, text, side, step,
                                                     ctx)
        return margins[side, step]

    print()
    for i, a in enumerate(engines):
        for b in engines[i + 1:]:
            ta, tb = results[a][0][4], results[b][0][4]
            step = next((k for k, (x, y) in enumerate(zip(ta, tb)) if x != y), None)
            if step is None:
                print(f"{a} and {b}: the same {min(len(ta), len(tb))} generated tokens")
                continue
            print(f"{a} and {b} part at generated token {step} ({ta[step]} against "
                  f"{tb[step]}), after {step} equal tokens")
            for side in (a, b):
                t1, l1, t2, l2 = margin(side, step)
                print(f"  {side:9} top two there: {t1} ({l1:.3f}), {t2} ({l2:.3f}); "
                      f"margin {l1 - l2:.3f}")


def prompt_of(llm, length):
    """The first `length` tokens of TEXT (repeated as often as needed) and
    their text, which must tokenize back to the same ids."""
    text = TEXT
    ids = llm.tokenize(text.encode(), add_bos=False, special=False)
    while len(ids) < length:
        text = text + " " + TEXT
        ids = llm.tokenize(text.encode(), add_bos=False, special=False)
    ids = ids[:length]
    cut = llm.detokenize(ids).decode()
    if llm.tokenize(cut.encode(), add_bos=False, special=False) != ids:
        sys.exit(f"the text cut to {length} tokens does not tokenize back to the same ids")
    return ids, cut


def compare(args, llm, llama_cpp, length, ctx):
    """Interleaved rounds of every engine on a prompt of `length` tokens;
    returns the table's rows."""
    ids, text = prompt_of(llm, length)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    results = {e: [] for e in engines}
    print(f"{len(ids)}-token prompt, {args.generate} generated tokens, {args.threads} thread(s), "
          f"{args.rounds} interleaved rounds; load average {os.getloadavg()[0]:.1f} at the start")
    for r in range(args.rounds):
        for e in engines:
            if e == "llama.cpp":
                res = llama_cpp_round(llm, llama_cpp, ids, args.generate)
            else:
                res = program_round(args.program, args.gguf, text, args.generate, e, ids,
                                    args.threads, ctx)
            results[e].append(res)
            pe, pn, ge, gn, _ = res
            print(f"  round {r + 1} {e:9} prompt {pn / pe:7.1f} tokens/s, "
                  f"generation {gn / ge:6.1f} tokens/s ({1e3 * ge / gn:.2f} ms/token)",
                  flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    rows = []
    for e in engines:
        pr = [pn / pe for pe, pn, _, _, _ in results[e]]
        gr = [gn / ge for _, _, ge, gn, _ in results[e]]
        first = results[e][0][4][:6]
        rows.append(f"| {len(ids)} | {e} | {statistics.median(pr):.1f} ({max(pr):.1f}) | "
                    f"{statistics.median(gr):.1f} ({max(gr):.1f}) | "
                    f"{1e3 / statistics.median(gr):.2f} | {first} |")
    for e in engines:
        if any(r[4] != results[e][0][4] for r in results[e]):
            print(f"{e}: the generated tokens differ between rounds")
    if len(engines) > 1:
        agreement(results, engines, args, llm, ids, text, ctx)
    print()
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--program", default="target/release/model-tracer")
    ap.add_argument("--prompt-len", default="256",
                    help="prompt length in tokens, or a comma-separated list of them")
    ap.add_argument("--generate", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="threads of every engine (llama.cpp's n_threads, model-tracer --threads)")
    ap.add_argument("--engines", default="llama.cpp,reference,candle",
                    help="comma-separated: llama.cpp, reference, reference-f16 (an f16 KV "
                    "cache, llama.cpp's type), candle")
    args = ap.parse_args()

    try:
        import llama_cpp
    except ImportError:
        sys.exit("llama-cpp-python is not installed: pip install llama-cpp-python")
    for p in (args.gguf, args.program):
        if not os.path.exists(p):
            sys.exit(f"{p} not found (bash .ci/fetch-model; cargo build --release --bin model-tracer)")
    lengths = [int(n) for n in args.prompt_len.split(",")]
    # Room for the longest prompt and the generated tokens, in whole 256s.
    ctx = max(1024, (max(lengths) + args.generate + 8 + 255) // 256 * 256)
    llm = llama_cpp.Llama(model_path=args.gguf, n_ctx=ctx, n_batch=512, n_threads=args.threads,
                          n_threads_batch=args.threads, verbose=False)
    rows = []
    for length in lengths:
        rows += compare(args, llm, llama_cpp, length, ctx)
    print(f"context {ctx} positions in every engine\n")
    print("| prompt tokens | engine | prompt eval tokens/s, median (best) | "
          "generation tokens/s, median (best) | ms/token (median) | first generated ids |")
    print("|---:|---|---:|---:|---:|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"({time.time() - t0:.0f} s)")
