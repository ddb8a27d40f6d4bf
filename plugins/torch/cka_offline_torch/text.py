"""Text inputs: a ``.txt`` file (one example per line), ``.jsonl`` or ``.csv``/``.tsv`` with a text column,
tokenized with a transformers tokenizer into ``input_ids``, ``attention_mask`` (and ``token_type_ids`` where
the tokenizer gives them).

With an ``hf:`` model the model's own tokenizer is used; for any other model give ``-I tokenizer=FOLDER``
(or ``hf:ORG/NAME``). Options (``-I key=value``): ``text_column`` (default ``text``), ``id_column``
(default: none, the ids are 0-based line numbers of the file: the line of a ``.txt`` or ``.jsonl``, the
record of a ``.csv`` after its header), ``max_length`` (truncation; default the tokenizer's
``model_max_length``), ``padding`` (``longest``: every example padded to the longest tokenized text of
the file, at most ``max_length``, so every batch has one shape; ``max_length``: padded to ``max_length``),
``padding_side`` (``left``/``right``, default the tokenizer's). Blank lines of a ``.txt``/``.jsonl`` are
skipped (a warning says how many); the ids of the others stay their line numbers.

The texts are read once when the reader opens (a few bytes per example); the tokens of a batch are made
when it is read. The fingerprint covers the file, the tokenizer's files and every tokenization setting,
so ``--resume`` and ``--shard`` treat another tokenizer, ``max_length`` or padding as other inputs.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import hashlib
import json
import logging
import os
import re
from typing import Any

import numpy as np

from cka_offline.errors import InputError
from cka_offline.extractor import InputReader, Option, sha256_path

from .hf import PREFIX, Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

LINE_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
TABLE_SUFFIXES = (".csv", ".tsv")
#: the longest ``max_length`` taken from a tokenizer's ``model_max_length`` (larger means "not set")
_UNSET_LIMIT = 1_000_000
_INT = re.compile(r"^[+-]?\d+$")


class TextInputs(InputReader):
    """Texts tokenized into ``input_ids`` + ``attention_mask`` (see the module docstring)."""

    name = "text"
    description = "text: .txt (one example per line), .jsonl or .csv with a text column, tokenized (-I tokenizer=)"
    declared_options = (
        Option("text_column", str, "text", "the .jsonl key / .csv column holding the text"),
        Option("id_column", str, None, "the .jsonl key / .csv column holding example ids (default: line numbers)"),
        Option("max_length", int, None, "tokens per example at most (truncation); default the tokenizer's", minimum=1),
        Option(
            "padding",
            str,
            "longest",
            "longest: pad to the longest text of the file; max_length: pad to max_length",
            choices=("longest", "max_length"),
        ),
        Option("padding_side", str, None, "left or right (default: the tokenizer's)", choices=("left", "right")),
        Option("tokenizer", str, None, "a transformers tokenizer folder or hub name (default: an hf: model's own)"),
    )

    @classmethod
    def can_open(cls, path: str) -> bool:
        return isinstance(path, str) and path.lower().endswith(LINE_SUFFIXES + JSONL_SUFFIXES + TABLE_SUFFIXES)

    def __init__(
        self,
        path: str,
        *,
        tokenizer_object: Tokenizer | None = None,
        position_limit: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(path, **options)
        values = self.option_values
        if not os.path.isfile(path):
            raise InputError(f"text inputs {path} not found; check the path")
        named = values["tokenizer"]
        if named:
            name = named[len(PREFIX) :] if named.startswith(PREFIX) else named
            tokenizer_object = load_tokenizer(name)
        if tokenizer_object is None:
            raise InputError(
                f"text inputs {path} need a tokenizer: use an hf: model (its tokenizer is used) or give "
                "-I tokenizer=FOLDER (a transformers tokenizer folder or hub name)"
            )
        tok = tokenizer_object.tokenizer
        if tok.pad_token is None:
            if tok.eos_token is None:
                raise InputError(f"tokenizer {tokenizer_object.name} has no padding token; texts cannot be batched")
            # GPT-style tokenizers have none: pad with the end token (the mask hides it), on a copy, so the
            # caller's tokenizer is left as it is
            tok = copy.deepcopy(tok)
            tok.pad_token = tok.eos_token
            tokenizer_object = dataclasses.replace(tokenizer_object, tokenizer=tok)
        self.tokenizer = tokenizer_object
        self.padding_side: str = values["padding_side"] or tok.padding_side
        self.padding: str = values["padding"]
        self.max_length = self._max_length(values["max_length"], position_limit)
        self._texts, self._ids = self._read(path, values["text_column"], values["id_column"])
        self.length = self.max_length if self.padding == "max_length" else self._longest()

    # ---------------------------------------------------------------------------------------- reading

    def _max_length(self, given: int | None, limit: int | None) -> int:
        tok = self.tokenizer.tokenizer
        if given is None:
            model_max = getattr(tok, "model_max_length", None)
            if not isinstance(model_max, int) or model_max > _UNSET_LIMIT:
                raise InputError(
                    f"tokenizer {self.tokenizer.name} does not say how many tokens its model takes; give "
                    "-I max_length=N for the text inputs"
                )
            given = model_max
        if limit is not None and given > limit:
            raise InputError(
                f"max_length {given} for text inputs {self.path} exceeds the {limit} positions the model has "
                f"(max_position_embeddings); give -I max_length={limit} or less"
            )
        return int(given)

    def _read(self, path: str, text_column: str, id_column: str | None) -> tuple[list[str], np.ndarray]:
        lower = path.lower()
        given = {k for k in ("text_column", "id_column") if k in self.options}
        if lower.endswith(LINE_SUFFIXES):
            if given:
                raise InputError(
                    f"{', '.join(sorted(given))} apply to .jsonl/.csv inputs; {path} is plain text, one example "
                    "per line (ids: 0-based line numbers)"
                )
            rows = [(n, line) for n, line in enumerate(_lines(path)) if line.strip()]
            self._warn_blank(path, rows, line_ids=True)
            return [t for _, t in rows], np.asarray([n for n, _ in rows], dtype=np.int64)
        if lower.endswith(JSONL_SUFFIXES):
            return self._read_jsonl(path, text_column, id_column)
        return self._read_table(path, text_column, id_column, "\t" if lower.endswith(".tsv") else ",")

    def _warn_blank(self, path: str, rows: list[tuple[int, Any]], *, line_ids: bool) -> None:
        total = rows[-1][0] + 1 if rows else 0
        if len(rows) < total:
            ids = "; the ids of the others are their 0-based line numbers" if line_ids else ""
            log.warning("%s: skipped %d blank line(s)%s", path, total - len(rows), ids)
        if not rows:
            raise InputError(f"{path} holds no text (every line is blank)")

    def _read_jsonl(self, path: str, text_column: str, id_column: str | None) -> tuple[list[str], np.ndarray]:
        texts: list[str] = []
        ids: list[Any] = []
        numbers: list[tuple[int, None]] = []
        for n, line in enumerate(_lines(path)):
            if not line.strip():
                continue
            where = f"line {n + 1} of {path}"  # as editors count lines; the id of line n + 1 is n
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise InputError(f"{where} is not valid JSON ({exc}); write one JSON object per line") from None
            if not isinstance(record, dict):
                raise InputError(f"{where} is a JSON {type(record).__name__}, not an object")
            texts.append(_text(record, text_column, where, sorted(record)))
            ids.append(_id(record, id_column, where, sorted(record)) if id_column else n)
            numbers.append((n, None))
        self._warn_blank(path, numbers, line_ids=not id_column)
        return texts, _ids_array(ids, path)

    def _read_table(
        self, path: str, text_column: str, id_column: str | None, delimiter: str
    ) -> tuple[list[str], np.ndarray]:
        try:
            with open(path, encoding="utf-8-sig", newline="") as fh:
                reader = csv.DictReader(fh, delimiter=delimiter)
                columns = list(reader.fieldnames or [])
                for column in (text_column, id_column):
                    if column and column not in columns:
                        raise InputError(
                            f"{path} has no column {column!r} (columns: {', '.join(columns) or 'none'}); "
                            f"name it with -I {'text' if column == text_column else 'id'}_column=NAME"
                        )
                texts, ids = [], []
                for n, record in enumerate(reader):
                    where = f"record {n} (line {reader.line_num}) of {path}"
                    texts.append(_text(record, text_column, where, columns))
                    ids.append(_id(record, id_column, where, columns) if id_column else n)
        except UnicodeDecodeError as exc:
            raise InputError(f"{path} is not UTF-8 text ({exc}); save it as UTF-8") from None
        except csv.Error as exc:
            kind = "TSV" if delimiter == "\t" else "CSV"
            raise InputError(f"{path} is not a readable {kind} file: {exc}") from None
        if not texts:
            raise InputError(f"{path} has a header but no records")
        if id_column and all(isinstance(i, str) and _INT.match(i) and str(int(i)) == i for i in ids):
            # integer ids in a CSV are read as integers, as in .npz ids -- only when every one is written as
            # Python writes it: "007" or "+7" as 7 would not be the id the file holds (and "7" and "007" would
            # become one id), so then every id stays text
            ids = [int(i) for i in ids]
        return texts, _ids_array(ids, path)

    def _longest(self) -> int:
        tok = self.tokenizer.tokenizer
        longest = 1
        for start in range(0, len(self._texts), 1024):
            encoded = tok(self._texts[start : start + 1024], truncation=True, max_length=self.max_length)
            longest = max(longest, *(len(ids) for ids in encoded["input_ids"]))
        return longest

    # ---------------------------------------------------------------------------------------- contract

    def __len__(self) -> int:
        return len(self._texts)

    def ids(self) -> np.ndarray:
        return self._ids

    def read(self, start: int, stop: int) -> dict[str, np.ndarray]:
        encoded = self.tokenizer.tokenizer(
            self._texts[start:stop],
            padding="max_length",
            padding_side=self.padding_side,
            truncation=True,
            max_length=self.length,
            return_tensors="np",
        )
        return {key: np.asarray(value, dtype=np.int64) for key, value in encoded.items()}

    def settings(self) -> dict[str, Any]:
        """What decides the tokens: tokenizer identity, lengths, padding and the columns."""
        values = self.option_values
        return {
            "tokenizer": self.tokenizer.name,
            "tokenizer_sha256": self.tokenizer.sha256,
            "max_length": self.max_length,
            "padding": self.padding,
            "padded_length": self.length,
            "padding_side": self.padding_side,
            "text_column": values["text_column"],
            "id_column": values["id_column"],
        }

    def fingerprint(self) -> dict[str, str]:
        settings = json.dumps(self.settings(), sort_keys=True)
        digest = hashlib.sha256(f"{sha256_path(self.path)}|{settings}".encode()).hexdigest()
        return {"description": f"{self.name}:{os.path.abspath(self.path)} {settings}", "sha256": digest}


def _lines(path: str) -> list[str]:
    """The lines of a UTF-8 file split at ``\\n`` only (a ``\\r`` before it is dropped), as editors number them."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        data = raw.decode("utf-8-sig")
    except OSError as exc:
        raise InputError(f"cannot read text inputs {path}: {exc}") from None
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1  # as editors count lines
        raise InputError(f"line {line} of {path} is not UTF-8 text ({exc.reason}); save the file as UTF-8") from None
    lines = data.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _text(record: dict[str, Any], column: str, where: str, keys: list[str]) -> str:
    if column not in record:
        raise InputError(
            f"{where} has no {column!r} (keys: {', '.join(map(str, keys)) or 'none'}); name the text with "
            "-I text_column=NAME"
        )
    value = record[column]
    if not isinstance(value, str):
        raise InputError(f"{where}: {column!r} is a {type(value).__name__}, not text")
    return value


def _id(record: dict[str, Any], column: str, where: str, keys: list[str]) -> Any:
    if column not in record or record[column] in (None, ""):
        raise InputError(
            f"{where} has no id in {column!r} (keys: {', '.join(map(str, keys))}); every example needs one"
        )
    value = record[column]
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InputError(f"{where}: id {value!r} in {column!r} must be an integer or a string")
    return value


def _ids_array(ids: list[Any], path: str) -> np.ndarray:
    kinds = {type(i) for i in ids}
    if len(kinds) > 1:
        raise InputError(f"the ids in {path} mix integers and strings; use one kind for every example")
    if kinds == {int}:
        too_big = next((i for i in ids if not -(2**63) <= i < 2**63), None)
        if too_big is not None:
            raise InputError(
                f"example id {too_big} in {path} does not fit in 64-bit signed integers, which activation files "
                "store; quote the ids so they are read as text, or renumber them"
            )
    return np.asarray(ids, dtype=np.int64 if kinds == {int} else str)


__all__ = ["TextInputs"]
