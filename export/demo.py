"""covidct-demo: the whole job on a sample it makes itself (synthetic phantoms, no real data).

Makes a labelled sample set, trains briefly, exports to ONNX, then screens a sample archive
with covidct-batch on a local Ray runtime and prints the summary. Every step calls the same
library functions as the commands.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from covidct.engine.contract import DISCLAIMER
from covidct.engine.exits import Exit, command
from covidct.engine.logs import setup_logging


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", default="demo-run", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--n", default=120, show_default=True, type=click.IntRange(30), help="Training images per class.")
@click.option("--epochs", default=12, show_default=True, type=click.IntRange(1))
@command("covidct-demo")
def main(out: Path, n: int, epochs: int):
    """Run train -> export -> screen end to end on a synthetic sample, locally, on the CPU."""
    setup_logging()
    from covidct.engine.summary import format_summary
    from covidct.engine.pipeline import ScreenConfig, run
    from covidct.train.fit import TrainConfig, summary, train
    from covidct.train.synthetic import make_archive, make_dataset

    from .exporter import ExportConfig, export

    t0 = time.time()
    click.echo(f"[1/4] making a synthetic sample under {out}/sample (CT-like phantoms)")
    data = make_dataset(out / "sample" / "labelled", n_per_class=n, seed=0, size=(256, 256))
    archive = out / "sample" / "archive"
    make_archive(archive, 200, seed=7, size=(320, 320), per_folder=50)
    (archive / "README.txt").write_text("not an image: becomes a 'skipped' row\n")
    (archive / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    click.echo("[2/4] training (covidct-train)")
    metrics = train(TrainConfig(data_dir=data, out=out / "run", epochs=epochs, image_size=(128, 128),
                                groups=r"p\d+"))
    click.echo(summary(metrics))
    click.echo("[3/4] exporting to ONNX with the contract inside (covidct-export)")
    report = export(ExportConfig(run_dir=out / "run", out=out / "model.onnx"))
    click.echo(f"parity with Keras: max |diff| {report['parity']['max_abs_diff_batch1']:.2e}")
    click.echo("[4/4] screening the sample archive (covidct-batch, local Ray, CPU)")
    cfg = ScreenConfig(inputs=(str(archive),), model=out / "model.onnx", out=out / "screen", overwrite=True,
                       device="cpu")
    result = run(cfg)
    click.echo(format_summary(result.run, cfg.out))
    if str(result.run.get("shift", {}).get("verdict", "")).startswith("shifted"):
        click.echo("(the sample archive is rendered unlike the training sample: other noise, JPEG compression "
                   "and size, as another scanner would make it; that is what the shift alarm reports)")
    click.echo(f"demo finished in {time.time() - t0:.0f} s; outputs under {out}")
    click.echo(DISCLAIMER)
    return Exit.OK if result.counts["ok"] else Exit.FILE_ERRORS


if __name__ == "__main__":
    main()
