"""``cka-analyze``: compare the layers of activation files with CKA, print a summary, save and plot it.

torch, h5py and matplotlib are imported inside the command, so ``cka-analyze --help`` answers fast.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import click

from ..analysis.options import (
    DEVICES,
    ESTIMATORS,
    KERNELS,
    MAX_EPOCHS,
    MAX_SEED,
    PRECISIONS,
    SHUFFLES,
    AnalysisOptions,
)
from .common import (
    DeviceType,
    FiniteFloatRange,
    HeldWarnings,
    ProgressBar,
    SizeType,
    debug_option,
    handle_errors,
    quiet_option,
    setup_logging,
    split_list,
    version_option,
)

PROG = "cka-analyze"
#: the defaults of the options, as the library has them
_DEFAULT = AnalysisOptions()

HELP = """Compare the layers of activation files (written by cka-extract) with CKA.

With one FILE its layers are compared with each other; with two, every layer of the first (A)
with every layer of the second (B); with more (say the checkpoints of one run), every pair, in a
single pass that computes each file's Gram matrices once per minibatch (only the pairs across files:
--all-pairs adds those within each file). A FILE may be a glob or
shard set ('run/acts-*.h5'). The files must hold the same example ids (in any order), or use
--intersection. CKA is the unbiased minibatch estimator of Nguyen et al. (2021): seeded uniformly random
minibatches of -m examples (whatever order the files store their rows in), with jackknife standard
errors and 95% intervals. The summary (best B layer for each A layer) goes to stdout; -o saves the result (.h5,
.json or .csv) and --plot draws the heatmap (.png, .pdf or .svg; one file per pair for 3+ files).
Under torchrun the processes share the minibatches and rank 0 writes the outputs (docs/distributed.md).

\b
Example:
  cka-analyze resnet_a.h5 resnet_b.h5 -o cka.json --plot cka.png
  cka-analyze ckpt-*.h5 --layers 'layer*.*.relu' --device cuda -m 1024 --epochs 3
  torchrun --standalone --nproc-per-node 4 --no-python cka-analyze ckpt-*.h5 --device cuda -o cka.h5
"""


def _pairs(n_files: int) -> list[tuple[int, int]]:
    return [(0, 0)] if n_files == 1 else [(i, j) for i in range(n_files) for j in range(i + 1, n_files)]


def _plot_paths(plot: str, pairs: list[tuple[int, int]]) -> list[tuple[tuple[int, int], str]]:
    """One heatmap per file pair: PATH itself for one pair, PATH with ``_i-j`` before the extension otherwise."""
    if len(pairs) == 1:
        return [(pairs[0], plot)]
    stem, ext = os.path.splitext(plot)
    return [((i, j), f"{stem}_{i}-{j}{ext}") for i, j in pairs]


def _input_paths(files: tuple[str, ...]) -> list[str]:
    """The files the command reads: each argument, a glob expanded as the reader expands it (an argument
    that matches nothing is left to the reader, which says so)."""
    from ..errors import FormatError
    from ..store.reader import expand_paths

    paths: list[str] = []
    for spec in files:
        try:
            paths.extend(expand_paths(spec))
        except FormatError:
            continue
    return paths


def _check_outputs(
    output: str | None,
    fmt: str | None,
    plot: str | None,
    files: tuple[str, ...],
    overwrite: bool,
    scratch_dir: str | None = None,
) -> None:
    """Refuse bad or existing outputs before hours of computing, not after: an unknown format, a folder,
    a missing or read-only folder, an output that is one of the inputs (even with --overwrite: compared by
    inode, so symlinks, hard links and ``./a.h5`` are caught), two outputs that are one file, an existing
    file without --overwrite; and a --scratch-dir that is not a writable folder."""
    from ..errors import OutputError
    from ..files import check_output, same_file, writable_folder
    from ..plot import plot_format
    from ..results import result_format

    targets: list[tuple[str, str]] = []
    if output:
        result_format(output, fmt)
        targets.append(("-o", output))
    if plot:
        plot_format(plot)
        targets.extend(("--plot", path) for _, path in _plot_paths(plot, _pairs(len(files))))
    inputs = _input_paths(files)
    for k, (option, path) in enumerate(targets):
        for other_option, other in targets[:k]:
            if same_file(path, other):
                raise OutputError(
                    f"{option} {path} and {other_option} {other} are the same file; give them different names"
                )
        check_output(path, inputs=inputs, overwrite=overwrite, option=option, hint="choose another name")
    if scratch_dir is not None and not os.path.isdir(scratch_dir):
        raise OutputError(
            f"--scratch-dir {scratch_dir} is not a folder"
            + ("" if os.path.exists(scratch_dir) else " (it does not exist)")
            + "; create it or give another"
        )
    if scratch_dir is not None and not writable_folder(scratch_dir):
        raise OutputError(f"--scratch-dir {scratch_dir} is not writable; give another folder")


@click.command(name=PROG, help=HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("files", nargs=-1, required=True, metavar="A.h5 [B.h5 ...]")
@click.option("--output", "-o", metavar="PATH", help="Save the result: .h5, .json or .csv (by extension, or --format).")
@click.option(
    "--format", "fmt", type=click.Choice(["h5", "json", "csv"]), help="Result format, overriding the extension."
)
@click.option("--plot", metavar="PATH", help="Heatmap of A against B: .png, .pdf or .svg.")
@click.option("--annotate/--no-annotate", default=None, help="Write values in the heatmap cells (default: when small).")
@click.option(
    "--batch-size",
    "-m",
    default=_DEFAULT.batch_size,
    show_default=True,
    type=click.IntRange(min=4),
    help="Examples per minibatch; the last ones are evened out so none is below 4.",
)
@click.option(
    "--epochs",
    default=_DEFAULT.epochs,
    show_default=True,
    type=click.IntRange(min=1, max=MAX_EPOCHS),
    help="Passes over the data, each reshuffled.",
)
@click.option(
    "--seed",
    default=_DEFAULT.seed,
    show_default=True,
    type=click.IntRange(min=0, max=MAX_SEED),
    help="Seed of the minibatches, the jackknife groups and the RBF bandwidth sample.",
)
@click.option(
    "--layers",
    "-l",
    multiple=True,
    metavar="PATTERN",
    help=(
        "Layers of every file: names, the aliases they were extracted by (an ONNX tensor's module, as cka-inspect "
        "shows), or globs (* within a dotted or / component, ** across); repeatable and comma-separated. Default: all."
    ),
)
@click.option("--layers-a", multiple=True, metavar="PATTERN", help="Layers of the first file (overrides --layers).")
@click.option("--layers-b", multiple=True, metavar="PATTERN", help="Layers of the other files (overrides --layers).")
@click.option("--kernel", default=_DEFAULT.kernel, show_default=True, type=click.Choice(KERNELS), help="CKA kernel.")
@click.option(
    "--rbf-fraction",
    default=_DEFAULT.rbf_fraction,
    show_default=True,
    type=FiniteFloatRange(min=0, min_open=True),
    help="RBF bandwidth as a fraction of the median pairwise distance (per layer, from up to 1000 examples).",
)
@click.option(
    "--precision",
    default=_DEFAULT.precision,
    show_default=True,
    type=click.Choice(PRECISIONS),
    help="Gram matrix precision (sums are always float64).",
)
@click.option(
    "--device", default=_DEFAULT.device, show_default=True, type=DeviceType(DEVICES), help="auto, cpu, cuda or cuda:N."
)
@click.option(
    "--estimator",
    default=_DEFAULT.estimator,
    show_default=True,
    type=click.Choice(ESTIMATORS),
    help="minibatch CKA, or the exact full-data CKA (biased or debiased; needs all examples in memory).",
)
@click.option(
    "--intersection", is_flag=True, help="Use the examples common to all files instead of requiring the same ones."
)
@click.option(
    "--n-groups",
    default=_DEFAULT.n_groups,
    show_default=True,
    type=click.IntRange(min=2),
    help="Jackknife groups for standard errors: each owns a share of the examples, in every epoch.",
)
@click.option(
    "--shuffle",
    default=_DEFAULT.shuffle,
    show_default=True,
    type=click.Choice(SHUFFLES),
    help="uniform: random minibatches (compressed layers are decompressed to a scratch file first); "
    "blocks: minibatches from shuffled whole chunks, for files larger than memory and disk "
    "(biased when rows are stored in class order; warns).",
)
@click.option(
    "--scratch-dir", metavar="DIR", help="Where compressed layers are decompressed (default: the temp folder)."
)
@click.option("--overwrite", is_flag=True, help="Replace the -o / --plot files if they exist.")
@click.option("--allow-external", is_flag=True, help="Read files with external HDF5 links (only files you trust).")
@click.option(
    "--hash/--no-hash",
    "hash_files",
    default=_DEFAULT.hash_files,
    show_default=True,
    help="Record each file's SHA-256 in the result (reads every byte once more, alongside the analysis).",
)
@click.option(
    "--max-memory",
    "full_max_bytes",
    type=SizeType(),
    default=None,
    help="Memory the full estimators may use for their n x n float64 Gram matrices, e.g. 16G or 512M "
    "(default 8G); beyond it the layers go in blocks, each block's Grams rebuilt per block pair.",
)
@click.option(
    "--all-pairs",
    is_flag=True,
    default=_DEFAULT.all_pairs,
    help="With 2+ files, also compute the layer pairs within each file (the result then holds them; by "
    "default only each file against the others is computed, and the within-file entries are NaN).",
)
@quiet_option
@debug_option
@version_option
@handle_errors(PROG)
def main(
    files: tuple[str, ...],
    output: str | None,
    fmt: str | None,
    plot: str | None,
    annotate: bool | None,
    layers: tuple[str, ...],
    layers_a: tuple[str, ...],
    layers_b: tuple[str, ...],
    intersection: bool,
    overwrite: bool,
    quiet: bool,
    debug: bool,
    **choices: Any,
) -> None:
    """``choices``: the options whose names are those of :class:`~cka_offline.analysis.AnalysisOptions`."""
    setup_logging(debug, quiet)
    from ..analysis import analyze, check_options
    from ..distributed import FOLLOWER_GRACE, environment, follower_exit, init

    env = environment()
    try:
        options = check_options(
            layers=split_list(layers) or None,
            layers_a=split_list(layers_a) or None,
            layers_b=split_list(layers_b) or None,
            intersect=intersection,
            **choices,
        )
    except ValueError as exc:
        if env is not None and env[0] != 0:  # under torchrun every rank finds it: rank 0 says it
            time.sleep(FOLLOWER_GRACE)
            sys.exit(2)
        raise click.UsageError(str(exc)) from None
    # under torchrun: every rank computes a share, rank 0 alone checks and writes the outputs and prints
    with follower_exit(PROG), init(options.device) as ctx:
        with ctx.checked("checking the outputs"):
            options = options.replace(device=ctx.device(options.device))
            if ctx.is_main:
                _check_outputs(output, fmt, plot, files, overwrite, options.scratch_dir)
        bar = ProgressBar("analyzing", enabled=not quiet and ctx.is_main)
        try:
            with HeldWarnings() as held:  # the result's warnings are printed once, below
                result = analyze(list(files), options, progress=bar, distributed=ctx)
        except BaseException:
            bar.abandon()  # on a terminal the error line is then all that stays
            raise
        bar.finish()
        held.release(result.warnings)
        if not ctx.is_main:
            return
    if quiet:  # no summary; what the user must know still goes to stderr
        for warning in result.warnings:
            click.echo(f"{PROG}: warning: {warning}", err=True)
    else:
        click.echo(result.summary())
    written: list[str] = []
    if output:
        written.append(result.save(output, format=fmt, overwrite=overwrite))
    if plot:
        from ..plot import plot_heatmap

        for pair, path in _plot_paths(plot, result.pairs):
            written.append(plot_heatmap(result, path, pair=pair, annotate=annotate))
    if written and not quiet:
        click.echo(f"{PROG}: wrote {', '.join(written)}", err=True)


__all__ = ["main"]


if __name__ == "__main__":  # torchrun -m cka_offline.cli.analyze ...
    main(prog_name=PROG)
