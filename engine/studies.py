"""Study- and series-level answers from the slice rows: the way a radiology department reads.

Rule (documented in the README): a study or series is flagged when the mean of its top-k
slice probabilities is at or above the model's threshold (k = --top-k, default 3; fewer
slices use all). DICOM rows group by StudyInstanceUID / SeriesInstanceUID; other rows by
``--group-by`` (``parent`` folder, or a regex whose first group or match names the study).

Everything here runs out of core in embedded DuckDB, straight from the Parquet parts, under
a fixed memory limit (spilling to OUT_DIR/.covidct-tmp): the memory of a report does not
grow with the number of rows, and a hospital's year of slices fits as well as a sample.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import atomic_file
from .rows import Status
from .shift import PROBABILITY_BINS, STATS, Histograms, compare
from .sink import PREDICTIONS, SCHEMA as ROW_SCHEMA

#: The status column's values as SQL literals (engine.rows.Status), for the queries below.
OK, ERROR, SKIPPED = (f"'{s.value}'" for s in (Status.OK, Status.ERROR, Status.SKIPPED))

STUDIES = "studies.parquet"
TMP = ".covidct-tmp"
MEMORY_LIMIT = "256MB"  # DuckDB's buffer pool; sorts and windows beyond it spill to disk
ROWS_PER_PASS = 1_000_000  # studies are aggregated in hash partitions of about this many rows

#: Columns of the current rows (no thumbnails: they are read only for the studies shown).
_CURRENT = ["path", "path_bytes", "status", "reason", "probability", "positive", "key", "study_uid", "series_uid",
            "sop_uid", "frame", "run_id", "file_id", *STATS]


def group_sql(group_by: str | None) -> str:
    """SQL expression naming the study of a non-DICOM row (NULL: no study)."""
    if group_by is None:
        return "NULL"
    if group_by == "parent":
        return r"nullif(regexp_extract(path, '^(.*)/[^/]*$', 1), '')"
    pattern = group_by.replace("'", "''")
    return f"nullif(regexp_extract(path, '{pattern}', {1 if re.compile(group_by).groups else 0}), '')"


def check_group_by(group_by: str | None) -> str | None:
    """Why ``group_by`` cannot be used (Python's and DuckDB's (RE2) regex dialects), or None."""
    if group_by in (None, "parent"):
        return None
    try:
        re.compile(group_by)
        import duckdb
        duckdb.connect().execute(f"SELECT {group_sql(group_by)} FROM (SELECT 'a/b' AS path)").fetchall()
    except Exception as e:  # re.error, duckdb.Error
        return str(e).splitlines()[0]
    return None


class Rows:
    """The current rows of one model in an OUT_DIR: the newest row per (file, SOP instance, frame).

    A DuckDB temporary table built once from the parts; every study, count and histogram of the
    report is a query over it. Close it (or use ``with``) to free its spill files.
    """

    def __init__(self, out: Path, model_sha256: str, group_by: str | None = None, threads: int | None = None,
                 memory_limit: str = MEMORY_LIMIT):
        import duckdb

        self.out = Path(out)
        self._link = None
        try:
            str(self.out.resolve()).encode("utf-8")
        except UnicodeEncodeError:  # DuckDB takes paths as UTF-8: reach OUT_DIR through a link that is
            self._link = tempfile.mkdtemp(prefix="covidct-out-")
            link = os.path.join(self._link, "out")
            os.symlink(os.fsencode(self.out.resolve()), link)
            self.out = Path(link)
        self.sha = model_sha256
        self.group_by = group_by
        self.tmp = self.out / TMP
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.con = duckdb.connect(config={
            "memory_limit": memory_limit, "temp_directory": str(self.tmp), "preserve_insertion_order": False,
            "threads": threads or min(4, os.cpu_count() or 1)})
        self.parts = sorted(str(p) for p in (self.out / PREDICTIONS).glob("part-*.parquet"))
        # parts written before a column existed lack it: NULL of its type
        have = {r[0] for r in self.con.execute("SELECT name FROM parquet_schema(?)", [self.parts]).fetchall()} \
            if self.parts else set()
        cols = ", ".join(c if c in have else f"CAST(NULL AS {_sql_type(c)}) AS {c}" for c in _CURRENT)
        if self.parts:
            source = f"(SELECT {cols} FROM read_parquet(?, union_by_name=true) WHERE model_sha256 = ?)"
            params = [self.parts, model_sha256]
        else:
            source, params = f"(SELECT {cols} WHERE false)", []
        grp = group_sql(group_by)
        # redacted DICOM paths can coincide (same patient, same file name on two dates): the SOP UID tells them apart
        self.con.execute(f"""
            CREATE TEMP TABLE cur AS
            SELECT * EXCLUDE (path_bytes, run_id, key, sop_uid),
                   sop_uid,
                   coalesce(study_uid, {grp}) AS study,
                   CASE WHEN study_uid IS NULL THEN {grp} ELSE series_uid END AS series
            FROM {source}
            QUALIFY CASE WHEN file_id IS NULL THEN row_number() OVER (
                PARTITION BY coalesce(path_bytes, encode(path)), coalesce(sop_uid, ''), coalesce(frame, -1)
                ORDER BY run_id DESC) = 1
              -- the newest run's rows of a file supersede all its older ones (an error row carries no SOP UID;
              -- a file replaced by another instance has another): every row of that run for it, per frame
              ELSE run_id = max(run_id) OVER (PARTITION BY file_id) END""", params)

    def __enter__(self) -> "Rows":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.con.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self._link is not None:
            shutil.rmtree(self._link, ignore_errors=True)  # the link only, never what it points at

    # ---------------------------------------------------------------- summaries for the report
    def status_counts(self) -> dict[str, int]:
        return dict(self.con.execute("SELECT status, count(*) FROM cur GROUP BY status").fetchall())

    def error_file_ids(self) -> np.ndarray:
        """file_id of every current error row that has one (rows written before the column have none)."""
        ids = self.con.execute(f"SELECT file_id FROM cur WHERE status = {ERROR} AND file_id IS NOT NULL").fetchnumpy()
        return np.asarray(ids["file_id"], np.int64)

    def flagged_counts(self) -> dict[str, int]:
        return {("flagged" if p else "not flagged"): n for p, n in self.con.execute(
            f"SELECT positive, count(*) FROM cur WHERE status = {OK} GROUP BY positive").fetchall()}

    def reasons(self) -> list[tuple[str, str, int]]:
        return self.con.execute(f"SELECT status, reason, count(*) FROM cur WHERE status <> {OK} "
                                "GROUP BY ALL ORDER BY status, reason").fetchall()

    def probability_histogram(self, bins: int = 20) -> np.ndarray:
        counts = np.zeros(bins, np.int64)
        for b, n in self.con.execute(f"SELECT {_bin_sql('probability', 0.0, 1.0, bins)}, "
                                     "count(*) FROM cur WHERE probability IS NOT NULL GROUP BY 1").fetchall():
            counts[max(0, b)] += n
        return counts

    def thumbnails(self, studies: list[str], per_study: int = 3) -> dict[str, list[tuple[float, bytes]]]:
        """The ``per_study`` most probable flagged slices' thumbnails of each of ``studies``."""
        if not studies:
            return {}
        self.con.execute("CREATE OR REPLACE TEMP TABLE shown AS SELECT unnest(?) AS study", [studies])
        rows = self.con.execute(f"""
            WITH t AS (
                SELECT coalesce(study_uid, {group_sql(self.group_by)}) AS study, probability, thumbnail
                FROM read_parquet(?, union_by_name=true)
                WHERE thumbnail IS NOT NULL AND model_sha256 = ?)
            SELECT study, probability, thumbnail FROM t SEMI JOIN shown USING (study)
            QUALIFY row_number() OVER (PARTITION BY study ORDER BY probability DESC) <= {int(per_study)}
            ORDER BY study, probability DESC""", [self.parts, self.sha]).fetchall() if self.parts else []
        best: dict[str, list[tuple[float, bytes]]] = {}
        for study, p, b in rows:
            best.setdefault(study, []).append((p, b))
        return best

    def top_flagged(self, limit: int) -> list[tuple[str, float, bytes | None]]:
        """The ``limit`` most probable current flagged slices: (path as rows show it, probability, thumbnail)."""
        top = self.con.execute(f"""SELECT path, probability, file_id FROM cur WHERE status = {OK} AND positive
                                   ORDER BY probability DESC, path LIMIT {int(limit)}""").fetchall()
        ids = [f for _, _, f in top if f is not None]
        thumbs: dict[int, bytes] = {}
        if ids and self.parts:
            self.con.execute("CREATE OR REPLACE TEMP TABLE shown_files AS SELECT unnest(?) AS file_id", [ids])
            thumbs = dict(self.con.execute("""
                SELECT file_id, arg_max(thumbnail, probability) FROM read_parquet(?, union_by_name=true)
                WHERE thumbnail IS NOT NULL AND model_sha256 = ? AND file_id IN (SELECT file_id FROM shown_files)
                GROUP BY file_id""", [self.parts, self.sha]).fetchall())
        return [(path, p, thumbs.get(f)) for path, p, f in top]

    # ---------------------------------------------------------------- studies
    def build_studies(self, threshold: float, top_k: int = 3, reference: dict | None = None,
                      batch_rows: int = 10_000) -> dict:
        """One row per series and per study, streamed to OUT_DIR/studies.parquet (atomically).

        Each carries the shift alarm over its own slices against the model's ``reference``. Rows are
        in hash partitions of the study, sorted by study (and series) within each.
        Returns ``{"studies", "flagged", "shifted"}`` counts at the study level."""
        bins = ", ".join(f"histogram({_bin_sql(k, lo, hi, b)}) FILTER (status = {OK} AND has_stats) AS h_{k}"
                         for k, (lo, hi, b) in STATS.items())
        pb = PROBABILITY_BINS
        summary = {"studies": 0, "flagged": 0, "shifted": 0}
        # Aggregate states (top-k lists, histograms) are per group and cannot spill: aggregate the
        # studies in hash partitions of about ROWS_PER_PASS rows so that memory stays flat.
        n = self.con.execute("SELECT count(*) FROM cur WHERE study IS NOT NULL").fetchone()[0]
        passes = max(1, -(-n // ROWS_PER_PASS))
        with atomic_file(self.out / STUDIES) as f, pq.ParquetWriter(f, SCHEMA) as writer:
            for level, keys in (("study", ["study"]), ("series", ["study", "series"])):
                by = ", ".join(keys)
                for i in range(passes):
                    cur = self.con.execute(f"""
                        WITH r AS (SELECT *, input_detail IS NOT NULL AND NOT isnan(input_detail) AS has_stats
                                   FROM cur WHERE study IS NOT NULL AND hash(study) % {passes} = {i})
                        SELECT {by}, count(*) AS slices, count(*) FILTER (status = {OK}) AS ok,
                               count(*) FILTER (status = {ERROR}) AS errored,
                               count(*) FILTER (status = {SKIPPED}) AS skipped,
                               count(*) FILTER (status = {OK} AND positive) AS flagged_slices,
                               max(probability) AS max_probability,
                               list_avg(max(probability, {int(top_k)}) FILTER (status = {OK})) AS top_k_mean,
                               arg_max(path, probability) FILTER (status = {OK}) AS top_slice_path,
                               arg_max(sop_uid, probability) FILTER (status = {OK}) AS top_slice_sop_uid,
                               arg_max(frame, probability) FILTER (status = {OK}) AS top_slice_frame,
                               count(*) FILTER (status = {OK} AND has_stats) AS n_stats, {bins},
                               histogram({_bin_sql("probability", 0.0, 1.0, pb)}) FILTER (status = {OK}) AS h_probability
                        FROM r GROUP BY {by} ORDER BY {by}""")
                    while True:
                        chunk = cur.fetchmany(batch_rows)
                        if not chunk:
                            break
                        records = [self._record(level, row, cur.description, threshold, top_k, reference)
                                   for row in chunk]
                        writer.write_table(pa.Table.from_pylist(records, schema=SCHEMA))
                        if level == "study":
                            summary["studies"] += len(records)
                            summary["flagged"] += sum(r["decision"] for r in records)
                            summary["shifted"] += sum(bool(r["shift_verdict"] and r["shift_verdict"].startswith("shifted"))
                                                      for r in records)
        return summary

    @staticmethod
    def _record(level, row, description, threshold, top_k, reference) -> dict:
        d = dict(zip((c[0] for c in description), row))
        hist = Histograms()
        hist.n = int(d["n_stats"])
        for k, (_, _, b) in STATS.items():
            for i, n in (d[f"h_{k}"] or {}).items():
                hist.counts[k][int(i)] += int(n)
        for i, n in (d["h_probability"] or {}).items():
            hist.probability[int(i)] += int(n)
        shift = compare(reference, hist)
        topk = d["top_k_mean"]
        frame = d["top_slice_frame"]
        return {
            "level": level, "study": d["study"], "series": d["series"] if level == "series" else None,
            "slices": d["slices"], "ok": d["ok"], "errored": d["errored"], "skipped": d["skipped"],
            "flagged_slices": d["flagged_slices"], "max_probability": d["max_probability"], "top_k": top_k,
            "top_k_mean": topk, "threshold": threshold, "decision": bool(topk is not None and topk >= threshold),
            "top_slice_path": d["top_slice_path"], "top_slice_sop_uid": d["top_slice_sop_uid"],
            "top_slice_frame": None if frame is None or frame < 0 else int(frame),
            "shift_score": shift["score"], "shift_verdict": shift["verdict"],
        }


def top_studies(path: Path, limit: int, flagged_only: bool = False) -> dict | None:
    """Study-level counts of a studies.parquet and its ``limit`` studies of highest top-k mean
    (flagged ones only if asked), read out of core; None when there is no such file."""
    if not Path(path).exists():
        return None
    import duckdb

    with utf8_path(path) as path:
        con = duckdb.connect(config={"memory_limit": "128MB", "threads": 1})
        return _top_studies(con, path, limit, flagged_only)


@contextlib.contextmanager
def utf8_path(path: Path):
    """``path``, or where it is not UTF-8 (DuckDB takes only UTF-8 paths) a link to it in a temporary folder."""
    try:
        str(path).encode("utf-8")
        yield path
        return
    except UnicodeEncodeError:
        pass
    tmp = tempfile.mkdtemp(prefix="covidct-link-")
    try:
        link = os.path.join(tmp, "f" + Path(path).suffix.encode("ascii", "ignore").decode())
        os.symlink(os.fsencode(Path(path).resolve()), link)
        yield Path(link)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _top_studies(con, path: Path, limit: int, flagged_only: bool) -> dict:
    try:
        n, flagged, top_k = con.execute(
            "SELECT count(*), count(*) FILTER (decision), any_value(top_k) FROM read_parquet(?) WHERE level = 'study'",
            [str(path)]).fetchone()
        cur = con.execute("SELECT * FROM read_parquet(?) WHERE level = 'study'" + (" AND decision" if flagged_only else "")
                          + " ORDER BY top_k_mean DESC NULLS LAST, study LIMIT ?", [str(path), int(limit)])
        names = [d[0] for d in cur.description]
        shown = [dict(zip(names, r)) for r in cur.fetchall()]
    finally:
        con.close()
    return {"studies": n, "flagged": flagged, "top_k": top_k, "shown": shown}


def _bin_sql(column: str, lo: float, hi: float, bins: int) -> str:
    """``shift._bin`` in SQL: the same bin for the same value (NaN in bin 0, outside clipped)."""
    x = f"CAST({column} AS DOUBLE)"
    return (f"least({bins - 1}, greatest(0, CAST(trunc((CASE WHEN isnan({x}) THEN CAST({float(lo)!r} AS DOUBLE) "
            f"ELSE {x} END - CAST({float(lo)!r} AS DOUBLE)) / CAST({float(hi - lo)!r} AS DOUBLE) * {bins}) AS BIGINT)))")


def _sql_type(column: str) -> str:
    t = ROW_SCHEMA.field(column).type
    return {pa.string(): "VARCHAR", pa.binary(): "BLOB", pa.float32(): "FLOAT", pa.float64(): "DOUBLE",
            pa.int64(): "BIGINT", pa.int32(): "INTEGER", pa.bool_(): "BOOLEAN"}[t]


SCHEMA = pa.schema([
    ("level", pa.string()), ("study", pa.string()), ("series", pa.string()), ("slices", pa.int64()),
    ("ok", pa.int64()), ("errored", pa.int64()), ("skipped", pa.int64()), ("flagged_slices", pa.int64()),
    ("max_probability", pa.float64()), ("top_k", pa.int64()), ("top_k_mean", pa.float64()),
    ("threshold", pa.float64()), ("decision", pa.bool_()), ("top_slice_path", pa.string()),
    ("top_slice_sop_uid", pa.string()), ("top_slice_frame", pa.int64()),
    ("shift_score", pa.float64()), ("shift_verdict", pa.string()),
])
