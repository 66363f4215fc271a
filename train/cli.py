"""Command line of covidct-train: parses options, builds a TrainConfig, calls train()."""

from __future__ import annotations

from pathlib import Path

import click

from covidct.engine.contract import DISCLAIMER
from covidct.engine.exits import CommandError, Exit, command
from covidct.engine.logs import setup_logging


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("site_dirs", nargs=-1, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run directory to write the model, split, metrics and plots to.")
@click.option("--site", "named_sites", multiple=True, metavar="NAME=DIR",
              help="A site with its name (repeatable); SITE_DIRS are named by their folder's name.")
@click.option("--leave-one-site-out", is_flag=True,
              help="Also train one model without each site and score it on the site left out (2+ sites).")
@click.option("--site-norm", is_flag=True,
              help="Compact, 2+ sites: one BatchNorm per site in training; the exported model mixes them.")
@click.option("--teacher", "teachers", multiple=True, metavar="SITE=RUN_DIR",
              help="Distil: a run trained on that site alone (same seed) softens the site's training targets.")
@click.option("--init", "init", default=None, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Adapt this covidct-train run's model to the one local folder given (20-200 labelled slices).")
@click.option("--adapt", "adapt_method", type=click.Choice(["probe", "all", "bn", "head"]), default="probe",
              show_default=True, help="With --init: a new linear head on the model's pooled features (probe), or "
              "fine-tuning of every weight, BatchNorm only, or the last layer.")
@click.option("--positive", default=None, help="Name of the positive class folder (default: recognised by name).")
@click.option("--groups", default=None, help="Regex on file names whose match (or first group) is a patient id.")
@click.option("--arch", type=click.Choice(["compact", "seed"]), default="compact", show_default=True,
              help="compact: residual CNN with global pooling; seed: the seeds' CNN and recipe, unchanged.")
@click.option("--preprocessing", type=click.Choice(["lung-crop", "resize"]), default="lung-crop", show_default=True,
              help="lung-crop: frame the lungs, normalise intensity from the image itself; resize: the whole image.")
@click.option("--epochs", type=click.IntRange(1), default=None,
              help="Epochs (compact: 120, a fixed cosine schedule; seed: at most 30, early stopping; "
                   "--init fine-tuning: 12).")
@click.option("--image-size", type=click.IntRange(8, 4096), default=None,
              help="Square input size in pixels (compact: 192; seed: 256).")
@click.option("--learning-rate", type=click.FloatRange(0, min_open=True), default=None,
              help="Peak learning rate (compact: 2e-3 AdamW; seed: 1e-4 Adam; --init --adapt all/bn/head: 3e-4 AdamW).")
@click.option("--site-augmentation/--no-site-augmentation", default=None,
              help="Imitate other hospitals' windows, framing, text and quality while training (compact: on).")
@click.option("--augment-share", type=click.FloatRange(0, 1), default=None,
              help="Share of training draws that site augmentation changes (default 0.5).")
@click.option("--mix-style/--no-mix-style", default=None,
              help="Compact: mix slices' feature statistics while training (MixStyle; default on).")
@click.option("--batch-size", type=click.IntRange(1), default=None)
@click.option("--seed", type=int, default=None)
@click.option("--target-sensitivity", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Validation sensitivity the operating threshold must reach (default 0.95; --init: the model's).")
@click.option("-v", "--verbose", is_flag=True)
@command("covidct-train")
def main(site_dirs, out, named_sites, leave_one_site_out, site_norm, teachers, init, adapt_method, positive, groups, arch, preprocessing,
         epochs, image_size, learning_rate, site_augmentation, augment_share, mix_style, batch_size, seed, target_sensitivity, verbose):
    """Train the COVID-19 CT slice classifier on one or more sites (SITE_DIRS, each one sub-folder per class),
    or, with --init, adapt a trained model to one local site."""
    setup_logging(verbose)
    from .data import DataError

    opts = {"epochs": epochs, "batch_size": batch_size, "seed": seed, "target_sensitivity": target_sensitivity,
            "learning_rate": learning_rate, "site_augmentation": site_augmentation,
            "augment_share": augment_share, "mix_style": mix_style}
    try:
        if init is not None:
            if teachers:
                raise DataError("--teacher is for training on sites: --init adapts one model")
            metrics, text = _adapt(site_dirs, named_sites, init, out, adapt_method, positive, groups, opts,
                                   leave_one_site_out)
        else:
            metrics, text = _train(site_dirs, named_sites, out, leave_one_site_out, positive, groups, arch,
                                   preprocessing, image_size, {**opts, "site_norm": site_norm or None,
                                    "teachers": _teachers(teachers) or None})
    except (DataError, ValueError) as e:
        raise CommandError(str(e), Exit.BAD_INPUT) from None
    click.echo(text)
    click.echo(f"run directory: {out}")
    click.echo(DISCLAIMER)


def _train(site_dirs, named_sites, out, leave_one_site_out, positive, groups, arch, preprocessing, image_size, opts):
    from .fit import TrainConfig, summary, train
    from .sites import parse_sites

    cfg = TrainConfig(sites=parse_sites(tuple(site_dirs), tuple(named_sites)), out=out, positive=positive,
                      groups=groups, arch=arch, preprocessing=preprocessing,
                      leave_one_site_out=leave_one_site_out,
                      image_size=(image_size, image_size) if image_size else None,
                      **{k: v for k, v in opts.items() if v is not None})
    metrics = train(cfg)
    return metrics, summary(metrics)


def _teachers(items: tuple[str, ...]) -> tuple[tuple[str, Path], ...]:
    from .data import DataError

    out = []
    for item in items:
        name, sep, run = item.partition("=")
        if not sep or not name or not run:
            raise DataError(f"--teacher takes SITE=RUN_DIR, e.g. --teacher saopaulo=runs/sp; got {item!r}")
        out.append((name, Path(run)))
    return tuple(out)


def _adapt(site_dirs, named_sites, init, out, method, positive, groups, opts, leave_one_site_out):
    from .adapt import AdaptConfig, adapt, summary
    from .data import DataError

    if opts.pop("mix_style", None) is not None:
        raise DataError("--mix-style is a training choice: --init adapts the source run's model as it was built")
    if len(site_dirs) + len(named_sites) != 1 or leave_one_site_out:
        raise DataError("--init adapts to one local folder: give exactly one LOCAL_DIR (and no --leave-one-site-out)")
    local = site_dirs[0] if site_dirs else Path(named_sites[0].partition("=")[2])
    cfg = AdaptConfig(local_dir=local, init=init, out=out, method=method, positive=positive, groups=groups,
                      **{k: v for k, v in opts.items() if v is not None})
    metrics = adapt(cfg)
    return metrics, summary(metrics)


if __name__ == "__main__":
    main()
