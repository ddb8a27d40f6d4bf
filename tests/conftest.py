"""Session-wide test settings."""

from __future__ import annotations

import os
import tempfile

# Remembered file digests (cka_offline.digests) go to a fresh folder for each test session, never to the
# user's ~/.cache; subprocesses (the CLI tests) inherit it.
os.environ["CKA_OFFLINE_CACHE_DIR"] = tempfile.mkdtemp(prefix="cka-offline-test-cache-")
os.environ.pop("CKA_OFFLINE_HASH_CACHE", None)
