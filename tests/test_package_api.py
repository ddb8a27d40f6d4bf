"""The package's public API: what dir() shows is what can be imported from it."""

from __future__ import annotations

import cka_offline


def test_dir_lists_the_public_api():
    names = dir(cka_offline)
    assert names == sorted(cka_offline.__all__)
    assert {"extract", "analyze", "CKAResult", "load_result", "AnalysisOptions", "__version__"} <= set(names)
    for name in names:
        assert getattr(cka_offline, name) is not None
