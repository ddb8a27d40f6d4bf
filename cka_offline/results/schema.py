"""The result format, version 1: the one mirror of ``docs/results.md`` in code.

Every key, dataset, attribute and column the result writers write and the readers check is named here;
``tests/results/test_schema_doc.py`` checks that ``docs/results.md`` names the same ones. Change the format
here and in the document together.

Versioning is MAJOR.MINOR: a minor release only adds (old readers ignore what they do not know, new readers
supply defaults for what an older file lacks); a reader refuses a major it does not know.
"""

from __future__ import annotations

FORMAT_NAME = "cka-offline-result"
FORMAT_MAJOR = 1
FORMAT_MINOR = 4
FORMAT_VERSION = f"{FORMAT_MAJOR}.{FORMAT_MINOR}"

# --- the serialisations --------------------------------------------------------------------------------
FORMATS = ("h5", "json", "csv")
#: file extension (lower case) -> format
EXTENSIONS = {".h5": "h5", ".hdf5": "h5", ".json": "json", ".csv": "csv"}
#: other spellings of a format accepted where a format is named explicitly
FORMAT_ALIASES = {"hdf5": "h5"}

# --- the result document (the JSON file; the HDF5 file's ``meta`` attribute without the matrices) -------
KEY_FORMAT = "format"  # str, == FORMAT_NAME
KEY_VERSION = "format_version"  # str, "MAJOR.MINOR"
KEY_TOOL_VERSION = "version"  # str, version of the cka-offline that computed the result
KEY_FILES = "files"  # list of file objects (FILE_* keys), in stacking order
KEY_PAIRS = "pairs"  # list of [i, j]: the file pairs the result reports
KEY_PARAMS = "params"  # object: how the result was computed (PARAM_KEYS)
KEY_N_EXAMPLES = "n_examples"  # int, examples used (after id alignment)
KEY_N_MINIBATCHES = "n_minibatches"  # int, minibatches accumulated over all epochs (0: full-data estimator)
KEY_TIMING = "timing"  # object: seconds spent (TIMING_KEYS)
KEY_WARNINGS = "warnings"  # list of str, one sentence each
KEY_CONFIDENCE = "confidence"  # float, level of the low/high interval

#: the four (L, L) float64 matrices over the stacked layers, in this order everywhere
MATRIX_CKA = "cka"  # CKA; NaN where undefined (a constant layer) or not computed (params.all_pairs false)
MATRIX_SE = "se"  # jackknife standard error; NaN for the full-data estimators
MATRIX_LOW = "low"  # lower bound of the confidence interval
MATRIX_HIGH = "high"  # upper bound of the confidence interval
MATRICES = (MATRIX_CKA, MATRIX_SE, MATRIX_LOW, MATRIX_HIGH)

REQUIRED_KEYS = (KEY_FORMAT, KEY_VERSION, KEY_FILES, KEY_PAIRS)
OPTIONAL_KEYS = (
    KEY_TOOL_VERSION,
    KEY_PARAMS,
    KEY_N_EXAMPLES,
    KEY_N_MINIBATCHES,
    KEY_TIMING,
    KEY_WARNINGS,
    KEY_CONFIDENCE,
)
#: the interval level a reader assumes when ``confidence`` is absent
DEFAULT_CONFIDENCE = 0.95

# --- one entry of ``files`` --------------------------------------------------------------------------
FILE_LABEL = "label"  # str, the file as it was given (a path, a glob); unique within a result
FILE_LAYERS = "layers"  # list of str, the selected layer names: the file's rows/columns, in order
FILE_PATHS = "paths"  # list of str, the shard paths the label resolved to
FILE_PROVENANCE = "provenance"  # object, the activation file's provenance (docs/format.md)
FILE_SHA256 = "sha256"  # list of str, SHA-256 of each path ("" where not computed)
FILE_N_EXAMPLES = "n_examples"  # int, examples stored in the file (before alignment)
FILE_ALIASES = "aliases"  # list of str (1.3), parallel to FILE_LAYERS: each layer's display alias, "" where none

REQUIRED_FILE_KEYS = (FILE_LABEL, FILE_LAYERS)
OPTIONAL_FILE_KEYS = (FILE_PATHS, FILE_PROVENANCE, FILE_SHA256, FILE_N_EXAMPLES, FILE_ALIASES)

# --- ``params``: recorded by analyze(); readers MUST NOT need any of them -------------------------------
PARAM_KEYS = (
    "batch_size",  # int, examples per minibatch asked for
    "epochs",  # int, passes over the examples
    "seed",  # int, seed of the minibatch order
    "kernel",  # str, "linear" or "rbf"
    "rbf_fraction",  # float or null, RBF bandwidth as a fraction of the median distance (null: linear)
    "bandwidths",  # object: file label -> {layer name: float or null}, the RBF bandwidth of each layer
    "precision",  # str, dtype of the Gram matrices
    "device",  # str, the device that computed it
    "estimator",  # str, "minibatch", "full" or "full-debiased"
    "n_groups",  # int, jackknife groups used (1.1; 1.0: groups asked for)
    "intersect",  # bool, files were reduced to the example ids they share
    "confidence",  # float, level of the interval (as KEY_CONFIDENCE)
    "shuffle",  # str, "uniform" or "blocks" (1.1; absent in 1.0: blocks)
    "block_rows",  # int, rows per read block of the shuffle buffer (shuffle "blocks")
    "buffer_blocks",  # int, blocks in the shuffle buffer (shuffle "blocks")
    "world_size",  # int, processes of a distributed run
    "all_pairs",  # bool (1.4), the within-file blocks were computed (false: NaN there off the diagonal, "not computed")
)

# --- ``timing``: seconds --------------------------------------------------------------------------------
TIMING_KEYS = (
    "total",  # the whole analysis
    "read_wait",  # compute waiting for data
    "compute",  # computing
    "hash_wait",  # waiting for the file hashes at the end
)

# --- HDF5 -----------------------------------------------------------------------------------------------
H5_ATTR_FORMAT = KEY_FORMAT  # root attribute, str, == FORMAT_NAME
H5_ATTR_VERSION = KEY_VERSION  # root attribute, str, "MAJOR.MINOR"
H5_ATTR_META = "meta"  # root attribute, str: the result document without the matrices, as JSON
H5_ROOT_ATTRS = (H5_ATTR_FORMAT, H5_ATTR_VERSION, H5_ATTR_META)
H5_DATASETS = MATRICES  # root datasets, (L, L) float64 each
# 1.2: HDF5 dimension scales, so netCDF readers (xarray with h5netcdf) show layer names
H5_DIM_A = "layer_a"  # root dataset, str (L,): the stacked layer names; the rows' dimension scale
H5_DIM_B = "layer_b"  # root dataset, str (L,): the same names; the columns' dimension scale
H5_FILE_A = "file_a"  # root dataset, str (L,): the label of each stacked layer's file, along the rows
H5_FILE_B = "file_b"  # root dataset, str (L,): the same, along the columns
H5_COORDINATES = (H5_DIM_A, H5_DIM_B, H5_FILE_A, H5_FILE_B)
H5_ATTR_COORDINATES = "coordinates"  # attribute of each matrix: "file_a file_b" (netCDF's CF convention)

# --- CSV: long format, one row per (layer of A, layer of B) of each reported pair ----------------------
CSV_FILE_A = "file_a"  # label of the pair's first file (rows of the block)
CSV_LAYER_A = "layer_a"  # layer of file_a
CSV_FILE_B = "file_b"  # label of the pair's second file (columns of the block)
CSV_LAYER_B = "layer_b"  # layer of file_b
CSV_COLUMNS = (CSV_FILE_A, CSV_LAYER_A, CSV_FILE_B, CSV_LAYER_B, *MATRICES)


def parse_version(text: object) -> tuple[int, int]:
    """``"1.0"`` -> ``(1, 0)``; raises ValueError on anything else."""
    major, minor = str(text).split(".")
    return int(major), int(minor)
