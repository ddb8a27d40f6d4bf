"""The notebook workflow end to end: two live modules, a DataLoader of dict batches, extraction to files,
analysis from memory and from files, a DataFrame and an xarray Dataset with layer names, the heatmap
drawn into a given axis, and progress lines in a log that is not a terminal. Plus every kind of batch
iterable ``extract`` takes and the loaders it must refuse."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import cka_offline as ck
from cka_offline.batch_inputs import BatchInputs
from cka_offline.errors import InputError
from cka_offline.store.reader import open_activations

from .cka.reference import cka_debiased

N = 96


class Pictures(Dataset):
    """A map-style dataset of dict examples, as a notebook would write: an image, a string id, a label."""

    def __init__(self, n: int = N, seed: int = 0, augment: bool = False) -> None:
        self.x = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
        self.augment = augment

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        x = self.x[i] + (torch.randn(()) if self.augment else 0)  # a "random augmentation"
        return {"pixels": x, "id": f"img{i:04d}", "label": i % 3}


def small_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(384, 5),
    ).eval()


def hooked_forward(model: nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, np.ndarray]:
    """The layers' outputs from a plain forward pass with hooks, flattened, in float64: the reference."""
    out: dict[str, np.ndarray] = {}
    modules = dict(model.named_modules())
    hooks = [
        modules[n].register_forward_hook(
            lambda m, i, o, n=n: out.__setitem__(n, o.detach().double().flatten(1).numpy())
        )
        for n in names
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return out


def test_two_live_models_over_a_dataloader_of_dict_batches(tmp_path, capsys):
    data = Pictures()
    loader = DataLoader(data, batch_size=20)  # 96 = 4 x 20 + 16: the last batch is short
    model_a, model_b = small_cnn(1), small_cnn(2)
    layers = ["0", "2", "5"]
    path_a = ck.extract(model_a, loader, tmp_path / "a.h5", layers=layers, batch_size=32)
    path_b = ck.extract(model_b, loader, tmp_path / "b.h5", layers=layers, batch_size=32)

    expected_ids = [f"img{i:04d}" for i in range(N)]
    ref_a, ref_b = hooked_forward(model_a, data.x, layers), hooked_forward(model_b, data.x, layers)
    with open_activations(path_a) as f:
        assert f.ids.tolist() == expected_ids  # ids from the loader's "id" entry; "label" is not an input
        for name in layers:
            np.testing.assert_allclose(f.read(name, 0, N), ref_a[name], rtol=1e-5, atol=1e-6)

    # one minibatch of all examples: minibatch CKA is the unbiased CKA of the whole set
    from_files = ck.analyze([path_a, path_b], batch_size=N, precision="float64", progress=False)
    from_memory = ck.analyze(
        [ck.Activations(ref_a, expected_ids, label="A"), ck.Activations(ref_b, expected_ids, label="B")],
        batch_size=N,
        precision="float64",
        progress=False,
    )
    reference = np.array([[cka_debiased(ref_a[x], ref_b[y]) for y in layers] for x in layers])
    np.testing.assert_allclose(from_memory.matrix(0, 1), reference, rtol=0, atol=1e-10)
    np.testing.assert_allclose(from_files.matrix(0, 1), reference, rtol=0, atol=1e-5)  # stored as float32

    frame = from_files.to_pandas(0, 1)
    assert list(frame.index) == layers and list(frame.columns) == layers
    np.testing.assert_allclose(frame.to_numpy(), from_files.matrix(0, 1))
    dataset = from_files.to_xarray()
    assert {"cka", "se", "low", "high"} <= set(dataset.data_vars)
    assert any(list(map(str, dataset[d].values)) == layers for d in dataset.dims)

    fig, ax = plt.subplots()
    returned = ck.plot_heatmap(from_files, i=0, j=1, ax=ax)
    assert returned is fig and ax.images and [t.get_text() for t in ax.get_xticklabels()] == layers
    plt.close(fig)

    # the default progress=True drew bars; stderr is not a terminal here, so they are whole lines
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(("extracting", "analyzing"))]
    assert any(line.startswith("extracting") and f"{N}/{N}" in line for line in lines)
    # the loader's first read (count, ids, fingerprint) has its own bar: 5 batches of 20, 20, 20, 20, 16
    assert any(line.startswith("reading batches") and "5/5" in line for line in err.splitlines())
    assert "\r" not in err


def test_compare_takes_a_dataloader_and_gives_the_same_numbers(tmp_path):
    loader = DataLoader(Pictures(), batch_size=25)
    a, b = small_cnn(1), small_cnn(2)
    result = ck.compare(a, b, loader, layers=["0", "5"], m=N, precision="float64", progress=False)
    x = Pictures().x
    ref_a, ref_b = hooked_forward(a, x, ["0", "5"]), hooked_forward(b, x, ["0", "5"])
    expected = [[cka_debiased(ref_a[p], ref_b[q]) for q in ("0", "5")] for p in ("0", "5")]
    np.testing.assert_allclose(result.matrix(0, 1), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["tuples", "list", "generator", "tensors"])
def test_every_kind_of_batch_iterable(tmp_path, kind):
    x = torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    y = torch.arange(40) % 2
    pieces = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 40, 16)]
    batches = {
        "tuples": DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16),  # (x, y) batches
        "list": [list(p) for p in pieces],
        "generator": (p for p in pieces),
        "tensors": [p[0] for p in pieces],
    }[kind]
    model = small_cnn(3)
    path = ck.extract(model, batches, tmp_path / "a.h5", layers=["5"], progress=False)
    with open_activations(path) as f:
        assert f.ids.tolist() == list(range(40))  # no ids in the batches: 0..n-1 in the loader's order
        np.testing.assert_allclose(f.read("5", 0, 40), hooked_forward(model, x, ["5"])["5"], rtol=1e-5, atol=1e-6)


def test_the_parts_of_a_batch_can_be_chosen(tmp_path):
    x = torch.randn(30, 3, 8, 8)
    ids = torch.arange(1000, 1030)
    loader = [(ids[i : i + 10], x[i : i + 10]) for i in range(0, 30, 10)]  # (id, input) tuples
    path = ck.extract(
        small_cnn(0), loader, tmp_path / "a.h5", layers=["5"], input_options={"input": 1, "ids": 0}, progress=False
    )
    with open_activations(path) as f:
        assert f.ids.tolist() == list(range(1000, 1030))
    with pytest.raises(InputError, match=r"input=0\.\.1"):
        ck.extract(small_cnn(0), loader, tmp_path / "b.h5", input_options={"input": 5}, progress=False)
    with pytest.raises(InputError, match="do not apply to a DataLoader"):
        ck.extract(small_cnn(0), loader, tmp_path / "c.h5", input_options={"resize": "8x8"}, progress=False)
    dict_batches = [{"image": x[:10], "name": [f"n{i}" for i in range(10)]}]
    with pytest.raises(InputError, match="not numeric"):
        ck.extract(small_cnn(0), dict_batches, tmp_path / "d.h5", input_options={"input": "name"}, progress=False)


def test_loaders_that_cannot_be_replayed_are_refused_clearly(tmp_path):
    shuffled = DataLoader(torch.utils.data.TensorDataset(torch.randn(30, 3, 8, 8)), batch_size=10, shuffle=True)
    with pytest.raises(InputError, match=r"at random \(shuffle=True\) and gives no example ids.*shuffle=False"):
        ck.extract(small_cnn(0), shuffled, tmp_path / "a.h5", progress=False)
    # any order that is not sequential: a weighted or custom sampler, also behind a batch_sampler
    data = torch.utils.data.TensorDataset(torch.randn(30, 3, 8, 8))
    weighted = torch.utils.data.WeightedRandomSampler(torch.ones(30), 30, replacement=False)
    batched = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(data), 10, drop_last=False)
    for loader, name in ((DataLoader(data, sampler=weighted), "WeightedRandomSampler"),
                         (DataLoader(data, batch_sampler=batched), "RandomSampler")):  # fmt: skip
        with pytest.raises(InputError, match=f"orders its examples at random .*{name}|shuffle=True"):
            ck.extract(small_cnn(0), loader, tmp_path / "w.h5", progress=False)
    with pytest.raises(InputError, match="one-shot iterator"):
        ck.compare(small_cnn(0), small_cnn(1), (b for b in [torch.randn(8, 3, 8, 8)]), progress=False)

    # ids from the batches and small enough to keep: one read, so shuffling is harmless ...
    shuffled_ids = DataLoader(Pictures(30), batch_size=10, shuffle=True)
    path = ck.extract(small_cnn(0), shuffled_ids, tmp_path / "b.h5", layers=["5"], progress=False)
    with open_activations(path) as f:
        order = [int(i[3:]) for i in f.ids.tolist()]
        assert sorted(order) == list(range(30)) and order != list(range(30))
        np.testing.assert_allclose(
            f.read("5", 0, 30), hooked_forward(small_cnn(0), Pictures(30).x[order], ["5"])["5"], rtol=1e-5, atol=1e-6
        )
    # ... but it cannot be resumed or sharded: the next read gives another order
    with pytest.raises(InputError, match="cannot resume from .*shuffle=True"):
        ck.extract(small_cnn(0), shuffled_ids, tmp_path / "c.h5", resume=True, progress=False)
    with pytest.raises(InputError, match="cannot write shards"):
        ck.extract(small_cnn(0), shuffled_ids, tmp_path / "d.h5", shard=(0, 2), progress=False)


def test_batches_read_twice_must_be_the_same(tmp_path):
    # too large to keep (cache_bytes=0): the loader is read again while the model runs, and checked
    steady = BatchInputs(DataLoader(Pictures(40), batch_size=16), cache_bytes=0)
    assert len(steady) == 40 and steady.read(10, 35)["pixels"].shape == (25, 3, 8, 8)
    np.testing.assert_array_equal(steady.read(0, 40)["pixels"], Pictures(40).x.numpy())
    augmenting = BatchInputs(DataLoader(Pictures(40, augment=True), batch_size=16), cache_bytes=0)
    with pytest.raises(InputError, match="batch 0 .*differs from the first time.*augmentation"):
        augmenting.read(0, 16)
    with pytest.raises(InputError, match="one-shot iterator"):
        BatchInputs((b for b in [np.zeros((4, 2), np.float32)] * 3), cache_bytes=0)


def test_a_deterministic_loader_resumes_to_the_same_file(tmp_path):
    loader = DataLoader(Pictures(60), batch_size=16)
    model = small_cnn(4)
    whole = ck.extract(model, loader, tmp_path / "whole.h5", layers=["2"], batch_size=16, progress=False)

    calls = []

    def stop_after_two(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) == 3:
            raise KeyboardInterrupt

    target = tmp_path / "resumed.h5"
    with pytest.raises(KeyboardInterrupt):
        ck.extract(model, loader, target, layers=["2"], batch_size=16, progress=stop_after_two)
    ck.extract(model, loader, target, layers=["2"], batch_size=16, resume=True, progress=False)
    with open_activations(whole) as a, open_activations(target) as b:
        assert a.ids.tolist() == b.ids.tolist()
        np.testing.assert_array_equal(a.read("2", 0, 60), b.read("2", 0, 60))
