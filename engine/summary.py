"""The console summary of a covidct-batch run (its run record), shared by the CLI and the demo."""

from __future__ import annotations

from pathlib import Path

from .contract import DISCLAIMER


def format_summary(run: dict, out: Path) -> str:
    """What covidct-batch prints at the end of a run: counts by label and reason, throughput, latency,
    inference, studies, the shift alarm, where the outputs are, the exit code and the disclaimer."""
    c = run["counts"]
    lines = ["", "covidct-batch summary", "-" * 44]
    for label, n in sorted(c["by_label"].items()):
        lines.append(f"  ok, label {label:<22} {n:>10,}")
    lines.append(f"  {'ok (all)':<32} {c['ok']:>10,}")
    for r in c["by_reason"]:
        lines.append(f"  {r['status'] + ', ' + str(r['reason']):<32} {r['files']:>10,}")
    lines.append(f"  {'already done (resumed)':<32} {c['already_done']:>10,}")
    lines.append("-" * 44)
    for d in run.get("damaged_parts", []):
        lines.append(f"  SET ASIDE {d['part']}: {d['reason']}; moved to {d['moved_to']}, its files screened again")
    if run.get("files_found") == 0:
        lines.append("  NOTHING FOUND: no file under the inputs (an empty folder, an unmounted share?); exit code 2")
    steady = run.get("steady_images_per_s")
    lines.append(f"  throughput {run['images_per_s']:,.1f} img/s end to end"
                 + (f", {steady:,.1f} img/s steady" if steady else "") + f" over {run['seconds']:.1f} s")
    lat = run["latency_ms"]
    lines.append("  latency ms p50/p95/p99: " + "; ".join(
        f"{k.replace('_ms', '')} {v['p50']}/{v['p95']}/{v['p99']}" for k, v in lat.items() if v["p50"] is not None))
    lines.append(f"  provider {', '.join(run['execution_providers'])}; model sha256 {run['model']['sha256'][:12]}")
    inf = run.get("inference")
    if inf:
        from .runtimes import describe
        lines.append(f"  inference: {describe(inf)}")
        lines.extend(f"    note: {n}" for n in inf.get("notes", []))
        if run["model"]["contract"].get("agreement"):
            from .runtimes import agreement_line
            lines.append(f"    {agreement_line(run['model']['contract']['agreement'])}")
    if run.get("startup_s"):
        s = run["startup_s"]
        lines.append(f"  start-up: Ray up at {s['ray_up']:.1f} s, first row on disk {s['first_row_after_ray']:.2f} s "
                     "after that" if s.get("first_row_after_ray") is not None else
                     f"  start-up: Ray up at {s['ray_up']:.1f} s")
    if run.get("studies", {}).get("studies"):
        st = run["studies"]
        lines.append(f"  studies: {st['flagged']} flagged of {st['studies']} ({st['rule']})"
                     + (f"; {st['shifted']} shifted" if st.get("shifted") else ""))
    lines.extend(shift_lines(run.get("shift")))
    cal = run["model"]["contract"].get("calibration")
    if cal:
        lines.append(f"  threshold {run['model']['contract']['threshold']:.4f} calibrated on {cal['data']['n']} local "
                     f"slices on {cal['date']} (was {cal['previous_threshold']:.4f})")
    lines.extend(study_table(Path(out)))
    lines.append(f"  predictions: {Path(out) / 'predictions'}/part-*.parquet; run record: {Path(out) / 'run.json'}")
    lines.append(f"  studies: {Path(out) / 'studies.parquet'}; report: {Path(out) / 'report.html'}")
    cur = run.get("current", {})
    gone = run.get("current_errors_not_found", 0)
    if cur.get("error", 0) - gone and not c["error"]:
        lines.append(f"  {cur['error'] - gone:,} error rows from earlier runs are still current in OUT_DIR "
                     "(unreadable and internal ones are retried by every rerun)")
    if gone:
        lines.append(f"  {gone:,} current error rows are of files this run did not find (gone, or not among its "
                     "inputs): they do not decide the exit code")
    lines.append(f"  exit code {run['exit_code']}")
    lines.append(DISCLAIMER)
    return "\n".join(lines)


def shift_lines(shift: dict | None) -> list[str]:
    """The shift alarm's verdict for the summary (details in run.json and report.html)."""
    if not shift:
        return []
    line = f"  SHIFT ALARM: {shift['verdict']}"
    if shift.get("score") is not None:
        line += f" (score {shift['score']:.3f} over {shift['slices']} slices"
        line += f"; shifted: {', '.join(shift['shifted_stats'])})" if shift.get("shifted_stats") else ")"
    return [line]


def study_table(out: Path, limit: int = 15) -> list[str]:
    """The studies with the highest top-k mean, as printed lines (the rest are in studies.parquet)."""
    from .studies import STUDIES, top_studies

    top = top_studies(out / STUDIES, limit)
    if not top or not top["studies"]:
        return []
    lines = [f"  {'study':<26} {'slices':>6} {'ok':>4} {'flagged':>7} {'top-k mean':>10}  decision"]
    for r in top["shown"]:
        name = str(r["study"])
        name = name if len(name) <= 26 else "..." + name[-23:]
        mean = f"{r['top_k_mean']:.3f}" if r["top_k_mean"] is not None else "-"
        lines.append(f"  {name:<26} {r['slices']:>6} {r['ok']:>4} {r['flagged_slices']:>7} {mean:>10}  "
                     + ("FLAGGED" if r["decision"] else "not flagged"))
    if top["studies"] > len(top["shown"]):
        lines.append(f"  ... {top['studies'] - len(top['shown'])} more studies in studies.parquet")
    return lines
