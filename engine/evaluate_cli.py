"""Command line of covidct-evaluate: parses options, builds an EvaluateConfig, calls evaluate()."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .exits import CommandError, Exit, command
from .logs import setup_logging
from .runtimes import DEVICES


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for evaluation.json, roc.png, reliability.png and the screening rows "
                   "(default: ./evaluation-<DATA_DIR name>).")
@click.option("--positive", default=None, help="Name of the positive class folder (default: recognised by name).")
@click.option("--target-sensitivity", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Sensitivity for the suggested local threshold (default: the model's own target).")
@click.option("--calibrate", is_flag=True,
              help="Also write a copy of the model whose threshold reaches the target sensitivity on this data "
                   "(needs >= 20 readable slices of each class; the original is never changed).")
@click.option("--calibrated-out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where --calibrate writes the new model (default: OUT/<model name>.calibrated.onnx).")
@click.option("--batch-size", type=click.IntRange(1, 4096), default=32, show_default=True)
@click.option("--num-cpus", type=click.IntRange(1), default=None, help="CPUs of the local Ray runtime (all cores).")
@click.option("--address", default=None, help="Join this Ray cluster instead of a local runtime.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True)
@click.option("--no-progress", is_flag=True, help="No progress line on stderr.")
@click.option("-v", "--verbose", is_flag=True)
@command("covidct-evaluate")
def main(model, data_dir, out, positive, target_sensitivity, calibrate, calibrated_out, batch_size, num_cpus, address,
         device, no_progress, verbose):
    """Check MODEL on labelled slices in DATA_DIR (one sub-folder per class, as for covidct-train).

    Exit codes: 0 evaluated; 1 evaluated, some files unreadable (listed); 2 nothing evaluated
    (bad model, bad folders, one class only) or --calibrate refused (too few slices, not lung CT);
    70 internal error (a bug); 130 interrupted.
    """
    setup_logging(verbose)
    from .evaluate import CalibrationRefused, EvaluateConfig, evaluate, format_report
    from .labels import DataError

    out = out or Path(f"evaluation-{Path(data_dir).resolve().name}")
    try:
        report = evaluate(EvaluateConfig(model=model, data_dir=data_dir, out=out, positive=positive,
                                         target_sensitivity=target_sensitivity, batch_size=batch_size,
                                         num_cpus=num_cpus, address=address, device=device,
                                         progress=not no_progress, calibrate=calibrate,
                                         calibrated_out=calibrated_out))
    except CalibrationRefused as e:
        print(f"covidct-evaluate: --calibrate refused: {e}", file=sys.stderr)
        return Exit.BAD_INPUT
    except DataError as e:  # a RunError is a CommandError already (engine.exits)
        raise CommandError(str(e)) from None
    click.echo(format_report(report, out))
    return Exit.FILE_ERRORS if report["files"]["unreadable"] else Exit.OK


if __name__ == "__main__":
    main()
