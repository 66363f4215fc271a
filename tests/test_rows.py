"""One typed row (engine.rows): a misspelt field is an error, never a silent null column."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from covidct.engine.reasons import Reason
from covidct.engine.rows import COLUMNS, SCHEMA, Row, RowFieldError, Status
from covidct.engine.shift import STATS
from covidct.engine.sink import PartWriter

#: The output schema as covidct-batch wrote it before Row existed: old OUT_DIRs must resume unchanged.
PREVIOUS_SCHEMA = [
    ("path", "string"), ("status", "string"), ("reason", "string"), ("message", "string"),
    ("probability", "float"), ("label", "string"), ("positive", "bool"), ("threshold", "float"),
    ("model_sha256", "string"), ("provider", "string"), ("read_ms", "float"), ("decode_ms", "float"),
    ("infer_ms", "float"), ("file_size", "int64"), ("mtime_ns", "int64"), ("run_id", "string"), ("node", "string"),
    ("key", "int64"), ("study_uid", "string"), ("series_uid", "string"), ("sop_uid", "string"),
    ("instance_number", "int32"), ("slice_position", "double"), ("frame", "int32"), ("thumbnail", "binary"),
    ("framing", "string"), ("dark_anchor", "float"), ("tissue_anchor", "float"), ("lung_fraction", "float"),
    ("input_mean", "float"), ("input_detail", "float"), ("path_bytes", "binary"), ("file_id", "int64"),
]


def test_the_schema_is_the_row_and_unchanged():
    assert [(f.name, str(f.type)) for f in SCHEMA] == PREVIOUS_SCHEMA
    assert list(Row.__dataclass_fields__) == COLUMNS
    assert set(STATS) <= set(COLUMNS)
    assert [s.value for s in Status] == ["ok", "error", "skipped"]
    assert Reason.CORRUPT == "corrupt" and Reason("too_large") is Reason.TOO_LARGE


def test_a_misspelt_field_is_an_error_where_it_is_made_and_where_it_is_written(tmp_path: Path):
    with pytest.raises(TypeError, match="probabilty"):
        Row(status=Status.OK, probabilty=0.9)
    row = Row(status=Status.OK, probability=0.9)
    with pytest.raises(AttributeError, match="probabilty"):
        row.probabilty = 0.8  # slots: no attribute the schema does not have
    w = PartWriter(tmp_path / "predictions", "r1")
    with pytest.raises(RowFieldError, match="probabilty"):
        w.add([{"path": "/a.png", "status": "ok", "probabilty": 0.9}])
    assert not list((tmp_path / "predictions").glob("part-*"))  # nothing written, not even the good rows
    w.add([{"path": "/a.png", "status": "ok", "probability": 0.9}, Row(path="/b.png", status=Status.ERROR,
                                                                       reason=Reason.CORRUPT, message="x")])
    w.flush()
    (part,) = (tmp_path / "predictions").glob("part-*.parquet")
    t = pq.read_table(part)
    assert t.schema.equals(SCHEMA) and t.column("probability").to_pylist() == [pytest.approx(0.9), None]
    assert t.column("status").to_pylist() == ["ok", "error"] and t.column("reason").type == pa.string()
