"""Kill ``cka-extract`` at random moments with SIGKILL, SIGTERM and SIGINT (Ctrl-C), for each compression,
then ``--resume`` and compare with an uninterrupted run. The measurement behind docs/reliability.md
("Kills at random moments"); tests/hardening/test_sigkill_resume.py runs a small sample of it.

    python -m tests.hardening.kill_loop --kills 20          # from the repository root: 20 per case
    CKA_KILL_LOOPS=20 python -m pytest tests/hardening/test_sigkill_resume.py   # the same through the test

Each kill ends as one of:

- ``complete``: the kill came after the final rename; the file at the final path equals the reference.
- ``resumed``: ``--resume`` finished the run, to a file identical to the reference (every dataset, chunk
  layout and attribute but the creation time), and left nothing else in the folder.
- ``refused``: ``--resume`` refused with one clear line (exit 3); a run with ``--overwrite`` then gives
  the reference.
- ``FAILED``: anything else: a traceback, another exit code, a file that differs from the reference, a
  complete-looking file after a kill that differs, or leftovers (lock or scratch files) after a resume.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .builders import BIN, full_content, npy_folder

COMPRESSIONS = ("none", "gzip", "lz4")
SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "INT": signal.SIGINT}
OUTCOMES = ("complete", "resumed", "refused", "FAILED")
#: counted besides the outcome: the kill left a partial file with rows in it (a kill mid-write), and the
#: resume found counted rows that did not read back and extracted them again
NOTES = ("mid-write", "dropped back")


def command(compression: str) -> list[str]:
    """Relative paths, run from each run's own folder: the recorded command line is the same everywhere."""
    return [
        str(BIN / "cka-extract"),
        "../acts",
        "-o",
        "out.h5",
        "-b",
        "10",
        "--chunk-rows",
        "64",
        "--compression",
        compression,
        "-q",
    ]


@dataclass
class Case:
    """The reference of one compression: its content and how long an uninterrupted run writes."""

    compression: str
    reference: dict[str, Any]
    seconds: float


@dataclass
class Report:
    counts: dict[str, Counter] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    refusals: list[str] = field(default_factory=list)

    def add(self, key: str, outcome: str, detail: str = "", notes: Sequence[str] = ()) -> None:
        counter = self.counts.setdefault(key, Counter())
        counter[outcome] += 1
        counter.update(notes)
        if outcome == "FAILED":
            self.failures.append(f"{key}: {detail}")
        elif outcome == "refused":
            self.refusals.append(f"{key}: {detail}")

    def total(self) -> Counter:
        """Every outcome and note over all cases."""
        out: Counter = Counter()
        for counter in self.counts.values():
            out.update(counter)
        return out

    def table(self) -> str:
        """The counts as a markdown table, one row per compression and signal."""
        columns = (*OUTCOMES, *NOTES)
        rows = [
            "| compression | signal | kills | " + " | ".join(columns) + " |",
            "|---|---|---|" + "---|" * len(columns),
        ]
        for key, counter in self.counts.items():
            compression, sig = key.split("/")
            cells = " | ".join(str(counter[o]) for o in columns)
            rows.append(f"| {compression} | SIG{sig} | {sum(counter[o] for o in OUTCOMES)} | {cells} |")
        return "\n".join(rows)


def prepare(root: Path, rows: int, compressions: Sequence[str]) -> list[Case]:
    """The inputs (a folder of .npy activations for the arrays extractor) and one reference per compression."""
    import hdf5plugin  # noqa: F401 - full_content reads the LZ4 references here

    npy_folder(root / "acts", n=rows, widths=(64, 32, 16))
    cases = []
    for compression in compressions:
        folder = root / f"ref-{compression}"
        folder.mkdir()
        proc = subprocess.Popen(command(compression), cwd=folder, stderr=subprocess.PIPE, text=True)
        started = _appeared(folder, proc)
        _, err = proc.communicate(timeout=300)
        seconds = time.monotonic() - started
        if proc.returncode != 0:
            raise RuntimeError(f"the reference run failed: {err}")
        cases.append(Case(compression, full_content(str(folder / "out.h5")), seconds))
    return cases


def kill_once(folder: Path, case: Case, sig: str, delay: float) -> tuple[str, str, list[str]]:
    """Start a run in ``folder``, send ``sig`` ``delay`` seconds after its lock file appears (the writer
    takes the lock just before it creates the file), then resume it; returns ``(outcome, detail, notes)``."""
    folder.mkdir()
    cmd = command(case.compression)
    proc = subprocess.Popen(cmd, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    started = _appeared(folder, proc)
    time.sleep(max(0.0, started + delay - time.monotonic()))
    if proc.poll() is None:
        proc.send_signal(SIGNALS[sig])
    _, err = proc.communicate(timeout=300)
    where = f"{folder.name} (signal after {delay:.3f} s, exit {proc.returncode})"
    if "Traceback" in err or "Exception ignored" in err:
        return "FAILED", f"{where}: the interrupted run printed a traceback: {err[-600:]}", []
    final, partial = folder / "out.h5", folder / "out.h5.partial"
    # a Ctrl-C or SIGTERM after the command has finished its work (the final file is written) ends Python's
    # exit by the signal (-2 or -15 here, 130 or 143 in a shell) without a message: allowed then, and only then
    late = proc.returncode == -SIGNALS[sig] and final.exists()
    if sig == "INT" and proc.returncode not in (0, 130) and not late:
        return "FAILED", f"{where}: Ctrl-C exited with {proc.returncode}: {err[-300:]}", []
    if sig == "TERM" and proc.returncode not in (0, 143) and not late:  # handled as Ctrl-C, with 128 + 15
        return "FAILED", f"{where}: SIGTERM exited with {proc.returncode}: {err[-300:]}", []
    if final.exists():
        if partial.exists():
            return "FAILED", f"{where}: both out.h5 and out.h5.partial exist", []
        if full_content(str(final)) != case.reference:
            return "FAILED", f"{where}: the file at the final path differs from an uninterrupted run's", []
        return "complete", "", []
    notes = ["mid-write"] if _rows_of(partial) else []
    r = subprocess.run([*cmd, "--resume"], cwd=folder, capture_output=True, text=True, timeout=300)
    if "do not read back" in r.stderr:
        notes.append("dropped back")
    if r.returncode == 3 and r.stderr.count("\n") == 1 and r.stderr.startswith("cka-extract: error: "):
        again = subprocess.run([*cmd, "--overwrite"], cwd=folder, capture_output=True, text=True, timeout=300)
        if again.returncode != 0 or not _same(str(final), case.reference, command=False):
            return "FAILED", f"{where}: refused ({r.stderr.strip()}), then --overwrite failed: {again.stderr}", notes
        return "refused", f"{where}: {r.stderr.strip()}", notes
    if r.returncode != 0:
        return "FAILED", f"{where}: --resume exited with {r.returncode}: {r.stderr[-600:]}", notes
    resumed = full_content(str(final))
    if resumed != case.reference:
        return (
            "FAILED",
            f"{where}: the resumed file differs from an uninterrupted run's: {difference(resumed, case.reference)}",
            notes,
        )
    left = sorted(p.name for p in folder.iterdir() if p.name != "out.h5")
    if left:
        return "FAILED", f"{where}: left behind after the resume: {left}", notes
    return "resumed", "", notes


def difference(content: dict[str, Any], reference: dict[str, Any]) -> str:
    """Where two ``full_content`` dicts differ first: the object, and for a dataset's values the first row."""
    import numpy as np

    for name in sorted(set(content) | set(reference)):
        got, want = content.get(name), reference.get(name)
        if got == want:
            continue
        if isinstance(got, tuple) and isinstance(want, tuple) and got[1:] == want[1:] and isinstance(got[0], bytes):
            a = np.frombuffer(got[0], dtype=got[1]).reshape(got[2])
            b = np.frombuffer(want[0], dtype=want[1]).reshape(want[2])
            rows = np.flatnonzero((a != b).reshape(len(a), -1).any(axis=1))
            return f"{name}: {len(rows)} rows differ, the first {rows[0]}, the last {rows[-1]}"
        return f"{name}: {str(got)[:200]} != {str(want)[:200]}"
    return "nothing"


def _same(path: str, reference: dict[str, Any], *, command: bool = True) -> bool:
    """``path`` holds what ``reference`` does (``command=False``: but for the recorded command line)."""
    content = full_content(path)
    if not command:
        content["/"].pop("command", None)
        reference = {**reference, "/": {k: v for k, v in reference["/"].items() if k != "command"}}
    return content == reference


def _rows_of(partial: Path) -> int:
    """The rows a partial file counts as written (0 when there is none or it cannot be read)."""
    import h5py

    try:
        with h5py.File(partial, "r", locking=False) as h:
            return int(h.attrs["rows_complete"])
    except (OSError, KeyError, RuntimeError, ValueError):
        return 0


def run(
    root: Path,
    *,
    kills: int,
    rows: int = 12_000,
    seed: int = 0,
    parallel: int = 2,
    compressions: Sequence[str] = COMPRESSIONS,
    signals: Sequence[str] = tuple(SIGNALS),
) -> Report:
    """``kills`` kills per compression and signal at moments drawn uniformly from just before the file is
    created to past the end of the run (scaled by how long the reference run wrote)."""
    cases = prepare(root, rows, compressions)
    rng = random.Random(seed)
    jobs = []
    for case in cases:
        for sig in signals:
            for k in range(kills):
                delay = rng.uniform(-0.05, 1.15) * case.seconds
                jobs.append((root / f"{case.compression}-{sig}-{k:03d}", case, sig, delay))
    rng.shuffle(jobs)  # the cases share the machine's load alike
    report = Report()
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        results = pool.map(lambda job: (job, _guarded(*job)), jobs)
        for (_, case, sig, _), (outcome, detail, notes) in results:
            report.add(f"{case.compression}/{sig}", outcome, detail, notes)
    report.counts = dict(sorted(report.counts.items(), key=lambda kv: (COMPRESSIONS.index(kv[0].split("/")[0]), kv[0])))
    return report


def _guarded(folder: Path, case: Case, sig: str, delay: float) -> tuple[str, str, list[str]]:
    try:
        return kill_once(folder, case, sig, delay)
    except subprocess.TimeoutExpired as exc:
        return "FAILED", f"{folder.name} (signal after {delay:.3f} s): {' '.join(map(str, exc.cmd[-3:]))} hung", []


def _appeared(folder: Path, proc: subprocess.Popen) -> float:
    """When the writer's lock file (or, from a writer without one, its partial file) appeared in
    ``folder`` (polled; the process may have finished already)."""
    names = [folder / "out.h5.lock", folder / "out.h5.partial"]
    deadline = time.monotonic() + 120
    while not any(p.exists() for p in names) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    return time.monotonic()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="kills per compression and signal (default 20)")
    parser.add_argument("--rows", type=int, default=12_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--root", type=Path, help="work folder (default: a new temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the counts and messages as JSON")
    args = parser.parse_args(argv)
    import tempfile

    root = args.root or Path(tempfile.mkdtemp(prefix="kill-loop-"))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    report = run(root, kills=args.kills, rows=args.rows, seed=args.seed, parallel=args.parallel)
    print(report.table())
    print(f"\ntotal: {dict(report.total())} in {time.monotonic() - t0:.0f} s (work folder {root})")
    for line in report.refusals:
        print("refused:", line)
    for line in report.failures:
        print("FAILED:", line)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "counts": {k: dict(v) for k, v in report.counts.items()},
                    "failures": report.failures,
                    "refusals": report.refusals,
                },
                indent=1,
            )
        )
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
