"""``cka-extract``: run a model over inputs and store chosen layers' activations in an HDF5 file.

Heavy modules (the extraction core, h5py, and through plugins torch and onnxruntime) are imported inside
the command, so ``cka-extract --help`` answers fast.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from ..files import partial_path
from ..store import schema
from .common import (
    DeviceType,
    ProgressBar,
    debug_option,
    handle_errors,
    parse_key_values,
    quiet_option,
    setup_logging,
    split_list,
    version_option,
)

if TYPE_CHECKING:
    from ..extraction import ExtractOptions

PROG = "cka-extract"
#: the explicit per-plugin flags: each sets one extractor option (-X KEY=VALUE); the security opt-in
#: --allow-pickle-code-execution stays a flag of its own on purpose
_OPTION_FLAGS = {
    "weights": "weights",
    "output_index": "output_index",
    "batch_axis": "batch_axis",
    "onnx_optimization": "optimization_level",
}


def _interrupted(output: str | None = None, **_: Any) -> str:
    partial = partial_path(output) if output else None
    if partial and os.path.exists(partial):
        return f"interrupted; the partial file {partial} was kept: run the same command with --resume to continue"
    return "interrupted; nothing was written"


def _shard(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value)
    if not m:
        raise click.BadParameter(f"{value!r} is not I/K (shard I of K, I counting from 0), for example 0/4")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1 or index >= count:
        raise click.BadParameter(f"{value!r}: I must be 0..K-1 (shards count from 0), for example 0/{max(count, 1)}")
    return index, count


def _reduction(values: tuple[str, ...]) -> str | dict[str, str]:
    default = schema.DEFAULT_REDUCTION
    per_layer: dict[str, str] = {}
    for value in values:
        pattern, sep, name = value.rpartition("=")
        if sep:
            per_layer[pattern] = name
        else:
            default = name
    if not per_layer:
        return default
    per_layer.setdefault("*", default)
    return per_layer


def _extractor_options(params: dict[str, Any]) -> dict[str, Any]:
    """-X KEY=VALUE, then the explicit per-plugin flags (:data:`_OPTION_FLAGS`) and the security opt-in."""
    opts = parse_key_values(params["option"], "-X/--option")
    if params["model_arg"]:
        opts["model_args"] = parse_key_values(params["model_arg"], "--model-arg")
    for flag, key in _OPTION_FLAGS.items():
        if params[flag] is not None:
            opts[key] = params[flag]
    index = opts.get("output_index")
    if isinstance(index, str) and index.lstrip("-").isdigit():
        opts["output_index"] = int(index)
    if params["allow_pickle_code_execution"]:
        opts["allow_pickle_code_execution"] = True
    return opts


def _shape(shape: tuple[int | None, ...] | None) -> str:
    if shape is None:
        return "?"
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _list_extractors(pm: Any) -> None:
    from ..registry import broken_plugins, list_extractors, list_input_readers

    extractors = list_extractors(pm)
    readers = list_input_readers(pm)
    if extractors:
        rows = [("EXTRACTOR", "VERSION", "DISTRIBUTION", "OPENS")]
        rows += [(e.name, e.version or "?", e.distribution, e.description) for e in extractors]
        click.echo(_table(rows))
    else:
        click.echo("no extractors installed (pip install cka-offline-torch, cka-offline-onnx, ...)")
    click.echo("")
    rows = [("INPUT READER", "VERSION", "DISTRIBUTION", "READS")]
    rows += [(e.name, e.version or "?", e.distribution, e.description) for e in readers]
    click.echo(_table(rows))
    broken = broken_plugins(pm)
    if broken:
        click.echo("")
        click.echo("broken plugins (not loaded):")
        for name, dist, error in broken:
            click.echo(f"  {name} ({dist}): {' '.join(error.split())}")


def _list_options(pm: Any) -> None:
    """Every installed extractor's (-X) and input reader's (-I) declared options: type, default, help."""
    from ..extractor import declared_options
    from ..registry import list_extractors, list_input_readers

    rows = [("PLUGIN", "FLAG", "OPTION", "TYPE", "DEFAULT", "HELP")]
    for flag, entries in (("-X", list_extractors(pm)), ("-I", list_input_readers(pm))):
        for e in entries:
            for o in declared_options(e.cls):
                default = (
                    "-"
                    if o.default is None
                    else str(o.default).lower()
                    if isinstance(o.default, bool)
                    else str(o.default)
                )
                rows.append((e.name, flag, o.name, o.describe_type(), default or '""', " ".join(o.help.split())))
    click.echo(_table(rows) if len(rows) > 1 else "no plugin declares options")


def _list_layers(model: str, params: dict[str, Any], options: dict[str, Any], pm: Any) -> None:
    """The layers MODEL offers; with --inputs, as one probe batch shows them (shape, runs, default)."""
    from ..extraction.probe import list_layers

    listing = list_layers(
        model,
        params["inputs"],
        extractor=params["extractor"],
        device=params["device"],
        options=options,
        input_options=parse_key_values(params["input_option"], "-I/--input-option"),
        batch_size=params["batch_size"],
        plugin_manager=pm,
    )
    default = set(listing.default)
    head: tuple[str, ...] = ("LAYER", "KIND", "SHAPE") + (("RUNS", "DEFAULT") if listing.probed else ()) + ("ALIASES",)
    rows = [head]
    for info in listing.layers:
        aliases = ", ".join(info.aliases)
        if not info.exposable:
            aliases = (aliases + "  " if aliases else "") + f"[not extractable: {info.reason}]"
        probed: tuple[str, ...] = ()
        if listing.probed:
            runs = "?" if info.runs is None else str(info.runs)
            probed = (
                f"{info.name.rsplit(':', 1)[-1]} of {runs}" if info.group else runs,
                "*" if info.name in default else "",
            )
        rows.append((info.name, info.kind or "-", _shape(info.shape), *probed, aliases))
    click.echo(_table(rows))
    if listing.probed:
        click.echo(
            f"(shapes are per example, from one probe batch of {listing.examples} inputs; RUNS: times the module "
            "runs per forward pass, 'i of k' for call i of a module run k times, the layer NAME:i; DEFAULT *: what "
            "no --layers selects)",
            err=True,
        )
    elif listing.can_probe:
        click.echo("(give --inputs to see each layer's shape and how often it runs, from one probe batch)", err=True)


class _Command(click.Command):
    """Keeps the command-line arguments (``ctx.meta["argv"]``) for the provenance of the file."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["argv"] = list(args)
        return super().parse_args(ctx, args)


HELP = """Run MODEL over INPUTS and store the activations of chosen layers in an HDF5 file.

MODEL is whatever an installed extractor plugin opens (a .onnx file, torch weights or a
`package.module:factory` spec; see --list-extractors). INPUTS is a .npz (arrays named after the
model's inputs, plus optional `ids`), a .npy, `file.h5:/dataset` or a folder of images. Each layer's
output is reduced to one row of features per example (--reduction) and written batch by batch, so an
interrupted run continues with --resume, and large inputs can be split with --shard I/K. Under
torchrun with K processes (and no --shard), rank r writes shard r/K to OUT-0000r-of-0000K.h5
(docs/distributed.md).

\b
Example:
  cka-extract resnet18.onnx --inputs images.npz -o resnet18.h5 --layers 'kind:Relu' --reduction mean
  cka-extract resnet18.onnx --list-layers
  torchrun --standalone --nproc-per-node 4 --no-python cka-extract resnet18.onnx --inputs images.npz \\
      -o acts/resnet18.h5 --device cuda     # -> acts/resnet18-0000{0..3}-of-00004.h5
"""


@click.command(
    cls=_Command,
    name=PROG,
    help=HELP,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.argument("model", required=False)
@click.option(
    "--inputs", "-i", "inputs", metavar="INPUTS", help="Model inputs: .npz, .npy, file.h5:/dataset or an image folder."
)
@click.option("--output", "-o", "output", metavar="OUT.h5", help="Activation file to write.")
@click.option(
    "--layers",
    "-l",
    multiple=True,
    metavar="PATTERN",
    help="Layers: names, globs, kind:Relu, aliases; repeatable and comma-separated. Default: all. Globs are "
    "path globs over dotted names: '*' stays within one component ('layer*' is layer1..layer4, "
    "'encoder.layer.*' the blocks), '**' crosses them ('layer1.**' is everything inside layer1). A module "
    "run k times per forward pass is the layers NAME:1 ... NAME:k; NAME selects them all. -r PATTERN=... "
    "matches the same way.",
)
@click.option(
    "--extractor", "-e", metavar="NAME", help="Extractor plugin to use (default: the one that can open MODEL)."
)
@click.option(
    "--list-extractors", is_flag=True, help="List installed extractors and input readers, and broken plugins."
)
@click.option(
    "--list-options",
    is_flag=True,
    help="List the options (-X, -I) each installed extractor and input reader declares, and exit.",
)
@click.option(
    "--list-layers",
    is_flag=True,
    help="List the layers MODEL offers (name, kind, shape, aliases) and exit; with --inputs (torch), each "
    "layer's per-example shape, runs per forward pass and the default selection, from one probe batch.",
)
@click.option(
    "--reduction",
    "-r",
    multiple=True,
    metavar="[PATTERN=]NAME",
    help=f"{', '.join(schema.REDUCTIONS)}: flatten is the default, mean averages positions (spatial, or the "
    "tokens of a (tokens, features) output; a vector is kept); "
    "PATTERN=NAME for some layers only. Repeatable.",
)
@click.option(
    "--mask-input",
    default="attention_mask",
    show_default=True,
    metavar="NAME",
    help="Input holding the attention mask for token reductions; 'none' counts every token.",
)
@click.option(
    "--batch-size", "-b", default=64, show_default=True, type=click.IntRange(min=1), help="Examples per forward pass."
)
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    type=DeviceType(),
    help="cpu, cuda, cuda:N, mps or auto (cuda if available).",
)
@click.option(
    "--dtype",
    default=schema.DEFAULT_DTYPE,
    show_default=True,
    type=click.Choice(schema.STORED_DTYPES),
    help="Stored dtype.",
)
@click.option("--max-examples", type=click.IntRange(min=1), metavar="N", help="Use only the first N examples.")
@click.option(
    "--shard",
    callback=_shard,
    metavar="I/K",
    help="Write only part I of K (I counts from 0) of the examples; the K files form one logical file.",
)
@click.option(
    "--resume", is_flag=True, help="Continue OUT.h5.partial left by an interrupted run with the same options."
)
@click.option("--overwrite", is_flag=True, help="Replace OUT.h5 if it exists.")
@click.option(
    "--chunk-rows", type=click.IntRange(min=1), metavar="N", help="Rows per HDF5 chunk (default: about 4 MB)."
)
@click.option(
    "--compression",
    default="none",
    show_default=True,
    type=click.Choice(schema.COMPRESSION_NAMES),
    help="HDF5 compression.",
)
@click.option(
    "--option",
    "-X",
    "option",
    multiple=True,
    metavar="KEY=VALUE",
    help="Extractor option (see --list-options); values are JSON (numbers, true, lists) or strings.",
)
@click.option(
    "--input-option",
    "-I",
    "input_option",
    multiple=True,
    metavar="KEY=VALUE",
    help="Input reader option (see --list-options): for image folders resize=HxW, mean=, std=, grayscale=true; "
    "for HDF5 dataset=, ids=.",
)
@click.option(
    "--model-arg", multiple=True, metavar="KEY=VALUE", help="torch: keyword argument of the model factory. Repeatable."
)
@click.option(
    "--weights", metavar="PATH", help="torch: weights (state dict or safetensors) to load into the factory's model."
)
@click.option(
    "--output-index", metavar="N|KEY", help="torch: which element of a tuple/dict model output is the output."
)
@click.option(
    "--allow-pickle-code-execution",
    is_flag=True,
    help="torch: load a pickled model file. Unpickling RUNS CODE FROM THE FILE: only for files you trust.",
)
@click.option(
    "--allow-external",
    is_flag=True,
    help="HDF5 inputs: read datasets whose values live in other files (external links, virtual datasets, "
    "external storage): only files you trust.",
)
@click.option("--batch-axis", type=int, metavar="N", help="onnx: axis of the batch in the model's inputs and outputs.")
@click.option(
    "--onnx-optimization",
    metavar="LEVEL",
    help="onnx: onnxruntime graph optimization level: disable, basic, extended or all (default: all, "
    "onnxruntime's own; the chosen tensors are graph outputs, so every level keeps them).",
)
@quiet_option
@debug_option
@version_option
@click.pass_context
@handle_errors(PROG, interrupted=lambda **kw: _interrupted(**kw))
def main(ctx: click.Context, **params: Any) -> None:
    """The command: ``params`` are the options above by name; see :func:`_extract_options` for the run's."""
    setup_logging(params["debug"], params["quiet"])
    from ..registry import get_plugin_manager

    obj = ctx.obj if isinstance(ctx.obj, dict) else {}
    pm = obj.get("plugin_manager") or get_plugin_manager()
    if params["list_extractors"] or params["list_options"]:
        (_list_extractors if params["list_extractors"] else _list_options)(pm)
        return
    model, output = params["model"], params["output"]
    if not model:
        raise click.UsageError("give a MODEL (or --list-extractors)")
    options = _extractor_options(params)
    if params["list_layers"]:
        _list_layers(model, params, options, pm)
        return
    if not output:
        raise click.UsageError("give the output file with -o OUT.h5")

    from ..distributed import environment

    opts = _extract_options(ctx, params, options)
    env = environment()
    if env is not None and env[1] > 1 and opts.shard is None:
        _extract_distributed(model, params["inputs"], output, params["quiet"], opts, pm)
        return
    from ..extraction import extract_with

    bar = ProgressBar("extracting", enabled=not params["quiet"])
    try:
        path = extract_with(opts, model, params["inputs"], output, progress=bar, plugin_manager=pm)
    finally:
        bar.finish()
    if not params["quiet"]:
        click.echo(f"{PROG}: wrote {path}", err=True)


def _extract_options(ctx: click.Context, params: dict[str, Any], options: dict[str, Any]) -> ExtractOptions:
    """The command line's settings as one checked :class:`~cka_offline.extraction.ExtractOptions`."""
    from ..extraction import ExtractOptions

    mask_input = params["mask_input"]
    return ExtractOptions(
        layers=split_list(params["layers"]) or None,
        extractor=params["extractor"],
        batch_size=params["batch_size"],
        device=params["device"],
        dtype=params["dtype"],
        reduction=_reduction(params["reduction"]),
        max_examples=params["max_examples"],
        shard=params["shard"],
        resume=params["resume"],
        overwrite=params["overwrite"],
        chunk_rows=params["chunk_rows"],
        compression=params["compression"],
        options=options,
        input_options=parse_key_values(params["input_option"], "-I/--input-option"),
        mask_input=None if mask_input.lower() == "none" else mask_input,
        # without --resume: a resumed file keeps its first run's command, and a run with nothing (or an
        # unreadable .partial) to resume must record the same, so both equal an uninterrupted run's file
        allow_external=params["allow_external"],
        command=shlex.join([PROG, *[a for a in ctx.meta.get("argv", sys.argv[1:]) if a != "--resume"]]),
    )


def _extract_distributed(
    model: str, inputs: str | None, output: str, quiet: bool, opts: ExtractOptions, pm: Any
) -> None:
    """Under torchrun with K ranks (and no --shard): rank r writes shard r/K to OUT-0000r-of-0000K.h5."""
    import dataclasses

    from ..distributed import follower_exit, init
    from ..extraction import extract_with, shard_path
    from ..files import refuse_existing

    with follower_exit(PROG), init("cpu") as dist:  # gloo: the ranks exchange only flags
        index, count = dist.rank, dist.world_size
        target = shard_path(output, index, count)
        with dist.checked("checking the outputs"):
            opts = dataclasses.replace(opts, device=dist.device(opts.device), shard=(index, count))
            refuse_existing(target, overwrite=opts.overwrite)
        bar = ProgressBar(f"extracting shard {index}/{count}", enabled=not quiet and dist.is_main)

        def progress(done: int, total: int) -> None:
            bar(done, total)
            dist.poll()  # stop early when another rank has failed

        try:
            with dist.checked("extracting"):
                extract_with(opts, model, inputs, target, progress=progress, plugin_manager=pm)
        finally:
            bar.finish()
    if dist.is_main and not quiet:
        pattern = shard_path(output, "*", count)
        click.echo(f"{PROG}: wrote {count} shards {pattern}; analyze them with cka-analyze '{pattern}'", err=True)


__all__ = ["main"]


if __name__ == "__main__":  # torchrun -m cka_offline.cli.extract ...
    main(prog_name=PROG)
