"""Model inputs from an iterable of batches: a ``torch.utils.data.DataLoader`` or any iterable (a list, a
generator function's result) whose items are batches.

A batch is an array or tensor (the model input), a tuple or list (element 0 is the model input, the
``(x, y)`` convention), or a dict (every array-valued entry is a model input, by name, except the ids
and the label entries). Which element is the input and which holds the example ids is configurable
(``input=`` and ``ids=``, on the command line ``-I input=...``).

The writer needs the number of examples and their ids before the first row is written, and resume needs
a fingerprint of the inputs, so :class:`BatchInputs` reads the batches once when it is made: it counts
the examples, collects their ids, and takes a SHA-256 of every batch. Batches that fit in
:data:`CACHE_BYTES` are kept and the model then runs on them (the loader is read once); larger inputs are
read again while the model runs, and each batch must then be the same as the first time: a loader that
shuffles or augments at random gives different batches, which would store activations under the wrong
ids, and is refused with an error that names the batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from .errors import InputError
from .extractor import InputReader
from .memory_inputs import DEFAULT_INPUT, is_memory_inputs, to_numpy

#: batches whose arrays total at most this many bytes are kept from the first read (no second read)
CACHE_BYTES = 1 << 30
#: dict keys taken as the example ids when ``ids`` is not given (the first one present)
ID_KEYS = ("id", "ids", "example_id", "example_ids", "idx", "index")
#: dict keys never taken as model inputs unless ``input`` names them: labels and targets
LABEL_KEYS = ("label", "labels", "target", "targets", "y", "class", "classes")

Selector = str | int | Sequence[str] | None


def is_batch_iterable(inputs: Any) -> bool:
    """Whether ``inputs`` is an iterable of batches (a DataLoader, a list of batches, a generator), not a
    path, an array in memory or a single dict of arrays."""
    if isinstance(inputs, (str, bytes, Mapping, InputReader)) or hasattr(inputs, "__fspath__"):
        return False
    if is_memory_inputs(inputs):
        return False
    return isinstance(inputs, Iterable)


def _order_sampler(loader: Any) -> str:
    """The name of the sampler that orders a DataLoader's examples when it is not sequential (a random,
    weighted or custom sampler, also behind a ``batch_sampler``), else ``""``: such an order may change
    from one read to the next, so the ids ``0..n-1`` would not name the same examples twice."""
    sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None) or getattr(loader, "sampler", None)
    if sampler is None:
        return ""  # not a DataLoader: its replay is checked batch by batch
    name = type(sampler).__name__
    return "" if name == "SequentialSampler" else name


def _describe(batches: Any) -> str:
    kind = type(batches).__name__
    size = getattr(batches, "batch_size", None)
    return f"{kind} (batches of {size})" if size else kind


class BatchInputs(InputReader):
    """The :class:`~cka_offline.extractor.InputReader` over an iterable of batches (see the module doc).

    Args:
        batches: a DataLoader or any iterable of batches that can be iterated again (a list, a DataLoader);
            a one-shot iterator (a generator) works when its batches fit in :data:`CACHE_BYTES`.
        input: which part of each batch is the model input: a dict key or tuple index, or a list of dict
            keys (a model with several inputs). Default: the whole batch if it is an array, element 0 of a
            tuple or list, every array-valued entry of a dict except the ids and :data:`LABEL_KEYS`.
        ids: which part of each batch holds one id per example (a dict key or tuple index). Default: the
            first of :data:`ID_KEYS` in a dict batch; otherwise the ids are ``0..n-1`` in the loader's order.
        cache_bytes: keep the batches from the first read when they total at most this many bytes.
        progress: called as ``progress(batches read, batches in all)`` during the first read (the total is
            ``len(batches)`` where it has one, else the count so far).
    """

    name = "batches"
    description = "a DataLoader or an iterable of batches (the Python API)"

    @classmethod
    def can_open(cls, path: str) -> bool:
        return False  # never chosen for a path

    def __init__(
        self,
        batches: Iterable[Any],
        input: Selector = None,
        ids: str | int | None = None,
        cache_bytes: int = CACHE_BYTES,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        super().__init__(_describe(batches))
        self.batches = batches
        self.input = input
        self.id_selector = ids
        self.what = _describe(batches)
        self._sizes: list[int] = []
        self._digests: list[str] = []
        self._cache: list[dict[str, np.ndarray]] | None = []
        ids_seen: list[np.ndarray] = []
        cached = 0
        from_batches = False
        try:
            expected = len(batches)  # type: ignore[arg-type]
        except TypeError:  # an iterable without a length
            expected = 0
        for index, batch in enumerate(batches):
            if progress is not None:
                progress(index, max(expected, index + 1))
            arrays, batch_ids = self._split(batch, index)
            n = len(next(iter(arrays.values())))
            if (batch_ids is not None) != from_batches and index > 0:
                raise InputError(
                    f"batch {index} of the {self.what} has ids but batch 0 had none, or the other way round"
                )
            from_batches = batch_ids is not None
            if batch_ids is not None:
                ids_seen.append(batch_ids)
            self._sizes.append(n)
            self._digests.append(_digest(arrays, batch_ids))
            if self._cache is not None:
                cached += sum(a.nbytes for a in arrays.values())
                self._cache = self._cache + [arrays] if cached <= cache_bytes else None
        if progress is not None and self._sizes:
            progress(len(self._sizes), len(self._sizes))
        if not self._sizes:
            raise InputError(f"the {self.what} gave no batches; check that its dataset is not empty")
        if self._cache is None and isinstance(batches, Iterator):
            raise InputError(
                f"the {self.what} is a one-shot iterator whose batches total more than {cache_bytes} bytes; they "
                "would have to be read twice: give a DataLoader or a list, which can be read again"
            )
        #: whether reading the batches again gives them in the same order (resume and shards need that)
        sampler = _order_sampler(batches)
        self.replayable = not sampler and not isinstance(batches, Iterator)
        if sampler and (not from_batches or self._cache is None):
            reason = "gives no example ids" if not from_batches else "is too large to keep, so it is read twice"
            how = "shuffle=True" if sampler == "RandomSampler" else f"sampler {sampler}"
            raise InputError(
                f"the {self.what} orders its examples at random ({how}) and {reason}: the activations could not be "
                "stored under the right examples; make it with shuffle=False and no sampler, or give each example "
                "an id in the batches"
            )
        self.n = int(sum(self._sizes))
        self._ids = np.concatenate(ids_seen) if from_batches else np.arange(self.n, dtype=np.int64)
        self._offsets = np.concatenate([[0], np.cumsum(self._sizes)])
        self._replay: Iterator[Any] | None = None
        self._next = 0  # index of the next batch the replay gives
        self.ids_from = "the batches" if from_batches else "the order (0..n-1)"

    # ------------------------------------------------------------------------------------------ batches

    def _split(self, batch: Any, index: int) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """``({input name: array}, ids or None)`` of one batch."""
        where = f"batch {index} of the {self.what}"
        if isinstance(batch, Mapping):
            id_key = (
                self.id_selector if self.id_selector is not None else next((k for k in ID_KEYS if k in batch), None)
            )
            if id_key is not None and id_key not in batch:
                raise InputError(f"{where} has no entry {id_key!r} for the ids; it has {', '.join(map(str, batch))}")
            if self.input is None:
                keys = [k for k in batch if k != id_key and str(k) not in LABEL_KEYS and _is_array(batch[k])]
            else:
                keys = [self.input] if isinstance(self.input, (str, int)) else list(self.input)
            missing = [k for k in keys if k not in batch]
            if missing or not keys:
                raise InputError(
                    f"{where} has no model input {', '.join(map(repr, missing)) or '(no array entries)'}; it has "
                    f"{', '.join(map(repr, batch))}: choose the input with input= (-I input=KEY)"
                )
            arrays = {str(k): to_numpy(batch[k], f"entry {k!r} of {where}") for k in keys}
            ids = None if id_key is None else _ids(batch[id_key], where)
        elif isinstance(batch, (tuple, list)):
            position = 0 if self.input is None else self.input
            if not isinstance(position, int) or not -len(batch) <= position < len(batch):
                raise InputError(
                    f"{where} is a {type(batch).__name__} of {len(batch)} elements; choose the model input by its "
                    f"position with input=0..{len(batch) - 1} (got {self.input!r})"
                )
            element = batch[position]
            arrays = (
                {str(k): to_numpy(v, f"entry {k!r} of {where}") for k, v in element.items()}
                if isinstance(element, Mapping)
                else {DEFAULT_INPUT: to_numpy(element, f"element {position} of {where}")}
            )
            ids = None
            if self.id_selector is not None:
                if not isinstance(self.id_selector, int) or not -len(batch) <= self.id_selector < len(batch):
                    raise InputError(f"{where} has no element {self.id_selector!r} for the ids (it has {len(batch)})")
                ids = _ids(batch[self.id_selector], where)
        else:
            if self.input is not None or self.id_selector is not None:
                raise InputError(f"{where} is a single array: it has no parts for input= or ids= to choose")
            arrays = {DEFAULT_INPUT: to_numpy(batch, where)}
            ids = None
        odd = [k for k, v in arrays.items() if v.dtype.kind not in "biufc"]
        if odd:
            raise InputError(
                f"the model input {odd[0]!r} of {where} is not numeric (dtype {arrays[odd[0]].dtype}); convert it to "
                "a tensor in the dataset (a transform such as ToTensor), or choose the input with input="
            )
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise InputError(f"the inputs of {where} have different batch sizes: {lengths}")
        n = next(iter(lengths.values()))
        if ids is not None and len(ids) != n:
            raise InputError(f"{where} has {len(ids)} ids for {n} examples; give one id per example")
        return arrays, ids

    def _batch(self, index: int) -> dict[str, np.ndarray]:
        """Batch ``index`` from the cache, or from a second read of the loader, checked against the first."""
        if self._cache is not None:
            return self._cache[index]
        if self._replay is None or index < self._next:
            self._replay, self._next = iter(self.batches), 0
        while True:
            try:
                batch = next(self._replay)
            except StopIteration:
                raise InputError(
                    f"the {self.what} gave {self._next} batches on its second read, {len(self._sizes)} on its first; "
                    "it must give the same batches each time it is read"
                ) from None
            arrays, ids = self._split(batch, self._next)
            if _digest(arrays, ids) != self._digests[self._next]:
                raise InputError(
                    f"batch {self._next} of the {self.what} differs from the first time it was read (random "
                    "augmentation, shuffling or a changing dataset): its activations would be stored under the wrong "
                    "examples; use deterministic transforms (evaluation mode) and shuffle=False"
                )
            self._next += 1
            if self._next - 1 == index:
                return arrays

    # ---------------------------------------------------------------------------------------- InputReader

    def __len__(self) -> int:
        return self.n

    def ids(self) -> np.ndarray:
        return self._ids

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        first = int(np.searchsorted(self._offsets, start, side="right")) - 1
        last = int(np.searchsorted(self._offsets, stop, side="left"))
        parts = [self._batch(i) for i in range(first, last)]
        lo = start - int(self._offsets[first])
        joined = parts[0] if len(parts) == 1 else {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return {k: v[lo : lo + stop - start] for k, v in joined.items()}

    def fingerprint(self) -> dict[str, str]:
        digest = hashlib.sha256("\n".join(self._digests).encode())
        return {
            "description": f"memory: {self.what}, {self.n} examples, ids from {self.ids_from}",
            "sha256": digest.hexdigest(),
        }


def _is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) or (hasattr(value, "detach") and hasattr(value, "shape"))


def _ids(value: Any, where: str) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    ids = np.asarray(value)
    if ids.ndim != 1:
        raise InputError(f"the ids of {where} must be one per example (1-D), got shape {ids.shape}")
    return ids


def _digest(arrays: Mapping[str, np.ndarray], ids: np.ndarray | None) -> str:
    h = hashlib.sha256()
    for key in sorted(arrays):
        value = np.ascontiguousarray(arrays[key])
        h.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
        h.update(value.reshape(-1).view(np.uint8).data)
    if ids is not None:
        h.update(repr(ids.tolist()).encode())
    return h.hexdigest()


__all__ = ["CACHE_BYTES", "ID_KEYS", "LABEL_KEYS", "BatchInputs", "is_batch_iterable"]
