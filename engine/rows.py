"""The one typed row of covidct-batch's output: every column of the Parquet schema is a field of ``Row``.

``SCHEMA`` is derived from ``Row`` (a column cannot exist in one and not the other), the shift
statistics' columns from ``engine.shift.STATS`` (their names are defined there only), and every
place that makes a row (the decode workers, the predictors, the driver, the sink's replacement of an
unwritable row) makes a ``Row``. Its slots make a misspelt field an error where it is set
(``row.probabilty = 0.9`` raises AttributeError; ``Row(probabilty=0.9)`` raises TypeError), never a
silent null column in a medical output; ``PartWriter.add`` refuses a dict with an unknown field.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, make_dataclass
from enum import StrEnum

import pyarrow as pa

from .shift import STATS


class Status(StrEnum):
    """What became of a file (the ``status`` column)."""

    OK = "ok"
    ERROR = "error"
    SKIPPED = "skipped"


#: (column, Python type, Arrow type, what it holds). Documented in the README; add columns at the end only.
COLUMNS_SPEC: list[tuple[str, type, pa.DataType, str]] = [
    ("path", str, pa.string(), "the file (its identifying parts redacted, or a pseudonym)"),
    ("status", str, pa.string(), "ok | error | skipped (Status)"),
    ("reason", str, pa.string(), "stable code (engine.reasons.Reason); null when ok"),
    ("message", str, pa.string(), "human-readable detail; null when ok"),
    ("probability", float, pa.float32(), "of the positive class; null unless ok"),
    ("label", str, pa.string(), "class name at the threshold; null unless ok"),
    ("positive", bool, pa.bool_(), "probability >= threshold; null unless ok"),
    ("threshold", float, pa.float32(), "the contract's operating threshold"),
    ("model_sha256", str, pa.string(), "the model file's hash"),
    ("provider", str, pa.string(), "what ran the model: an ONNX Runtime execution provider or OpenVINO:<device>"),
    ("read_ms", float, pa.float32(), "reading the file"),
    ("decode_ms", float, pa.float32(), "decode + preprocessing (this frame's share)"),
    ("infer_ms", float, pa.float32(), "this image's share of its batch's inference"),
    ("file_size", int, pa.int64(), "bytes"),
    ("mtime_ns", int, pa.int64(), "file modification time, ns since the epoch"),
    ("run_id", str, pa.string(), "the run that wrote the row"),
    ("node", str, pa.string(), "Ray node id (first 12 hex digits) of the predictor"),
    ("key", int, pa.int64(), "resume key of (path, size, mtime, model); the path may be redacted"),
    ("study_uid", str, pa.string(), "DICOM only (keyed hashes with --pseudonymize)"),
    ("series_uid", str, pa.string(), "DICOM only"),
    ("sop_uid", str, pa.string(), "DICOM only"),
    ("instance_number", int, pa.int32(), "DICOM only"),
    ("slice_position", float, pa.float64(), "z of ImagePositionPatient (mm)"),
    ("frame", int, pa.int32(), "frame index within the DICOM object (0 for single-frame)"),
    ("thumbnail", bytes, pa.binary(), "96x96 JPEG of the model's input, positive rows only (for the report)"),
    ("framing", str, pa.string(), "null, or the preprocessing's fallback: no_body / no_lungs"),
    # the shift alarm's statistics (engine.shift.STATS), in its order
    *[(name, float, pa.float32(), "shift statistic (engine.shift)") for name in STATS],
    ("path_bytes", bytes, pa.binary(), "the exact file name when it is not UTF-8; null otherwise"),
    ("file_id", int, pa.int64(), "keyed hash of the exact path: which file a row is about, even where path "
                                 "is redacted; the newest run's rows of a file supersede its older rows"),
]

#: The row. Built from COLUMNS_SPEC so that its fields and the schema are one list; every field defaults
#: to None (null), slots make an unknown attribute an error.
Row = make_dataclass("Row", [(name, typ | None, field(default=None)) for name, typ, _, _ in COLUMNS_SPEC],
                     slots=True)
Row.__module__, Row.__qualname__ = __name__, "Row"  # picklable by name (Ray sends rows between processes)
Row.__doc__ = "One output row (see engine.rows): the Parquet schema's columns as fields, None for null."

SCHEMA = pa.schema([(name, arrow) for name, _, arrow, _ in COLUMNS_SPEC])
COLUMNS: list[str] = SCHEMA.names
FIELDS = frozenset(COLUMNS)


class RowFieldError(ValueError):
    """A row with a field the schema does not have (a misspelt column)."""


def as_row(row) -> "Row":
    """A ``Row`` as is; a dict made into one, refusing a field the schema does not have (naming it)."""
    if isinstance(row, Row):
        return row
    unknown = sorted(set(row) - FIELDS)
    if unknown:
        raise RowFieldError(f"row field(s) {unknown} are not columns of the output schema "
                            f"(misspelt? columns: {', '.join(COLUMNS)})")
    return Row(**row)


def row_dict(row: "Row") -> dict:
    """The row's fields as a dict (column -> value)."""
    return {f.name: getattr(row, f.name) for f in fields(row)}


@dataclass(frozen=True, slots=True)
class Decoded:
    """A decode worker's result for one frame or failed file: its row, and whether its thumbnail may be
    made (no burned-in text can show in it). Only the row is ever written."""

    row: "Row"
    thumbnail_allowed: bool = False


__all__ = ["Row", "Status", "SCHEMA", "COLUMNS", "FIELDS", "COLUMNS_SPEC", "RowFieldError", "as_row", "row_dict",
           "Decoded"]
