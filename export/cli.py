"""Command line of covidct-export: parses options, builds an ExportConfig, calls export()."""

from __future__ import annotations

from pathlib import Path

import click

from covidct.engine.exits import CommandError, Exit, command
from covidct.engine.logs import setup_logging


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the ONNX model (written only after it passes validation).")
@click.option("--int8", is_flag=True, help="Also write a static INT8 (QDQ) model beside it, as NAME.int8.onnx.")
@click.option("-v", "--verbose", is_flag=True)
@command("covidct-export")
def main(run_dir, out, int8, verbose):
    """Export the model of a covidct-train RUN_DIR to ONNX, validated against Keras.

    Exit codes: 0 written; 2 RUN_DIR is not a run directory or its model changed since training; 4 the ONNX
    model failed validation against Keras (or the INT8 twin its checks): nothing written; 70 internal error
    (a bug); 130 interrupted.
    """
    setup_logging(verbose)
    from .exporter import ExportConfig, export
    from .validate import ExportInputError, ExportValidationError

    try:
        report = export(ExportConfig(run_dir=run_dir, out=out, int8=int8))
    except ExportInputError as e:
        raise CommandError(str(e), Exit.BAD_INPUT) from None
    except ExportValidationError as e:
        raise CommandError(str(e), Exit.VALIDATION_FAILED) from None
    p = report["parity"]
    click.echo(f"wrote {out}: parity over {p['n_images']} real images, max |keras - onnx| "
               + ", ".join(f"batch {b}: {p[f'max_abs_diff_batch{b}']:.2e}" for b in p["batch_sizes"])
               + f" (tolerance {p['atol']:g})")
    ad = report["contract"].get("adaptation")
    if ad:
        click.echo(f"adapted with covidct-train --init from {ad['source_run']} (model sha256 "
                   f"{ad['source_model_sha256'][:12]}) on {ad['local_set']['n']} local slices: the provenance is in "
                   "the contract")
    if "int8" in report:
        q = report["int8"]
        a = q["agreement"]
        auc = (f", ROC AUC {a['auc']:.4f} vs FP32 {a['auc_fp32']:.4f}" if "auc" in a else "")
        click.echo(f"wrote {q['model']}: labels agree with FP32 on {a['label_agreement']:.1%} of the "
                   f"{a['n']} test-split images{auc}; ONNX Runtime {q['int8_images_per_s']} vs "
                   f"{q['fp32_images_per_s']} images/s (x{q['speedup']}) on this CPU; covidct-batch --precision int8 "
                   "picks the faster runtime for it")


if __name__ == "__main__":
    main()
