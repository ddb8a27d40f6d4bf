"""Conformance checks for plugin authors: does an extractor keep the contract the core relies on?

In a plugin's test suite::

    from cka_offline.testing import check_extractor

    def test_conformance(tmp_path):
        model = make_tiny_model(tmp_path)
        check_extractor(MyExtractor, model, {"input": np.random.rand(4, 3, 8, 8).astype("float32")})

Every failed check raises :class:`AssertionError` with a message saying what the core expected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .errors import CKAOfflineError
from .extractor import Extractor, LayerInfo, check_declarations, declared_options

_UNKNOWN_LAYER = "cka-offline-conformance-no-such-layer"


def _fail(cls: type, text: str) -> AssertionError:
    return AssertionError(f"{cls.__name__}: {text}")


def check_extractor(
    extractor_cls: type[Extractor],
    source: str,
    inputs: Mapping[str, np.ndarray],
    *,
    layers: Sequence[str] | None = None,
    device: str = "cpu",
    options: Mapping[str, Any] | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> list[str]:
    """Check ``extractor_cls`` on ``source`` with ``inputs`` (at least 2 examples); returns the layers checked.

    Checks: class attributes are set; ``declared_options`` are valid :class:`Option` declarations with
    unique names; ``can_open(source)`` is true; ``layers()`` (and ``probe(inputs)`` where it gives
    layers, whose names are then the ones run) returns uniquely named :class:`LayerInfo`; ``run()`` returns every requested layer and no other, each with the batch on
    axis 0; per-example outputs agree (shape, and values within ``rtol``/``atol``) between a batch of all
    examples and smaller batches, including a batch of one; an unknown layer raises a
    :class:`~cka_offline.errors.CKAOfflineError`; reductions declared in ``early_reductions`` give the
    core's numbers; ``close()`` may be called twice.
    ``layers`` restricts the run checks to some layer names (default: every extractable layer).
    (Longer than 80 lines on purpose: one straight list of checks, read top to bottom like a test.)
    """
    cls = extractor_cls
    if not (isinstance(cls, type) and issubclass(cls, Extractor)):
        raise AssertionError(f"{cls!r} is not a subclass of cka_offline.extractor.Extractor")
    for attr in ("name", "framework", "description"):
        value = getattr(cls, attr, "")
        if not isinstance(value, str) or not value:
            raise _fail(cls, f"class attribute {attr!r} must be a non-empty string, got {value!r}")
    try:
        check_declarations(declared_options(cls), cls.__name__)
    except TypeError as exc:
        raise _fail(cls, str(exc)) from None
    if not cls.can_open(source):
        raise _fail(cls, f"can_open({source!r}) returned {cls.can_open(source)!r}; expected True")
    n = {len(np.asarray(v)) for v in inputs.values()}
    if len(n) != 1 or min(n) < 2:
        raise AssertionError(f"check_extractor needs inputs with the same number (>= 2) of examples, got {sorted(n)}")
    (n_examples,) = n

    ext = cls(source, device=device, options=dict(options or {}))
    try:
        infos = ext.layers()
        if not isinstance(infos, list) or not infos or not all(isinstance(i, LayerInfo) for i in infos):
            raise _fail(cls, f"layers() must return a non-empty list of LayerInfo, got {infos!r:.200}")
        probed = ext.probe({k: np.asarray(v) for k, v in inputs.items()})
        if probed is not None:  # an extractor that probes: its per-call layers are what the core selects from
            if not isinstance(probed, list) or not probed or not all(isinstance(i, LayerInfo) for i in probed):
                raise _fail(cls, f"probe() must return None or a non-empty list of LayerInfo, got {probed!r:.200}")
            infos = probed
        names = [i.name for i in infos]
        dup = sorted({x for x in names if names.count(x) > 1})
        if dup:
            raise _fail(cls, f"layers() returns duplicate names {dup}; every layer needs a unique name")
        names = list(layers) if layers else [i.name for i in infos if i.exposable]
        unknown = [x for x in names if x not in {i.name for i in infos}]
        if unknown:
            raise AssertionError(f"layers {unknown} given to check_extractor are not in layers() of {source}")

        full = _run(ext, {k: np.asarray(v) for k, v in inputs.items()}, names, n_examples)
        half = n_examples // 2
        for lo, hi in ((0, 1), (1, half if half > 1 else 2), (half if half > 1 else 2, n_examples)):
            if lo >= hi:
                continue
            part = _run(ext, {k: np.asarray(v)[lo:hi] for k, v in inputs.items()}, names, hi - lo)
            for name in names:
                a, b = full[name][lo:hi], part[name]
                if a.shape != b.shape:
                    raise _fail(
                        cls,
                        f"layer {name!r}: per-example shape {b.shape[1:]} with a batch of {hi - lo} but "
                        f"{a.shape[1:]} with a batch of {n_examples}; it must not depend on the batch size",
                    )
                if not np.allclose(a.astype(np.float64), b.astype(np.float64), rtol=rtol, atol=atol, equal_nan=True):
                    raise _fail(
                        cls,
                        f"layer {name!r}: examples {lo}:{hi} give different values in a batch of {hi - lo} than "
                        f"in a batch of {n_examples} (max difference {np.abs(a - b).max():.3g}); is the model "
                        "in training mode (dropout, batch statistics)?",
                    )
        try:
            ext.run({k: np.asarray(v)[:1] for k, v in inputs.items()}, [_UNKNOWN_LAYER])
        except CKAOfflineError:
            pass
        except Exception as exc:
            raise _fail(
                cls, f"run() with an unknown layer raised {type(exc).__name__}: {exc}; it must raise a CKAOfflineError"
            ) from exc
        else:
            raise _fail(cls, "run() with an unknown layer returned normally; it must raise a CKAOfflineError naming it")
        _check_early(ext, inputs, full, names, n_examples, rtol, atol)
        prov = ext.provenance()
        if not isinstance(prov, dict) or not all(isinstance(v, str) for v in prov.values()):
            raise _fail(cls, f"provenance() must return a dict of strings, got {prov!r:.200}")
    finally:
        ext.close()
    try:
        ext.close()
    except Exception as exc:
        raise _fail(
            cls, f"close() called a second time raised {type(exc).__name__}: {exc}; it must be idempotent"
        ) from exc
    return names


def _check_early(
    ext: Extractor, inputs: Any, full: dict[str, np.ndarray], names: list[str], n: int, rtol: float, atol: float
) -> None:
    """Reductions the extractor says it applies itself (``early_reductions``) must give the core's numbers."""
    from .reduce import reduce

    cls = type(ext)
    early = {
        name: r for r in sorted(cls.early_reductions) for name in names if r == "mean" and full[name].ndim >= 3
    }  # the spatial mean needs (batch, channels, *spatial)
    if not early:
        return
    accepted = ext.reduce_early(early)
    if not set(accepted) <= set(early):
        raise _fail(cls, f"reduce_early() accepted layers it was not given: {sorted(set(accepted) - set(early))}")
    if not accepted:
        return
    got = _run(ext, {k: np.asarray(v) for k, v in inputs.items()}, names, n)
    for name in accepted:
        want = reduce(name, early[name], full[name].astype(np.float64), layout="channels_first")
        if got[name].shape != want.shape or not np.allclose(got[name], want, rtol=max(rtol, 1e-5), atol=atol):
            raise _fail(
                cls,
                f"layer {name!r}: reduce_early({early[name]!r}) returned shape {got[name].shape}"
                + (f", max difference {np.abs(got[name] - want).max():.3g}" if got[name].shape == want.shape else "")
                + f" against the core's reduction of the full output {want.shape}; they must agree",
            )


def _run(ext: Extractor, inputs: dict[str, np.ndarray], names: list[str], b: int) -> dict[str, np.ndarray]:
    cls = type(ext)
    out = ext.run(inputs, names)
    if not isinstance(out, dict):
        raise _fail(cls, f"run() must return a dict {{layer name: array}}, got {type(out).__name__}")
    missing = [x for x in names if x not in out]
    extra = [x for x in out if x not in names]
    if missing:
        raise _fail(cls, f"run() did not return requested layer(s) {missing}")
    if extra:
        raise _fail(cls, f"run() returned layer(s) {extra} that were not requested")
    for name in names:
        arr = out[name]
        if not isinstance(arr, np.ndarray):
            raise _fail(cls, f"run() returned {type(arr).__name__} for layer {name!r}; it must return numpy arrays")
        if arr.ndim == 0 or arr.shape[0] != b:
            raise _fail(cls, f"layer {name!r}: shape {arr.shape} for a batch of {b}; the batch must be on axis 0")
    return out


__all__ = ["check_extractor"]
