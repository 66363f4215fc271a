"""Checks an exported model must pass before it is put in place."""

from __future__ import annotations

import logging

import numpy as np

from covidct.engine.contract import Contract, ContractError, contract_from_metadata

log = logging.getLogger(__name__)

#: Keras (TensorFlow kernels) and ONNX Runtime (MLAS kernels) sum the same float32 products
#: in different orders: the ~250k-term Dense reduction drifts by ~1e-6 relative, which the
#: sigmoid (slope <= 0.25) shrinks further. 1e-4 is two orders above that noise and far below
#: what a preprocessing mistake moves (a 1/256 instead of 1/255 rescale shifts ~1e-3).
PARITY_ATOL = 1e-4
PARITY_BATCH_SIZES = (1, 8)


class ExportValidationError(RuntimeError):
    """The exported model failed a check; it was not written."""


class ExportInputError(ExportValidationError):
    """What was given to export is not exportable (not a run directory, a model changed since training)."""


def structural_problems(proto, contract: Contract) -> list[str]:
    import onnx

    problems = []
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # onnx raises ValidationError and InferenceError
        problems.append(f"onnx.checker: {e}")
    inputs, outputs = proto.graph.input, proto.graph.output
    if [i.name for i in inputs] != [contract.input_name]:
        problems.append(f"inputs {[i.name for i in inputs]} != [{contract.input_name!r}]")
    elif inputs[0].type.tensor_type.elem_type != onnx.TensorProto.UINT8:
        problems.append("input is not uint8")
    else:
        dims = inputs[0].type.tensor_type.shape.dim
        if not dims[0].dim_param or dims[0].dim_value:
            problems.append("batch axis is not symbolic")
        shape = [d.dim_value for d in dims[1:]]
        if shape != [contract.height, contract.width, contract.channels]:
            problems.append(f"input shape {shape} != contract {[contract.height, contract.width, contract.channels]}")
    if [o.name for o in outputs] != [contract.output_name]:
        problems.append(f"outputs {[o.name for o in outputs]} != [{contract.output_name!r}]")
    try:
        back = contract_from_metadata({p.key: p.value for p in proto.metadata_props})
        if back != contract:
            problems.append("contract read back from metadata differs from the one written")
    except ContractError as e:
        problems.append(str(e))
    return problems


def compare(reference: np.ndarray, candidate_session, images: np.ndarray, contract: Contract,
            batch_sizes=PARITY_BATCH_SIZES, atol: float = PARITY_ATOL) -> tuple[dict, list[str]]:
    """Run ``candidate_session`` at each batch size and compare with reference probabilities.

    A label may only differ where the reference probability lies within ``atol`` of the
    threshold (then the disagreement is float noise, and it is counted, not failed).
    """
    problems, report = [], {"atol": atol, "n_images": int(len(images)), "batch_sizes": list(batch_sizes)}
    thr = contract.threshold
    for bs in batch_sizes:
        got = np.concatenate([
            candidate_session.run([contract.output_name], {contract.input_name: images[i:i + bs]})[0][:, 0]
            for i in range(0, len(images), bs)])
        diff = float(np.max(np.abs(got - reference)))
        flips = (got >= thr) != (reference >= thr)
        boundary = np.abs(reference - thr) <= atol
        report[f"max_abs_diff_batch{bs}"] = diff
        report[f"label_flips_batch{bs}"] = int(flips.sum())
        if diff > atol:
            problems.append(f"batch {bs}: max |keras - onnx| = {diff:.3g} > {atol:g}")
        if (flips & ~boundary).any():
            problems.append(f"batch {bs}: {int((flips & ~boundary).sum())} label(s) differ at threshold {thr:.4f}")
    return report, problems


def validate(proto, keras_model, images: np.ndarray, contract: Contract) -> dict:
    """Structure, contract and Keras-vs-ONNX-Runtime parity; raises once with every problem."""
    import onnxruntime as ort

    problems = structural_problems(proto, contract)
    report: dict = {}
    if len(images) < 2:
        problems.append(f"parity needs real images: only {len(images)} could be read")
    if not problems:
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        reference = keras_model.predict(images.astype(np.float32), batch_size=16, verbose=0)[:, 0]
        report, parity_problems = compare(reference, session, images, contract)
        problems += parity_problems
    if problems:
        raise ExportValidationError("exported model failed validation:\n  - " + "\n  - ".join(problems))
    log.info("parity: %s", report)
    return report
