"""Scale-out with torch.distributed: `cka-analyze` and `cka-extract` under torchrun (2 processes, gloo on
loopback) give the single-process results; a failing rank stops every rank with one clear line and no result.

Each torchrun launch costs a few seconds of start-up on 2 busy cores, so the module launches four times in
all (analysis, failure, extraction, the benchmark's smoke run); the rest is tested in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cka_offline import distributed
from cka_offline.analysis import MinibatchPlan, analyze, own_minibatches, plan_minibatches
from cka_offline.analysis.batches import HDF5BatchReader
from cka_offline.analysis.loop import SCALE_SAMPLE
from cka_offline.analysis.options import AnalysisOptions
from cka_offline.analysis.stack import LayerStack
from cka_offline.errors import CKAOfflineError, DistributedError, FormatError
from cka_offline.extraction import shard_path
from cka_offline.store.reader import open_activations

from .analyze_fixtures import chain_activations, write_acts

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"
_TORCHRUN_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "CKA_DISTRIBUTED",
    "TORCHELASTIC_RUN_ID",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def torchrun(args: list[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node 2 -m MODULE ARGS`` with this venv."""
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_VARS}
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        CKA_DIST_TIMEOUT="120",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def no_torchrun(monkeypatch):
    for key in _TORCHRUN_VARS:
        monkeypatch.delenv(key, raising=False)


# ---------------------------------------------------------------- in-process: the plan, the environment
@pytest.mark.parametrize("world", [2, 3, 7])
def test_ranks_read_exactly_the_single_process_minibatches(tmp_path, world):
    path = write_acts(tmp_path / "a.h5", chain_activations(150, widths=(5, 3)), chunk_rows=16)
    with open_activations(path) as f:
        stack = LayerStack.build([f], ["a"], AnalysisOptions())
        mplan = MinibatchPlan(150, 12, seed=3, epochs=2, block_rows=16, buffer_blocks=2)
        plan = plan_minibatches(150, 12, seed=3, epochs=2, block_rows=16, buffer_blocks=2)

        def read(own):
            out = []
            with HDF5BatchReader(stack, mplan, own or (0, len(plan)), prefetch=2, workers=1) as reader:
                for batch in reader:
                    out.append((batch.index, batch.positions.copy(), [np.array(a) for a in batch.arrays]))
                    reader.release(batch)
            return out

        whole = read(None)
        shares = [read(own_minibatches(len(plan), r, world)) for r in range(world)]
    assert [len(s) for s in shares] == [len(range(*own_minibatches(len(plan), r, world))) for r in range(world)]
    joined = [b for share in shares for b in share]
    assert [b[0] for b in joined] == list(range(len(plan)))
    for (_, positions, arrays), (_, pos_whole, arr_whole), planned in zip(joined, whole, plan):
        np.testing.assert_array_equal(positions, planned)
        np.testing.assert_array_equal(positions, pos_whole)
        for a, b in zip(arrays, arr_whole):
            np.testing.assert_array_equal(a, b)


def test_single_process_is_a_no_op(no_torchrun):
    assert distributed.environment() is None
    with distributed.init("cpu") as ctx:
        assert not ctx.enabled and ctx.is_main
        assert ctx.device("cuda") == "cuda" and ctx.gather(3) == [3] and ctx.broadcast("x") == "x"
        ctx.agree("data", 1)
        ctx.poll(force=True)
        with pytest.raises(FormatError, match="own"), ctx.checked("reading"):
            raise FormatError("own message")


def test_environment(no_torchrun, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.environment() == (1, 4, 1)
    monkeypatch.setenv("CKA_DISTRIBUTED", "0")
    assert distributed.environment() is None
    monkeypatch.delenv("CKA_DISTRIBUTED")
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(DistributedError, match="malformed torchrun environment.*expected integers"):
        distributed.environment()
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(DistributedError, match="RANK=4, WORLD_SIZE=4"):
        distributed.environment()
    monkeypatch.setenv("CKA_DIST_TIMEOUT", "soon")
    with pytest.raises(DistributedError, match="CKA_DIST_TIMEOUT='soon'"):
        distributed._timeout()


def test_follower_exit(no_torchrun, monkeypatch, capsys):
    monkeypatch.setattr(distributed, "FOLLOWER_GRACE", 0.0)
    quiet = DistributedError("rank 0 reports this")
    quiet.quiet, quiet.exit_code = True, 3
    with pytest.raises(DistributedError):  # single process: untouched
        with distributed.follower_exit("prog"):
            raise quiet
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exit_info, distributed.follower_exit("prog"):
        raise quiet
    assert exit_info.value.code == 3 and capsys.readouterr().err == ""
    with pytest.raises(SystemExit), distributed.follower_exit("prog"):
        raise CKAOfflineError("cannot join")
    assert capsys.readouterr().err == "prog: error: rank 1: cannot join\n"


class TwoRanks(distributed.Distributed):
    """Rank ``rank`` of 2 without a process group: ``other(obj)`` plays the other rank's part of each exchange
    (its object, or an exception for a lost connection)."""

    def __init__(self, rank, other):
        super().__init__(rank, 2, rank)
        self.other = other

    def _gather(self, obj):
        theirs = self.other(obj)
        if isinstance(theirs, BaseException):
            raise theirs
        return [obj, theirs] if self.rank == 0 else [theirs, obj]


def _ok(status):
    return distributed._Status(1 - status.rank, False)


def _failed(status):
    return distributed._Status(1 - status.rank, True, "FormatError", "x.h5 is broken", 5)


def test_checked_phase_outcomes():
    with TwoRanks(0, _ok).checked("reading"):
        pass
    with pytest.raises(DistributedError, match=r"^rank 1 of 2 failed while reading: x.h5 is broken. No result") as info:
        with TwoRanks(0, _failed).checked("reading"):
            pass
    assert info.value.exit_code == 5 and not getattr(info.value, "quiet", False)
    with pytest.raises(DistributedError, match="rank 0 of 2 failed") as info, TwoRanks(1, _failed).checked("reading"):
        raise FormatError("my own")  # rank 0 reports it; this rank stays quiet
    assert info.value.quiet
    with pytest.raises(FormatError, match="my own"), TwoRanks(0, _ok).checked("reading"):
        raise FormatError("my own")
    with pytest.raises(ZeroDivisionError), TwoRanks(1, _ok).checked("reading"):
        _ = 1 / 0  # a bug keeps its traceback on its rank
    with pytest.raises(DistributedError, match="rank 0 of 2 lost contact with the other ranks while reading"):
        with TwoRanks(0, lambda obj: RuntimeError("Connection closed by peer")).checked("reading"):
            pass
    with pytest.raises(FormatError, match="my own"):  # lost contact, but this rank's own error says more
        with TwoRanks(0, lambda obj: RuntimeError("timeout")).checked("reading"):
            raise FormatError("my own")


def test_ranks_must_agree_and_use_their_own_gpu():
    TwoRanks(0, lambda v: v).agree("data", ("ids", 3), ("example ids", "layers"))
    with pytest.raises(DistributedError, match=r"rank 1 sees other data than rank 0 \(layers differ\)"):
        TwoRanks(0, lambda v: ("ids", 4)).agree("data", ("ids", 3), ("example ids", "layers"))
    ctx = TwoRanks(1, _ok)
    assert ctx.device("cpu") == "cpu" and ctx.device("cuda:0") == "cuda:0"
    if not __import__("torch").cuda.is_available():
        assert ctx.device("cuda") == "cuda:1" and ctx.device("auto") == "cpu"


def test_full_estimator_refused_on_several_ranks(tmp_path):
    path = write_acts(tmp_path / "a.h5", chain_activations(40))
    with pytest.raises(DistributedError, match="the full estimator runs in one process"):
        analyze([path], estimator="full", device="cpu", distributed=TwoRanks(0, _ok))


def test_shard_path():
    assert shard_path("run/acts.h5", 1, 4) == "run/acts-00001-of-00004.h5"
    assert shard_path("acts", 0, 2) == "acts-00000-of-00002"
    assert shard_path("acts.h5", "*", 12) == "acts-*-of-00012.h5"


# ---------------------------------------------------------------- torchrun: cka-analyze
def test_analyze_on_two_ranks_equals_one_process(tmp_path):
    n, cut = 300, 130
    a, b = chain_activations(n, seed=0), chain_activations(n, seed=1)
    write_acts(tmp_path / "a-0.h5", {k: v[:cut] for k, v in a.items()}, ids=np.arange(cut), shard=(0, 2, 0))
    write_acts(tmp_path / "a-1.h5", {k: v[cut:] for k, v in a.items()}, ids=np.arange(cut, n), shard=(1, 2, cut))
    write_acts(tmp_path / "b.h5", b)
    out = tmp_path / "out"
    out.mkdir()
    # 3 epochs of 15 minibatches: rank 1's share starts inside epoch 1 and inside a shuffle buffer
    opts = ["-m", "20", "--epochs", "3", "--seed", "5", "--kernel", "rbf", "--precision", "float64", "--device", "cpu"]
    proc = torchrun(["cka_offline.cli.analyze", "a-*.h5", "b.h5", *opts, "-o", "out/cka.json"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["cka.json"]  # rank 0 wrote the result, rank 1 nothing
    assert proc.stdout.count("layer of A") == 1  # one summary
    got = json.loads((out / "cka.json").read_text())
    ref = analyze(
        [str(tmp_path / "a-*.h5"), str(tmp_path / "b.h5")],
        batch_size=20,
        epochs=3,
        seed=5,
        kernel="rbf",
        precision="float64",
        device="cpu",
    )
    assert got["n_minibatches"] == ref.n_minibatches == 45 and got["params"]["world_size"] == 2
    # the all-reduce sums the computed blocks; the within-file entries are not computed on any rank
    assert got["params"]["all_pairs"] is False and got["cka"][0][1] is None and np.isnan(ref.cka[0, 1])
    assert [f["sha256"] for f in got["files"]] == [f.sha256 for f in ref.files]  # each rank hashed a share
    bandwidths = [v for per_file in got["params"]["bandwidths"].values() for v in per_file.values()]
    assert bandwidths == pytest.approx([v for f in ref.params["bandwidths"].values() for v in f.values()], rel=1e-12)
    for key in ("cka", "se", "low", "high"):
        np.testing.assert_allclose(np.array(got[key], dtype=float), getattr(ref, key), rtol=0, atol=1e-12)


def test_a_failing_rank_stops_all_with_one_message(tmp_path):
    n = 300
    acts = chain_activations(n, seed=2)
    plan = plan_minibatches(n, 20)
    lo, hi = own_minibatches(len(plan), 1, 2)
    sampled = set(MinibatchPlan(n, 20).sample(SCALE_SAMPLE).tolist())  # read by every rank for the scales
    bad = next(int(p) for p in plan[hi - 1] if int(p) not in sampled)  # an example only rank 1 reads
    acts["layer1"][bad, 0] = np.nan
    write_acts(tmp_path / "a.h5", acts)
    proc = torchrun(["cka_offline.cli.analyze", "a.h5", "-m", "20", "--device", "cpu", "-o", "cka.json"], tmp_path)
    assert proc.returncode != 0
    message = f"rank 1 of 2 failed while computing the minibatches: a.h5: layer 'layer1' holds nan for example id {bad}"
    assert proc.stderr.count(message) == 1, proc.stderr[-3000:]
    assert "No result was written" in proc.stderr
    assert not (tmp_path / "cka.json").exists() and sorted(os.listdir(tmp_path)) == ["a.h5"]


# ---------------------------------------------------------------- torchrun: cka-extract
def test_extract_on_two_ranks_writes_shards_equal_to_one_file(tmp_path):
    from cka_offline.extraction import extract

    model = f"{SAMPLE / 'digits_cnn.py'}:make_model"
    common = [
        "--weights",
        str(SAMPLE / "cnn_a.safetensors"),
        "--inputs",
        str(SAMPLE / "digits.npz"),
        "--max-examples",
        "200",
        "--layers",
        "relu3,relu4",
        "-b",
        "64",
    ]
    proc = torchrun(["cka_offline.cli.extract", model, *common, "-o", "acts.h5"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["acts-00000-of-00002.h5", "acts-00001-of-00002.h5"]
    assert proc.stderr.count("wrote 2 shards acts-*-of-00002.h5") == 1
    whole = extract(
        model,
        str(SAMPLE / "digits.npz"),
        tmp_path / "whole.h5",
        layers=["relu3", "relu4"],
        options={"weights": str(SAMPLE / "cnn_a.safetensors")},
        max_examples=200,
        batch_size=64,
    )
    pattern = str(tmp_path / "acts-*-of-00002.h5")
    with open_activations(pattern) as shards, open_activations(whole) as one:
        assert shards.n_examples == 200 and np.array_equal(shards.ids, one.ids)
        for layer in ("relu3", "relu4"):
            np.testing.assert_allclose(shards.read(layer, 0, 200), one.read(layer, 0, 200), rtol=1e-5, atol=1e-6)
    kw = dict(batch_size=32, precision="float64", device="cpu")
    got, ref = analyze([pattern], **kw), analyze([whole], **kw)
    np.testing.assert_allclose(got.cka, ref.cka, atol=1e-6)


# ---------------------------------------------------------------- the benchmark
def test_bench_distributed_smoke(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_VARS}
    env["PYTHONPATH"] = str(REPO)
    cmd = [
        sys.executable,
        str(REPO / "bench" / "bench_distributed.py"),
        "--smoke",
        "--results-dir",
        str(tmp_path / "results"),
        "--data-dir",
        str(tmp_path / "data"),
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "results" / "distributed.json").read_text())
    summary = doc["summary"]
    assert summary["speedup_analysis"] > 0 and summary["speedup_end_to_end"] > 0
    assert summary["max_abs_cka_diff"] <= 1e-12
