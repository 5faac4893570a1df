"""Synthetic M4 metadata and Parquet shard layouts shared by the engine tests, with plain
numpy references (independent of pym4) for the weighted counts."""
from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

VOCAB = ["doctor", "nurse", "pilot", "chef", "judge", "baker"]
REGIONS = ["east", "north", "west"]


def metadata(n: int, seed: int = 0) -> pa.Table:
    """n rows: groups g0 (bool), g1 (int8 0/1); labels l0 (float 0/1), l1, l2 (bool); a tag
    list ``tags`` (0-4 values from VOCAB, a value may repeat within a row); ``region``
    (string, one of REGIONS); utility ``u``; ``id`` (int64, shuffled)."""
    rng = np.random.default_rng(seed)
    g0 = rng.random(n) < 0.3
    g1 = (rng.random(n) < 0.25 + 0.3 * g0).astype(np.int8)
    l0 = (rng.random(n) < 0.2 + 0.4 * g0).astype(np.float64)
    l1 = rng.random(n) < 0.5
    l2 = rng.random(n) < 0.1 + 0.2 * g1
    tags = []
    for i in range(n):
        k = rng.integers(0, 5)
        p = np.array([3.0 if g0[i] else 1.0, 1.0, 2.0 if g1[i] else 0.5, 1.0, 0.5, 0.2])
        tags.append([VOCAB[j] for j in rng.choice(len(VOCAB), size=k, p=p / p.sum())])
    region = np.array(REGIONS)[rng.integers(0, 3, n)]
    return pa.table({
        "g0": pa.array(g0), "g1": pa.array(g1), "l0": pa.array(l0), "l1": pa.array(l1), "l2": pa.array(l2),
        "tags": pa.array(tags, type=pa.list_(pa.string())), "region": pa.array(region),
        "u": pa.array(rng.normal(0, 0.05, n)), "id": pa.array(rng.permutation(n).astype(np.int64) + 1000)})


def write_shards(table: pa.Table, folder: str, sizes: Sequence[int]) -> List[str]:
    """Consecutive slices of ``table`` of the given sizes (0 allowed), one file each, named
    so that their sorted order is the slice order."""
    assert sum(sizes) == table.num_rows
    os.makedirs(folder, exist_ok=True)
    paths, start = [], 0
    for i, k in enumerate(sizes):
        p = os.path.join(folder, f"shard-{i:03d}.parquet")
        pq.write_table(table.slice(start, k), p, row_group_size=max(1, k // 3 or 1))
        paths.append(p)
        start += k
    return paths


def write_hive(table: pa.Table, folder: str, key: str = "region") -> pa.Table:
    """``folder/key=value/part-0.parquet`` per value, the key dropped from the files; returns
    the table in the order the files hold it (sorted by key value, then original order)."""
    parts = []
    for v in sorted(set(table.column(key).to_pylist())):
        mask = pa.compute.equal(table.column(key), v)
        sub = table.filter(mask)
        d = os.path.join(folder, f"{key}={v}")
        os.makedirs(d, exist_ok=True)
        pq.write_table(sub.drop_columns([key]), os.path.join(d, "part-0.parquet"))
        parts.append(sub)
    return pa.concat_tables(parts)


def dense(table: pa.Table, cols: Sequence[str]) -> np.ndarray:
    return np.stack([np.asarray(table.column(c).to_numpy(zero_copy_only=False), dtype=np.float64) for c in cols],
                    axis=1) if cols else np.zeros((table.num_rows, 0))


def tags_dense(table: pa.Table, col: str, vocab: Sequence[str]) -> np.ndarray:
    """(n, len(vocab)) 0/1: whether each row's tag list (or string) holds each value."""
    out = np.zeros((table.num_rows, len(vocab)))
    for i, v in enumerate(table.column(col).to_pylist()):
        vals = v if isinstance(v, list) else [v]
        for j, t in enumerate(vocab):
            out[i, j] = float(t in vals)
    return out


def counts_reference(s: np.ndarray, y: np.ndarray, q: Optional[np.ndarray] = None) -> np.ndarray:
    """[sum q | sum q s_k | sum q y_r | sum q s_k y_r], float64, in plain numpy."""
    w = np.ones(s.shape[0]) if q is None else q
    return np.concatenate([[w.sum()], w @ s, w @ y, ((s * w[:, None]).T @ y).reshape(-1)])


def arrays_of(t: pa.Table, spec: dict):
    """Dense s, y (float64) of an in-memory table from a column spec (``sensitive``,
    ``sensitive_from``: every value, sorted; ``labels``, ``labels_from``: VOCAB, sorted)."""
    s = dense(t, spec.get("sensitive", []))
    if spec.get("sensitive_from"):
        col = spec["sensitive_from"]
        s = np.concatenate([s, tags_dense(t, col, sorted(set(t.column(col).to_pylist())))], axis=1)
    y = dense(t, spec.get("labels", []))
    if spec.get("labels_from"):
        y = np.concatenate([y, tags_dense(t, spec["labels_from"], sorted(VOCAB))], axis=1)
    return s, y


# A balance_dataset run in a child process (killed and resumed by the checkpoint tests).
BALANCE_DATASET_RUN = """
import pym4.m4 as m4
m4.balance_dataset({src!r}, {out!r}, **{args!r})
"""


def read_json(path: str):
    with open(path) as f:
        return json.load(f)
