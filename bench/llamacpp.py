"""llama.cpp benchmark: convert model directories with llama.cpp's own converter and measure
them in llama.cpp (prefill / decode tokens/s, WikiText-2 perplexity) beside our PyTorch
perplexity, the dense model measured in the same run (issue #23).

Usage (a bench script, never run in CI or tests)::

    LLMPRUNE_DATA_DIR=/work/shared/data PYTHONPATH=src python bench/llamacpp.py \\
        OUT_DIR [OUT_DIR ...] --dense smollm2-135m --json bench/out/llamacpp.json

What it does:

1. **Build, once.** llama.cpp comes from the PyPI sdist of ``llama-cpp-python`` (it vendors
   llama.cpp with its ``convert_hf_to_gguf.py`` and ``gguf-py``): ``pip download
   llama-cpp-python==VERSION --no-deps --no-binary :all:``, unpacked, then cmake builds only the
   ``llama-bench`` and ``llama-perplexity`` targets (Release, CPU only, no networking). About
   15 min on 2 cores, cached under ``~/.cache/llmprune/llamacpp`` (``LLMPRUNE_LLAMACPP_DIR`` or
   ``--cache`` to move it); ``--build-only`` does just this step.
2. **Convert** the dense model and every directory with the vendored ``convert_hf_to_gguf.py``
   (its ``gguf-py`` first on ``PYTHONPATH``), unmodified, to ``--outtype f32`` by default (f32
   keeps llama.cpp's perplexity comparable with ours; ``f16``/``bf16`` are options). GGUF
   files are cached in ``bench/out/llamacpp/gguf`` keyed by the directory's contents.
3. **Perplexity**: ``llama-perplexity -f wiki.test.raw -c 1024 --chunks 40``. llama.cpp's
   protocol differs from ours: it tokenises the whole file (with a BOS per window when the
   vocabulary asks for one) and scores only the second half of each window (every scored token
   sees at least 512 tokens of context), so its number is lower than ours; ours scores every
   token of 40 non-overlapping 1024-token windows. Both are reported.
4. **Speed**: ``llama-bench -p 128 -n 32 -t THREADS -r REPS -o json`` with every model in one
   invocation, ``--rounds`` times: prefill (pp128) and decode (tg32) tokens/s, mean ± std over
   all samples, and each model's speed-up = the median over rounds of its ratio to the dense
   model measured in the same round. ``--threads 1,2`` measures both counts. On a machine
   shared with other jobs llama.cpp's threads spin at barriers waiting for a descheduled
   sibling, so with more threads than free cores its speed collapses (measured: 0.3 decode
   tokens/s at 2 threads, 6 at 1, under a load average of 12 on 2 cores): look at the load
   average the report gives; ``llama-perplexity`` runs on ``--ppl-threads`` (1; its result
   does not depend on them).

Writes ``--json`` (default ``bench/out/llamacpp.json``) and a Markdown table beside it
(``.md``), and prints the table. Perplexities already in ``--json`` for the same GGUF and
protocol are taken from there (they are deterministic; ``--fresh`` measures them again); the
speed is always measured anew.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

OUT = Path(__file__).resolve().parent / "out"
# The llama-cpp-python release whose vendored llama.cpp we build (pinned so numbers reproduce).
LLAMA_CPP_PYTHON = "0.3.36"
TARGETS = ("llama-bench", "llama-perplexity")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",  # no networking (LLAMA_CURL is the older name)
    "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF", "-DGGML_VULKAN=OFF", "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF",
)


def cache_root(arg: str | None) -> Path:
    """Where the sdist, the unpacked source and the build live."""
    if arg:
        return Path(arg).expanduser()
    env = os.environ.get("LLMPRUNE_LLAMACPP_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmprune" / "llamacpp"


class LlamaCpp:
    """Paths into one built llama.cpp: the two tools, the converter and its gguf-py."""

    def __init__(self, root: Path, version: str = LLAMA_CPP_PYTHON):
        self.root = root
        self.version = version
        self.src = root / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
        self.build = root / f"build-{version}"
        self.bin = self.build / "bin"
        self.stamp = self.build / "llmprune-build.json"

    @property
    def convert(self) -> Path:
        return self.src / "convert_hf_to_gguf.py"

    @property
    def gguf_py(self) -> Path:
        return self.src / "gguf-py"

    def tool(self, name: str) -> Path:
        return self.bin / name

    def built(self) -> bool:
        if not self.stamp.is_file() or not all(self.tool(t).is_file() for t in TARGETS):
            return False
        return json.loads(self.stamp.read_text()).get("cmake_flags") == list(CMAKE_FLAGS)

    def commit(self) -> str | None:
        """llama.cpp's own version line (``llama-bench --version``), e.g. its build and commit."""
        r = subprocess.run([str(self.tool("llama-bench")), "--version"], capture_output=True, text=True)
        lines = (r.stdout + r.stderr).strip().splitlines()
        return lines[0] if lines else None


def _run(cmd: list[str], log: Path | None = None, **kw) -> subprocess.CompletedProcess:
    """Run ``cmd``; on failure exit with its last output lines (and the log path)."""
    print("+", " ".join(str(c) for c in cmd), flush=True)
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"$ {' '.join(map(str, cmd))}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}")
    if r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-25:])
        sys.exit(f"failed ({r.returncode}): {' '.join(map(str, cmd))}\n{tail}"
                 + (f"\nfull log: {log}" if log else ""))
    return r


def ensure_built(root: Path, jobs: int) -> LlamaCpp:
    """Download, unpack and build llama.cpp's two tools once; later calls reuse the cache."""
    lc = LlamaCpp(root)
    if lc.built():
        return lc
    root.mkdir(parents=True, exist_ok=True)
    sdist = root / "src" / f"llama_cpp_python-{lc.version}.tar.gz"
    if not sdist.is_file():
        _run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={lc.version}", "--no-deps",
              "--no-binary", ":all:", "-d", root / "src"])
    if not lc.convert.is_file():
        with tarfile.open(sdist) as tf:
            tf.extractall(root, filter="data")
    t0 = time.time()
    print(f"building {', '.join(TARGETS)} from {lc.src} (once; ~15 min on 2 cores)", flush=True)
    logs = root / "logs"
    _run(["cmake", "-S", lc.src, "-B", lc.build, *CMAKE_FLAGS], log=logs / "cmake-configure.log")
    _run(["cmake", "--build", lc.build, "--config", "Release", "-j", str(jobs), "--target", *TARGETS],
         log=logs / "cmake-build.log")
    lc.stamp.write_text(json.dumps({"llama_cpp_python": lc.version, "cmake_flags": list(CMAKE_FLAGS),
                                    "build_s": round(time.time() - t0, 1),
                                    "machine": platform.machine()}, indent=1))
    print(f"built in {time.time() - t0:.0f} s", flush=True)
    return lc


# --- models -------------------------------------------------------------------------------------
def model_dir(spec: str) -> Path:
    """A bundled name (converted to its cached HF directory once) or an HF directory."""
    from llmprune.models.loading import BUNDLED, model_source

    d = Path(model_source(spec)) if spec in BUNDLED else Path(spec).expanduser()
    if not (d / "config.json").is_file():
        sys.exit(f"{spec}: not a Hugging Face model directory (no config.json)")
    return d.resolve()


def safetensors_params(d: Path) -> int:
    """Parameters stored in the directory's safetensors files (tied weights are stored once)."""
    n = 0
    for f in sorted(d.glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for name, t in header.items():
            if name != "__metadata__":
                k = 1
                for s in t["shape"]:
                    k *= s
                n += k
    return n


def content_key(d: Path, outtype: str, lc: LlamaCpp) -> str:
    """Changes whenever the directory's config, weights or tokenizer, the type or llama.cpp do."""
    h = hashlib.sha256(f"{outtype}|{lc.version}|{d}".encode())
    for f in sorted(d.iterdir()):
        if f.is_file() and f.suffix in (".json", ".safetensors", ".model", ".txt"):
            st = f.stat()
            h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def convert(d: Path, lc: LlamaCpp, outtype: str, gguf_dir: Path) -> tuple[Path, float, bool]:
    """``(gguf, seconds, cached)``: the directory converted by llama.cpp's own, unmodified
    ``convert_hf_to_gguf.py`` (its gguf-py first on PYTHONPATH)."""
    out = gguf_dir / f"{d.name}-{content_key(d, outtype, lc)}-{outtype}.gguf"
    if out.is_file():
        return out, 0.0, True
    gguf_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(lc.gguf_py), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    try:
        _run([sys.executable, lc.convert, d, "--outfile", tmp, "--outtype", outtype],
             log=gguf_dir / f"{out.stem}.convert.log", env=env)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out, time.perf_counter() - t0, False


# --- llama.cpp measurements ----------------------------------------------------------------------
PPL_RE = re.compile(r"Final estimate: PPL = ([0-9.]+|nan|inf) \+/- ([0-9.]+|nan|inf)")


def llamacpp_ppl(gguf: Path, lc: LlamaCpp, text: Path, ctx: int, chunks: int, threads: int, log: Path) -> dict:
    """llama.cpp's own WikiText-2 perplexity (its protocol: each window's second half scored)."""
    t0 = time.perf_counter()
    r = _run([lc.tool("llama-perplexity"), "-m", gguf, "-f", text, "-c", ctx, "-b", ctx, "--chunks", chunks,
              "-t", threads], log=log)
    m = PPL_RE.search(r.stdout + r.stderr)
    if m is None:
        sys.exit(f"no 'Final estimate' in llama-perplexity's output; see {log}")
    return {"ppl": float(m.group(1)), "ppl_err": float(m.group(2)), "seconds": time.perf_counter() - t0}


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    h = len(xs) // 2
    return xs[h] if len(xs) % 2 else (xs[h - 1] + xs[h]) / 2


def llamacpp_speed(ggufs: list[Path], lc: LlamaCpp, prompt: int, gen: int, threads: list[int],
                   load_modes: list[str], reps: int, rounds: int, log_dir: Path) -> list[dict]:
    """prefill (pp``prompt``) and decode (tg``gen``) tokens/s of each model with ``llama-bench``,
    at each thread count and load mode: ``[model] → {"{threads}t-{mode}": {prefill_tok_s,
    prefill_std, prefill_speedup, ...}}``.

    ``rounds`` invocations, each measuring every model in turn (``reps`` repetitions each), so a
    change of machine load hits the dense model and the pruned ones alike; each model's samples
    pool over the rounds, and its ratio to the first model (dense) is the median of the per-round
    ratios of mean tokens/s.
    """
    names = [str(g) for g in ggufs]
    samples: dict[tuple[int, str, str], list[float]] = {}
    per_round: list[dict[tuple[int, str, str], float]] = []
    for r in range(rounds):
        cmd = [lc.tool("llama-bench"), "-p", prompt, "-n", gen, "-t", ",".join(map(str, threads)),
               "-lm", ",".join(load_modes), "-r", reps, "-o", "json"]
        for g in ggufs:
            cmd += ["-m", g]
        means = {}
        for row in json.loads(_run(cmd, log=log_dir / f"llama-bench-round{r}.log").stdout):
            key = (names.index(row["model_filename"]), f"{row['n_threads']}t-{row.get('load_mode', 'mmap')}",
                   "prefill" if row["n_gen"] == 0 else "decode")
            samples.setdefault(key, []).extend(row["samples_ts"])
            means[key] = row["avg_ts"]
        per_round.append(means)
    res: list[dict] = [{} for _ in ggufs]
    for (i, t, kind), x in sorted(samples.items()):
        mean = sum(x) / len(x)
        res[i].setdefault(t, {}).update({
            f"{kind}_tok_s": mean,
            f"{kind}_std": (sum((v - mean) ** 2 for v in x) / max(len(x) - 1, 1)) ** 0.5,
            f"{kind}_speedup": _median([m[(i, t, kind)] / m[(0, t, kind)] for m in per_round]),
            f"{kind}_samples": x,
        })
    return res


# --- our PyTorch perplexity ------------------------------------------------------------------------
def our_ppl(d: Path, ctx: int, windows: int) -> dict:
    """llmprune's WikiText-2 perplexity (the papers' protocol: every token of the first
    ``windows`` non-overlapping ``ctx``-token windows), fp32 on the CPU."""
    import torch

    from llmprune.data.sources import load_corpus
    from llmprune.data.tokens import eval_token_stream
    from llmprune.eval.perplexity import perplexity
    from llmprune.models.loading import load_model

    t0 = time.perf_counter()
    model, tok = load_model(str(d), dtype="float32")
    ids = eval_token_stream(load_corpus("wikitext2", "test"), tok, ctx)
    r = perplexity(model, ids, ctx, max_windows=windows, progress=False)
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return {"ppl": r["ppl"], "seconds": time.perf_counter() - t0}


def structured_info(d: Path) -> dict:
    """What llmprune's pruning.json says the directory is (method, share of parameters removed)."""
    f = d / "pruning.json"
    if not f.is_file():
        return {}
    r = json.loads(f.read_text())
    info = {"method": r.get("method")}
    if isinstance(r.get("params"), dict):
        info["removed_share"] = r["params"].get("removed_share")
    opts = r.get("options") or {}
    for k in ("ratio", "param_ratio", "layers", "expert_score"):
        if opts.get(k) is not None:
            info[k] = opts[k]
    return info


# --- report --------------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    c = result["config"]
    ok = [m for m in result["models"] if "error" not in m]
    lines = [
        f"llama.cpp ({c['llama_cpp_build']}, from the llama-cpp-python {c['llama_cpp_python']} sdist), {c['outtype']} "
        f"GGUF. Perplexity: WikiText-2 test, {c['ctx']}-token windows, first {c['chunks']}. Speed: llama-bench -p "
        f"{c['prompt']} -n {c['gen']}, {c['rounds']} rounds x {c['reps']} repetitions, every model in each round. "
        f"Load average (1/5/15 min) at start {c['load_start']}, at end {c['load_end']} on {c['cpus']} CPUs.",
        "",
        "| model | params | PPL ours | PPL llama.cpp |",
        "|---|---:|---:|---:|",
    ]
    for m in result["models"]:
        if "error" in m:
            lines.append(f"| {m['name']} | {m['params'] / 1e6:.1f} M | – | failed: {m['error']} |")
            continue
        ours = f"{m['ours']['ppl']:.2f}" if m.get("ours") else "–"
        lp = m["llamacpp_ppl"]
        lines.append(f"| {m['name']} | {m['params'] / 1e6:.1f} M | {ours} | {lp['ppl']:.2f} ± {lp['ppl_err']:.2f} |")
    for key in sorted({k for m in ok for k in m["speed"]}):
        t, mode = key.split("t-")
        lines += ["", f"{t} thread{'s' * (int(t) > 1)}, weights {'mmapped' if mode == 'mmap' else 'loaded: ' + mode}:",
                  "",
                  "| model | prefill t/s | x dense | decode t/s | x dense |", "|---|---:|---:|---:|---:|"]
        for m in ok:
            sp = m["speed"][key]
            lines.append(f"| {m['name']} | {sp['prefill_tok_s']:.1f} ± {sp['prefill_std']:.1f} | "
                         f"{sp['prefill_speedup']:.2f} | {sp['decode_tok_s']:.2f} ± {sp['decode_std']:.2f} | "
                         f"{sp['decode_speedup']:.2f} |")
    lines += ["", "PPL ours: every token of the first windows (the papers' protocol); PPL llama.cpp: "
              "llama-perplexity, only the second half of each window scored (so lower). "
              "x dense: median over rounds of the per-round ratio to the dense model."]
    return "\n".join(lines)


def previous_ppl(json_path: Path, args: argparse.Namespace) -> dict[str, dict]:
    """Perplexities of an earlier run with the same protocol, by GGUF file (its name carries
    the directory's content key and the type): they are deterministic, so not measured again."""
    if not json_path.is_file():
        return {}
    old = json.loads(json_path.read_text())
    if any(old["config"].get(k) != getattr(args, k) for k in ("ctx", "chunks", "outtype")):
        return {}
    return {m["gguf"]: m for m in old["models"] if "gguf" in m}


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", nargs="*", help="model directories (HF format) to measure beside the dense model")
    p.add_argument("--dense", default="smollm2-135m", help="the dense model: bundled name or HF directory")
    p.add_argument("--json", default=str(OUT / "llamacpp.json"), help="results (the .md table goes beside it)")
    p.add_argument("--outtype", default="f32", choices=["f32", "f16", "bf16"], help="GGUF weight type")
    p.add_argument("--ctx", type=int, default=1024, help="perplexity window (llama-perplexity -c)")
    p.add_argument("--chunks", type=int, default=40, help="perplexity windows (llama-perplexity --chunks)")
    p.add_argument("--threads", default="2", help="llama-bench threads, e.g. 2 or 1,2 (each is measured)")
    p.add_argument("--load-mode", default="mmap,none",
                   help="llama-bench -lm: weights mmapped from the GGUF (llama.cpp's default) and/or read into "
                        "memory (none); both by default, see docs/llamacpp.md")
    p.add_argument("--ppl-threads", type=int, default=1,
                   help="llama-perplexity threads (the PPL does not depend on them; on a machine shared with "
                        "other jobs one thread avoids llama.cpp's spinning thread barriers)")
    p.add_argument("--prompt", type=int, default=128, help="llama-bench -p: prompt tokens (prefill)")
    p.add_argument("--gen", type=int, default=32, help="llama-bench -n: generated tokens (decode)")
    p.add_argument("--reps", type=int, default=3, help="llama-bench -r: repetitions per round")
    p.add_argument("--rounds", type=int, default=3, help="llama-bench invocations over all models")
    p.add_argument("--no-ours", action="store_true", help="skip our PyTorch perplexity")
    p.add_argument("--fresh", action="store_true", help="measure the perplexities again even if --json has them")
    p.add_argument("--gguf-dir", default=str(OUT / "llamacpp" / "gguf"), help="converted GGUF cache")
    p.add_argument("--cache", default=None, help="llama.cpp build cache (default ~/.cache/llmprune/llamacpp)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel compile jobs for the build")
    p.add_argument("--build-only", action="store_true", help="build llama.cpp's tools and stop")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    lc = ensure_built(cache_root(args.cache), args.jobs)
    if args.build_only:
        print(f"llama-bench and llama-perplexity are in {lc.bin}")
        return
    from llmprune.data.sources import local_path

    text, _ = local_path("wikitext2", "test")
    if text is None:
        sys.exit("WikiText-2 test not found: set LLMPRUNE_DATA_DIR to the directory with wikitext-2-raw/")
    json_path = Path(args.json)
    log_dir = json_path.parent / "llamacpp" / "logs"
    specs = [args.dense, *args.dirs]
    dirs = [model_dir(s) for s in specs]  # every argument checked before any work
    earlier = {} if args.fresh else previous_ppl(json_path, args)
    load_start = load_average()
    models, ggufs = [], []
    for spec, d in zip(specs, dirs, strict=True):
        name = spec if spec in (args.dense,) else d.name
        entry = {"name": name, "dir": str(d), "params": safetensors_params(d), **structured_info(d)}
        print(f"== {name}: converting", flush=True)
        try:
            gguf, conv_s, cached = convert(d, lc, args.outtype, Path(args.gguf_dir))
        except SystemExit as e:
            if d == dirs[0]:
                raise
            entry["error"] = f"conversion failed: {str(e).splitlines()[0]}"
            models.append(entry)
            continue
        entry.update(gguf=str(gguf), gguf_bytes=gguf.stat().st_size, convert_s=conv_s, convert_cached=cached)
        done = earlier.get(str(gguf), {})
        if "llamacpp_ppl" in done:
            entry["llamacpp_ppl"] = {**done["llamacpp_ppl"], "from": str(json_path)}
        else:
            print(f"== {name}: llama-perplexity", flush=True)
            entry["llamacpp_ppl"] = llamacpp_ppl(gguf, lc, text, args.ctx, args.chunks, args.ppl_threads,
                                                 log_dir / f"{gguf.stem}.perplexity.log")
        if "ours" in done:
            entry["ours"] = {**done["ours"], "from": str(json_path)}
        elif not args.no_ours:
            print(f"== {name}: our perplexity", flush=True)
            entry["ours"] = our_ppl(d, args.ctx, args.chunks)
        models.append(entry)
        ggufs.append(gguf)
    print(f"== llama-bench: {len(ggufs)} models, {args.rounds} rounds", flush=True)
    threads = [int(t) for t in args.threads.split(",")]
    speeds = llamacpp_speed(ggufs, lc, args.prompt, args.gen, threads, args.load_mode.split(","), args.reps,
                            args.rounds, log_dir)
    for entry, sp in zip([m for m in models if "error" not in m], speeds, strict=True):
        entry["speed"] = sp
    config = {k: getattr(args, k) for k in ("outtype", "ctx", "chunks", "threads", "load_mode", "ppl_threads",
                                            "prompt", "gen", "reps", "rounds")}
    config.update(llama_cpp_python=lc.version, llama_cpp_build=lc.commit(), cmake_flags=list(CMAKE_FLAGS),
                  machine=platform.machine(), cpus=os.cpu_count(), load_start=load_start, load_end=load_average(),
                  date=time.strftime("%Y-%m-%d %H:%M"))
    result = {"config": config, "models": models}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1))
    table = markdown(result)
    json_path.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
