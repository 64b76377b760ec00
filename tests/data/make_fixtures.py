"""Writes the files the data tests read, into the folder given as the only argument.

The values follow closed forms that the C++ tests recompute, so every check is exact:
- h5py files (the Python side of the format): chunked, gzip + shuffle, float16, uint16, lzf;
- inputs for h5shard (IDX gzip pair, CSV table, text files) for the round-trip tests;
- bad files, one per row of the bad-input table.
"""
import gzip
import os
import struct
import sys

import h5py
import numpy as np


def idx_bytes(array):
    codes = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def main(out):
    os.makedirs(out, exist_ok=True)
    path = lambda name: os.path.join(out, name)

    # Classification as h5py writes it: float32 inputs[i, r, c] = 100 i + 10 r + c,
    # int16 targets[i] = (37 i) % 1000 - 500, chunks of 16 rows, gzip 6 + shuffle.
    n = 103
    i = np.arange(n)
    inputs = (100 * i[:, None, None] + 10 * np.arange(3)[None, :, None] + np.arange(5)[None, None, :]).astype(np.float32)
    targets = ((37 * i) % 1000 - 500).astype(np.int16)
    with h5py.File(path("h5py_gzip.h5"), "w") as f:
        f.create_dataset("inputs", data=inputs, chunks=(16, 3, 5), compression="gzip", compression_opts=6, shuffle=True)
        f.create_dataset("targets", data=targets, chunks=(16,), compression="gzip", shuffle=True)

    # float16 inputs[i, k] = i + k / 2 and uint16 targets[i] = 60000 + i (widened to int64).
    m = 40
    with h5py.File(path("h5py_half.h5"), "w") as f:
        half = (np.arange(m)[:, None] + np.arange(2)[None, :] / 2).astype(np.float16)
        f.create_dataset("inputs", data=half, chunks=(8, 2), compression="gzip", shuffle=True)
        f.create_dataset("targets", data=(60000 + np.arange(m)).astype(np.uint16), chunks=(8,), compression="gzip")

    # A uint16 token stream: tokens[t] = (7 t) % 65536, chunks of 64.
    t = np.arange(1001)
    with h5py.File(path("h5py_tokens.h5"), "w") as f:
        f.create_dataset("tokens", data=((7 * t) % 65536).astype(np.uint16), chunks=(64,), compression="gzip", shuffle=True)

    # Sample ids: inputs[i] = (i, -i) float32, targets[i] = i int64, chunks of 8 rows, gzip.
    ids = np.arange(100)
    with h5py.File(path("ids.h5"), "w") as f:
        f.create_dataset("inputs", data=np.stack([ids, -ids], 1).astype(np.float32), chunks=(8, 2), compression="gzip")
        f.create_dataset("targets", data=ids.astype(np.int64), chunks=(8,), compression="gzip")

    # A filter this HDF5 build does not have.
    with h5py.File(path("lzf.h5"), "w") as f:
        f.create_dataset("inputs", data=inputs, chunks=(16, 3, 5), compression="lzf")
        f.create_dataset("targets", data=targets)

    # --- Bad input, one file per problem ---------------------------------------------------
    with open(path("not_hdf5.h5"), "wb") as f:
        f.write(b"this is plain text, not HDF5\n" * 10)
    whole = open(path("h5py_gzip.h5"), "rb").read()
    with open(path("truncated.h5"), "wb") as f:
        f.write(whole[: len(whole) // 2])
    with h5py.File(path("missing_targets.h5"), "w") as f:
        f.create_dataset("inputs", data=inputs)
    with h5py.File(path("rows_disagree.h5"), "w") as f:
        f.create_dataset("inputs", data=inputs[:10])
        f.create_dataset("targets", data=targets[:9])
    with h5py.File(path("string_dtype.h5"), "w") as f:
        f.create_dataset("inputs", data=np.array([b"abcd"] * 10, dtype="S4"))
        f.create_dataset("targets", data=targets[:10])
    with h5py.File(path("zero.h5"), "w") as f:
        f.create_dataset("inputs", shape=(0, 4), dtype=np.float32)
        f.create_dataset("targets", shape=(0,), dtype=np.int64)
    with h5py.File(path("short_tokens.h5"), "w") as f:
        f.create_dataset("tokens", data=np.arange(5, dtype=np.uint8))

    # --- Inputs for h5shard ------------------------------------------------------------------
    # IDX: images[i, r, c] = (12 i + 3 r + c) % 256 (50 x 4 x 3), labels[i] = i % 10.
    images = ((12 * np.arange(50)[:, None, None] + 3 * np.arange(4)[None, :, None] + np.arange(3)[None, None, :]) % 256).astype(np.uint8)
    labels = (np.arange(50) % 10).astype(np.uint8)
    with gzip.open(path("images-idx3-ubyte.gz"), "wb") as f:
        f.write(idx_bytes(images))
    with gzip.open(path("labels-idx1-ubyte.gz"), "wb") as f:
        f.write(idx_bytes(labels))
    with gzip.open(path("labels-short-idx1-ubyte.gz"), "wb") as f:
        f.write(idx_bytes(labels[:49]))
    blob = gzip.compress(idx_bytes(images))
    with open(path("images-truncated.gz"), "wb") as f:
        f.write(blob[: len(blob) // 2])

    # CSV: x = i / 4, y = -i, label "cat"/"dog"/"emu" by i % 3; a header line.
    with open(path("table.csv"), "w") as f:
        f.write("x,y,animal\n")
        for r in range(30):
            f.write(f"{r / 4},{-r},{['cat', 'dog', 'emu'][r % 3]}\n")
    with open(path("empty.csv"), "w") as f:
        f.write("x,y,label\n")

    # Text: two files, character level.
    with open(path("a.txt"), "w") as f:
        f.write("hello world\n" * 20)
    with open(path("b.txt"), "w") as f:
        f.write("héllo wörld\n" * 20)


if __name__ == "__main__":
    main(sys.argv[1])
