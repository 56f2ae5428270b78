#!/usr/bin/env python3
"""Run the comparison engines (OpenVINO GenAI, llama.cpp, CTranslate2) on dumped workloads.

Every engine gets the requests of a `headrace bench throughput --dump-workload FILE` file:
prompts as token ids, EOS ignored, exactly `output_len` greedy tokens per request, all
requests submitted at once; model load and a warm-up are not timed. Output tokens/s is
sum(output_len) / wall time, the definition `headrace bench throughput` uses.

The engines live outside the project (`bench/anchors/setup.sh` installs them into
$ANCHORS_DIR); run this script with any python, it re-executes itself with
$ANCHORS_DIR/venv-ov/bin/python. It is not part of the project's tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TextIO

DEFAULT_DIR = Path(os.environ.get("ANCHORS_DIR", Path.home() / ".cache" / "headrace-anchors"))
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
ENGINES = {
    "headrace-bf16": "headrace bf16 (`headrace bench throughput`)",
    "headrace-int8": "headrace W8A8 + int8 KV",
    "ov-fp16": "OpenVINO GenAI fp16 IR, bf16 KV",
    "ov-int8": "OpenVINO GenAI int8 IR, u8 KV",
    "llama-f16": "llama.cpp F16 (batched-bench)",
    "llama-q8_0": "llama.cpp Q8_0 (batched-bench)",
    "llama-server-f16": "llama.cpp F16 (server, -np N)",
    "llama-server-q8_0": "llama.cpp Q8_0 (server, -np N)",
    "ct2": "CTranslate2 int8",
}
DEFAULT_ENGINES = "headrace-bf16,headrace-int8,ov-fp16,ov-int8,llama-f16,llama-q8_0,llama-server-f16,llama-server-q8_0,ct2"


@dataclass(frozen=True)
class Request:
    prompt: tuple[int, ...]
    output_len: int


@dataclass(frozen=True)
class Workload:
    label: str  # table column: "single", "uniform", "mixed"
    name: str
    requests: tuple[Request, ...]

    @property
    def output_tokens(self) -> int:
        return sum(r.output_len for r in self.requests)

    def uniform_shape(self) -> tuple[int, int, int] | None:
        """(prompt_len, output_len, batch) when every request has the same lengths."""
        shapes = {(len(r.prompt), r.output_len) for r in self.requests}
        if len(shapes) != 1:
            return None
        prompt_len, output_len = shapes.pop()
        return prompt_len, output_len, len(self.requests)

    def warmup(self) -> Workload:
        """A few of its requests, 8 output tokens each: compiles shapes, warms caches."""
        reqs = tuple(Request(r.prompt, min(r.output_len, 8)) for r in self.requests[:4])
        return Workload(f"{self.label}-warmup", self.name, reqs)


@dataclass
class Result:
    engine: str
    workload: str
    num_requests: int
    output_tokens: int
    wall_s: float
    ttft_p50_ms: float | None = None
    tpot_p50_ms: float | None = None
    note: str = ""
    output_tok_s: float = field(init=False)
    requests_s: float = field(init=False)

    def __post_init__(self) -> None:
        self.output_tok_s = self.output_tokens / self.wall_s
        self.requests_s = self.num_requests / self.wall_s

    def __str__(self) -> str:
        return (
            f"{self.engine}/{self.workload}: {self.output_tok_s:.1f} out tok/s, "
            f"{self.wall_s:.2f} s, TTFT p50 {_fmt(self.ttft_p50_ms)} ms, "
            f"TPOT p50 {_fmt(self.tpot_p50_ms)} ms ({self.note})"
        )


@dataclass
class Timings:
    """Per request: when its first and last tokens arrived (seconds after submission)."""

    first: list[float | None]
    last: list[float]
    counts: list[int]
    wall_s: float = 0.0  # submission of the first request to the last token

    @classmethod
    def empty(cls, n: int) -> Timings:
        return cls([None] * n, [0.0] * n, [0] * n)

    def record(self, i: int, now: float, new_tokens: int) -> None:
        if new_tokens:
            if self.first[i] is None:
                self.first[i] = now
            self.last[i] = now
            self.counts[i] += new_tokens

    def result(self, engine: str, w: Workload, note: str = "") -> Result:
        for i, (r, n) in enumerate(zip(w.requests, self.counts, strict=True)):
            if n != r.output_len:
                raise RuntimeError(f"{engine}/{w.label}: request {i} gave {n}, not {r.output_len}")
        ttft = [f for f in self.first if f is not None]
        tpot = [
            (last - first) / (n - 1)
            for first, last, n in zip(self.first, self.last, self.counts, strict=True)
            if first is not None and n > 1
        ]
        return Result(
            engine,
            w.label,
            len(w.requests),
            w.output_tokens,
            self.wall_s,
            _p50_ms(ttft),
            _p50_ms(tpot),
            note,
        )


def _best(results: Sequence[Result]) -> list[Result]:
    """Per workload, the run with the most output tokens/s (of the settings tried)."""
    best: dict[str, Result] = {}
    for r in results:
        if r.workload not in best or r.output_tok_s > best[r.workload].output_tok_s:
            best[r.workload] = r
    return list(best.values())


def median_of_rounds(rounds: Sequence[Sequence[Result]]) -> list[Result]:
    """Per (engine, workload), the run of median output tok/s over the rounds (the lower of
    the two middle ones for an even count), its note listing every round's figure.

    Rounds alternate the engines, so a slow spell of a shared host (+-30% between minutes on
    the 2-core VMs this runs on) falls on one round of each engine, not on one engine.
    """
    runs: dict[tuple[str, str], list[Result]] = {}
    for results in rounds:
        for r in results:
            runs.setdefault((r.engine, r.workload), []).append(r)
    out = []
    for group in runs.values():
        ordered = sorted(group, key=lambda r: r.output_tok_s)
        mid = ordered[(len(ordered) - 1) // 2]
        if len(group) > 1:
            figures = " / ".join(_fmt(r.output_tok_s) for r in group)
            rounds_note = f"median of {len(group)} rounds: {figures}"
            mid = replace(mid, note=f"{mid.note}; {rounds_note}" if mid.note else rounds_note)
        out.append(mid)
    return out


def _p50_ms(values: Sequence[float]) -> float | None:
    return statistics.median(values) * 1000 if values else None


def load_workloads(paths: Sequence[str]) -> list[Workload]:
    workloads: list[Workload] = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        name = str(data.get("name", Path(path).stem))
        reqs = tuple(
            Request(tuple(int(t) for t in r["prompt_token_ids"]), int(r["output_len"]))
            for r in data["requests"]
        )
        if not reqs or any(not r.prompt or r.output_len < 1 for r in reqs):
            raise ValueError(f"{path}: every request needs a prompt and output_len >= 1")
        label = name.split("(")[0].strip() or Path(path).stem
        while label in {w.label for w in workloads}:
            label += "'"
        workloads.append(Workload(label, name, reqs))
    return workloads


def make_workloads(directory: Path, seed: int = 0) -> None:
    """single (1 x 128/128), uniform (32 x 128/128), mixed (64, log-uniform 32-512 / 16-256)."""
    rng = random.Random(seed)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, 49000) for _ in range(n)]

    def log_uniform(low: int, high: int) -> int:
        return min(max(round(math.exp(rng.uniform(math.log(low), math.log(high)))), low), high)

    sets = {
        "single": ("single(P=128, O=128, B=1)", [(prompt(128), 128)]),
        "uniform": ("uniform(P=128, O=128, B=32)", [(prompt(128), 128) for _ in range(32)]),
        "mixed": (
            f"mixed(n=64, seed={seed})",
            [(prompt(log_uniform(32, 512)), log_uniform(16, 256)) for _ in range(64)],
        ),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for stem, (name, reqs) in sets.items():
        requests = [{"prompt_token_ids": p, "output_len": o} for p, o in reqs]
        (directory / f"{stem}.json").write_text(json.dumps({"name": name, "requests": requests}))
        print(directory / f"{stem}.json", file=sys.stderr)


# --- OpenVINO GenAI ----------------------------------------------------------------------


def run_openvino(
    engine: str,
    model_dir: Path,
    kv_precision: str,
    workloads: Sequence[Workload],
    threads: int,
    batched_tokens: Sequence[int],
) -> list[Result]:
    """ContinuousBatchingPipeline, once per max_num_batched_tokens; the best one per workload."""
    import openvino_genai as ov_genai

    results = []
    for mbt in batched_tokens:
        sched = ov_genai.SchedulerConfig()
        sched.cache_size = 2  # GB of KV cache: far more than any of these workloads needs
        sched.max_num_batched_tokens = mbt
        sched.dynamic_split_fuse = True
        sched.enable_prefix_caching = False
        props = {"INFERENCE_NUM_THREADS": threads, "KV_CACHE_PRECISION": kv_precision}
        try:
            pipe = ov_genai.ContinuousBatchingPipeline(str(model_dir), sched, "CPU", props)
        except RuntimeError as exc:
            # OpenVINO's AVX2 build runs its paged attention on f32 (or u8) pages only.
            if "expect kvcache type f32" not in str(exc):
                raise
            props["KV_CACHE_PRECISION"] = "f32"
            pipe = ov_genai.ContinuousBatchingPipeline(str(model_dir), sched, "CPU", props)
        setting = f"max_num_batched_tokens={mbt}, KV {props['KV_CACHE_PRECISION']}"
        for w in workloads:
            _ov_generate(pipe, w.warmup())
            result = _ov_generate(pipe, w).result(engine, w, setting)
            _log(result)
            results.append(result)
        del pipe
    return _best(results)


def _ov_generate(pipe: object, w: Workload) -> Timings:
    import numpy as np
    import openvino as ov
    import openvino_genai as ov_genai

    inputs, configs = [], []
    for r in w.requests:
        inputs.append(ov.Tensor(np.array([r.prompt], dtype=np.int64)))
        cfg = ov_genai.GenerationConfig()
        cfg.max_new_tokens = cfg.min_new_tokens = r.output_len
        cfg.ignore_eos = True
        cfg.do_sample = False
        configs.append(cfg)
    timings = Timings.empty(len(inputs))
    start = time.perf_counter()
    handles = [
        pipe.add_request(i, x, c) for i, (x, c) in enumerate(zip(inputs, configs, strict=True))
    ]
    while pipe.has_non_finished_requests():
        pipe.step()
        now = time.perf_counter() - start
        for i, h in enumerate(handles):
            while h.can_read():
                timings.record(i, now, sum(len(o.generated_ids) for o in h.read().values()))
    timings.wall_s = time.perf_counter() - start
    return timings


# --- headrace ----------------------------------------------------------------------------


def run_headrace(
    engine: str,
    workloads: Sequence[Workload],
    files: Sequence[str],
    threads: int,
    options: Sequence[str],
) -> list[Result]:
    """`headrace bench throughput --workload-file` in the project's .venv, one process per
    workload (its JSON: output tokens, wall time, TTFT and TPOT percentiles)."""
    headrace = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "headrace"
    results = []
    for w, path in zip(workloads, files, strict=True):
        cmd = [str(headrace), "bench", "throughput", "--workload-file", str(path)]
        cmd += ["--no-baseline", "--json", "--num-threads", str(threads), *options]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        run = json.loads(proc.stdout.splitlines()[-1])["headrace"]
        ttft, tpot = run.get("ttft_p50_s"), run.get("tpot_p50_s")
        result = Result(
            engine,
            w.label,
            len(w.requests),
            int(run["output_tokens"]),
            float(run["elapsed_s"]),
            None if ttft is None else ttft * 1000,
            None if tpot is None else tpot * 1000,
            " ".join(options) or "bfloat16",
        )
        _log(str(result))
        results.append(result)
    return results


# --- CTranslate2 -------------------------------------------------------------------------


def run_ctranslate2(
    engine: str, model_dir: Path, workloads: Sequence[Workload], threads: int
) -> list[Result]:
    """One generate_batch of all requests (static batch; CTranslate2 has no continuous
    batching); a callback stops each request at its output_len and timestamps its tokens."""
    import ctranslate2

    vocab = json.loads((model_dir / "vocabulary.json").read_text())
    gen = ctranslate2.Generator(
        str(model_dir), device="cpu", compute_type="int8", intra_threads=threads, inter_threads=1
    )
    results = []
    for w in workloads:
        _ct2_generate(gen, vocab, w.warmup())
        results.append(_ct2_generate(gen, vocab, w).result(engine, w, "one static batch"))
        _log(results[-1])
    return results


def _ct2_generate(gen: object, vocab: list[str], w: Workload) -> Timings:
    prompts = [[vocab[t] for t in r.prompt] for r in w.requests]
    # Prompt tokens beyond the shortest prompt are fed in the decoding loop: those steps
    # come before request i's first generated token.
    shortest = min(len(p) for p in prompts)
    offset = [len(p) - shortest for p in prompts]
    out_len = [r.output_len for r in w.requests]
    timings = Timings.empty(len(prompts))
    start = time.perf_counter()

    def on_token(step: object) -> bool:
        i = step.batch_id
        generated = step.step - offset[i] + 1
        timings.record(i, time.perf_counter() - start, 1)
        return generated >= out_len[i]

    longest = max(out_len)
    results = gen.generate_batch(
        prompts,
        max_length=longest,
        min_length=longest,  # no EOS before the callback stops the request
        end_token=[],
        sampling_topk=1,
        include_prompt_in_result=False,
        callback=on_token,
    )
    timings.wall_s = time.perf_counter() - start
    for i, r in enumerate(results):
        if len(r.sequences_ids[0]) != out_len[i]:
            raise RuntimeError(f"ct2: request {i} gave {len(r.sequences_ids[0])} tokens")
    return timings


# --- llama.cpp ---------------------------------------------------------------------------


def run_llama_batched_bench(
    engine: str,
    binary: Path,
    gguf: Path,
    workloads: Sequence[Workload],
    threads: int,
    flash_attn: Sequence[str],
) -> list[Result]:
    """llama-batched-bench for workloads whose requests all share one (P, O): B sequences
    of P random prompt tokens prefilled together, then O batched decode steps. It cannot
    run mixed lengths (or our token ids: its prompts are random tokens of the same length).
    TTFT = its prompt time T_PP (every first token waits for the whole batched prefill),
    TPOT = T_TG / O. Each `flash_attn` setting is tried; the best is reported."""
    results = []
    for w in workloads:
        shape = w.uniform_shape()
        if shape is None:
            _log(f"{engine}/{w.label}: skipped (llama-batched-bench needs equal lengths)")
            continue
        prompt_len, output_len, batch = shape
        ctx = max(256, math.ceil(batch * (prompt_len + output_len) / 256) * 256)
        for fa in flash_attn:
            cmd = [
                str(binary), "-m", str(gguf), "-c", str(ctx), "-b", "2048", "-ub", "512",
                "-npp", str(prompt_len), "-ntg", str(output_len), "-npl", str(batch),
                "-t", str(threads), "-tb", str(threads), "-fa", fa, "--output-format", "jsonl",
            ]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows = [s for s in proc.stdout.splitlines() + proc.stderr.splitlines() if s[:1] == "{"]
            row = json.loads(rows[-1])
            tpot_ms = row["t_tg"] / output_len * 1000
            ttft_ms = row["t_pp"] * 1000
            note = f"-fa {fa}"
            results.append(
                Result(engine, w.label, batch, batch * output_len, row["t"], ttft_ms, tpot_ms, note)
            )
            _log(results[-1])
    return _best(results)


def run_llama_server(
    engine: str,
    binary: Path,
    gguf: Path,
    workloads: Sequence[Workload],
    threads: int,
    flash_attn: Sequence[str],
) -> list[Result]:
    """llama-server with one slot per request (continuous batching; per-slot KV cache, each
    slot as long as the longest request), all requests POSTed at once to /completion as
    token ids. TTFT_i = its response time minus its `predicted_ms` (the server's time from
    first to last token); TPOT_i = predicted_ms / (n - 1). Each `flash_attn` setting is
    tried; the best is reported."""
    results = []
    for w in workloads:
        n = len(w.requests)
        slot = math.ceil(max(len(r.prompt) + r.output_len for r in w.requests) / 256) * 256
        for fa in flash_attn:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            cmd = [
                str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                "-c", str(n * slot), "-np", str(n), "--no-kv-unified", "-cb", "-fa", fa,
                "-b", "2048", "-ub", "512", "-t", str(threads), "-tb", str(threads),
                "--cache-ram", "0", "--no-webui",
            ]  # fmt: skip
            with (
                tempfile.TemporaryFile() as log,
                subprocess.Popen(cmd, stdout=log, stderr=log) as srv,
            ):
                try:
                    url = f"http://127.0.0.1:{port}"
                    _wait_healthy(url, srv)
                    _server_generate(url, w.warmup())
                    timings = _server_generate(url, w)
                except Exception:
                    log.seek(0)
                    sys.stderr.write(log.read().decode(errors="replace")[-3000:])
                    raise
                finally:
                    srv.terminate()
            results.append(timings.result(engine, w, f"-np {n} -c {n}x{slot} -fa {fa}"))
            _log(results[-1])
    return _best(results)


def _wait_healthy(url: str, srv: subprocess.Popen[bytes], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if srv.poll() is not None:
            raise RuntimeError(f"llama-server exited with {srv.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError("llama-server did not become healthy")


def _server_generate(url: str, w: Workload) -> Timings:
    timings = Timings.empty(len(w.requests))
    start = time.perf_counter()

    def one(i: int) -> None:
        r = w.requests[i]
        body = {
            "prompt": list(r.prompt),
            "n_predict": r.output_len,
            "ignore_eos": True,
            "temperature": 0.0,
            "top_k": 1,
            "cache_prompt": False,
            "return_tokens": True,
        }
        req = urllib.request.Request(
            f"{url}/completion", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=3600) as resp:
            out = json.loads(resp.read())
        done = time.perf_counter() - start
        n, gen_s = len(out["tokens"]), out["timings"]["predicted_ms"] / 1000
        if out["timings"]["prompt_n"] != len(r.prompt):
            raise RuntimeError(f"llama-server: request {i} prompt_n {out['timings']['prompt_n']}")
        timings.record(i, done - gen_s, 1)
        timings.record(i, done, n - 1)

    with ThreadPoolExecutor(max_workers=len(w.requests)) as pool:
        list(pool.map(one, range(len(w.requests))))
    timings.wall_s = time.perf_counter() - start
    return timings


# --- report ------------------------------------------------------------------------------


def cpu_info() -> dict[str, object]:
    fields: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        if not line.strip():
            break  # the first CPU is enough
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    return {
        "model": fields.get("model name", "?"),
        "cores": os.cpu_count(),
        "flags": {f: f in flags for f in CPU_FLAGS},
    }


def versions(anchors: Path, engines: Sequence[str]) -> dict[str, str]:
    found: dict[str, str] = {"python": sys.version.split()[0]}
    for module in ("openvino", "openvino_genai", "ctranslate2"):
        with contextlib.suppress(ImportError, AttributeError):
            found[module] = __import__(module).__version__
    binary = anchors / "llama-build" / "bin" / "llama-batched-bench"
    if binary.exists() and any(e.startswith("llama") for e in engines):
        proc = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
        lines = [s for s in (proc.stdout + proc.stderr).splitlines() if s.startswith("version")]
        found["llama.cpp"] = lines[0].removeprefix("version: ") if lines else "?"
    return found


@dataclass
class Report:
    """What one or more runs measured: the tables and the `--json` object are made of it."""

    time: str
    cpu: dict[str, object]
    versions: dict[str, str]
    threads: int
    workloads: dict[str, str]  # label -> name
    results: list[Result]

    @classmethod
    def merge(cls, paths: Sequence[str]) -> Report:
        """The `--json` outputs of several runs (e.g. one per engine, or repeats) as one
        report; of repeated (engine, workload) runs, the fastest is kept."""
        init = {f.name for f in fields(Result) if f.init}
        reports = [json.loads(Path(p).read_text()) for p in paths]
        versions: dict[str, str] = {}
        workloads: dict[str, str] = {}
        results: list[Result] = []
        for data in reports:
            versions.update(data["versions"])
            workloads.update(data["workloads"])
            results += [
                Result(**{k: v for k, v in r.items() if k in init}) for r in data["results"]
            ]
        best: dict[tuple[str, str], Result] = {}
        for r in results:
            key = (r.engine, r.workload)
            if key not in best or r.output_tok_s > best[key].output_tok_s:
                best[key] = r
        results = list(best.values())
        times = sorted({data["time"] for data in reports})
        first = reports[0]
        span = times[0] if len(times) == 1 else f"{times[0]} to {times[-1]}"
        return cls(span, first["cpu"], versions, first["threads"], workloads, results)

    def print_tables(self, out: TextIO) -> None:
        flags = self.cpu["flags"]
        assert isinstance(flags, dict)
        yes_no = " ".join(f"{f}={'yes' if v else 'no'}" for f, v in flags.items())
        print(f"CPU: {self.cpu['model']} ({self.cpu['cores']} cores); {yes_no}", file=out)
        print("versions: " + ", ".join(f"{k} {v}" for k, v in self.versions.items()), file=out)
        print(f"threads: {self.threads}; measured {self.time}", file=out)
        print("workloads: " + "; ".join(f"{k} = {v}" for k, v in self.workloads.items()), file=out)
        print(file=out)
        _print_tables(self.results, list(self.workloads), out)


def _print_tables(results: Sequence[Result], workloads: Sequence[str], out: TextIO) -> None:
    by_key = {(r.engine, r.workload): r for r in results}
    engines = list(dict.fromkeys(r.engine for r in results))
    width = max([len(ENGINES[e]) for e in engines] + [6]) + 2
    print(
        "engine".ljust(width) + "".join(f"{w:>10}" for w in workloads) + "   (output tok/s)",
        file=out,
    )
    for e in engines:
        cells = [by_key.get((e, w)) for w in workloads]
        row = "".join(f"{_fmt(c.output_tok_s) if c else '—':>10}" for c in cells)
        print(ENGINES[e].ljust(width) + row, file=out)
    print(file=out)
    print(
        f"{'engine':<{width}}{'workload':<10}{'out tok/s':>10}{'req/s':>8}"
        f"{'TTFT p50 ms':>13}{'TPOT p50 ms':>13}{'wall s':>9}  note",
        file=out,
    )
    for r in results:
        print(
            f"{ENGINES[r.engine]:<{width}}{r.workload:<10}{_fmt(r.output_tok_s):>10}"
            f"{r.requests_s:>8.2f}{_fmt(r.ttft_p50_ms):>13}{_fmt(r.tpot_p50_ms):>13}"
            f"{r.wall_s:>9.2f}  {r.note}",
            file=out,
        )


def _fmt(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def _log(message: object) -> None:
    print(f"[anchors] {message}", file=sys.stderr, flush=True)


def _reexec_in_venv(anchors: Path) -> None:
    python = anchors / "venv-ov" / "bin" / "python"
    try:
        import openvino_genai  # noqa: F401
    except ImportError:
        if not python.exists():
            sys.exit(f"{python} missing: run bench/anchors/setup.sh (ANCHORS_DIR={anchors})")
        if Path(sys.prefix).resolve() != python.parent.parent.resolve():
            os.execv(str(python), [str(python), *sys.argv])
        raise


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload-file", action="append", default=[], metavar="FILE")
    parser.add_argument(
        "--make-workloads", metavar="DIR", help="write single/uniform/mixed.json there and exit"
    )
    parser.add_argument(
        "--report", nargs="+", metavar="JSON", help="print the tables of earlier --json outputs"
    )
    parser.add_argument("--anchors-dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engines", default=DEFAULT_ENGINES, help=f"of {', '.join(ENGINES)}")
    parser.add_argument(
        "--ov-max-batched-tokens",
        default="256,1024",
        help="OpenVINO scheduler max_num_batched_tokens values to try; the best is reported",
    )
    parser.add_argument(
        "--llama-flash-attn",
        default="on,off",
        help="llama.cpp -fa values to try (on, off, auto); the best is reported",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every engine this many times, alternating, and report each one's median",
    )
    parser.add_argument(
        "--json", action="store_true", help="one JSON object on stdout (tables go to stderr)"
    )
    args = parser.parse_args(argv)
    if args.make_workloads:
        make_workloads(Path(args.make_workloads))
        return
    if args.report:
        Report.merge(args.report).print_tables(sys.stdout)
        return
    if not args.workload_file:
        parser.error("give --workload-file (or --make-workloads DIR, or --report FILE)")
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if unknown := set(engines) - set(ENGINES):
        parser.error(f"unknown engines {sorted(unknown)}; known: {', '.join(ENGINES)}")
    anchors: Path = args.anchors_dir.expanduser()
    _reexec_in_venv(anchors)
    workloads = load_workloads(args.workload_file)
    t = args.threads
    bin_dir, gguf = anchors / "llama-build" / "bin", anchors / "gguf"
    mbt = [int(x) for x in args.ov_max_batched_tokens.split(",")]
    fa = args.llama_flash_attn.split(",")
    files = args.workload_file
    runners: dict[str, Callable[[], list[Result]]] = {
        "headrace-bf16": lambda: run_headrace("headrace-bf16", workloads, files, t, []),
        "headrace-int8": lambda: run_headrace(
            "headrace-int8",
            workloads,
            files,
            t,
            ["--quantization", "w8a8", "--kv-cache-dtype", "int8"],
        ),
        "ov-fp16": lambda: run_openvino("ov-fp16", anchors / "ov-fp16", "bf16", workloads, t, mbt),
        "ov-int8": lambda: run_openvino("ov-int8", anchors / "ov-int8", "u8", workloads, t, mbt),
        "llama-f16": lambda: run_llama_batched_bench(
            "llama-f16", bin_dir / "llama-batched-bench", gguf / "model-f16.gguf", workloads, t, fa
        ),
        "llama-q8_0": lambda: run_llama_batched_bench(
            "llama-q8_0",
            bin_dir / "llama-batched-bench",
            gguf / "model-q8_0.gguf",
            workloads,
            t,
            fa,
        ),
        "llama-server-f16": lambda: run_llama_server(
            "llama-server-f16", bin_dir / "llama-server", gguf / "model-f16.gguf", workloads, t, fa
        ),
        "llama-server-q8_0": lambda: run_llama_server(
            "llama-server-q8_0",
            bin_dir / "llama-server",
            gguf / "model-q8_0.gguf",
            workloads,
            t,
            fa,
        ),
        "ct2": lambda: run_ctranslate2("ct2", anchors / "ct2-int8", workloads, t),
    }
    report = Report(
        time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        cpu_info(),
        versions(anchors, engines),
        t,
        {w.label: w.name for w in workloads},
        [],
    )
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    rounds: list[list[Result]] = []
    for i in range(args.rounds):
        rounds.append([])
        for engine in engines:
            _log(f"round {i + 1}/{args.rounds}: running {engine}")
            rounds[-1].extend(runners[engine]())
    report.results = median_of_rounds(rounds)
    report.print_tables(sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(asdict(report)))


if __name__ == "__main__":
    main()
