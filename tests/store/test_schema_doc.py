"""docs/format.md and store/schema.py must name the same keys."""

import os
import re

from cka_offline.store import schema

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "format.md")


def _table_keys(section: str) -> set[str]:
    text = open(DOC, encoding="utf-8").read()
    body = text.split(section, 1)[1]
    body = body.split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z_0-9]+)` \|", body, flags=re.M))


def test_root_attributes_match():
    assert _table_keys("## Root attributes") == set(schema.REQUIRED_ROOT_ATTRS) | set(schema.OPTIONAL_ROOT_ATTRS)


def test_required_root_attributes_marked_must():
    text = open(DOC, encoding="utf-8").read().split("## Root attributes", 1)[1].split("\n## ", 1)[0]
    must = set(re.findall(r"^\| `([a-z_0-9]+)` \| [^|]+ \| MUST \|", text, flags=re.M))
    assert must == set(schema.REQUIRED_ROOT_ATTRS)


def test_layer_attributes_and_reductions_match():
    keys = _table_keys("## `/layers/LNNNN`")
    assert set(schema.REQUIRED_LAYER_ATTRS) <= keys
    assert keys - set(schema.REQUIRED_LAYER_ATTRS) - set(schema.OPTIONAL_LAYER_ATTRS) == set(schema.REDUCTIONS)


def test_layer_attributes_marked_must_are_the_required_ones():
    text = open(DOC, encoding="utf-8").read().split("## `/layers/LNNNN`", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `([a-z_0-9]+)` \| [^|]+ \| (MUST|SHOULD|MAY) \|", text, flags=re.M))
    assert {k for k, v in rows.items() if v == "MUST"} == set(schema.REQUIRED_LAYER_ATTRS)
    assert {k for k, v in rows.items() if v != "MUST"} == set(schema.OPTIONAL_LAYER_ATTRS)


def test_names_and_version_match():
    text = open(DOC, encoding="utf-8").read()
    assert f"# The activation file format, version {schema.FORMAT_VERSION}" in text
    assert f"exactly `{schema.FORMAT_NAME}`" in text
    assert f"this document: `{schema.FORMAT_VERSION}`" in text
    assert f"`golden_v{schema.FORMAT_VERSION.replace('.', '_')}.h5`" in text
    assert f"`/{schema.IDS_DATASET}`" in text and schema.LAYER_KEY_FORMAT.format(0) in text
