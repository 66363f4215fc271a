"""OUT_DIR/report.html: one self-contained page (no server, no network, no scripts) for a radiologist."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np

from .atomic import write_atomic
from .contract import DISCLAIMER
from .studies import STUDIES, top_studies

REPORT = "report.html"
RUN = "run.json"
MAX_FLAGGED = 200  # studies shown with thumbnails; the rest are counted
MAX_FLAGGED_FILES = 100  # without study grouping: files listed by probability
FILE_THUMBNAILS = 24  # of which this many with their slice (the report stays small)


def _esc(v) -> str:
    return html.escape("" if v is None else str(v))


def histogram_svg(counts: np.ndarray, threshold: float, w: int = 560, h: int = 180) -> str:
    """An SVG bar chart of slice-probability counts in equal bins over [0, 1]."""
    bins = len(counts)
    top = max(1, int(counts.max()) if len(counts) else 1)
    bw = w / bins
    bars = "".join(
        f'<rect x="{i * bw:.1f}" y="{h - 20 - c / top * (h - 30):.1f}" width="{bw - 2:.1f}" '
        f'height="{c / top * (h - 30):.1f}" fill="#4a78b5"><title>{i / bins:.2f}-{(i + 1) / bins:.2f}: {c}</title></rect>'
        for i, c in enumerate(counts))
    tx = threshold * w
    axis = "".join(f'<text x="{x * w:.0f}" y="{h - 4}" font-size="11" text-anchor="middle">{x:.1f}</text>'
                   for x in (0.0, 0.25, 0.5, 0.75, 1.0))
    return (f'<svg id="histogram" xmlns="http://www.w3.org/2000/svg" width="{w + 10}" height="{h}" '
            f'role="img" aria-label="histogram of slice probabilities">{bars}'
            f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="0" y2="{h - 20}" stroke="#c0392b" stroke-width="2"/>'
            f'<text x="{tx + 4:.1f}" y="12" font-size="11" fill="#c0392b">threshold {threshold:.3f}</text>{axis}</svg>')


def shift_banner(shift: dict | None) -> str:
    """The shift alarm's verdict as a visible banner, with the statistics behind it."""
    if not shift:
        return ""
    verdict = shift["verdict"]
    cls = "shifted" if verdict.startswith("shifted") else "inrange" if verdict == "in range" else "unknown"
    head = {"shifted": "This archive is not like the data the model was trained on. Check the model on "
                       "labelled local slices (covidct-evaluate) before using its outputs.",
            "inrange": "This archive is in the range of the data the model was trained on (how the images were "
                       "made, not whether the model is right: only a labelled local check tells that).",
            "unknown": verdict}[cls]
    rows = "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(v['ks'])}</td><td>{_esc(v['critical'])}</td>"
                   f"<td>{'decides' if v.get('decides') else 'information'}</td>"
                   f"<td>{'shifted' if v['shifted'] else ''}</td></tr>" for k, v in shift.get("stats", {}).items())
    table = ("<details><summary>statistics (Kolmogorov-Smirnov distance to the reference)</summary><table>"
             "<tr><th>statistic</th><th>KS</th><th>critical</th><th>role</th><th></th></tr>" + rows + "</table>"
             f"<p>{_esc(shift.get('rule'))}</p></details>") if rows else ""
    score = f" Shift score {shift['score']:.3f} over {shift['slices']} slices." if shift.get("score") is not None else ""
    return (f'<div class="{cls}" id="shift"><b>Shift alarm: {_esc(verdict)}.</b> {_esc(head) if cls != "unknown" else ""}'
            f'{_esc(score)}{table}</div>')


def calibration_note(cal: dict | None) -> str:
    """Where the threshold came from, when covidct-evaluate --calibrate set it on local data."""
    if not cal:
        return ""
    d = cal.get("data", {})
    return (f'<p id="calibration">Threshold calibrated on local data on {_esc(cal.get("date"))}: '
            f'{_esc(d.get("n"))} slices ({_esc(d.get("positives"))} positive, {_esc(d.get("negatives"))} negative), '
            f'target sensitivity {_esc(cal.get("target_sensitivity"))}; previous threshold '
            f'{_esc(cal.get("previous_threshold"))}; original model sha256 '
            f'<code>{_esc(str(cal.get("original_sha256"))[:16])}</code>.</p>')


def inference_note(inf: dict | None, startup: dict | None, agreement: dict | None) -> str:
    """Runtime, precision, instruction set, CPU flags and fallbacks; start-up apart from throughput."""
    if not inf:
        return ""
    from .runtimes import agreement_line, describe

    notes = "".join(f"<li>{_esc(n)}</li>" for n in inf.get("notes", []) + ([agreement_line(agreement)]
                                                                          if agreement else []))
    su = ""
    if startup and startup.get("first_row_after_ray") is not None:
        su = (f" Start-up: Ray up at {startup['ray_up']:.1f} s, first row on disk "
              f"{startup['first_row_after_ray']:.2f} s after that.")
    return (f'<p id="inference">Inference: {_esc(describe(inf))}.{_esc(su)}</p>'
            + (f"<ul>{notes}</ul>" if notes else ""))


def state_note(state: str | None) -> str:
    if state in (None, "complete"):
        return ""
    return (f'<p class="warn" id="state">This run did not finish ({_esc(state)}): rows written before it stopped '
            "are counted below; rerun the same command to screen the rest.</p>")


def write_report(out: Path, run: dict, rows) -> Path:
    """Render the report from run.json's record, the current rows (a ``studies.Rows``),
    studies.parquet and the thumbnails of the studies shown. Memory does not grow with rows:
    every figure is a query, and at most MAX_FLAGGED studies are read from studies.parquet.

    Longer than most functions here on purpose: it is the page from top to bottom, one block per
    section (header, counts, shift alarm, flagged studies or files, throughput), read in order."""
    out = Path(out)
    sha = run["model"]["sha256"]
    thr = float(run["model"]["contract"]["threshold"])
    c = run["counts"]
    status = rows.status_counts()

    parts = [f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>covidct-batch report {_esc(run['run_id'])}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px;color:#222}}
table{{border-collapse:collapse;margin:.5em 0}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}}
.warn{{background:#fff3cd;border:1px solid #e0c060;padding:.6em 1em}}.thumbs img{{margin:2px;border:1px solid #999}}
.flag{{color:#c0392b;font-weight:bold}}.shifted{{background:#f8d7da;border:2px solid #c0392b;padding:.6em 1em}}
.inrange{{background:#e6f4ea;border:1px solid #5a9;padding:.6em 1em}}.unknown{{background:#eee;border:1px solid #aaa;padding:.6em 1em}}
</style></head><body>
<h1>covidct-batch screening report</h1>
<p class="warn" id="disclaimer">{_esc(DISCLAIMER)}</p>
{shift_banner(run.get("shift"))}
{calibration_note(run["model"]["contract"].get("calibration"))}
<p>Run <code>{_esc(run['run_id'])}</code>, {_esc(run['started'])} to {_esc(run['ended'])}. Model sha256
<code>{_esc(sha[:16])}</code>, positive class <b>{_esc(run['model']['contract']['positive_class'])}</b>,
threshold {thr:.4f}, provider {_esc(', '.join(run['execution_providers']))}.</p>
{inference_note(run.get("inference"), run.get("startup_s"), run["model"]["contract"].get("agreement"))}
{state_note(run.get("state"))}
<h2>Counts</h2><table id="counts"><tr><th>files/slices in OUT_DIR</th><th>number</th></tr>"""]
    for k in ("ok", "error", "skipped"):
        parts.append(f"<tr><td>{k}</td><td class='n-{k}'>{int(status.get(k, 0))}</td></tr>")
    for label, n in sorted(rows.flagged_counts().items()):
        parts.append(f"<tr><td>ok, {label}</td><td>{int(n)}</td></tr>")
    parts.append(f"<tr><td>this run: new / already done</td><td>{c['ok'] + c['error'] + c['skipped']} / "
                 f"{c['already_done']}</td></tr></table>")
    parts.append("<h2>Slice probabilities</h2>" + histogram_svg(rows.probability_histogram(), thr))

    parts.append("<h2>Flagged studies</h2>")
    st = top_studies(rows.out / STUDIES, MAX_FLAGGED, flagged_only=True)
    if st is not None and st["studies"]:
        flagged = st["shown"]
        parts.append(f"<p>{st['flagged']} of {st['studies']} studies flagged (mean of the top {st['top_k']} "
                     f"slice probabilities &ge; threshold).</p>")
        parts.append('<table id="flagged"><tr><th>study</th><th>slices ok/total</th><th>flagged slices</th>'
                     "<th>top-k mean</th><th>max</th><th>shift</th><th>top slices</th></tr>")
        thumbs = rows.thumbnails([s["study"] for s in flagged])
        for s in flagged:
            imgs = "".join(
                f'<img alt="slice p={p:.3f}" title="p={p:.3f}" width="96" height="96" '
                f'src="data:image/jpeg;base64,{base64.b64encode(b).decode()}">'
                for p, b in thumbs.get(s["study"], [])[:3])
            parts.append(f"<tr><td><code>{_esc(s['study'])}</code></td><td>{s['ok']}/{s['slices']}</td>"
                         f"<td>{s['flagged_slices']}</td><td class='flag'>{s['top_k_mean']:.3f}</td>"
                         f"<td>{s['max_probability']:.3f}</td><td>{_esc(s.get('shift_verdict'))}</td>"
                         f"<td class='thumbs'>{imgs}</td></tr>")
        parts.append("</table>")
        if st["flagged"] > len(flagged):
            parts.append(f"<p>{st['flagged'] - len(flagged)} more flagged studies are in studies.parquet.</p>")
    else:
        top = rows.top_flagged(MAX_FLAGGED_FILES)
        parts.append("<p>No study grouping (DICOM UIDs or --group-by) for these inputs: the most probable "
                     f"flagged files are listed instead ({len(top)} shown, the first {FILE_THUMBNAILS} with "
                     "their slice where allowed).</p>")
        if top:
            parts.append('<table id="flagged-files"><tr><th>file</th><th>probability</th><th>slice</th></tr>')
            for k, (path, p, b) in enumerate(top):
                img = (f'<img alt="slice p={p:.3f}" width="96" height="96" '
                       f'src="data:image/jpeg;base64,{base64.b64encode(b).decode()}">'
                       if b and k < FILE_THUMBNAILS else "")
                parts.append(f"<tr><td><code>{_esc(path)}</code></td><td class='flag'>{p:.3f}</td>"
                             f"<td class='thumbs'>{img}</td></tr>")
            parts.append("</table>")

    parts.append('<h2>Errors and skips</h2><table id="reasons"><tr><th>status</th><th>reason</th><th>number</th></tr>')
    for st_, reason, n in rows.reasons():
        parts.append(f"<tr><td>{_esc(st_)}</td><td>{_esc(reason)}</td><td>{int(n)}</td></tr>")
    parts.append("</table>")
    lat = run["latency_ms"]
    parts.append(f"<h2>Throughput and latency</h2><p id='throughput'>{run['images_per_s']:.1f} images/s end to end"
                 f" over {run['seconds']:.1f} s" + (f", {run['steady_images_per_s']:.1f} images/s steady"
                                                     if run.get("steady_images_per_s") else "") + ".</p>")
    parts.append("<table><tr><th>stage (ms)</th><th>p50</th><th>p95</th><th>p99</th></tr>" + "".join(
        f"<tr><td>{_esc(k.replace('_ms', ''))}</td><td>{v['p50']}</td><td>{v['p95']}</td><td>{v['p99']}</td></tr>"
        for k, v in lat.items() if v["p50"] is not None) + "</table>")
    parts.append(f"<p><small>{_esc(DISCLAIMER)}</small></p></body></html>")
    write_atomic(out / REPORT, "\n".join(parts))
    return out / REPORT


def build_report(out: Path, top_k: int | None = None, group_by: str | None = "<from run.json>", seen=None) -> dict:
    """studies.parquet and report.html from OUT_DIR alone (its parts and run.json); updates run.json.

    ``top_k`` and ``group_by`` default to the run's own; covidct-batch calls this at the end of a
    run, covidct-report after a crash or to change the rule without screening again.
    Returns the updated run record: ``studies``, and ``current`` (rows by status now current in
    OUT_DIR for this model, earlier runs' included). With ``seen`` (the file_ids a run found), ``current``
    also says how many current error rows are of files that run did not find (gone, or not among its
    inputs): ``current_errors_not_found``; those do not decide its exit code."""
    from .studies import Rows

    out = Path(out)
    run = json.loads((out / RUN).read_text())
    cfg = run.get("config", {})
    top_k = int(top_k if top_k is not None else cfg.get("top_k", 3))
    group_by = cfg.get("group_by") if group_by == "<from run.json>" else group_by
    contract = run["model"]["contract"]
    with Rows(out, run["model"]["sha256"], group_by) as rows:
        counts = rows.build_studies(float(contract["threshold"]), top_k, contract.get("reference"))
        run["studies"] = {**counts, "rule": f"mean of the top {top_k} slice probabilities >= threshold",
                          "group_by": group_by}
        run["current"] = {k: int(rows.status_counts().get(k, 0)) for k in ("ok", "error", "skipped")}
        if seen is not None:
            ids = rows.error_file_ids()  # rows without a file_id cannot be told apart: they count
            run["current_errors_not_found"] = int(sum(1 for i in ids.tolist() if i not in seen))
        write_json(out / RUN, run)
        write_report(out, run, rows)
    return run


def write_json(path: Path, record: dict) -> None:
    """``record`` as JSON, atomically (temporary file, fsync, rename); OutputError when it cannot be written
    (a full disk outside the parts stops a run like one inside them: exit 3)."""
    from .sink import OutputError

    try:
        write_atomic(path, json.dumps(record, indent=2, default=str))
    except OSError as e:
        raise OutputError(f"{path} could not be written ({e.strerror or e})") from None
