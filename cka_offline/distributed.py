"""Run the commands on several processes with ``torch.distributed`` (launched by ``torchrun``).

:func:`init` looks for the variables ``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``) and joins the process group; without them (or with one process) it
returns a :class:`Distributed` whose every method is a no-op, so the commands run the same code either
way. See ``docs/distributed.md`` for how the work divides and how to launch.

Failures. Every phase of a command runs inside :meth:`Distributed.checked`: at its end all ranks exchange
their status, so one rank's error (a missing shard, NaN activations, a bug) makes every rank stop with a
non-zero exit, and only rank 0 prints one line naming the failing rank and its message (a bug keeps its
traceback on its own rank). A rank that fails also sets a flag in the rendezvous store, which the others
poll (:meth:`Distributed.poll`, at most twice a second) during long phases, so they stop early instead of
finishing their share first. A rank that dies without a word (killed, out of memory) is noticed by
``torchrun`` on its machine, and by the others at the next collective (a closed connection, or the
timeout). Rank 0 writes results only after every rank has succeeded, so a failed run leaves no result file.

Environment:
    ``CKA_DIST_BACKEND``: process-group backend (default ``gloo`` on CPU, ``cpu:gloo,cuda:nccl`` on CUDA).
    ``CKA_DIST_TIMEOUT``: seconds a collective may wait for the other ranks (default 1800).
    ``CKA_DISTRIBUTED=0``: ignore the torchrun variables (a command started by a job that itself runs
    under torchrun).
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .devices import parse_device
from .errors import CKAOfflineError, DistributedError

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

#: seconds a collective waits for the other ranks before giving up (CKA_DIST_TIMEOUT)
DEFAULT_TIMEOUT = 1800.0
#: seconds between two looks at the failure flag in :meth:`Distributed.poll`
POLL_INTERVAL = 0.5

_ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_instances = itertools.count()


class PeerFailedError(DistributedError):
    """Raised by :meth:`Distributed.poll` when another rank has failed; :meth:`Distributed.checked`
    turns it into the failing rank's message."""


@dataclass(frozen=True)
class _Status:
    rank: int
    failed: bool
    kind: str = ""
    message: str = ""
    exit_code: int = 2


def environment() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from the variables torchrun sets; ``None`` when they are absent
    or ``CKA_DISTRIBUTED=0``. Raises DistributedError when they are set but malformed."""
    if os.environ.get("CKA_DISTRIBUTED", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if "WORLD_SIZE" not in os.environ and "RANK" not in os.environ:
        return None
    try:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        values = ", ".join(f"{k}={os.environ.get(k)!r}" for k in _ENV_VARS)
        raise DistributedError(f"malformed torchrun environment ({values}): expected integers") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise DistributedError(f"malformed torchrun environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
    return rank, world, local


def _timeout() -> float:
    text = os.environ.get("CKA_DIST_TIMEOUT", "")
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise DistributedError(f"CKA_DIST_TIMEOUT={text!r}: expected a number of seconds > 0")
    return value


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if isinstance(exc, CKAOfflineError) else f"{type(exc).__name__}: {text}"


class Distributed:
    """This process's place in a run: rank, world size, its device, and the collectives the commands use.

    Made by :func:`init`; with ``world_size == 1`` every method is a no-op (or the identity). Use it as a
    context manager (or call :meth:`close`) to leave the process group.
    """

    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        local_rank: int = 0,
        *,
        backend: str | None = None,
        store: Any = None,
        timeout: float = DEFAULT_TIMEOUT,
        owns_group: bool = False,
    ) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.backend = backend
        self.timeout = timeout
        self._store = store
        self._owns_group = owns_group
        self._phase = 0
        self._last_poll = 0.0

    # ------------------------------------------------------------------ facts
    @property
    def enabled(self) -> bool:
        """More than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints, shows progress and writes outputs."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"Distributed(rank={self.rank}, world_size={self.world_size}, local_rank={self.local_rank}, backend={self.backend!r})"

    def device(self, requested: str) -> str:
        """This rank's device: ``cuda`` (and ``auto`` where CUDA exists) become ``cuda:LOCAL_RANK`` under
        torchrun; ``cpu``, ``mps`` and an explicit ``cuda:N`` stay as given."""
        device = parse_device(requested)
        if not self.enabled or device.index is not None or device.kind not in ("cuda", "auto"):
            return requested
        import torch

        if device.kind == "auto" and not torch.cuda.is_available():
            return "cpu"
        if torch.cuda.is_available() and self.local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"rank {self.rank} has LOCAL_RANK {self.local_rank} but this machine has only "
                f"{torch.cuda.device_count()} CUDA device(s); start at most that many processes per machine "
                "(torchrun --nproc-per-node)"
            )
        return f"cuda:{self.local_rank}"

    # ------------------------------------------------------------------ failures
    @contextlib.contextmanager
    def checked(self, phase: str) -> Iterator[None]:
        """Run a phase on every rank, then agree on how it went.

        Every rank must enter the same checked phases in the same order. When any rank raised, every rank
        raises when the phase ends: rank 0 its own error, or a :class:`DistributedError` naming the failing
        rank and its message (with that error's exit code); other ranks a *quiet* DistributedError
        (``exc.quiet``: the CLI exits without printing, so one line is shown in all), except that a bug
        (not a CKAOfflineError) keeps its traceback on the rank where it happened.
        """
        if not self.enabled:
            yield
            return
        phase_id = self._phase
        self._phase += 1
        error: BaseException | None = None
        try:
            yield
        except PeerFailedError:
            pass  # another rank failed; its status says why
        except Exception as exc:
            error = exc
            self._signal(phase_id)
        status = (
            _Status(self.rank, False)
            if error is None
            else _Status(self.rank, True, type(error).__name__, _describe(error), int(getattr(error, "exit_code", 1)))
        )
        try:
            statuses: list[_Status] = self._gather(status)
        except Exception as exc:
            if error is not None:
                raise error from None  # this rank's own error says more than the lost contact
            raise DistributedError(
                f"rank {self.rank} of {self.world_size} lost contact with the other ranks while {phase} "
                f"({_describe(exc)}); another rank died or is far slower (wait limit {self.timeout:g} s, "
                "CKA_DIST_TIMEOUT); see the other ranks' errors. No result was written"
            ) from exc
        failed = [s for s in statuses if s.failed]
        if not failed:
            return
        first = failed[0]
        if error is not None and (self.is_main or not isinstance(error, CKAOfflineError)):
            raise error
        others = f" (ranks {', '.join(str(s.rank) for s in failed[1:])} failed too)" if len(failed) > 1 else ""
        failure = DistributedError(
            f"rank {first.rank} of {self.world_size} failed while {phase}: {first.message}{others}. "
            "No result was written"
        )
        failure.exit_code = first.exit_code
        failure.quiet = not self.is_main
        raise failure

    def poll(self, force: bool = False) -> None:
        """Raise :class:`PeerFailedError` if another rank has failed in the current phase; cheap (looks
        at the store at most every 0.5 s, unless ``force``). Call it inside long checked phases."""
        if not self.enabled or self._store is None:
            return
        now = time.monotonic()
        if not force and now - self._last_poll < POLL_INTERVAL:
            return
        self._last_poll = now
        try:
            failures = self._store.add(self._fail_key(self._phase - 1), 0)
        except Exception:
            return
        if failures:
            raise PeerFailedError("another rank failed")

    def _fail_key(self, phase_id: int) -> str:
        return f"failed/{phase_id}"

    def _signal(self, phase_id: int) -> None:
        if self._store is None:
            return
        try:
            self._store.add(self._fail_key(phase_id), 1)
        except Exception:
            log.debug("could not flag the failure in the store", exc_info=True)

    # ------------------------------------------------------------------ collectives
    def _gather(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        return self._gather(obj) if self.enabled else [obj]

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` (picklable), on every rank."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def agree(self, what: str, value: Any, describe: Sequence[str] | None = None) -> None:
        """Check that every rank holds the same ``value`` (a picklable, comparable object) as rank 0;
        raises DistributedError (quiet on ranks other than 0) naming the first rank that differs.

        ``value`` may be a tuple, with ``describe`` naming its items for the message."""
        if not self.enabled:
            return
        values = self._gather(value)
        for rank, other in enumerate(values):
            if other == values[0]:
                continue
            detail = ""
            if describe is not None and isinstance(value, tuple):
                differ = [name for name, a, b in zip(describe, values[0], other) if a != b]
                detail = f" ({', '.join(differ)} differ)"
            exc = DistributedError(
                f"rank {rank} sees other {what} than rank 0{detail}; every rank must read the same files with "
                "the same options (on several machines: the same file contents at the same paths)"
            )
            exc.quiet = not self.is_main
            raise exc

    def all_reduce_sum(self, arrays: Sequence[Any]) -> None:
        """Sum every array over the ranks, in place (the accumulator's state: numpy float64 sums and int64
        counts, reduced as CPU tensors sharing their memory; torch tensors are reduced as they are)."""
        if not self.enabled:
            return
        import torch
        import torch.distributed as dist

        for a in arrays:
            dist.all_reduce(a if isinstance(a, torch.Tensor) else torch.from_numpy(a), op=dist.ReduceOp.SUM)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Leave the process group (when :func:`init` joined it)."""
        if self._owns_group:
            import torch.distributed as dist

            self._owns_group = False
            if dist.is_initialized():
                dist.destroy_process_group()

    def __enter__(self) -> Distributed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: seconds a rank other than 0 waits before exiting after a failure, so that rank 0's one-line report is
#: printed before torchrun, seeing the first exit, stops the other processes
FOLLOWER_GRACE = 5.0


@contextlib.contextmanager
def follower_exit(prog: str) -> Iterator[None]:
    """For command-line front ends, around the whole command: on a rank other than 0 under torchrun, an
    error exits *after* rank 0 has had time to print its report (a quiet :class:`DistributedError`, which
    rank 0 reports, exits silently; another error is printed here first, with the rank). Rank 0 and single
    processes are left alone."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        env = environment()
        if env is None or env[1] == 1 or env[0] == 0:
            raise
        code = int(getattr(exc, "exit_code", 1))
        if not getattr(exc, "quiet", False):
            import sys
            import traceback

            if isinstance(exc, CKAOfflineError):
                print(f"{prog}: error: rank {env[0]}: {_describe(exc)}", file=sys.stderr, flush=True)
            else:
                traceback.print_exc()
                sys.stderr.flush()
        time.sleep(FOLLOWER_GRACE)
        raise SystemExit(code) from None


def init(device: str = "cpu", *, backend: str | None = None, timeout: float | None = None) -> Distributed:
    """Join the torchrun process group, or return the single-process :class:`Distributed` (no-op).

    Args:
        device: the device the command will use: ``cuda`` or ``cuda:N`` picks the NCCL backend for tensors
            (``cpu:gloo,cuda:nccl``: objects and flags still go through gloo), anything else gloo.
        backend: override the backend (else ``CKA_DIST_BACKEND``, else the default above).
        timeout: seconds a collective may wait (else ``CKA_DIST_TIMEOUT``, else 1800).

    Reuses a process group the caller has initialized already (and then leaves it open on close).

    Raises:
        DistributedError: malformed environment, or the rendezvous or process group failed.
    """
    env = environment()
    if env is None or env[1] == 1:
        return Distributed()
    import torch
    import torch.distributed as dist

    rank, world, local = env
    limit = timeout if timeout is not None else _timeout()
    prefix = f"cka_offline/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{next(_instances)}/"
    if dist.is_initialized():
        get_store = getattr(dist.distributed_c10d, "_get_default_store", None)
        store = dist.PrefixStore(prefix, get_store()) if get_store is not None else None
        return Distributed(
            dist.get_rank(), dist.get_world_size(), local, backend=str(dist.get_backend()), store=store, timeout=limit
        )
    parsed = parse_device(device)
    on_cuda = parsed.is_cuda or (parsed.kind == "auto" and torch.cuda.is_available())
    chosen = backend or os.environ.get("CKA_DIST_BACKEND") or ("cpu:gloo,cuda:nccl" if on_cuda else "gloo")
    if on_cuda and torch.cuda.is_available() and local < torch.cuda.device_count():
        torch.cuda.set_device(local)
    delta = datetime.timedelta(seconds=limit)
    try:
        store, rank, world = next(dist.rendezvous("env://", rank, world, timeout=delta))
        store.set_timeout(delta)
        dist.init_process_group(
            chosen, store=dist.PrefixStore("default_pg", store), rank=rank, world_size=world, timeout=delta
        )
    except (RuntimeError, ValueError, OSError) as exc:
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise DistributedError(
            f"rank {rank} of {world} could not join the process group (backend {chosen}, rendezvous {where}): "
            f"{_describe(exc)}; check that every machine runs the same torchrun command and reaches the "
            "rendezvous address, or set CKA_DIST_BACKEND"
        ) from exc
    log.info("rank %d of %d (local %d) joined the process group, backend %s", rank, world, local, chosen)
    return Distributed(
        rank, world, local, backend=chosen, store=dist.PrefixStore(prefix, store), timeout=limit, owns_group=True
    )


__all__ = [
    "Distributed",
    "DistributedError",
    "PeerFailedError",
    "init",
    "environment",
    "follower_exit",
    "DEFAULT_TIMEOUT",
]
