"""Write the inputs the README's examples run on into a folder (nothing here is committed; it takes a second):

    python sample_data/make_examples.py examples

- ``examples/digits/<label>/<id>.png``: the first 300 digits of ``digits.npz`` as 8-bit PNGs in class-sorted
  folders, laid out as image datasets are (ImageFolder): the ids an image folder gives are these relative
  paths, read class by class;
- ``examples/sentences.txt``: 300 short English sentences, one example per line (ids: 0-based line numbers);
- ``examples/their_activations/``: what a collaborator might send: one ``.npy`` per layer for all 1797
  digits (random features of the pixels, seeded) and ``ids.txt`` with the digits' ids, one per line.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
N_IMAGES = 300
N_SENTENCES = 300

SUBJECTS = ("the cat", "a dog", "my neighbour", "the old teacher", "a small bird", "the engineer", "our team")
VERBS = ("sees", "likes", "follows", "draws", "remembers", "carries", "ignores")
OBJECTS = ("a red ball", "the river", "an open window", "the last train", "a quiet song", "the map", "two apples")
ENDINGS = ("", " every morning", " in the garden", " without a word", " after the rain", " at night")


def digits_images(out: str) -> None:
    from PIL import Image

    data = np.load(os.path.join(HERE, "digits.npz"))
    for i in range(N_IMAGES):
        folder = os.path.join(out, "digits", str(int(data["labels"][i])))
        os.makedirs(folder, exist_ok=True)
        pixels = np.round(data["pixels"][i, 0] * 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(os.path.join(folder, f"{int(data['ids'][i]):04d}.png"))


def sentences(out: str) -> None:
    rng = np.random.default_rng(0)
    with open(os.path.join(out, "sentences.txt"), "w", encoding="utf-8") as f:
        for _ in range(N_SENTENCES):
            parts = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)]
            f.write(" ".join(parts) + str(rng.choice(ENDINGS)) + ".\n")


def their_activations(out: str) -> None:
    data = np.load(os.path.join(HERE, "digits.npz"))
    x = data["pixels"].reshape(len(data["pixels"]), -1).astype(np.float64)
    rng = np.random.default_rng(1)
    folder = os.path.join(out, "their_activations")
    os.makedirs(folder, exist_ok=True)
    for name, width in (("block1", 32), ("block2", 16)):
        x = np.maximum(x @ rng.normal(size=(x.shape[1], width)) / np.sqrt(x.shape[1]), 0)
        np.save(os.path.join(folder, f"{name}.npy"), x.astype(np.float32))
    np.savetxt(os.path.join(folder, "ids.txt"), data["ids"], fmt="%d")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write (created)")
    out = parser.parse_args().out
    os.makedirs(out, exist_ok=True)
    digits_images(out)
    sentences(out)
    their_activations(out)
    print(f"wrote {out}/digits/ ({N_IMAGES} PNGs in 10 class folders), {out}/sentences.txt, {out}/their_activations/")


if __name__ == "__main__":
    main()
