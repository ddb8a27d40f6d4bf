"""The activation file format, version 1: the one mirror of ``docs/format.md`` in code.

Every key the writer writes and the reader checks is named here; ``tests/store/test_schema_doc.py``
checks that ``docs/format.md`` names the same keys. Change the format here and in the document together.

Versioning is MAJOR.MINOR: a minor release only adds keys (old readers ignore them, new readers supply
defaults); a reader refuses a major it does not know.
"""

from __future__ import annotations

from dataclasses import dataclass

FORMAT_NAME = "cka-offline-activations"
FORMAT_MAJOR = 1
FORMAT_MINOR = 2  # 1.1: the optional layer attribute "alias"; 1.2: the optional dataset /checksums
FORMAT_VERSION = f"{FORMAT_MAJOR}.{FORMAT_MINOR}"

# --- root attributes -------------------------------------------------------------------------------
ATTR_FORMAT = "format"  # str, == FORMAT_NAME
ATTR_VERSION = "format_version"  # str, "MAJOR.MINOR"
ATTR_TOOL_VERSION = "cka_offline_version"  # str, version of the writing cka-offline
ATTR_CREATED = "created"  # str, ISO 8601 UTC time the file was started
ATTR_N_EXAMPLES = "n_examples"  # int, rows of every layer dataset and of /ids
ATTR_ROWS_COMPLETE = "rows_complete"  # int, rows fully written and flushed (== n_examples when complete)
ATTR_COMPLETE = "complete"  # bool, True only once every row is written
ATTR_CHUNK_ROWS = "chunk_rows"  # int, rows per HDF5 chunk of every layer dataset
ATTR_RESUME_KEY = "resume_key"  # str, fingerprint of model + inputs + options; --resume must match it
ATTR_SHARD_INDEX = "shard_index"  # int, this file's shard (0 when not sharded)
ATTR_SHARD_COUNT = "shard_count"  # int, number of shards of the logical file (1 when not sharded)
ATTR_EXAMPLE_OFFSET = "example_offset"  # int, row of the logical file where this shard's first row goes

# provenance (str; "" when unknown)
PROVENANCE_ATTRS = (
    "extractor",  # extractor plugin name, e.g. "torch"
    "extractor_version",  # version of the plugin's distribution
    "framework",  # e.g. "torch", "onnxruntime", "numpy"
    "framework_version",
    "model",  # model identifier: factory spec or model file path
    "model_sha256",  # SHA-256 of the model file (weights) where there is one
    "inputs",  # description of the inputs (reader and path)
    "inputs_sha256",  # SHA-256 of the inputs file or folder
    "command",  # the command line that made the file
    "options",  # JSON object: extraction options (layers, reduction, dtype, extractor options...)
)
ATTR_EXTRA = "extra"  # str, JSON object of further provenance an extractor recorded

REQUIRED_ROOT_ATTRS = (
    ATTR_FORMAT,
    ATTR_VERSION,
    ATTR_TOOL_VERSION,
    ATTR_CREATED,
    ATTR_N_EXAMPLES,
    ATTR_ROWS_COMPLETE,
    ATTR_COMPLETE,
    ATTR_CHUNK_ROWS,
)
OPTIONAL_ROOT_ATTRS = (
    ATTR_RESUME_KEY,
    ATTR_SHARD_INDEX,
    ATTR_SHARD_COUNT,
    ATTR_EXAMPLE_OFFSET,
    ATTR_EXTRA,
    *PROVENANCE_ATTRS,
)

# --- datasets and groups ---------------------------------------------------------------------------
IDS_DATASET = "ids"  # 1-D, int64 or UTF-8 variable-length str, unique, one per row in row order
LAYERS_GROUP = "layers"  # group of one 2-D dataset per layer
#: optional (1.2): uint32 (chunks, layers), the CRC-32 (zlib.crc32) of each chunk's stored rows of each layer
CHECKSUMS_DATASET = "checksums"
LAYER_KEY_FORMAT = "L{:04d}"  # dataset names inside /layers: L0000, L0001, ... (never model names)

# --- per-layer dataset attributes ------------------------------------------------------------------
LAYER_ATTR_NAME = "name"  # str, the layer's original name (may contain '/' and '.')
LAYER_ATTR_ORDER = "order"  # int, position of the layer in the model (0-based, as extracted)
LAYER_ATTR_ORIGINAL_SHAPE = "original_shape"  # int array, per-example shape before reduction
LAYER_ATTR_REDUCTION = "reduction"  # str, one of REDUCTIONS
LAYER_ATTR_DTYPE = "dtype"  # str, stored dtype: one of STORED_DTYPES
LAYER_ATTR_FEATURES = "features"  # int, number of columns
LAYER_ATTR_ALIAS = "alias"  # str, optional (1.1): the name the user selected the layer by, for display

REQUIRED_LAYER_ATTRS = (
    LAYER_ATTR_NAME,
    LAYER_ATTR_ORDER,
    LAYER_ATTR_ORIGINAL_SHAPE,
    LAYER_ATTR_REDUCTION,
    LAYER_ATTR_DTYPE,
    LAYER_ATTR_FEATURES,
)
OPTIONAL_LAYER_ATTRS = (LAYER_ATTR_ALIAS,)


@dataclass(frozen=True)
class StoredLayer:
    """One stored layer, as the writer is told it (name, original shape, reduction, features) and as the
    reader finds it (with its stored ``dtype``, its position ``order`` and its dataset ``key``, ``L0000``).

    Attributes mirror the per-layer attributes above; ``name`` is the model's own spelling, never a path.
    ``alias`` (1.1) is a shorter display name the layer was selected by (an ONNX tensor's PyTorch module
    name, ``conv1`` for ``/conv1/Conv_output_0``); ``""`` when there is none or the file predates 1.1.
    """

    name: str
    original_shape: tuple[int, ...]
    reduction: str
    features: int
    dtype: str = ""
    order: int = -1
    key: str = ""
    alias: str = ""


# === allowed values: extraction side (activation files) ==============================================
# Every list of allowed values lives here; the CLI's click.Choice lists, extract() and the writer read them.

#: reductions of a layer's output to one row per example (cka_offline.reduce), the default first
REDUCTIONS = ("flatten", "mean", "token_mean", "first_token", "last_token", "none")
DEFAULT_REDUCTION = "flatten"
#: the reductions that pool tokens of a (batch, tokens, features) output, with the attention mask
TOKEN_REDUCTIONS = ("token_mean", "first_token", "last_token")
#: stored dtypes of the layer datasets, the default first
STORED_DTYPES = ("float32", "float16")
DEFAULT_DTYPE = "float32"
#: HDF5 compressions of the layer datasets; None (spelt "none" on the command line) is uncompressed
COMPRESSIONS = (None, "gzip", "lz4")
COMPRESSION_NAMES = tuple("none" if c is None else c for c in COMPRESSIONS)


def compression_name(compression: str | None) -> str | None:
    """``compression`` checked against :data:`COMPRESSIONS` (``"none"`` -> None); ValueError if unknown."""
    value = None if compression in (None, "none") else compression
    if value not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r}; use one of {', '.join(COMPRESSION_NAMES)}")
    return value


# === end of the extraction-side allowed values ========================================================

#: default bytes per chunk that chunk_rows aims at (rows * widest layer * itemsize)
TARGET_CHUNK_BYTES = 4 << 20
MIN_CHUNK_ROWS = 16
MAX_CHUNK_ROWS = 1024


def layer_key(order: int) -> str:
    """Name of the dataset inside ``/layers`` that holds the layer at position ``order``."""
    return LAYER_KEY_FORMAT.format(order)


def default_chunk_rows(max_features: int, itemsize: int) -> int:
    """Rows per chunk so the widest layer's chunk is about TARGET_CHUNK_BYTES, a power of two in range."""
    rows = max(1, TARGET_CHUNK_BYTES // max(1, max_features * itemsize))
    power = 1 << (rows.bit_length() - 1)
    return int(min(MAX_CHUNK_ROWS, max(MIN_CHUNK_ROWS, power)))


def parse_version(text: str) -> tuple[int, int]:
    """``"1.0"`` -> ``(1, 0)``; raises ValueError on anything else."""
    major, minor = str(text).split(".")
    return int(major), int(minor)
