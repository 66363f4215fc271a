"""covidct-export: a run directory in, a validated ONNX model with its contract out."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from covidct.engine.contract import Contract, embed_contract, save_atomic, sha256_file
from covidct.engine.decode import DecodeError, decode_file
from covidct.engine.metrics import agreement
from covidct.train.data import read_split
from covidct.train.fit import CONTRACT_FILE, MODEL_FILE, SPLIT_FILE

from .convert import keras_to_onnx
from .validate import ExportInputError, ExportValidationError, compare, structural_problems, validate

log = logging.getLogger(__name__)

PARITY_IMAGES = 48
CALIBRATION_IMAGES = 512  # measured: 128 gave max |int8 - fp32| 0.096, 600 gave 0.032


@dataclass(frozen=True)
class ExportConfig:
    run_dir: Path
    out: Path
    int8: bool = False
    reference: bool = True  # record the shift alarm's reference in the contract

    def __post_init__(self):
        missing = [n for n in (MODEL_FILE, CONTRACT_FILE, SPLIT_FILE) if not (Path(self.run_dir) / n).is_file()]
        if missing:
            raise ExportInputError(f"{self.run_dir} is not a covidct-train run directory: missing {missing}")

    @property
    def int8_out(self) -> Path:
        return Path(self.out).with_suffix(".int8.onnx")

    @property
    def report_out(self) -> Path:
        return Path(self.out).with_suffix(".export.json")


def split_images(rows: list[dict], split: str, limit: int, contract: Contract) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``limit`` decoded images of ``split`` and their labels (1: the positive class)."""
    images, labels = [], []
    for row in rows:
        if row["split"] != split or len(images) >= limit:
            continue
        try:
            images.append(decode_file(row["path"], **contract.decode_kwargs()))
            labels.append(int(row["class"] == contract.positive_class))
        except DecodeError as e:
            log.warning("parity image %s unreadable (%s)", row["path"], e)
    if not images:
        return np.zeros((0, *contract.image_size, 1), np.uint8), np.zeros(0, int)
    return np.stack(images)[..., None], np.asarray(labels)


def _held_out(rows: list[dict]) -> str:
    """The split parity and INT8 agreement are measured on: the test split, or for a run adapted with
    ``covidct-train --init`` (whose every slice is adaptation data, marked train) that one."""
    return "test" if any(r["split"] == "test" for r in rows) else "train"


def _load_images(rows: list[dict], split: str, limit: int, contract: Contract) -> np.ndarray:
    return split_images(rows, split, limit, contract)[0]


def shift_reference(rows: list[dict], model, contract: Contract) -> dict | None:
    """The shift alarm's reference (``engine.shift``): the statistics of the training and validation
    images as the engine's preprocessing sees them, and the model's probabilities on the validation
    split. The test split stays out, so that the alarm's quiet on it is a fair check. None for a
    model whose preprocessing yields no statistics (plain resize)."""
    from covidct.engine.decode import decode_inputs, read_file
    from covidct.engine.shift import Histograms, slice_stats

    hist = Histograms()
    val_images = []
    for row in rows:
        if row["split"] == "test":
            continue
        try:
            frames = decode_inputs(read_file(row["path"]), **contract.decode_kwargs())
        except DecodeError:
            continue
        for img, _, framing in frames:
            hist.add(slice_stats(img, framing))
            if row["split"] == "val":
                val_images.append(img)
    if hist.n == 0:
        return None
    if val_images:
        probs = model.predict(np.stack(val_images)[..., None].astype(np.float32), batch_size=32, verbose=0)[:, 0]
        for p in probs:
            hist.add(None, float(p))
    return hist.to_reference(f"training and validation splits of the covidct-train run ({hist.n} slices); "
                             f"probabilities of its validation split ({len(val_images)} slices)")


def export(cfg: ExportConfig) -> dict:
    """Convert, validate and write the model (and its INT8 twin with ``int8``); returns the report."""
    from covidct.train.model import load_trained

    run = Path(cfg.run_dir)
    contract = Contract.from_json((run / CONTRACT_FILE).read_text())
    actual = sha256_file(run / MODEL_FILE)
    if contract.source_sha256 != actual:
        raise ExportInputError(f"{run / MODEL_FILE} changed since training (sha256 {actual[:12]} != "
                                    f"contract {contract.source_sha256[:12]}): train again")
    model = load_trained(run / MODEL_FILE, contract.image_size, contract.architecture or "seed")
    rows = read_split(run / SPLIT_FILE)
    images = _load_images(rows, _held_out(rows), PARITY_IMAGES, contract)
    if cfg.reference:
        contract = dataclasses.replace(contract, reference=shift_reference(rows, model, contract))
    t = time.perf_counter()
    proto = keras_to_onnx(model, contract)
    report = {"convert_seconds": round(time.perf_counter() - t, 1), "parity": validate(proto, model, images, contract),
              "contract": json.loads(contract.to_json())}
    fp32_bytes = proto.SerializeToString()
    save_atomic(fp32_bytes, cfg.out)
    report["model"] = str(cfg.out)
    if cfg.int8:
        report["int8"] = _export_int8(proto, fp32_bytes, rows, images, contract, cfg.int8_out)
    cfg.report_out.write_text(json.dumps(report, indent=2))
    return report


def _export_int8(proto, fp32_bytes: bytes, rows, images: np.ndarray, contract: Contract, out: Path) -> dict:
    import onnxruntime as ort

    from .quantize import quantize_int8, throughput

    calibration = _load_images(rows, "train", CALIBRATION_IMAGES, contract)
    q_proto, q_contract = quantize_int8(proto, calibration, contract)
    problems = structural_problems(q_proto, q_contract)
    if problems:
        raise ExportValidationError("INT8 model failed validation:\n  - " + "\n  - ".join(problems))
    fp32 = ort.InferenceSession(fp32_bytes, providers=["CPUExecutionProvider"])
    q = ort.InferenceSession(q_proto.SerializeToString(), providers=["CPUExecutionProvider"])

    def probs(session, x):
        return np.concatenate([session.run(None, {contract.input_name: x[i:i + 32]})[0][:, 0]
                               for i in range(0, len(x), 32)]) if len(x) else np.zeros(0)

    # agreement with FP32 on the whole test split, carried by the INT8 model's contract
    held = _held_out(rows)
    test, y = split_images(rows, held, 10 ** 9, contract)
    ag = agreement(probs(fp32, test), probs(q, test), contract.threshold, y)
    q_contract = dataclasses.replace(q_contract, agreement={
        **ag, "split": ("test split of the covidct-train run" if held == "test" else
                        "the local slices the model was adapted on (covidct-train --init)"), "runtime": "onnxruntime",
        "fp32_sha256": hashlib.sha256(fp32_bytes).hexdigest()})
    embed_contract(q_proto, q_contract)
    q_bytes = q_proto.SerializeToString()
    bench = np.concatenate([images] * (32 // max(1, len(images)) + 1))[:32]
    speed_fp32 = throughput(fp32_bytes, bench, contract.input_name)
    speed_int8 = throughput(q_bytes, bench, contract.input_name)
    save_atomic(q_bytes, out)
    return {"model": str(out), "n_images": ag["n"], "agreement": q_contract.agreement,
            "label_agreement_with_fp32": ag["label_agreement"], "max_abs_diff_vs_fp32": ag["max_abs_diff"],
            "fp32_images_per_s": round(speed_fp32, 1), "int8_images_per_s": round(speed_int8, 1),
            "speedup": round(speed_int8 / speed_fp32, 2)}
