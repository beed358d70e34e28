#!/usr/bin/env python3
"""Prompt evaluation and generation speed of llama.cpp, the reference decoder
and the candle model, side by side: the same GGUF file, the same 256-token
prompt, one thread each, interleaved rounds in one run.

llama.cpp runs in this process through the `llama-cpp-python` package
(`pip install llama-cpp-python`, which builds llama.cpp from source); its
times are llama.cpp's own performance counters (`llama_perf_context`: prompt
evaluation and generation separately, as its command-line tools print
them). The two Rust engines run as `model-tracer run --trace off`, whose
`--json` output holds the same two times. The prompt is llama.cpp's
tokenization of a fixed English text, cut to 256 tokens; the script checks
that `model-tracer` tokenizes the cut text to the same ids.

    cargo build --release --bin model-tracer
    python3 benches/compare_llama_cpp.py            # after bash .ci/fetch-model
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


def program_round(program, gguf, text, generate, engine, ids):
    """One `model-tracer run --trace off`; its own timing."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "run.json")
        cmd = [program, "run", "--gguf", gguf, "--prompt", text, "--trace", "off",
               "--max-tokens", str(generate), "--ctx", "1024", "--json", path]
        if engine != "reference":
            cmd += ["--engine", engine]
        env = dict(os.environ, CANDLE_NUM_THREADS="1")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd[:3])} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        with open(path) as f:
            run = json.load(f)
    if run["prompt_ids"] != ids:
        sys.exit(f"{engine}: model-tracer tokenized the prompt otherwise than llama.cpp")
    t = run["timing"]
    return (t["prompt_eval_s"], t["prompt_positions"], t["generation_s"],
            t["generation_forwards"], run["generated_ids"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--program", default="target/release/model-tracer")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--generate", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--engines", default="llama.cpp,reference,candle",
                    help="comma-separated: llama.cpp, reference, candle")
    args = ap.parse_args()

    try:
        import llama_cpp
    except ImportError:
        sys.exit("llama-cpp-python is not installed: pip install llama-cpp-python")
    for p in (args.gguf, args.program):
        if not os.path.exists(p):
            sys.exit(f"{p} not found (bash .ci/fetch-model; cargo build --release --bin model-tracer)")

    llm = llama_cpp.Llama(model_path=args.gguf, n_ctx=1024, n_batch=512, n_threads=1,
                          n_threads_batch=1, verbose=False)
    ids = llm.tokenize(TEXT.encode(), add_bos=False, special=False)
    if len(ids) < args.prompt_len:
        sys.exit(f"the text is {len(ids)} tokens, fewer than {args.prompt_len}")
    ids = ids[: args.prompt_len]
    text = llm.detokenize(ids).decode()
    if llm.tokenize(text.encode(), add_bos=False, special=False) != ids:
        sys.exit("the cut text does not tokenize back to the same ids")

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    results = {e: [] for e in engines}
    print(f"{len(ids)}-token prompt, {args.generate} generated tokens, one thread, "
          f"{args.rounds} interleaved rounds; load average {os.getloadavg()[0]:.1f} at the start")
    for r in range(args.rounds):
        for e in engines:
            if e == "llama.cpp":
                res = llama_cpp_round(llm, llama_cpp, ids, args.generate)
            else:
                res = program_round(args.program, args.gguf, text, args.generate, e, ids)
            results[e].append(res)
            pe, pn, ge, gn, _ = res
            print(f"  round {r + 1} {e:9} prompt {pn / pe:7.1f} tokens/s, "
                  f"generation {gn / ge:6.1f} tokens/s", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    print()
    print("| engine | prompt eval tokens/s, median (best) | generation tokens/s, median (best) | first generated ids |")
    print("|---|---:|---:|---|")
    for e in engines:
        pr = [pn / pe for pe, pn, _, _, _ in results[e]]
        gr = [gn / ge for _, _, ge, gn, _ in results[e]]
        first = results[e][0][4][:6]
        print(f"| {e} | {statistics.median(pr):.1f} ({max(pr):.1f}) | "
              f"{statistics.median(gr):.1f} ({max(gr):.1f}) | {first} |")


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"({time.time() - t0:.0f} s)")
