"""Command line of covidct-train: parses options, builds a TrainConfig, calls train()."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from engine.contract import DISCLAIMER
from engine.logs import setup_logging


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run directory to write the model, split, metrics and plots to.")
@click.option("--positive", default=None, help="Name of the positive class folder (default: recognised by name).")
@click.option("--groups", default=None, help="Regex on file names whose match (or first group) is a patient id.")
@click.option("--arch", type=click.Choice(["compact", "seed"]), default="compact", show_default=True,
              help="compact: residual CNN with global pooling; seed: the seeds' CNN and recipe, unchanged.")
@click.option("--preprocessing", type=click.Choice(["lung-crop", "resize"]), default="lung-crop", show_default=True,
              help="lung-crop: frame the lungs, normalise intensity from the image itself; resize: the whole image.")
@click.option("--epochs", type=click.IntRange(1), default=None,
              help="Epochs (compact: 40, a fixed cosine schedule; seed: at most 30, early stopping).")
@click.option("--image-size", type=click.IntRange(8, 4096), default=None,
              help="Square input size in pixels (compact: 192; seed: 256).")
@click.option("--learning-rate", type=click.FloatRange(0, min_open=True), default=None,
              help="Peak learning rate (compact: 2e-3 AdamW; seed: 1e-4 Adam).")
@click.option("--site-augmentation/--no-site-augmentation", default=None,
              help="Imitate other hospitals' windows, framing, text and quality while training (compact: on).")
@click.option("--batch-size", type=click.IntRange(1), default=None)
@click.option("--seed", type=int, default=None)
@click.option("--target-sensitivity", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Validation sensitivity the operating threshold must reach (default 0.95).")
@click.option("-v", "--verbose", is_flag=True)
def main(data_dir, out, positive, groups, arch, preprocessing, epochs, image_size, learning_rate, site_augmentation,
         batch_size, seed, target_sensitivity, verbose):
    """Train the COVID-19 CT slice classifier on DATA_DIR (one sub-folder per class)."""
    setup_logging(verbose)
    from .data import DataError
    from .fit import TrainConfig, summary, train

    opts = {"epochs": epochs, "batch_size": batch_size, "seed": seed, "target_sensitivity": target_sensitivity,
            "image_size": (image_size, image_size) if image_size else None, "learning_rate": learning_rate,
            "site_augmentation": site_augmentation}
    try:
        cfg = TrainConfig(data_dir=data_dir, out=out, positive=positive, groups=groups, arch=arch,
                          preprocessing=preprocessing,
                          **{k: v for k, v in opts.items() if v is not None})
        metrics = train(cfg)
    except (DataError, ValueError) as e:
        click.echo(f"covidct-train: error: {e}", err=True)
        sys.exit(2)
    click.echo(summary(metrics))
    click.echo(f"run directory: {out}")
    click.echo(DISCLAIMER)


if __name__ == "__main__":
    main()
