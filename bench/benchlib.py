"""Shared pieces of the benchmarks: workload W, files, running cka-analyze, machine description, results.

Every bench script imports this module (it sits beside them), writes one JSON into bench/results/ with
:func:`write_result`, and ``bench/report.py`` turns those JSONs into docs/benchmarks.md.

Workload W (``spec("full")``): two "models" A and B of 12 layers each, widths 256..4096 (sum 40,960 over the
24 layers), n = 8192 examples, minibatch m = 256. The activations are deterministic and have real structure:
both models see the same inputs (a 256-d latent with a decaying spectrum); each model is a random
linear+ReLU chain on that latent, and layer ``l`` emits ``relu(z_l P_l + b_l)`` (a random projection of
the chain's state to the layer's width, non-negative with non-zero means, like real post-ReLU features).
Rows are generated in fixed blocks of 256 seeded by the block index, so any row range is reproducible
and files of any ``n`` are written in bounded memory.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "results"
PEERS_PYTHON = REPO / ".bench-venv" / "bin" / "python"
ROW_BLOCK = 256  # rows per generator block (the unit of determinism)
LATENT = 256


# ====================================================================== workload
@dataclass(frozen=True)
class Spec:
    """A workload: layer widths of models A and B, examples, minibatch size."""

    name: str
    widths_a: tuple[int, ...]
    widths_b: tuple[int, ...]
    n: int
    m: int = 256
    seed: int = 0
    #: rescale each example's chain state to unit root mean square after every layer (as a LayerNorm does):
    #: deep chains (workload H's 150 layers) would otherwise grow by orders of magnitude with depth
    layer_norm: bool = False

    @property
    def total_width(self) -> int:
        return sum(self.widths_a) + sum(self.widths_b)

    def with_n(self, n: int) -> Spec:
        return Spec(self.name, self.widths_a, self.widths_b, n, self.m, self.seed, self.layer_norm)

    def describe(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "n": self.n,
            "m": self.m,
            "seed": self.seed,
            "widths_a": list(self.widths_a),
            "widths_b": list(self.widths_b),
            "layers": len(self.widths_a) + len(self.widths_b),
            "total_width": self.total_width,
        }
        if self.layer_norm:  # only then: W's description (and so its files' fingerprint) is unchanged
            out["layer_norm"] = True
        return out


_W_A = (256, 512, 1024, 2048, 4096, 4096, 2048, 2048, 1024, 1024, 512, 256)  # sum 18,944
_W_B = (256, 512, 512, 1024, 2048, 4096, 4096, 4096, 2048, 2048, 1024, 256)  # sum 22,016
# workload H: two deep models of 150 mean-pooled layers each, many narrow early layers and fewer wide late
# ones (a ResNet-50's blocks pool to 64..2048 channels), n = 16,384; 5.1 GB of float32 in all
_H_A = (64,) * 60 + (128,) * 40 + (256,) * 25 + (512,) * 15 + (1024,) * 7 + (2048,) * 3  # sum 36,352
_H_B = (64,) * 50 + (128,) * 40 + (256,) * 30 + (512,) * 18 + (1024,) * 8 + (2048,) * 4  # sum 41,600


def spec(size: str, n: int | None = None) -> Spec:
    """``full``: workload W; ``quick``: W's layers at 1/4 width, n = 2048; ``smoke``: tiny (seconds).
    ``H``, ``H-quick`` (H's layers at 1/4 width, n = 2048), ``H-smoke`` (2 x 12 narrow layers): workload H."""
    if size == "H":
        return Spec("H", _H_A, _H_B, 16384 if n is None else n, 256, layer_norm=True)
    if size == "H-quick":
        a, b = (tuple(max(16, w // 4) for w in ws) for ws in (_H_A, _H_B))
        return Spec("H/4 quick", a, b, 2048 if n is None else n, 256, layer_norm=True)
    if size == "H-smoke":
        a, b = (8,) * 5 + (16,) * 4 + (32,) * 3, (8,) * 4 + (16,) * 4 + (48,) * 4
        return Spec("H smoke", a, b, 256 if n is None else n, 32, layer_norm=True)
    if size == "full":
        s = Spec("W", _W_A, _W_B, 8192, 256)
    elif size == "quick":
        s = Spec("W/4 quick", tuple(w // 4 for w in _W_A), tuple(w // 4 for w in _W_B), 2048, 256)
    elif size == "smoke":
        s = Spec("smoke", (16, 32, 64, 32), (32, 16, 48, 24), 256, 64)
    else:
        raise ValueError(f"unknown size {size!r}")
    return s.with_n(n) if n is not None else s


def _weights(widths: Sequence[int], seed: int, model: int) -> tuple[list[Any], list[Any], list[Any]]:
    import torch

    g = torch.Generator().manual_seed(1000 * seed + model)
    chain, proj, bias = [], [], []
    for w in widths:
        # a near-orthogonal mixing step keeps the chain's scale; layers drift apart with depth
        a = torch.randn(LATENT, LATENT, generator=g, dtype=torch.float64) / LATENT**0.5
        chain.append(0.8 * torch.eye(LATENT, dtype=torch.float64) + 0.9 * a)
        proj.append(torch.randn(LATENT, w, generator=g, dtype=torch.float64) / LATENT**0.5)
        bias.append(0.3 * torch.randn(w, generator=g, dtype=torch.float64))
    return chain, proj, bias


def _latent_block(seed: int, block: int) -> Any:
    import torch

    g = torch.Generator().manual_seed(10_000_019 * (seed + 1) + block)
    z = torch.randn(ROW_BLOCK, LATENT, generator=g, dtype=torch.float64)
    spectrum = 1.0 / (1.0 + torch.arange(LATENT, dtype=torch.float64)) ** 0.5  # decaying: real structure
    return z * spectrum


class Generator:
    """Deterministic activations of W: ``rows(model, start, stop)`` -> list of float32 arrays, one per layer."""

    def __init__(self, s: Spec, transform: str = "none") -> None:
        self.spec, self.transform = s, transform
        self.params = [_weights(s.widths_a, s.seed, 0), _weights(s.widths_b, s.seed, 1)]

    def _apply(self, x: Any) -> Any:
        if self.transform == "none":
            return x
        if self.transform == "scale1e-3":
            return x * 1e-3
        if self.transform == "shift50":
            return x + 50.0
        raise ValueError(f"unknown transform {self.transform!r}")

    def rows(self, model: int, start: int, stop: int) -> list[np.ndarray]:
        import torch

        chain, proj, bias = self.params[model]
        first, last = start // ROW_BLOCK, (stop - 1) // ROW_BLOCK
        z = torch.cat([_latent_block(self.spec.seed, b) for b in range(first, last + 1)])
        z = z[start - first * ROW_BLOCK : stop - first * ROW_BLOCK]
        out = []
        for a, p, b in zip(chain, proj, bias):
            z = torch.relu(z @ a) + 0.05 * z  # leaky chain: information flows, with depth-dependent change
            if self.spec.layer_norm:  # per example, so any row range is still reproducible
                z = z / z.square().mean(dim=1, keepdim=True).sqrt().clamp_min(1e-12)
            out.append(self._apply(torch.relu(z @ p + b)).to(torch.float32).numpy())
        return out


def layer_names(s: Spec) -> tuple[list[str], list[str]]:
    return [f"a{k:02d}" for k in range(len(s.widths_a))], [f"b{k:02d}" for k in range(len(s.widths_b))]


def _fingerprint(s: Spec, transform: str, kind: str) -> str:
    text = json.dumps([s.describe(), transform, kind, 2], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def materialize(
    s: Spec,
    directory: str | os.PathLike[str],
    *,
    transform: str = "none",
    h5: bool = True,
    npy: bool = False,
    block_rows: int = 1024,
) -> dict[str, Any]:
    """Write W (or a variant) as HDF5 activation files (``a.h5``, ``b.h5``; float32, uncompressed) and/or as
    per-layer ``.npy`` files (for the peers), reusing files a previous call made with the same parameters.

    Returns ``{"h5": [a.h5, b.h5], "npy": {"a": [...], "b": [...]}, "seconds": generation time}``.
    """
    from cka_offline.store.writer import ActivationWriter, LayerSpec

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = layer_names(s)
    widths = (s.widths_a, s.widths_b)
    out: dict[str, Any] = {"h5": [], "npy": {"a": [], "b": []}, "seconds": 0.0}
    marker = directory / "workload.json"
    key = _fingerprint(s, transform, f"h5={h5},npy={npy}")
    h5_paths = [directory / "a.h5", directory / "b.h5"]
    npy_paths = [[directory / f"{nm}.npy" for nm in names[k]] for k in range(2)]
    out["h5"] = [str(p) for p in h5_paths] if h5 else []
    out["npy"] = {"a": [str(p) for p in npy_paths[0]], "b": [str(p) for p in npy_paths[1]]} if npy else {}
    if marker.exists() and json.loads(marker.read_text()).get("key") == key:
        return out
    marker.unlink(missing_ok=True)
    t0 = time.perf_counter()
    gen = Generator(s, transform)
    for k in range(2):
        writer = None
        mmaps = []
        if h5:
            layers = [LayerSpec(nm, (w,), "none", w) for nm, w in zip(names[k], widths[k])]
            writer = ActivationWriter(
                str(h5_paths[k]),
                ids=np.arange(s.n, dtype=np.int64),
                layers=layers,
                provenance={
                    "extractor": "bench/benchlib.py",
                    "model": f"{'H' if s.layer_norm else 'W'} model {'AB'[k]}",
                    "options": json.dumps({"transform": transform, **s.describe()}),
                },
                dtype="float32",
                overwrite=True,
            )
        if npy:
            mmaps = [
                np.lib.format.open_memmap(p, mode="w+", dtype=np.float32, shape=(s.n, w))
                for p, w in zip(npy_paths[k], widths[k])
            ]
        try:
            for start in range(0, s.n, block_rows):
                stop = min(s.n, start + block_rows)
                arrays = gen.rows(k, start, stop)
                if writer is not None:
                    writer.write(dict(zip(names[k], arrays)))
                for mm, arr in zip(mmaps, arrays):
                    mm[start:stop] = arr
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        if writer is not None:
            writer.close()
        for mm in mmaps:
            mm.flush()
        del mmaps
    out["seconds"] = time.perf_counter() - t0
    marker.write_text(json.dumps({"key": key, "spec": s.describe(), "transform": transform}))
    return out


def sequential_batches(n: int, m: int, max_batches: int | None = None) -> list[np.ndarray]:
    """The peers' minibatches: consecutive rows, unshuffled, ``ceil(n/m)`` batches (the last may be short)."""
    batches = [np.arange(i, min(n, i + m)) for i in range(0, n, m)]
    return batches[:max_batches] if max_batches else batches


# ====================================================================== running commands
def cli(name: str) -> list[str]:
    """The installed console script ``name`` beside this Python, else the same entry point via ``-c``."""
    script = Path(sys.executable).with_name(name)
    if script.exists():
        return [str(script)]
    module = {"cka-analyze": "analyze", "cka-extract": "extract", "cka-inspect": "inspect"}[name]
    return [sys.executable, "-c", f"import sys; from cka_offline.cli.{module} import main; sys.exit(main())"]


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


@dataclass
class Run:
    seconds: float
    max_rss_mb: float
    stdout: str
    stderr: str
    returncode: int = 0


#: Starts the measured command from a small process. Linux carries a process's peak RSS across fork and
#: exec (the forked copy of the parent's memory counts), so a command started straight from this
#: benchmark process -- hundreds of MB of data and torch -- would report at least this process's RSS.
#: The launcher is a fresh, small process; its child's peak is the command's own.
_LAUNCHER = (
    "import os, sys, time\n"
    "t0 = time.perf_counter()\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    os.execvp(sys.argv[2], sys.argv[2:])\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "open(sys.argv[1], 'w').write(f'{usage.ru_maxrss} {time.perf_counter() - t0}')\n"
    "sys.exit(os.waitstatus_to_exitcode(status) % 256)\n"
)


def run(
    cmd: Sequence[str], *, check: bool = True, env: dict[str, str] | None = None, timeout: float | None = None
) -> Run:
    """Run ``cmd``; its wall seconds and its own peak resident memory (``wait4``'s ru_maxrss of the command,
    started by a small launcher so that this process's memory does not count; see ``_LAUNCHER``). The
    seconds are the launcher's, from fork to exit of the command: the launcher's own start is not counted."""
    import signal
    import tempfile
    import threading

    with (
        tempfile.TemporaryFile("w+") as out,
        tempfile.TemporaryFile("w+") as err,
        tempfile.NamedTemporaryFile("r", suffix=".maxrss") as rss,
    ):
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-S", "-c", _LAUNCHER, rss.name, *cmd],
            stdout=out,
            stderr=err,
            text=True,
            env=env or child_env(),
            start_new_session=True,
        )
        timer_ = None
        if timeout:
            timer_ = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
            timer_.start()
        proc.wait()
        seconds = time.perf_counter() - t0
        if timer_ is not None:
            timer_.cancel()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
        text = rss.read().split()
    if check and proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{stderr[-4000:]}")
    if len(text) == 2:
        return Run(float(text[1]), int(text[0]) / 1024.0, stdout, stderr, proc.returncode)
    return Run(seconds, float("nan"), stdout, stderr, proc.returncode)


def analyze_cmd(
    files: Sequence[str],
    output: str,
    *,
    m: int = 256,
    precision: str = "float32",
    device: str = "cpu",
    seed: int = 0,
    extra: Sequence[str] = (),
) -> list[str]:
    return [
        *cli("cka-analyze"),
        *files,
        "-o",
        output,
        "-m",
        str(m),
        "--seed",
        str(seed),
        "--precision",
        precision,
        "--device",
        device,
        "--overwrite",
        *extra,
    ]


def run_analyze(files: Sequence[str], output: str, *, env: dict[str, str] | None = None, **kw: Any) -> tuple[Run, Any]:
    """``cka-analyze`` end to end as a subprocess -> (Run, CKAResult loaded from ``output``); ``env``: extra
    environment variables for it."""
    from cka_offline.results import load_result

    r = run(analyze_cmd(files, output, **kw), env=child_env(**env) if env else None)
    return r, load_result(output)


def analyze_plan(result: Any) -> list[np.ndarray]:
    """The minibatches a cka-analyze result used (rebuilt from its recorded parameters)."""
    from cka_offline.analysis import plan_minibatches

    p = result.params  # the workloads' ids are 0..n-1 in file order, so ranks are positions (ids=None)
    return plan_minibatches(
        result.n_examples,
        int(p["batch_size"]),
        seed=int(p["seed"]),
        epochs=int(p["epochs"]),
        n_groups=int(p["n_groups"]),
        shuffle=p.get("shuffle", "blocks"),
        block_rows=int(p.get("block_rows", 1024)),
        buffer_blocks=int(p.get("buffer_blocks", 8)),
    )


def peers_available() -> tuple[bool, str]:
    if not PEERS_PYTHON.exists():
        return False, f"{PEERS_PYTHON} is missing (create it with bench/setup_peers.sh)"
    return True, ""


def run_peer(
    peer: str, manifest: str, output: str, *, m: int, max_batches: int | None = None, timeout: float | None = None
) -> dict[str, Any]:
    """Run one peer's own minibatch loop in the peers' venv; returns the runner's JSON line (seconds, ...)."""
    cmd = [
        str(PEERS_PYTHON),
        str(BENCH / "peers_runner.py"),
        "--peer",
        peer,
        "--manifest",
        manifest,
        "--batch-size",
        str(m),
        "--out",
        output,
    ]
    if max_batches:
        cmd += ["--max-batches", str(max_batches)]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    r = run(cmd, check=False, env=env, timeout=timeout)
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"peer": peer, "ok": False, "error": (r.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    info = json.loads(lines[-1])
    info["max_rss_mb"] = r.max_rss_mb
    return info


def write_manifest(directory: str | os.PathLike[str], s: Spec, npy: dict[str, list[str]]) -> str:
    names = layer_names(s)
    path = Path(directory) / "manifest.json"
    path.write_text(
        json.dumps({"n": s.n, "a": {"names": names[0], "paths": npy["a"]}, "b": {"names": names[1], "paths": npy["b"]}})
    )
    return str(path)


# ====================================================================== hardware
def gemm_rate(
    dtype: str, shape: tuple[int, int, int] = (2048, 2048, 2048), min_seconds: float = 1.0, lib: str = "torch"
) -> float:
    """Matrix-product rate (FLOP/s) for ``(a x b) @ (b x c)``, best of repeats: ``lib="torch"`` (torch.matmul
    on this process's torch threads, MKL here) or ``"numpy"`` (numpy's BLAS, OpenBLAS here, its default threads)."""
    a_, b_, c_ = shape
    if lib == "numpy":
        rng = np.random.default_rng(0)
        x = rng.standard_normal((a_, b_)).astype(dtype)
        y = rng.standard_normal((b_, c_)).astype(dtype)
    else:
        import torch

        dt = getattr(torch, dtype)
        x = torch.randn(a_, b_, dtype=dt)
        y = torch.randn(b_, c_, dtype=dt)
    x @ y
    best = float("inf")
    t_end = time.perf_counter() + min_seconds
    reps = 0
    while reps < 3 or time.perf_counter() < t_end:
        t = time.perf_counter()
        x @ y
        best = min(best, time.perf_counter() - t)
        reps += 1
    return 2.0 * a_ * b_ * c_ / best


def gram_rate(dtype: str, m: int, d: int, min_seconds: float = 0.5) -> float:
    """Rate (FLOP/s) of the Gram product ``x @ x.T`` for ``x`` of shape (m, d): the shape the analysis uses."""
    import torch

    x = torch.randn(m, d, dtype=getattr(torch, dtype))
    x @ x.T
    best = float("inf")
    t_end = time.perf_counter() + min_seconds
    reps = 0
    while reps < 3 or time.perf_counter() < t_end:
        t = time.perf_counter()
        x @ x.T
        best = min(best, time.perf_counter() - t)
        reps += 1
    return 2.0 * m * m * d / best


def memory_bandwidth(mbytes: int = 512) -> dict[str, float]:
    """Read (sum) and copy bandwidth in bytes/s over a buffer far larger than the caches; best of 5."""
    import torch

    x = torch.ones(mbytes * 2**20 // 4, dtype=torch.float32)
    y = torch.empty_like(x)
    read = copy = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        read = min(read, time.perf_counter() - t)
        t = time.perf_counter()
        y.copy_(x)
        copy = min(copy, time.perf_counter() - t)
    nbytes = x.numel() * 4
    return {"read_Bps": nbytes / read, "copy_Bps": 2 * nbytes / copy}


# ====================================================================== description and results
def _cmd_out(cmd: Sequence[str]) -> str:
    try:
        return subprocess.run(list(cmd), capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict[str, Any]:
    model = ""
    for line in _cmd_out(["lscpu"]).splitlines():
        if line.startswith("Model name:"):
            model = line.split(":", 1)[1].strip()
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": model or platform.processor(),
        "cores": os.cpu_count(),
        "memory": mem,
        "simd": " ".join(f for f in ("avx2", "fma", "avx512f") if f in flags),
        "os": platform.platform(),
        "python": platform.python_version(),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("OPENBLAS", "OMP_", "MKL_"))},
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for mod in ("cka_offline", "numpy", "torch", "h5py", "onnxruntime"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            pass
    commit = _cmd_out(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]).strip()
    if commit:
        dirty = _cmd_out(["git", "-C", str(REPO), "status", "--porcelain", "--", "cka_offline", "plugins"]).strip()
        out["git"] = commit + (" + uncommitted changes" if dirty else "")
    return out


def write_result(name: str, data: dict[str, Any], results_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write ``bench/results/<name>.json`` with the date, machine, versions and command added."""
    directory = Path(results_dir) if results_dir else RESULTS
    directory.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": name,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]]),
        "machine": machine(),
        "versions": versions(),
        **data,
    }
    path = directory / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2, default=_json_default))
    print(f"wrote {path}")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value).__name__)


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| over the entries both hold (NaN if either has a NaN where the other has a number, or
    nothing is compared): the within-file entries a default analysis leaves NaN compare as equal."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or not np.array_equal(np.isnan(a), np.isnan(b)):
        return float("nan")
    both = ~np.isnan(a)
    return float(np.max(np.abs(a[both] - b[both]))) if both.any() else float("nan")


def common_args(parser: Any) -> None:
    parser.add_argument("--quick", action="store_true", help="W at 1/4 width and n = 2048 (about a minute)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the test suite (seconds)")
    parser.add_argument("--data-dir", help="where to write the generated files (default: bench/results/data)")
    parser.add_argument("--results-dir", help="where to write the JSON (default: bench/results)")


def size_of(args: Any) -> str:
    return "smoke" if args.smoke else "quick" if args.quick else "full"


def data_dir(args: Any, name: str) -> Path:
    base = Path(args.data_dir) if args.data_dir else RESULTS / "data"
    return base / name


def timer() -> Callable[[], float]:
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0


def disk_free_gb(path: str | os.PathLike[str]) -> float:
    Path(path).mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(path).free / 2**30
