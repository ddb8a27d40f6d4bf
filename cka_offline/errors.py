"""Errors a user can cause. Every one is a :class:`CKAOfflineError`.

The message of each says what went wrong, where (file, layer, example id) and how to fix it.
The CLI prints it as one line on stderr and exits with its ``exit_code``; ``--debug`` shows the traceback.
This module imports nothing from the package so that every layer can use it.

Exit codes of the commands (docs/reliability.md, "What a person sees"): 0 success; 1 a bug (an unexpected
exception, with its traceback); 2 a usage error (click's: an unknown option, a bad option value, a missing
argument; also :class:`OptionError`); 3 a problem with the data, files, model or machine (every other
:class:`CKAOfflineError`); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

#: click's exit code for a usage error; also that of :class:`OptionError`
USAGE_EXIT_CODE = 2
#: the exit code of a :class:`CKAOfflineError` about the data, files, model or machine
DATA_EXIT_CODE = 3


class CKAOfflineError(Exception):
    """Base class of every error a user can cause (bad input, bad file, bad option)."""

    exit_code = DATA_EXIT_CODE


class FormatError(CKAOfflineError):
    """A file is not a valid activation (or result) file: wrong type, missing or malformed content."""


class VersionError(FormatError):
    """A file was written in a format major version this release cannot read."""


class IncompleteFileError(FormatError):
    """A file is still being written, or its writer died before finishing."""


class UnsafeFileError(FormatError):
    """A file points outside itself (external links, external storage, virtual datasets)."""


class AlignmentError(CKAOfflineError):
    """Two files do not hold the same examples, or shards do not fit together."""


class LayerSelectionError(CKAOfflineError):
    """A layer name or pattern matches nothing, or is ambiguous."""


class InputError(CKAOfflineError):
    """Model inputs cannot be read or do not fit the model."""


class ModelError(CKAOfflineError):
    """A model cannot be loaded or run."""


class PluginError(CKAOfflineError):
    """No extractor fits a source, several do, or a plugin is broken."""


class ActivationValueError(CKAOfflineError):
    """Activations hold NaN or Inf."""


class InsufficientDataError(CKAOfflineError):
    """Too few examples for the requested estimator (HSIC_1 needs at least 4 per minibatch)."""


class OutputError(CKAOfflineError):
    """An output cannot be written: it exists (use --overwrite), its folder is not writable, the disk is full."""


class DeviceError(CKAOfflineError):
    """A requested device (cuda, cuda:N) or execution provider is not available."""


class ResourceError(CKAOfflineError):
    """A computation would need more memory than allowed (for example the exact full-data estimator)."""


class ResumeError(CKAOfflineError):
    """An interrupted extraction cannot be resumed with the given model, inputs or options."""


class DistributedError(CKAOfflineError):
    """A rank of a torch.distributed run failed or disagrees with the others."""

    #: set on the ranks that are not rank 0: the CLI exits without printing (rank 0 says it once)
    quiet: bool = False


class NoExtractorError(PluginError):
    """No installed extractor can open a model source."""


class OptionError(CKAOfflineError):
    """An extractor or input-reader option is unknown or has a value of the wrong type (``-X``, ``-I``)."""

    exit_code = USAGE_EXIT_CODE
