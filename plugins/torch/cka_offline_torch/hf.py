"""Hugging Face ``transformers`` models as torch sources: ``hf:FOLDER`` or ``hf:ORG/NAME``.

``hf:FOLDER`` loads a folder written by ``save_pretrained`` (``config.json``, weights, tokenizer files);
``hf:ORG/NAME[@REVISION]`` resolves the name to a snapshot folder in the Hugging Face cache (downloaded
where the hub is reachable; with ``HF_HUB_OFFLINE=1`` only what is cached). The model is
``AutoModel.from_pretrained`` of that folder (the base model: a classification or LM head is dropped), its
tokenizer ``AutoTokenizer.from_pretrained`` of the same folder, so blocks are named as in transformers
(``embeddings``, ``encoder.layer.3``).

Security: weights are read from safetensors only (``use_safetensors=True``); a folder with only a pickle
checkpoint (``pytorch_model.bin``) needs ``allow_pickle_code_execution``. A model or tokenizer that brings
its own Python code (``auto_map`` in its config) is refused unless ``trust_remote_code=true``.

Identity (provenance and the resume/shard checks): ``model_sha256`` covers ``config.json`` and the weights
as loaded (their tensors, whatever the file layout); the tokenizer's files are recorded with the inputs
(:mod:`.text`). Importing this module is cheap: torch and transformers are imported inside functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from cka_offline.errors import InputError, ModelError
from cka_offline.extractor import InputReader, Option, sha256_path

from .binding import module_signature
from .extractor import TorchExtractor
from .identity import state_sha256

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PREFIX = "hf:"
SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
#: files that define a tokenizer (hashed for its identity when present)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
#: what is fetched of a hub repository (no ONNX/OpenVINO/TF/Flax copies, no pickles unless allowed)
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_PICKLE_HINT = "only if you trust the file, pass --allow-pickle-code-execution (-X allow_pickle_code_execution=true)"
_CODE_HINT = "only if you trust its code, pass -X trust_remote_code=true"


def is_hf_source(source: Any) -> bool:
    """Whether ``source`` is spelled ``hf:NAME_OR_PATH`` (nothing is opened)."""
    return isinstance(source, str) and source.strip().startswith(PREFIX)


def hf_name(source: str) -> str:
    """The folder or hub name of an ``hf:`` source."""
    return source.strip()[len(PREFIX) :]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class HFFolder:
    """A resolved ``hf:`` source: the local folder and, for a hub name, the name and snapshot commit."""

    source: str  # as given after "hf:"
    folder: str
    repo_id: str = ""
    revision: str = ""  # the snapshot's commit hash (hub names only)


def resolve(name: str, *, allow_pickle: bool = False, what: str = "model") -> HFFolder:
    """The local folder of ``name``: an existing folder as it is, or a hub name resolved in the cache
    (downloading the files a model needs where the hub is reachable)."""
    if not name:
        raise ModelError("hf: needs a folder or a model name, e.g. hf:path/to/folder or hf:bert-base-uncased")
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return HFFolder(name, os.path.abspath(expanded))
    if os.path.exists(expanded):
        raise ModelError(
            f"hf:{name} is a file, not a folder; give the folder written by save_pretrained (with config.json)"
        )
    repo_id, _, revision = name.partition("@")
    looks_like_path = name.startswith((".", "/", "~")) or os.sep in name.strip("/").replace("/", "", 1)
    if looks_like_path or not _HUB_NAME.match(repo_id):
        raise ModelError(f"hf:{name}: no such folder; check the path (a hub name looks like ORG/NAME)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    patterns = _HUB_PATTERNS + (["*.bin"] if allow_pickle else [])
    offline = _offline()
    try:
        folder = snapshot_download(
            repo_id, revision=revision or None, allow_patterns=patterns, local_files_only=offline
        )
    except LocalEntryNotFoundError:
        raise ModelError(
            f"hf:{name} is not a folder and not in the Hugging Face cache, and downloads are off "
            f"(HF_HUB_OFFLINE=1); give a local folder (hf:path/to/folder) or download the {what} where the hub "
            f"is reachable (huggingface-cli download {repo_id})"
        ) from None
    except HFValidationError as exc:
        raise ModelError(f"hf:{name} is not a valid model name ({exc}); give ORG/NAME or a folder") from None
    except Exception as exc:  # network errors, unknown repositories, gated models
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelError(
            f"hf:{name} could not be fetched from the Hugging Face hub: {type(exc).__name__}: {first}; check the "
            "name (and HF_TOKEN for a gated model), or give a local folder (hf:path/to/folder)"
        ) from None
    return HFFolder(name, str(folder), repo_id=repo_id, revision=os.path.basename(os.path.normpath(folder)))


def _read_json(path: str, where: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            loaded = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} ({where}) is not readable JSON: {exc}") from None
    if not isinstance(loaded, dict):
        raise ModelError(f"{path} ({where}) must hold a JSON object")
    return loaded


def _refuse_code(config: Mapping[str, Any], path: str, name: str, trust_remote_code: bool) -> None:
    auto_map = config.get("auto_map")
    if auto_map and not trust_remote_code:
        classes = ", ".join(sorted(map(str, auto_map.values() if isinstance(auto_map, dict) else auto_map)))[:200]
        raise ModelError(
            f"hf:{name} brings its own Python code ({os.path.basename(path)} auto_map: {classes}), which would run "
            f"when loaded; {_CODE_HINT}"
        )


def weights_format(folder: str, name: str, allow_pickle: bool) -> str:
    """``"safetensors"`` or (opted in) ``"pickle"``: the checkpoint that will be loaded from ``folder``."""
    present = set(os.listdir(folder))
    if present & set(SAFETENSORS_FILES):
        return "safetensors"
    if present & set(PICKLE_FILES):
        if not allow_pickle:
            found = sorted(present & set(PICKLE_FILES))[0]
            raise ModelError(
                f"hf:{name} has only a pickle checkpoint ({found}), which can run code when loaded; convert it to "
                f"safetensors (model.save_pretrained(folder) writes model.safetensors), or {_PICKLE_HINT}"
            )
        return "pickle"
    raise ModelError(
        f"hf:{name} has no model weights ({' or '.join(SAFETENSORS_FILES)}) in {folder}; "
        "save the model with model.save_pretrained(folder)"
    )


def folder_sha256(folder: str, names: tuple[str, ...]) -> str:
    """SHA-256 over the files of ``names`` present in ``folder`` (each name and its content digest)."""
    digest = hashlib.sha256()
    for fname in names:
        path = os.path.join(folder, fname)
        if os.path.isfile(path):
            digest.update(f"{fname}:{sha256_path(path)}|".encode())
    return digest.hexdigest()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No transformers progress bar ("Loading weights") on the terminal while a model loads: the command
    draws its own; transformers' setting is put back afterwards."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


@dataclass
class LoadedModel:
    """A model loaded from an ``hf:`` source, with what identifies it."""

    model: Any
    where: HFFolder
    weights: str  # "safetensors" or "pickle"
    config_sha256: str
    weights_sha256: str = ""
    extras: dict[str, str] = field(default_factory=dict)


def load_model(name: str, *, allow_pickle: bool, trust_remote_code: bool) -> LoadedModel:
    """``AutoModel.from_pretrained`` of the resolved folder, safetensors only unless ``allow_pickle``."""
    where = resolve(name, allow_pickle=allow_pickle)
    config_path = os.path.join(where.folder, "config.json")
    if not os.path.isfile(config_path):
        raise ModelError(
            f"hf:{name} has no config.json in {where.folder}; give a folder written by model.save_pretrained()"
        )
    _refuse_code(_read_json(config_path, f"config of hf:{name}"), config_path, name, trust_remote_code)
    fmt = weights_format(where.folder, name, allow_pickle)
    from transformers import AutoModel

    try:
        with _quiet():
            model = AutoModel.from_pretrained(
                where.folder,
                use_safetensors=fmt == "safetensors",
                trust_remote_code=trust_remote_code,
                local_files_only=True,
            )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelError(
            f"transformers could not load hf:{name} with AutoModel: {type(exc).__name__}: {first}; check that the "
            "folder holds a complete transformers model (config.json and weights from save_pretrained)"
        ) from None
    return LoadedModel(model, where, fmt, sha256_path(config_path))


def load_tokenizer(name: str, *, trust_remote_code: bool = False, where: HFFolder | None = None) -> Tokenizer:
    """``AutoTokenizer.from_pretrained`` of the folder of ``name`` (resolved like a model)."""
    where = where or resolve(name, what="tokenizer")
    present = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(where.folder, f))]
    if not present:
        raise InputError(
            f"hf:{name} has no tokenizer files ({', '.join(TOKENIZER_FILES[:5])}, ...) in {where.folder}; "
            "save the tokenizer there with tokenizer.save_pretrained(folder), or give -I tokenizer=FOLDER"
        )
    config_path = os.path.join(where.folder, "tokenizer_config.json")
    if os.path.isfile(config_path):
        _refuse_code(_read_json(config_path, f"tokenizer of hf:{name}"), config_path, name, trust_remote_code)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            where.folder, trust_remote_code=trust_remote_code, local_files_only=True
        )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InputError(
            f"transformers could not load the tokenizer of hf:{name}: {type(exc).__name__}: {first}"
        ) from None
    return Tokenizer(tokenizer, name=f"hf:{name}", sha256=folder_sha256(where.folder, TOKENIZER_FILES))


@dataclass(frozen=True)
class Tokenizer:
    """A transformers tokenizer with its identity: where it came from and the SHA-256 of its files."""

    tokenizer: Any
    name: str
    sha256: str


class HFExtractor(TorchExtractor):
    """Hugging Face ``transformers`` models: ``hf:FOLDER`` or ``hf:ORG/NAME[@REVISION]`` (see :mod:`.hf`).

    Everything else is the torch extractor's: layers are the named submodules (``encoder.layer.3``),
    captured by forward hooks. Text inputs (``.txt``, ``.jsonl``, ``.csv``) are tokenized with the
    model's own tokenizer (:meth:`open_inputs`, :mod:`.text`).
    """

    name = "hf"
    description = (
        "Hugging Face transformers models: hf:FOLDER or hf:ORG/NAME (AutoModel, safetensors; "
        "text inputs .txt/.jsonl/.csv tokenized with its tokenizer)"
    )
    declared_options: ClassVar[tuple[Option, ...]] = (  # type: ignore[assignment]  # one option more
        *TorchExtractor.declared_options,
        Option(
            "trust_remote_code",
            bool,
            False,
            "true to load a model or tokenizer that brings its own Python code (auto_map in its "
            "config); that code runs on load, so only for models you trust",
        ),
    )

    @classmethod
    def can_open(cls, source: str) -> bool:
        return is_hf_source(source)

    def __init__(self, source: Any, *, device: str = "cpu", options: Mapping[str, Any] | None = None) -> None:
        if not is_hf_source(source):
            raise ModelError(f"{source!r} is not an hf: source; write hf:path/to/folder or hf:ORG/NAME")
        super().__init__(source, device=device, options=options)
        self.trust_remote_code: bool = self.option_values["trust_remote_code"]
        self._loaded: LoadedModel | None = None
        self._tokenizer: Tokenizer | None = None

    def _load(self) -> torch.nn.Module:
        if self._model is not None:
            return self._model
        loaded = self._loaded or load_model(
            hf_name(self.source), allow_pickle=self.allow_pickle, trust_remote_code=self.trust_remote_code
        )
        self._loaded = loaded
        model = loaded.model
        self._signature = module_signature(model)
        model = self._on_device(model)
        log.debug("loaded %s (%s) from %s on %s", self.source, type(model).__name__, loaded.where.folder, self._device)
        return model

    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer, from the same folder (loaded once)."""
        if self._tokenizer is None:
            self._load()
            assert self._loaded is not None
            self._tokenizer = load_tokenizer(
                hf_name(self.source), trust_remote_code=self.trust_remote_code, where=self._loaded.where
            )
        return self._tokenizer

    def open_inputs(self, path: str, options: Mapping[str, Any]) -> InputReader | None:
        """Text files (``.txt``, ``.jsonl``, ``.csv``) tokenized with this model's tokenizer (unless
        ``-I tokenizer=`` names another); ``None`` for any other inputs."""
        from .text import TextInputs

        if not TextInputs.can_open(path):
            return None
        model = self._load()
        limit = getattr(model.config, "max_position_embeddings", None)
        tokenizer = None if options.get("tokenizer") else self.tokenizer()
        return TextInputs(path, tokenizer_object=tokenizer, position_limit=limit, **options)

    def provenance(self) -> dict[str, str]:
        record = super().provenance()
        loaded = self._loaded
        assert loaded is not None  # super().provenance() loaded the model
        if not loaded.weights_sha256:  # the weights as loaded: every tensor, whatever the file layout
            loaded.weights_sha256 = record.get("model_state_sha256") or state_sha256(loaded.model)
        import transformers

        # the base identity (code: transformers' version and any user modules; state: every tensor as
        # loaded) plus the config, which decides what the code does with the weights
        combined = hashlib.sha256(f"config:{loaded.config_sha256}|identity:{record['model_sha256']}".encode())
        record["model_sha256"] = combined.hexdigest()
        record.update(
            {
                "hf_folder": loaded.where.folder,
                "hf_model_class": type(loaded.model).__name__,
                "hf_config_sha256": loaded.config_sha256,
                "hf_weights_sha256": loaded.weights_sha256,
                "hf_weights_format": loaded.weights,
                "transformers_version": transformers.__version__,
            }
        )
        if loaded.where.repo_id:
            record["hf_repo_id"] = loaded.where.repo_id
            record["hf_revision"] = loaded.where.revision
        if self._tokenizer is not None:
            record["hf_tokenizer_sha256"] = self._tokenizer.sha256
        return record


__all__ = [
    "HFExtractor",
    "HFFolder",
    "LoadedModel",
    "Tokenizer",
    "is_hf_source",
    "load_model",
    "load_tokenizer",
    "resolve",
]
