"""End to end through covidct-train and covidct-export on synthetic CT phantoms."""

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from covidct.engine.contract import Contract, read_contract, sha256_file
from covidct.engine.decode import decode_file
from covidct.train.data import read_split
from tests.conftest import run_cli


def test_train_writes_run_directory_with_honest_metrics(trained_run):
    run = trained_run["run"]
    for name in ("model.keras", "metrics.json", "history.json", "split.csv", "contract.json", "curves.png",
                 "confusion.png"):
        assert (run / name).is_file(), name
    m = json.loads((run / "metrics.json").read_text())
    assert m["class_names"] == ["Not_Infected", "Infected"] and m["positive_class"] == "Infected"
    assert m["split_sizes"]["test"] == m["n"] and sum(m["split_sizes"].values()) == 180
    c = m["confusion"]
    assert c["tp"] + c["fn"] + c["tn"] + c["fp"] == m["n"]
    assert m["roc_auc"] > 0.8, m  # the phantoms' ground-glass blobs are learnable
    lo, hi = m["sensitivity_ci95"]
    assert lo <= m["sensitivity"] <= hi
    assert "test split" in trained_run["train_stdout"] and "Research use only" in trained_run["train_stdout"]


def test_split_keeps_patients_together(trained_run):
    import csv
    import re
    rows = list(csv.DictReader(open(trained_run["run"] / "split.csv")))
    by_patient = {}
    for r in rows:
        pid = re.search(r"p\d+", r["path"].rsplit("/", 1)[-1]).group(0) + r["class"]
        by_patient.setdefault(pid, set()).add(r["split"])
    assert all(len(s) == 1 for s in by_patient.values())


def test_exported_model_carries_contract_and_matches_keras(trained_run):
    from covidct.train.model import load_trained

    run, model_path = trained_run["run"], trained_run["model"]
    contract = read_contract(model_path)
    # the exported contract is training's plus the shift alarm's reference (made at export)
    assert contract.reference is not None and contract.reference["n"] > 0
    assert dataclasses.replace(contract, reference=None) == Contract.from_json((run / "contract.json").read_text())
    assert contract.image_size == (64, 64) and contract.class_names == ("Not_Infected", "Infected")
    assert contract.threshold == json.loads((run / "metrics.json").read_text())["threshold"]
    proto = onnx.load(model_path)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    # training-only layers (MixStyle, the seeds' random augmentation) leave no trace in the exported graph
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & {"RandomUniform", "RandomUniformLike", "RandomNormal", "Where", "ReduceVariance"}, ops
    assert {"Conv", "GlobalAveragePool", "Sigmoid"} <= ops

    paths = sorted((trained_run["data"] / "Infected").iterdir())[:10]
    x = np.stack([decode_file(p, **contract.decode_kwargs()) for p in paths])[..., None]
    keras_p = load_trained(run / "model.keras", contract.image_size, contract.architecture).predict(x.astype(np.float32), verbose=0)[:, 0]
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    onnx_p = sess.run(None, {"image": x})[0][:, 0]
    assert np.abs(onnx_p - keras_p).max() <= 1e-4
    report = json.loads(model_path.with_suffix(".export.json").read_text())
    assert report["parity"]["max_abs_diff_batch1"] <= 1e-4 and report["parity"]["n_images"] > 0


def test_int8_model_reported_beside_fp32(trained_run):
    report = json.loads(trained_run["model"].with_suffix(".export.json").read_text())["int8"]
    assert report["label_agreement_with_fp32"] >= 0.9
    assert report["int8_images_per_s"] > 0 and report["fp32_images_per_s"] > 0
    q = read_contract(report["model"])
    assert q.precision == "int8"
    # the INT8 model carries its agreement with FP32 on the whole test split, recomputed here
    split = [r for r in read_split(trained_run["run"] / "split.csv") if r["split"] == "test"]
    assert q.agreement["n"] == len(split) > 0
    fp32 = read_contract(trained_run["model"])
    x = np.stack([decode_file(r["path"], **fp32.decode_kwargs()) for r in split])[..., None]
    p = {}
    for name, path in (("fp32", trained_run["model"]), ("int8", report["model"])):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        p[name] = sess.run(None, {"image": x})[0][:, 0]
    equal = np.mean((p["fp32"] >= fp32.threshold) == (p["int8"] >= fp32.threshold))
    assert abs(q.agreement["label_agreement"] - equal) < 1e-9
    assert q.agreement["fp32_sha256"] == sha256_file(trained_run["model"])


def test_export_refuses_a_model_changed_after_training(trained_run, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(trained_run["run"], run, ignore=shutil.ignore_patterns("*.onnx"))
    with open(run / "model.keras", "ab") as f:
        f.write(b"tampered")
    r = run_cli("covidct-export", run, "--out", run / "m.onnx")
    assert r.returncode == 2 and "changed since training" in r.stderr  # bad input (engine.exits)
    assert not (run / "m.onnx").exists()


def test_export_validation_failure_is_an_error_not_a_warning(trained_run, monkeypatch):
    """Parity breaks when the ONNX graph's preprocessing differs from Keras: raise, never warn."""
    from covidct.export import validate as V
    from covidct.train.model import load_trained

    contract = read_contract(trained_run["model"])
    keras_model = load_trained(trained_run["run"] / "model.keras", contract.image_size, contract.architecture)
    proto = onnx.load(trained_run["model"])
    for init in proto.graph.initializer:  # perturb the first conv's weights in the ONNX copy only
        if init.dims and len(init.dims) == 4:
            w = onnx.numpy_helper.to_array(init).copy() * 1.5
            init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
            break
    x = np.random.default_rng(0).integers(0, 256, (6, *contract.image_size, 1), dtype=np.uint8)
    with pytest.raises(V.ExportValidationError, match="max \\|keras - onnx\\|"):
        V.validate(proto, keras_model, x, contract)


def test_train_rejects_ambiguous_classes(tmp_path):
    for n in ("a", "b"):
        (tmp_path / n).mkdir()
    r = run_cli("covidct-train", tmp_path, "--out", tmp_path / "run")
    assert r.returncode == 2 and "--positive" in r.stderr


@pytest.mark.slow
def test_real_data_train_and_export(tmp_path):
    from tests.conftest import shared_dataset
    data = shared_dataset("sarscov2-ct-subset")
    r = run_cli("covidct-train", data, "--out", tmp_path / "s", "--epochs", "4", timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    e = run_cli("covidct-export", tmp_path / "s", "--out", tmp_path / "s" / "model.onnx", timeout=900)
    assert e.returncode == 0, e.stderr[-3000:]
    assert read_contract(tmp_path / "s" / "model.onnx").class_names == ("non-COVID", "COVID")
