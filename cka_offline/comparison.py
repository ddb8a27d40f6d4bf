"""``compare(model_a, model_b, inputs)``: the one-call convenience, written on top of extract + analyze.

Both models' activations go to activation files (in a temporary folder removed afterwards, or in
``keep_dir``), which are then analysed; the result is the same :class:`~cka_offline.results.CKAResult`
that ``cka-analyze`` gives, with the files labelled ``A: <model>`` and ``B: <model>``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .results import CKAResult


def compare(
    model_a: Any,
    model_b: Any,
    inputs: Any,
    *,
    layers: Sequence[str] | None = None,
    layers_b: Sequence[str] | None = None,
    reduction: str | Mapping[str, str] = "flatten",
    batch_size: int = 64,
    device: str = "cpu",
    options_a: Mapping[str, Any] | None = None,
    options_b: Mapping[str, Any] | None = None,
    keep_dir: str | os.PathLike[str] | None = None,
    progress: bool | Callable[[int, int], None] | None = True,
    **analysis: Any,
) -> CKAResult:
    """CKA between the layers of two models on the same inputs.

    Args:
        model_a, model_b: anything :func:`cka_offline.extract` takes as a source: a live ``torch.nn.Module``,
            a factory spec (``pkg.mod:make``), an ONNX file, ...
        inputs: anything ``extract`` takes as inputs (arrays in memory, an ``.npz``, an image folder, ...).
        layers: the layers of model A (and of B unless ``layers_b``), names or patterns; default all.
        reduction, batch_size, device: as for ``extract`` (``device`` is used for the analysis too, unless
            ``analysis`` gives its own).
        options_a, options_b: each model's extractor options (``{"weights": ...}``).
        progress: ``True`` (the default): tqdm bars for both extractions and the analysis; ``False``: none;
            or a function ``progress(done, total)`` called by each of the three steps.
        keep_dir: keep the two activation files there (``a.h5``, ``b.h5``); default: a temporary folder.
        analysis: :class:`~cka_offline.analysis.AnalysisOptions` fields (``batch_size`` is the extraction's:
            give the analysis minibatch size as ``m``).
    """
    from collections.abc import Iterator

    from .analysis import analyze
    from .errors import InputError
    from .extraction import describe_source, extract

    if isinstance(inputs, Iterator):
        raise InputError(
            f"compare() reads the inputs once per model, but a one-shot iterator ({type(inputs).__name__}) is "
            "empty after the first: give a list of batches or a DataLoader"
        )

    m = analysis.pop("m", 256)
    analysis.setdefault("device", device if device != "mps" else "cpu")
    with tempfile.TemporaryDirectory(prefix="cka-compare-") as tmp:
        folder = os.fspath(keep_dir) if keep_dir is not None else tmp
        paths = []
        for name, model, own_layers, options in (
            ("a", model_a, layers, options_a),
            ("b", model_b, layers_b if layers_b is not None else layers, options_b),
        ):
            paths.append(
                extract(
                    model,
                    inputs,
                    os.path.join(folder, f"{name}.h5"),
                    layers=own_layers,
                    reduction=reduction,
                    batch_size=batch_size,
                    device=device,
                    options=options,
                    overwrite=keep_dir is None,
                    progress=progress,
                )
            )
        result = analyze(paths, batch_size=m, progress=progress, **analysis)
    labels = {paths[0]: f"A: {describe_source(model_a)}", paths[1]: f"B: {describe_source(model_b)}"}
    for info in result.files:
        info.label = labels.get(info.label, info.label)
    if "bandwidths" in result.params:
        result.params["bandwidths"] = {labels.get(k, k): v for k, v in result.params["bandwidths"].items()}
    return result


__all__ = ["compare"]
