"""The contract's input path against the decoder alone, per slice on one core.

    python -m benchmarks.decode_path

writes ``benchmarks/results/decode-path-<class>.{json,md}``. For CT-like 512x512 JPEG slices
(``train.synthetic.make_archive``), real PNG slices from ``../shared/data`` and the TCIA DICOM
slices there, each file's best of ``--repeats`` timings of:

- ``imdecode``: ``cv2.imdecode`` alone of the file's bytes, with the flag the engine uses (for DICOM:
  ``pydicom.dcmread(...).pixel_array``, the decoder the engine calls);
- ``decode``: the engine's decode of those bytes to a grey frame (format sniffing, the header's
  budget checks, the end-marker check, grey conversion; for DICOM the HU and the window);
- ``working_copy``: lung-crop's reduction to its working size; ``framing``: finding the body and the
  lungs on it; ``crop_resize_map``: the rest of lung-crop (anchors, the crop resized to the model's
  size, the intensity map, the mask outside the body); ``statistics``: the shift alarm's statistics;
- ``whole``: ``read_file`` + ``decode_inputs`` + ``slice_stats``, what a worker runs per slice.

The ratio ``whole / imdecode`` is the issue's target (<= 1.5); its two sides are timed in turn, call by
call, so that a busy moment of a shared machine weighs on both. Medians over files; CPU flags named.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from benchmarks.compare import best_of, best_of_paired, result_stem
from covidct.engine.contract import DEFAULT_INTERPOLATION, INTERPOLATIONS, LUNG_WINDOW
from covidct.engine.decode import decode_grey_frames, decode_inputs, read_file, sniff
from covidct.engine.preprocess import _shrink, default_spec, find_body_and_lungs, lung_crop
from covidct.engine.runtimes import cpu_flags, cpu_name
from covidct.engine.shift import slice_stats

RESULTS = Path(__file__).resolve().parent / "results"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
STAGES = ("read", "imdecode", "decode", "working_copy", "framing", "crop_resize_map", "statistics", "whole")


def _best(fn, repeats: int) -> float:
    """Milliseconds of the fastest of ``repeats`` calls."""
    return best_of(fn, repeats) * 1e3


def _best_paired(fns: dict, repeats: int) -> dict:
    """Milliseconds of the fastest of ``repeats`` calls of each function, taken in turn (``best_of_paired``)."""
    return {name: v * 1e3 for name, v in best_of_paired(fns, repeats).items()}


def decoder_alone(data: bytes):
    """The decoder the engine calls for these bytes, alone: a function of no arguments."""
    fmt = sniff(data[:132])
    if fmt in (None, "dicom"):
        import io
        import warnings

        import pydicom

        def dicom():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return pydicom.dcmread(io.BytesIO(data), force=True).pixel_array
        return dicom
    buf = np.frombuffer(data, np.uint8)
    flag = cv2.IMREAD_GRAYSCALE if fmt == "jpeg" else cv2.IMREAD_UNCHANGED
    return lambda: cv2.imdecode(buf, flag)


def measure_file(path: Path, size=(256, 256), spec=None, repeats: int = 20, reduced_jpeg: bool = False) -> dict:
    """Milliseconds of each stage (best of ``repeats``) for one file, and ``ratio`` = whole / imdecode.

    ``reduced_jpeg``: the engine decodes a JPEG at half scale in libjpeg's DCT (``--fast-jpeg``; not the
    contract's exact path); the decoder alone stays the full decode, as the target defines it."""
    spec = spec or default_spec()
    data = Path(path).read_bytes()
    interp = INTERPOLATIONS[DEFAULT_INTERPOLATION]  # what a new model's contract names
    reduced_for = size if reduced_jpeg else None
    grey = decode_grey_frames(data, window=LUNG_WINDOW, reduced_jpeg_for=reduced_for)[0][0]
    small, _ = _shrink(grey, int(spec["work_size"]))
    img, framing = lung_crop(grey, size, interp, spec)
    t = _best_paired({  # the ratio's two sides in turn
        "imdecode": decoder_alone(data),
        "whole": lambda: [slice_stats(i, f) for i, _, f in decode_inputs(
            read_file(path), size, DEFAULT_INTERPOLATION, window=LUNG_WINDOW, preprocessing=spec,
            reduced_jpeg=reduced_jpeg)],
    }, repeats)
    t |= {
        "read": _best(lambda: read_file(path), repeats),
        "decode": _best(lambda: decode_grey_frames(data, window=LUNG_WINDOW, reduced_jpeg_for=reduced_for), repeats),
        "working_copy": _best(lambda: _shrink(grey, int(spec["work_size"])), repeats),
        "framing": _best(lambda: find_body_and_lungs(small), repeats),
        "lung_crop": _best(lambda: lung_crop(grey, size, interp, spec), repeats),
        "statistics": _best(lambda: slice_stats(img, framing), repeats),
    }
    t["crop_resize_map"] = max(0.0, t["lung_crop"] - t["working_copy"] - t["framing"])
    t["ratio"] = t["whole"] / t["imdecode"]
    t["shape"] = list(grey.shape)
    return t


def measure_set(paths: list[Path], **kw) -> dict:
    per = [measure_file(p, **kw) for p in paths]
    out = {k: round(statistics.median(r[k] for r in per), 4) for k in (*STAGES, "lung_crop", "ratio")}
    out["files"] = len(per)
    out["shapes"] = sorted({tuple(r["shape"]) for r in per})[:4]
    return out


#: The row that measures a lever outside the contract: the same JPEG slices decoded at half scale.
HALF_SCALE = "CT-like 512x512 JPEG, half-scale decode (`--fast-jpeg`: not the contract's path)"


def sets(n: int, work: Path) -> dict[str, list[Path]]:
    from covidct.train.synthetic import make_archive

    jpegs = make_archive(work / "jpeg", n, seed=0, size=(512, 512))
    found = {"CT-like 512x512 JPEG (synthetic)": jpegs, HALF_SCALE: jpegs}
    for name in ("sarscov2-ct-subset", "ucsd-covid-ct"):
        pngs = sorted((SHARED / name).rglob("*.png"))
        if pngs:
            found[f"real PNG ({name})"] = pngs[:: max(1, len(pngs) // n)][:n]
    dcm = sorted((SHARED / "tcia-covid19-ny-sbu-dicom").rglob("*.dcm"))
    if dcm:
        found["real DICOM 512x512 int16 (TCIA)"] = dcm[:n]
    return found


def markdown(report: dict) -> str:
    lines = ["# The contract's input path against the decoder alone (one core, per slice)", "",
             f"Machine: {report['cpu']}, **CPU flags: {' '.join(report['cpu_flags'])}**. Date: {report['date']}. "
             f"Command: `{report['command']}`. Medians over files of each file's best of {report['repeats']}; ms. "
             f"Interpolation `{report.get('interpolation', 'area')}` (what a new model's contract names).", "",
             "| slices | files | read | decoder alone | engine decode | working copy | framing | crop+resize+map "
             "| statistics | whole path | whole / decoder | target <= 1.5 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["sets"].items():
        verdict = "yes" if r["ratio"] <= 1.5 else "**no**"
        lines.append(f"| {name} | {r['files']} | {r['read']:.3f} | {r['imdecode']:.3f} | {r['decode']:.3f} | "
                     f"{r['working_copy']:.3f} | {r['framing']:.3f} | {r['crop_resize_map']:.3f} | "
                     f"{r['statistics']:.3f} | {r['whole']:.3f} | {r['ratio']:.2f} | "
                     f"{verdict + ' (not the contract)' if name == HALF_SCALE else verdict} |")
    lines += ["", "Decoder alone: `cv2.imdecode` (JPEG grey, PNG unchanged); for DICOM `pydicom` `pixel_array`. "
              "Engine decode adds the format and budget checks and grey conversion (DICOM: HU and window). "
              "Framing is lung-crop's search for the body and lungs on its 128-pixel working copy; "
              "crop+resize+map is the rest of lung-crop. Whole path: read_file + decode_inputs + slice_stats. "
              "The ratio's two sides (decoder alone, whole path) are timed in turn, call by call, so that a busy "
              "moment weighs on both; each stage column in a loop of its own, on warmer caches, so the stages "
              "need not add up to the whole. The half-scale row measures the lever the target names for JPEG "
              "(libjpeg's DCT scaling, the engine's opt-in `--fast-jpeg`): its inputs differ from the contract's "
              "(within 4 grey levels before lung-crop), so reaching 1.5 that way needs a new contract version.", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40, help="files per set")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--tag", default="", help="suffix of the report's name (see benchmarks.compare --tag)")
    args = ap.parse_args()
    cv2.setNumThreads(1)  # one core, as each worker runs

    with tempfile.TemporaryDirectory() as tmp:
        report = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "cpu_flags": cpu_flags(),
                  "interpolation": DEFAULT_INTERPOLATION,
                  "repeats": args.repeats, "command": "python -m benchmarks.decode_path " + " ".join(
                      f"--{k} {v}" for k, v in (("n", args.n), ("repeats", args.repeats))),
                  "sets": {name: measure_set(paths, repeats=args.repeats, reduced_jpeg=name == HALF_SCALE)
                           for name, paths in sets(args.n, Path(tmp)).items()}}
    args.results.mkdir(parents=True, exist_ok=True)
    stem = result_stem(args.results, "decode-path", {"cpu_flags": report["cpu_flags"]}, args.tag)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
