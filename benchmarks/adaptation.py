"""Adaptation curve: a model trained at one site, adapted to another with N of its labelled slices.

For each N (20, 50, 100, 200 by default) a sample of N slices of the new site (half of each class where the
site has them, whole groups only: ``--groups``, by default the UCSD set's source figure, the part of the
file name before ``%N``) is taken; samples are nested (the 20 are among the 50...) and every figure is
measured on the same **unseen** slices: all of the site's slices outside the largest sample, in groups
none of the samples touched. For each N, through the commands a user runs:

- ``covidct-train LOCAL --init SOURCE_RUN``, ``covidct-export``, ``covidct-evaluate`` on the unseen slices;
- ``covidct-evaluate SOURCE_MODEL LOCAL --calibrate`` (only the threshold moves), then ``covidct-evaluate``
  of the calibrated model on the unseen slices.

The source model itself is evaluated on the unseen slices first. Writes ``adaptation-<cpu class>.md`` and
``.json`` under ``benchmarks/results``, with the time each command took and the CPU flags.

    python -m benchmarks.adaptation --source runs/ms/leave-one-site-out/ucsd-covid-ct \\
        --site ../shared/data/ucsd-covid-ct --work runs/adapt
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from covidct.engine.labels import resolve_classes

RESULTS = Path(__file__).resolve().parent / "results"
#: UCSD's crops of one paper figure share the file name before ``%N``.
FIGURE_GROUPS = r"^(.*?)%\d+\.[A-Za-z]+$"


def _group(name: str, pattern: re.Pattern) -> str:
    m = pattern.search(name)
    return (m.group(1) if m.groups() else m.group(0)) if m else name


def nested_samples(site: Path, sizes: list[int], seed: int, groups: str) -> tuple[list[list[tuple[str, Path]]],
                                                                                 list[tuple[str, Path]]]:
    """Samples of the given sizes (nested, whole groups, classes balanced) and the unseen slices."""
    pattern = re.compile(groups)
    classes = resolve_classes(site)
    rng = np.random.default_rng(seed)
    ordered = {}
    for c in classes:
        files = sorted(p for p in (site / c).iterdir() if p.is_file())
        by_group: dict[str, list[Path]] = {}
        for p in files:
            by_group.setdefault(_group(p.name, pattern), []).append(p)
        keys = sorted(by_group)
        rng.shuffle(keys)
        ordered[c] = [[(c, p) for p in by_group[k]] for k in keys]
    samples = []
    for n in sorted(sizes):
        sample = []
        for c in classes:
            taken = []
            for g in ordered[c]:
                if len(taken) >= n // 2:
                    break
                taken.extend(g)
            sample.extend(taken)
        samples.append(sample)
    used = {p for _, p in samples[-1]}
    unseen = [(c, p) for c in classes for g in ordered[c] for _, p in g if p not in used]
    return samples, unseen


def _folder(root: Path, files: list[tuple[str, Path]]) -> Path:
    if root.exists():
        shutil.rmtree(root)
    for c, p in files:
        (root / c).mkdir(parents=True, exist_ok=True)
        shutil.copy2(p, root / c / p.name)
    return root


def _cli(name: str, *args, log: list) -> tuple[subprocess.CompletedProcess, float]:
    exe = Path(sys.executable).with_name(name)
    t = time.perf_counter()
    r = subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True)
    dt = time.perf_counter() - t
    log.append({"command": " ".join([name, *map(str, args)]), "seconds": round(dt, 1), "rc": r.returncode})
    return r, dt


def _evaluation(path: Path) -> dict:
    e = json.loads((path / "evaluation.json").read_text())
    at = e["at_stored_threshold"]
    return {"n": e["n"], "roc_auc": e["roc_auc"], "roc_auc_ci95": e["roc_auc_ci95"], "threshold": at["threshold"],
            "sensitivity": at["sensitivity"], "sensitivity_ci95": at["sensitivity_ci95"],
            "specificity": at["specificity"], "specificity_ci95": at["specificity_ci95"]}


def run(source: Path, site: Path, work: Path, sizes: list[int], seed: int, groups: str, method: str,
        init_args: tuple[str, ...] = ()) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    samples, unseen = nested_samples(site, sizes, seed, groups)
    unseen_dir = _folder(work / "unseen", unseen)
    log: list = []
    model = source / "model.onnx"
    if not model.is_file():
        r, _ = _cli("covidct-export", source, "--out", model, log=log)
        if r.returncode:
            raise SystemExit(r.stderr[-3000:])
    r, _ = _cli("covidct-evaluate", model, unseen_dir, "--out", work / "eval-source", "--no-progress", log=log)
    if r.returncode not in (0, 1):
        raise SystemExit(r.stderr[-3000:])
    report = {"source_run": str(source), "site": str(site), "unseen": len(unseen), "groups": groups, "seed": seed,
              "method": method, "init_args": list(init_args), "source_on_unseen": _evaluation(work / "eval-source"),
              "sizes": []}
    for n, sample in zip(sorted(sizes), samples):
        local = _folder(work / f"local-{n}", sample)
        row = {"n": len(sample), "classes": {c: sum(1 for k, _ in sample if k == c) for c in resolve_classes(site)}}
        out = work / f"adapt-{n}"
        shutil.rmtree(out, ignore_errors=True)
        r, t_train = _cli("covidct-train", local, "--init", source, "--out", out, "--groups", groups,
                          "--adapt", method, *init_args, log=log)
        if r.returncode == 0:
            r2, t_export = _cli("covidct-export", out, "--out", out / "model.onnx", log=log)
            _cli("covidct-evaluate", out / "model.onnx", unseen_dir, "--out", work / f"eval-adapt-{n}",
                 "--no-progress", log=log)
            cv = json.loads((out / "metrics.json").read_text())
            row["adapted"] = {**_evaluation(work / f"eval-adapt-{n}"), "train_s": round(t_train, 1),
                              "export_s": round(t_export, 1),
                              "local_out_of_fold": {k: cv[k] for k in ("roc_auc", "roc_auc_ci95", "sensitivity",
                                                                       "specificity")}}
        else:
            row["adapted"] = {"refused": r.stderr.strip().splitlines()[-1]}
        cal = work / f"calibrated-{n}.onnx"
        r, _ = _cli("covidct-evaluate", model, local, "--out", work / f"eval-local-{n}", "--calibrate",
                    "--calibrated-out", cal, "--no-progress", log=log)
        if cal.is_file():
            _cli("covidct-evaluate", cal, unseen_dir, "--out", work / f"eval-cal-{n}", "--no-progress", log=log)
            row["calibrated"] = _evaluation(work / f"eval-cal-{n}")
        else:
            row["calibrated"] = {"refused": (r.stderr.strip().splitlines() or ["?"])[-1]}
        report["sizes"].append(row)
        print(json.dumps(row), flush=True)
    report["commands"] = log
    return report


def _fig(f: dict) -> str:
    if "refused" in f:
        return "refused: " + f["refused"].replace("|", "/")[:160]
    lo, hi = f["roc_auc_ci95"]
    return (f"{f['roc_auc']:.3f} [{lo:.3f}, {hi:.3f}] | {f['sensitivity']:.3f} / {f['specificity']:.3f} "
            f"(threshold {f['threshold']:.3f})")


def markdown(r: dict) -> str:
    m = r["machine"]
    s = r["source_on_unseen"]
    lines = [
        "# Adaptation to a new site: AUC on the site's unseen slices against the number of local slices",
        "",
        f"Machine: {m['cores']} cores, {m['cpu']}, **CPU flags: {' '.join(m['cpu_flags'])}**; {r['date']}.",
        f"Source run `{r['source_run']}`; new site `{r['site']}`; {r['unseen']} unseen slices (outside every sample, "
        f"whole source figures, groups `{r['groups']}`), seed {r['seed']}; `--adapt {r['method']}`"
        + "".join(f" `{a}`" for a in r.get("init_args", [])) + ".",
        "",
        f"Source model on the unseen slices, not adapted: AUC {_fig(s)}.",
        "",
        "| local slices | covidct-train --init: AUC [95% CI] on unseen | sens / spec at its stored threshold "
        "| local out-of-fold AUC | covidct-evaluate --calibrate: AUC | sens / spec |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["sizes"]:
        a, c = row["adapted"], row["calibrated"]
        a_cells = _fig(a).split(" | ") if "refused" not in a else [_fig(a), ""]
        c_cells = _fig(c).split(" | ") if "refused" not in c else [_fig(c), ""]
        oof = a.get("local_out_of_fold", {})
        oof_s = f"{oof['roc_auc']:.3f} [{oof['roc_auc_ci95'][0]:.3f}, {oof['roc_auc_ci95'][1]:.3f}]" if oof else ""
        lines.append(f"| {row['n']} {row['classes']} | {a_cells[0]} | {a_cells[1]} | {oof_s} | {c_cells[0]} | "
                     f"{c_cells[1]} |")
    lines += ["", "Times (seconds): " + "; ".join(f"`{c['command'].split(' ')[0]}` {c['seconds']}"
                                               for c in r["commands"] if "--init" in c["command"]), ""]
    return "\n".join(lines)


def main() -> None:
    from benchmarks.compare import machine, result_stem

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, required=True, help="a covidct-train run (exported here if needed)")
    ap.add_argument("--site", type=Path, required=True, help="the new site's labelled folder")
    ap.add_argument("--work", type=Path, default=Path("runs/adapt"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[20, 50, 100, 200])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--groups", default=FIGURE_GROUPS)
    ap.add_argument("--adapt", default="probe", choices=["probe", "all", "bn", "head"])
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--tag", default="", help="suffix of the result files, after a '-' (e.g. 'probe')")
    ap.add_argument("--init-args", default="", help="more options for covidct-train --init, e.g. '--epochs 20'")
    args = ap.parse_args()
    report = run(args.source, args.site, args.work, args.sizes, args.seed, args.groups, args.adapt,
                 tuple(shlex.split(args.init_args)))
    report["machine"] = machine()
    report["date"] = time.strftime("%Y-%m-%d")
    m = report["machine"]
    stem = result_stem(args.results, "adaptation", {**m, "gpu": None}, args.tag)  # named by the CPU it trained on
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
