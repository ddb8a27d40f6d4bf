"""``cka-inspect``: print what an activation file, or a saved result, holds."""

from __future__ import annotations

import json
from typing import Any

import click

from .common import debug_option, handle_errors, version_option

EPILOG = """\b
Example:
  cka-inspect demo_output/cnn_a.h5
  cka-inspect "shards/acts-*.h5" --json
  cka-inspect demo_output/cka.json
"""


def describe(f: Any) -> dict[str, Any]:
    """A JSON-ready description of an open ActivationFile."""
    ids = f.ids
    # a valid file may hold 0 examples (an extraction over an empty input): no first or last id then
    first, last = (ids[0].item(), ids[-1].item()) if len(ids) else (None, None)
    return {
        "paths": f.paths,
        "format_version": f"{f.version[0]}.{f.version[1]}",
        "n_examples": int(f.n_examples),
        "ids": {"dtype": "str" if ids.dtype.kind == "U" else "int64", "first": first, "last": last},
        "chunk_rows": int(f.chunk_rows),
        "provenance": f.provenance,
        "layers": [
            {
                "name": m.name,
                "alias": m.alias,  # format 1.1: the name the layer was selected by ("" where none)
                "stored_shape": [int(f.n_examples), m.features],
                "original_shape": list(m.original_shape),
                "dtype": m.dtype,
                "reduction": m.reduction,
            }
            for m in f.layers
        ],
    }


def _options_text(text: str) -> str:
    """The recorded extraction options on one readable line: a per-layer reduction map (one entry per layer,
    hundreds for a transformer) is summarised as counts, since the layer table shows each layer's;
    ``--json`` keeps the whole record."""
    try:
        options = json.loads(text)
    except (TypeError, ValueError):
        return text
    if not isinstance(options, dict):
        return text
    reductions = options.get("reduction")
    if isinstance(reductions, dict) and len(reductions) > 3:
        counts: dict[str, int] = {}
        for value in reductions.values():
            counts[str(value)] = counts.get(str(value), 0) + 1
        options["reduction"] = "per layer (below): " + ", ".join(f"{k} x{v}" for k, v in counts.items())
    return json.dumps(options, sort_keys=True)


def format_text(info: dict[str, Any]) -> str:
    prov = info["provenance"]
    lines = [", ".join(info["paths"])]

    def row(key: str, value: str) -> None:
        if value:
            lines.append(f"  {key:<11} {value}")

    row(
        "format",
        f"cka-offline-activations {info['format_version']} (written by cka-offline "
        f"{prov.get('cka_offline_version', '?')} at {prov.get('created', '?')})",
    )
    ids = info["ids"]
    if info["n_examples"]:
        row("examples", f"{info['n_examples']} (ids: {ids['dtype']}, {ids['first']!r} .. {ids['last']!r})")
    else:
        row("examples", "0 (the file holds no examples: cka-analyze needs at least 4)")
    row("extractor", f"{prov.get('extractor', '')} {prov.get('extractor_version', '')}".strip())
    row("framework", f"{prov.get('framework', '')} {prov.get('framework_version', '')}".strip())
    sha = prov.get("model_sha256", "")
    row("model", prov.get("model", "") + (f"  (sha256 {sha[:16]}...)" if sha else ""))
    sha = prov.get("inputs_sha256", "")
    row("inputs", prov.get("inputs", "") + (f"  (sha256 {sha[:16]}...)" if sha else ""))
    row("command", prov.get("command", ""))
    row("options", _options_text(prov.get("options", "")))
    if prov.get("extra"):
        row("extra", json.dumps(prov["extra"], sort_keys=True))
    if prov.get("shards"):
        row("shards", str(len(prov["shards"])))
    layers = info["layers"]
    lines.append(f"  layers ({len(layers)}):")
    width = max([len("name"), *(len(layer["name"]) for layer in layers)])
    # the alias column only where some layer has one (an ONNX export selected by module names)
    aliased = any(layer.get("alias") for layer in layers)
    alias_width = max([len("alias"), *(len(layer.get("alias", "")) for layer in layers)]) if aliased else 0
    alias_head = f"{'alias':<{alias_width}}  " if aliased else ""
    lines.append(
        f"    {'#':>3}  {'name':<{width}}  {alias_head}{'stored shape':<14} {'original shape':<16} {'dtype':<8} reduction"
    )
    for i, layer in enumerate(layers):
        stored = "x".join(str(d) for d in layer["stored_shape"])
        original = "x".join(str(d) for d in layer["original_shape"]) or "scalar"
        alias = f"{layer.get('alias') or '-':<{alias_width}}  " if aliased else ""
        lines.append(
            f"    {i:>3}  {layer['name']:<{width}}  {alias}{stored:<14} {original:<16} {layer['dtype']:<8} {layer['reduction']}"
        )
    return "\n".join(lines)


def describe_result(path: str, result: Any) -> dict[str, Any]:
    """A JSON-ready description of a saved result: its document without the four matrices."""
    from ..results.io import result_meta, stored_version

    info = result_meta(result)
    info["path"] = path
    info["format_version"] = stored_version(path) or "(csv: not recorded)"
    return info


def format_result_text(path: str, result: Any, info: dict[str, Any]) -> str:
    """The saved result as text: format, files, parameters, timing, then the analysis summary."""
    lines = [path, f"  {'format':<11} cka-offline-result {info['format_version']}"]
    if result.version:
        lines[-1] += f" (computed by cka-offline {result.version})"
    lines.append(f"  files ({len(result.files)}):")
    for k, f in enumerate(result.files):
        model = f"  model {f.provenance['model']}" if f.provenance.get("model") else ""
        stored = f", {f.n_examples} examples stored" if f.n_examples else ""
        lines.append(f"    {k}  {f.label}: {len(f.layers)} layers{stored}{model}")
    lines.append("  pairs:      " + ", ".join(f"{i}-{j}" for i, j in result.pairs))
    if result.params:
        lines.append("  parameters:")
        for key, value in result.params.items():
            text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
            lines.append(f"    {key:<14} {text if len(text) <= 100 else text[:99] + '…'}")
    if result.timing:
        lines.append("  timing:     " + ", ".join(f"{k} {v:.2f} s" for k, v in result.timing.items() if v is not None))
    lines.append("")
    lines.append(result.summary())
    return "\n".join(lines)


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("files", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per file instead of text.")
@click.option(
    "--allow-external",
    is_flag=True,
    help="Open files with HDF5 external links or virtual datasets (only files you trust).",
)
@debug_option
@version_option
@handle_errors("cka-inspect")
def inspect(files: tuple[str, ...], as_json: bool, allow_external: bool, debug: bool) -> None:
    """Print what activation files hold: format version, provenance, number of examples, and each layer's
    name, stored shape, original shape, dtype and reduction. A glob or several shard files of one
    extraction are shown as one logical file when given as one quoted pattern. A saved result
    (cka-analyze -o: .h5, .json, .csv) is shown with its files, parameters and summary."""
    from ..results.io import is_result_file, load_result
    from ..store.reader import open_activations

    for spec in files:
        if is_result_file(spec):
            result = load_result(spec, allow_external=allow_external)
            info = describe_result(spec, result)
            click.echo(json.dumps(info, default=str) if as_json else format_result_text(spec, result, info))
            continue
        with open_activations(spec, allow_external=allow_external, allow_lone_shard=True) as f:
            info = describe(f)
        click.echo(json.dumps(info, default=str) if as_json else format_text(info))


def main() -> None:
    inspect(prog_name="cka-inspect")


if __name__ == "__main__":
    main()
