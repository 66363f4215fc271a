"""The README's promises against inputs made to break them (issue: no duplicate, no stale row...)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from engine.contract import Contract
from tests.conftest import read_rows, run_cli, tiny_model

SIZE = (32, 32)


def _model(tmp_path: Path) -> Path:
    return tiny_model(tmp_path / "m.onnx", SIZE, contract=Contract(image_size=SIZE, class_names=("neg", "pos"),
                                                                   positive_class="pos", threshold=0.5))


def _pngs(root: Path, n: int, seed: int = 0) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = root / f"s{i:03d}.png"
        cv2.imwrite(str(p), rng.integers(0, 256, (48, 40), dtype=np.uint8))
        paths.append(p)
    return paths


def test_a_file_is_screened_once_however_it_is_named(tmp_path):
    data = tmp_path / "data"
    files = _pngs(data / "a", 5) + _pngs(data / "b", 3, seed=1)
    (tmp_path / "link").symlink_to(data, target_is_directory=True)
    lst = tmp_path / "list.txt"
    # inside a folder given as INPUT, named again through a symlinked folder, and twice in the list
    lst.write_text(f"{files[0]}\n{tmp_path / 'link' / 'a' / files[1].name}\n{files[0]}\n")
    out = tmp_path / "out"
    r = run_cli("covidct-batch", data, f"{data}/", data / "a", tmp_path / "link", files[2], "--from-list", lst,
                "--model", _model(tmp_path), "--out", out, "--no-progress", "--num-cpus", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_rows(out)
    assert len(rows) == len(files) and rows.path.is_unique, rows.path.tolist()
    assert set(rows.path) == {str(p) for p in files}
