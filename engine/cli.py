"""Command line of covidct-batch: parses options, builds a ScreenConfig, calls pipeline.run()."""

from __future__ import annotations

from pathlib import Path

import click

from .contract import DISCLAIMER
from .exits import CommandError, Exit, command
from .logs import setup_logging
from .summary import format_summary, study_table
from .runtimes import DEVICES, PRECISIONS, RUNTIME_CHOICES, THUMBNAILS


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", nargs=-1, type=click.Path(path_type=str))
@click.option("--model", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="ONNX model written by covidct-export (its embedded contract drives preprocessing).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder: predictions/part-*.parquet and run.json. Reusing it resumes.")
@click.option("--from-list", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A file with one input path per line.")
@click.option("--overwrite", is_flag=True, help="Discard OUT's earlier predictions and start afresh.")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=None, help="Images per inference batch (32).")
@click.option("--num-cpus", type=click.IntRange(1), default=None, help="CPUs of the local Ray runtime (all cores).")
@click.option("--predictors", type=click.IntRange(1), default=None,
              help="Predictor actors (default: one single-threaded predictor per CPU, at most 16 a node; with GPUs, one per GPU).")
@click.option("--inference-threads", type=click.IntRange(1), default=None,
              help="Inference threads per predictor (default: the node's CPUs divided among its predictors, so 1 with one predictor a CPU; 2 on a GPU).")
@click.option("--max-in-flight", type=click.IntRange(1), default=None,
              help="Batches submitted but not yet written (bounds memory; default from the worker count).")
@click.option("--rows-per-part", type=click.IntRange(1), default=None,
              help="Rows per Parquet part file (20000); a part is also written every 30 s.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--runtime", type=click.Choice(RUNTIME_CHOICES), default="auto", show_default=True,
              help="Inference runtime on the CPU; auto: OpenVINO only where installed, in parity and measured faster "
                   "here (the measurement is cached per machine).")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="Opt-in reduced precision: int8 runs MODEL's twin NAME.int8.onnx (covidct-export --int8), bf16 "
                   "needs OpenVINO and a CPU with BF16. Falls back to FP32 where not faster here, and says so.")
@click.option("--address", default=None, help="Join this Ray cluster (e.g. 10.0.0.5:6379) instead of a local runtime.")
@click.option("--allow-unauthenticated-cluster", is_flag=True,
              help="Join an --address cluster even though it requires no token (refused otherwise).")
@click.option("--group-by", default=None,
              help="Study grouping for non-DICOM files: 'parent' (folder) or a regex on the path.")
@click.option("--top-k", type=click.IntRange(1), default=None,
              help="Study rule: flagged when the mean of the top-k slice probabilities >= threshold (3).")
@click.option("--pseudonymize", is_flag=True,
              help="Replace DICOM UIDs and every path (folders and file names) with keyed hashes; the key "
                   "comes from $COVIDCT_PSEUDONYM_KEY.")
@click.option("--thumbnails", type=click.Choice(THUMBNAILS), default="auto", show_default=True,
              help="Thumbnails of flagged slices for the report; auto: none for DICOM unless its "
                   "BurnedInAnnotation is NO (burned-in text would show).")
@click.option("--fast-jpeg", is_flag=True,
              help="Decode JPEGs at least twice the model's size at half scale (measured: the whole input path "
                   "1.47 vs 1.68 ms per 512x512 slice on an Intel Xeon, one core; probabilities move by up to "
                   "2e-4 from training's full decode).")
@click.option("--no-progress", is_flag=True, help="No progress line on stderr.")
@click.option("-v", "--verbose", is_flag=True)
@command("covidct-batch", interrupted="interrupted; parts already written are kept, rerun to resume")
def main(inputs, model, out, from_list, overwrite, batch_size, num_cpus, predictors, inference_threads,
         max_in_flight, rows_per_part, device, runtime, precision, address, allow_unauthenticated_cluster, group_by, top_k, pseudonymize,
         thumbnails, fast_jpeg, no_progress, verbose):
    """Screen CT slices under INPUT... (folders, files) with MODEL; one prediction row per file.

    Exit codes: 0 every file ok or skipped; 1 finished, some files are error rows;
    2 nothing done (bad options, no model, broken contract, Ray unreachable, OUT in use by another run,
    no file found under the inputs);
    3 stopped because a part could not be written (disk full): earlier parts intact; 70 internal error
    (a bug); 130 interrupted (Ctrl-C, SIGTERM).
    """
    setup_logging(verbose)
    from .pipeline import OutputError, ScreenConfig, run

    opts = {"batch_size": batch_size, "num_cpus": num_cpus, "predictors": predictors,
            "inference_threads": inference_threads, "max_in_flight": max_in_flight, "rows_per_part": rows_per_part,
            "top_k": top_k}
    key = None
    if pseudonymize:
        import os
        key = os.environ.get("COVIDCT_PSEUDONYM_KEY")
        if not key:
            raise CommandError("--pseudonymize needs the key in $COVIDCT_PSEUDONYM_KEY "
                               "(keep it secret and reuse it for comparable pseudonyms)")
    try:
        cfg = ScreenConfig(inputs=tuple(inputs), model=model, out=out, from_list=from_list, overwrite=overwrite,
                           device=device, runtime=runtime, precision=precision, address=address, progress=not no_progress, group_by=group_by,
                           pseudonym_key=key, fast_jpeg=fast_jpeg, worker_logs=verbose, thumbnails=thumbnails,
                           allow_unauthenticated_cluster=allow_unauthenticated_cluster,
                           **{k: v for k, v in opts.items() if v is not None})
        summary = run(cfg)  # a RunError is a CommandError: exit 2 with its message (engine.exits)
    except OutputError as e:
        raise CommandError(f"{e}. Every part written before is intact; free space (or fix OUT_DIR) and rerun the "
                           "same command to resume", Exit.OUTPUT_FAILED) from None
    click.echo(format_summary(summary.run, out))
    return summary.exit_code


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--top-k", type=click.IntRange(1), default=None, help="Study rule's k (default: the run's).")
@click.option("--group-by", default="<from run.json>",
              help="Study grouping for non-DICOM files: 'parent', a regex, or 'none' (default: the run's).")
@click.option("-v", "--verbose", is_flag=True)
@command("covidct-report")
def report_main(out, top_k, group_by, verbose):
    """Rebuild OUT/studies.parquet and OUT/report.html from OUT alone (its parts and run.json).

    After a crash, or to change the study rule, without screening again. Exit 2 when OUT holds
    no run.json (it is written when a run starts).
    """
    setup_logging(verbose)
    from .report import RUN, build_report
    from .studies import check_group_by

    group_by = None if group_by == "none" else group_by
    if group_by != "<from run.json>":
        problem = check_group_by(group_by)
        if problem:
            raise CommandError(f"--group-by {group_by!r}: {problem}")
    if not (out / RUN).is_file():
        raise CommandError(f"{out / RUN} does not exist: not a covidct-batch OUT_DIR")
    import json

    from .lock import LockedError, OutDirLock
    from .sink import OutputError
    try:
        json.loads((out / RUN).read_text())["model"]["sha256"]
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise CommandError(f"{out / RUN} is not a covidct-batch run record ({type(e).__name__}); rerun covidct-batch "
                           "with the same OUT_DIR and model to write it again (the parts are kept)") from None
    try:  # it writes what a run writes (run.json, studies.parquet, report.html): never beside a live run
        lock = OutDirLock(out).acquire()
    except LockedError as e:
        raise CommandError(f"{e}; run covidct-report once that run has ended") from None
    from .sink import PREDICTIONS, set_aside_damaged
    for d in set_aside_damaged(out / PREDICTIONS):
        click.echo(f"covidct-report: set aside {d['part']}: {d['reason']} (moved to {d['moved_to']}); rerun "
                   "covidct-batch to screen its files again", err=True)
    try:
        st = build_report(out, top_k, group_by)["studies"]
    except OutputError as e:
        raise CommandError(str(e), Exit.OUTPUT_FAILED) from None
    finally:
        lock.release()
    click.echo(f"studies: {st['flagged']} flagged of {st['studies']} ({st['rule']}); "
               f"{out / 'studies.parquet'}; {out / 'report.html'}")
    for line in study_table(out):
        click.echo(line)
    click.echo(DISCLAIMER)


if __name__ == "__main__":
    main()
