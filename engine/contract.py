"""The preprocessing contract a model carries inside its ONNX ``metadata_props``.

Training writes it, export embeds it, the engine reads it and nothing else: every
preprocessing constant (size, channels, interpolation, window, threshold, class names)
lives in one place, the model file.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2

from .preprocess import AREA_LINEAR, INTER_AREA_LINEAR, RESIZE, default_spec, spec_problems
from .shift import reference_problems

#: Key under which the contract JSON is stored in the ONNX model's metadata_props.
METADATA_KEY = "covidct_contract"
#: Version 2 adds ``preprocessing`` (site-invariant lung framing), ``target_sensitivity``,
#: ``architecture``, ``reference`` (the shift alarm's) and ``calibration`` (a local threshold's provenance). A version 1 contract reads as ``preprocessing = {"method": "resize"}``, so an
#: older model screens exactly as it did.
SCHEMA_VERSION = 2
SUPPORTED_SCHEMAS = (1, 2)

#: What new models are trained with (``engine.preprocess.resample``: area quality at linear cost).
DEFAULT_INTERPOLATION = AREA_LINEAR
#: What a contract that names no interpolation was made with (every writer before area-linear).
EARLIER_INTERPOLATION = "area"

#: Interpolation names a contract may use, mapped to the flags ``engine.preprocess.resample`` takes
#: (OpenCV's, and area-linear's own).
INTERPOLATIONS = {
    AREA_LINEAR: INTER_AREA_LINEAR,
    "area": cv2.INTER_AREA,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "nearest": cv2.INTER_NEAREST,
}

#: Default CT window (Hounsfield units) that maps DICOM pixels to grey: a lung window.
LUNG_WINDOW = {"level": -600.0, "width": 1500.0}

DISCLAIMER = (
    "Research use only: covidct-batch is a triage aid for research, not a medical device, "
    "and its outputs are not a diagnosis."
)


class ContractError(ValueError):
    """The model's contract is missing or invalid."""


@dataclass(frozen=True)
class Contract:
    """What a model expects and how its output is read.

    Attributes:
        image_size: (height, width) the image is resized to.
        class_names: (negative, positive) class folder names, in that order.
        positive_class: the class a probability refers to (``class_names[1]``).
        threshold: probability at or above which a slice is labelled positive.
        channels: grey images only: 1.
        interpolation: key of ``INTERPOLATIONS``: how ``engine.preprocess.resample`` resizes.
        input_name / output_name: ONNX tensor names.
        input_dtype / layout: the input is uint8 NHWC; scaling happens in the graph.
        precision: "fp32", or "int8" for a QDQ-quantized model.
        window: CT window (level, width in HU) applied to DICOM pixels.
        metrics: test-split metrics from training (informational).
        source_sha256: hash of the Keras model the ONNX file was exported from.
        project_version: covidct-batch version that wrote the contract.
        preprocessing: how a grey image becomes the model's input (``engine.preprocess``): method
            and parameters. Schema 1 contracts have none and read as ``{"method": "resize"}``.
        target_sensitivity: the sensitivity the threshold was chosen to reach (None if unknown).
        architecture: the network's name (informational).
        reference: what the model saw, for the shift alarm (``engine.shift``); None: no alarm.
        calibration: provenance of a threshold set by ``covidct-evaluate --calibrate`` (None when the
            threshold is training's): the local set, the date, the figures at the old and new
            threshold, and the original model's sha256.
        agreement: for a reduced-precision model (``precision`` int8), how it agrees with the FP32
            model it was made from on the training run's test split (``engine.metrics.agreement``).
        adaptation: provenance of a model adapted to a site by ``covidct-train --init`` (None otherwise): the
            source run and its model's sha256, the local set's size and class counts, what was adapted,
            and the cross-validated figures on the local set.
    """

    image_size: tuple[int, int]
    class_names: tuple[str, str]
    positive_class: str
    threshold: float
    channels: int = 1
    interpolation: str = DEFAULT_INTERPOLATION
    precision: str = "fp32"
    input_name: str = "image"
    output_name: str = "probability"
    input_dtype: str = "uint8"
    layout: str = "NHWC"
    window: dict[str, float] = field(default_factory=lambda: dict(LUNG_WINDOW))
    metrics: dict[str, Any] = field(default_factory=dict)
    source_sha256: str = ""
    project_version: str = ""
    preprocessing: dict[str, Any] = field(default_factory=default_spec)
    target_sensitivity: float | None = None
    architecture: str = ""
    reference: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    agreement: dict[str, Any] | None = None
    adaptation: dict[str, Any] | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ContractError("invalid preprocessing contract: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every way this contract is invalid (empty when it is valid)."""
        p: list[str] = []
        size = self.image_size
        if (not isinstance(size, (tuple, list)) or len(size) != 2
                or not all(isinstance(v, int) and 8 <= v <= 4096 for v in size)):
            p.append(f"image_size must be two integers in 8..4096, e.g. [256, 256]; got {size!r}")
        if self.channels != 1:
            p.append(f"channels must be 1 (grey); got {self.channels!r}")
        if self.interpolation not in INTERPOLATIONS:
            p.append(f"interpolation must be one of {sorted(INTERPOLATIONS)}; got {self.interpolation!r}")
        if self.precision not in ("fp32", "int8"):
            p.append(f"precision must be 'fp32' or 'int8'; got {self.precision!r}")
        if self.input_dtype != "uint8" or self.layout != "NHWC":
            p.append(f"input must be uint8 NHWC; got {self.input_dtype} {self.layout}")
        if len(self.class_names) != 2 or len(set(self.class_names)) != 2:
            p.append(f"class_names must be two distinct names [negative, positive]; got {self.class_names!r}")
        elif self.positive_class != self.class_names[1]:
            p.append(f"positive_class {self.positive_class!r} must be class_names[1] ({self.class_names[1]!r})")
        if not isinstance(self.threshold, (int, float)) or not 0.0 <= float(self.threshold) <= 1.0:
            p.append(f"threshold must be a probability in [0, 1], e.g. 0.5; got {self.threshold!r}")
        w = self.window
        if not isinstance(w, dict) or not {"level", "width"} <= set(w) or not float(w.get("width", 0)) > 0:
            p.append(f"window must be {{'level': HU, 'width': HU > 0}}, e.g. {LUNG_WINDOW}; got {w!r}")
        p.extend(spec_problems(self.preprocessing))
        p.extend(reference_problems(self.reference))
        cal = self.calibration
        if cal is not None and (not isinstance(cal, dict) or not {"original_sha256", "previous_threshold"} <= set(cal)):
            p.append("calibration must be an object with at least original_sha256 and previous_threshold")
        ag = self.agreement
        if ag is not None and (not isinstance(ag, dict) or not {"n", "label_agreement"} <= set(ag)):
            p.append("agreement must be an object with at least n and label_agreement")
        ad = self.adaptation
        if ad is not None and (not isinstance(ad, dict) or not {"source_model_sha256", "local_set"} <= set(ad)):
            p.append("adaptation must be an object with at least source_model_sha256 and local_set")
        ts = self.target_sensitivity
        if ts is not None and (not isinstance(ts, (int, float)) or not 0.0 < float(ts) <= 1.0):
            p.append(f"target_sensitivity must be in (0, 1], e.g. 0.95; got {ts!r}")
        if self.schema_version not in SUPPORTED_SCHEMAS:
            p.append(f"schema_version {self.schema_version!r} is not supported (this engine reads "
                     f"{list(SUPPORTED_SCHEMAS)})")
        return p

    @property
    def height(self) -> int:
        return self.image_size[0]

    @property
    def width(self) -> int:
        return self.image_size[1]

    @property
    def cv2_interpolation(self) -> int:
        return INTERPOLATIONS[self.interpolation]

    def decode_kwargs(self) -> dict[str, Any]:
        """Everything the decode functions need from this contract, e.g. ``decode_file(p, **c.decode_kwargs())``."""
        return {"image_size": tuple(self.image_size), "interpolation": self.interpolation,
                "window": dict(self.window), "preprocessing": dict(self.preprocessing)}

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Contract":
        """Parse a contract (JSON only, never ``eval``); raise ContractError naming what is wrong."""
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as e:
            raise ContractError(f"contract is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ContractError("contract JSON must be an object")
        known = {f.name for f in dataclasses.fields(cls)}
        required = {"image_size", "class_names", "positive_class", "threshold"}
        missing = sorted(required - set(data))
        if missing:
            raise ContractError(f"contract lacks required keys {missing}")
        unknown = sorted(set(data) - known)
        if unknown:
            raise ContractError(f"contract has unknown keys {unknown} (written by a newer version?)")
        if data.get("schema_version", 1) == 1:
            unknown_v1 = sorted(set(data) & {"preprocessing", "target_sensitivity", "architecture", "reference",
                                             "calibration", "agreement", "adaptation"})
            if unknown_v1:
                raise ContractError(f"a schema 1 contract cannot carry {unknown_v1}")
            data["preprocessing"] = {"method": RESIZE}  # what every schema 1 model was trained on
        elif "preprocessing" not in data:
            raise ContractError("a schema 2 contract must say its preprocessing")
        data.setdefault("interpolation", EARLIER_INTERPOLATION)
        data["image_size"] = tuple(data["image_size"])
        data["class_names"] = tuple(data["class_names"])
        try:
            return cls(**data)
        except TypeError as e:
            raise ContractError(f"contract fields are malformed: {e}") from None


def embed_contract(proto, contract: Contract) -> None:
    """Write the contract (and the research-use disclaimer) into ``metadata_props``."""
    props = {p.key: p.value for p in proto.metadata_props}
    props[METADATA_KEY] = contract.to_json()
    props["disclaimer"] = DISCLAIMER
    del proto.metadata_props[:]
    for k, v in sorted(props.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    proto.producer_name = "covidct-export"
    proto.doc_string = DISCLAIMER


def save_atomic(proto_bytes: bytes, out: Path) -> None:
    """Write the model file whole (engine.atomic), making its folder if needed."""
    from .atomic import write_atomic

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, proto_bytes)


def sha256_file(path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks: the provenance hash of models."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_contract(model_path) -> Contract:
    """Read the contract embedded in an ONNX model file (an ONNX Runtime session reads its metadata).

    Raises:
        ContractError: the file is not an ONNX model or carries no valid contract.
    """
    import onnxruntime as ort

    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        meta = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"]).get_modelmeta()
    except Exception as e:  # onnxruntime raises several private exception types
        raise ContractError(f"{model_path} is not a loadable ONNX model: {e}") from None
    return contract_from_metadata(meta.custom_metadata_map, source=str(model_path))


def contract_from_metadata(props: dict[str, str], source: str = "model") -> Contract:
    if METADATA_KEY not in props:
        raise ContractError(
            f"{source} has no '{METADATA_KEY}' entry in its metadata: export it with covidct-export "
            f"(keys present: {sorted(props) or 'none'})")
    return Contract.from_json(props[METADATA_KEY])
