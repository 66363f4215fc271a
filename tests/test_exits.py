"""One exit-code table for all six commands (engine.exits): a crash is 70 with its traceback (never 1), bad
input is 2, Ctrl-C is 130, for each command. Run in-process: each command's function that does the work is
replaced by one that crashes or is interrupted."""

from __future__ import annotations

import importlib
import json
import signal
from pathlib import Path

import pytest

from covidct.engine.exits import Exit


def _invoke(entry: str, args: list[str]) -> int:
    module, name = entry.split(":")
    main = getattr(importlib.import_module(module), name)
    handler = signal.getsignal(signal.SIGTERM)  # the wrapper installs its own: give pytest its own back
    try:
        with pytest.raises(SystemExit) as e:
            main.main(args=[str(a) for a in args], prog_name=name, standalone_mode=True)
    finally:
        signal.signal(signal.SIGTERM, handler)
    return e.value.code


def _commands(tmp: Path) -> dict[str, tuple[str, list, list[tuple[str, str]], list]]:
    """command -> (entry point, arguments that reach the work, functions doing the work, bad-input arguments)."""
    (tmp / "site" / "a").mkdir(parents=True)
    out = tmp / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"model": {"sha256": "0" * 64}}))
    not_a_model = tmp / "model.onnx"
    not_a_model.write_bytes(b"not an onnx model")
    empty = tmp / "empty"
    empty.mkdir()
    return {
        "covidct-batch": ("covidct.engine.cli:main", [tmp, "--model", not_a_model, "--out", tmp / "o1", "--no-progress"],
                          [("covidct.engine.pipeline", "run")], [tmp, "--model", tmp / "missing.onnx", "--out", tmp / "o2"]),
        "covidct-report": ("covidct.engine.cli:report_main", [out], [("covidct.engine.report", "build_report")], [empty]),
        "covidct-evaluate": ("covidct.engine.evaluate_cli:main", [not_a_model, tmp / "site", "--out", tmp / "e1"],
                             [("covidct.engine.evaluate", "evaluate")], [not_a_model, tmp / "site", "--out", tmp / "e2"]),
        "covidct-train": ("covidct.train.cli:main", [tmp / "site", "--out", tmp / "r1"], [("covidct.train.cli", "_train")],
                          [tmp / "site", "--out", tmp / "r2"]),
        "covidct-export": ("covidct.export.cli:main", [empty, "--out", tmp / "m.onnx"],
                           [("covidct.export.exporter", "ExportConfig"), ("covidct.export.exporter", "export")],
                           [empty, "--out", tmp / "m2.onnx"]),
        "covidct-demo": ("covidct.export.demo:main", ["--out", tmp / "demo"], [("covidct.train.synthetic", "make_dataset")],
                         ["--n", "5"]),
    }


@pytest.mark.parametrize("name", ["covidct-batch", "covidct-report", "covidct-evaluate", "covidct-train",
                                  "covidct-export", "covidct-demo"])
def test_each_command_exits_70_on_a_crash_2_on_bad_input_and_130_on_ctrl_c(name, tmp_path, monkeypatch, capsys):
    entry, args, work, bad = _commands(tmp_path)[name]

    def patched(exc):
        def boom(*a, **k):
            raise exc
        for module, fn in work:
            monkeypatch.setattr(importlib.import_module(module), fn, boom)

    patched(RuntimeError("a bug"))
    assert _invoke(entry, args) == Exit.INTERNAL == 70
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: a bug" in err and "internal error" in err, err[-2000:]

    patched(KeyboardInterrupt())
    assert _invoke(entry, args) == Exit.INTERRUPTED == 130
    assert f"{name}: interrupted" in capsys.readouterr().err

    monkeypatch.undo()
    assert _invoke(entry, bad) == Exit.BAD_INPUT == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and ("error" in err.lower()), err[-2000:]


def test_a_crash_in_native_code_leaves_the_python_stack_on_stderr():
    """A segmentation fault in a command (in a library's native code) cannot be caught: its Python stack,
    on stderr, is what tells where it happened (a run once ended with -11 and nothing else to go on)."""
    import subprocess
    import sys

    code = ("import faulthandler, click\n"
            "from covidct.engine.exits import command\n"
            "@click.command()\n@command('probe')\ndef main():\n    faulthandler._sigsegv()\n"
            "main()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGSEGV
    assert "Segmentation fault" in r.stderr and "in main" in r.stderr, r.stderr
