"""Study- and series-level answers from the slice rows: the way a radiology department reads.

Rule (documented in the README): a study or series is flagged when the mean of its top-k
slice probabilities is at or above the model's threshold (k = --top-k, default 3; fewer
slices use all). DICOM rows group by StudyInstanceUID / SeriesInstanceUID; other rows by
``--group-by`` (``parent`` folder, or a regex whose first group or match names the study).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .shift import STATS, Histograms, compare
from .sink import PREDICTIONS

STUDIES = "studies.parquet"
COLUMNS = ["path", "status", "reason", "probability", "positive", "threshold", "model_sha256", "run_id", "key",
           "study_uid", "series_uid", "sop_uid", "frame"]


def current_rows(out: Path, model_sha256: str):
    """The newest row per (file, SOP instance, frame) for this model, as a pandas DataFrame."""
    import pandas as pd

    parts = sorted((Path(out) / PREDICTIONS).glob("part-*.parquet"))
    if not parts:
        return pd.DataFrame(columns=COLUMNS + list(STATS))
    frames = []
    for p in parts:  # parts written before the shift statistics existed have no such columns
        have = set(pq.read_schema(p).names)
        frames.append(pq.read_table(p, columns=COLUMNS + [c for c in STATS if c in have]).to_pandas())
    df = pd.concat(frames, ignore_index=True)
    for c in STATS:
        if c not in df:
            df[c] = np.nan
    df = df[df.model_sha256 == model_sha256]
    df["frame"] = df["frame"].fillna(-1)
    # redacted DICOM paths can coincide (same patient, same file name on two dates): the SOP UID tells them apart
    ident = df["sop_uid"].fillna("")
    return df.assign(_id=ident).sort_values("run_id").drop_duplicates(["path", "_id", "frame"], keep="last") \
        .drop(columns="_id")


def group_key(path: str, group_by: str | None) -> str | None:
    if group_by is None:
        return None
    if group_by == "parent":
        return os.path.dirname(path)
    m = re.search(group_by, path)
    return (m.group(1) if m.groups() else m.group(0)) if m else None


def group_shift(reference: dict | None, ok) -> dict:
    """The shift alarm over one group's ok rows (``current_rows`` columns)."""
    hist = Histograms()
    values = ok[list(STATS)].to_numpy(np.float64)
    for row, p in zip(values, ok.probability.to_numpy(np.float64)):
        hist.add(None if np.isnan(row[-1]) else dict(zip(STATS, row)), p)
    return compare(reference, hist)


def build_studies(out: Path, rows, threshold: float, top_k: int = 3, group_by: str | None = None,
                  reference: dict | None = None) -> pa.Table:
    """One row per series and per study from ``current_rows``; written to OUT_DIR/studies.parquet atomically.

    Each carries the shift alarm over its own slices against the model's ``reference``."""
    df = rows.copy()
    if len(df):
        other = df.study_uid.isna()
        df.loc[other, "study_uid"] = [group_key(p, group_by) for p in df.loc[other, "path"]]
        df.loc[other, "series_uid"] = df.loc[other, "study_uid"]
        df = df[df.study_uid.notna()]
    records = []
    for level, keys in (("study", ["study_uid"]), ("series", ["study_uid", "series_uid"])):
        for key, g in (df.groupby(keys, sort=True) if len(df) else []):
            key = key if isinstance(key, tuple) else (key,)
            ok = g[g.status == "ok"]
            probs = np.sort(ok.probability.to_numpy(np.float64))[::-1]
            topk = float(probs[:top_k].mean()) if len(probs) else None
            top = ok.loc[ok.probability.idxmax()] if len(ok) else None
            shift = group_shift(reference, ok)
            records.append({
                "level": level, "study": key[0], "series": key[1] if level == "series" else None,
                "slices": int(len(g)), "ok": int(len(ok)), "errored": int((g.status == "error").sum()),
                "skipped": int((g.status == "skipped").sum()), "flagged_slices": int(ok.positive.sum()),
                "max_probability": float(probs[0]) if len(probs) else None, "top_k": top_k,
                "top_k_mean": topk, "threshold": threshold,
                "decision": bool(topk is not None and topk >= threshold),
                "top_slice_path": None if top is None else top.path,
                "top_slice_sop_uid": None if top is None or not isinstance(top.sop_uid, str) else top.sop_uid,
                "top_slice_frame": None if top is None or top.frame < 0 else int(top.frame),
                "shift_score": shift["score"], "shift_verdict": shift["verdict"],
            })
    table = pa.Table.from_pylist(records, schema=SCHEMA)
    tmp = Path(out) / (STUDIES + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, Path(out) / STUDIES)
    return table


SCHEMA = pa.schema([
    ("level", pa.string()), ("study", pa.string()), ("series", pa.string()), ("slices", pa.int64()),
    ("ok", pa.int64()), ("errored", pa.int64()), ("skipped", pa.int64()), ("flagged_slices", pa.int64()),
    ("max_probability", pa.float64()), ("top_k", pa.int64()), ("top_k_mean", pa.float64()),
    ("threshold", pa.float64()), ("decision", pa.bool_()), ("top_slice_path", pa.string()),
    ("top_slice_sop_uid", pa.string()), ("top_slice_frame", pa.int64()),
    ("shift_score", pa.float64()), ("shift_verdict", pa.string()),
])
