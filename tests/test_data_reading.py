"""Images read as they are displayed (EXIF orientation), in training and in ``sclseg check``; lossy masks flagged."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sclseg.config import config_from_dict
from sclseg.data import build_data
from sclseg.data.check import check_data


def _photo(path: Path, stored: np.ndarray, orientation: int) -> None:
    """A JPEG-free photo file (PNG with an EXIF block) so that the pixels stay exact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(path, exif=exif.tobytes())


def _mask(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8)).save(path)


def _cfg(root: Path):
    return config_from_dict({"data": {"name": "folder", "root": str(root), "crop_size": [8, 8],
                                      "folder": {"classes": ["dark", "bright"], "val_fraction": 0.0}}})


def test_training_pairs_a_turned_square_photo_with_the_mask_of_what_is_shown(tmp_path) -> None:
    shown = np.zeros((8, 8, 3), dtype=np.uint8)
    shown[:, :3] = 255  # bright band on the left of the displayed photo
    mask = (shown[..., 0] > 0).astype(np.uint8)  # the annotator drew on the displayed photo
    _photo(tmp_path / "images" / "p.png", np.rot90(shown, 1).copy(), 6)  # stored turned; tag 6 turns it back
    _mask(tmp_path / "masks" / "p.png", mask)
    dataset = build_data(_cfg(tmp_path)).labeled
    image, label, _ = dataset.load(0)
    assert np.array_equal((image[0].numpy() > 0).astype(np.uint8), label.numpy())  # 100% agreement
    assert check_data(_cfg(tmp_path), cache=False).ok


def test_check_names_the_orientation_tag_when_the_mask_fits_only_the_stored_pixels(tmp_path) -> None:
    stored = np.zeros((6, 10, 3), dtype=np.uint8)
    _photo(tmp_path / "images" / "p.png", stored, 8)  # displayed 6 wide, 10 high
    _mask(tmp_path / "masks" / "p.png", np.zeros((6, 10)))  # drawn on the stored pixels
    report = check_data(_cfg(tmp_path), cache=False)
    (problem,) = report.problems
    assert "stored 10x6 but displayed 6x10 (EXIF orientation tag)" in problem.what
    with pytest.raises(ValueError, match=r"as displayed: its EXIF orientation tag applied"):
        build_data(_cfg(tmp_path)).labeled.load(0)


def test_check_flags_jpeg_data_under_a_png_mask_name(tmp_path) -> None:
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 2, (16, 16)).astype(np.uint8)
    (tmp_path / "images").mkdir()
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "images" / "m.png")
    buffer = io.BytesIO()
    Image.fromarray(mask).save(buffer, format="JPEG", quality=75)
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "m.png").write_bytes(buffer.getvalue())
    decoded = np.asarray(Image.open(tmp_path / "masks" / "m.png"))
    assert (decoded != mask).any()  # the lossy copy changed class values
    (problem,) = check_data(_cfg(tmp_path), cache=False).problems
    assert problem.file.endswith("m.png") and "JPEG data" in problem.what and "lossless index PNG" in problem.expected


def test_data_without_an_evaluation_split_trains_without_evaluation_and_says_so(tmp_path, capsys) -> None:
    from sclseg.cli import main

    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for i in range(4):
        _photo(root / "images" / f"s{i}.png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), 1)
        _mask(root / "masks" / f"s{i}.png", rng.integers(0, 2, (16, 16)))
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  name: folder\n  root: {root}\n  crop_size: [16, 16]\n  batch_size: 2\n  folder:\n"
                      "    classes: [dark, bright]\n    val_fraction: 0\nmodel:\n  name: compact\n  width: 8\n"
                      "method:\n  name: supervised\ntrain:\n  threads: 1\n  iterations: 2\n  eval_interval: 1\n")
    out = tmp_path / "run"
    assert main(["train", str(config), "--out", str(out)]) == 0
    assert "trains without evaluation" in capsys.readouterr().err
    assert (out / "step_2.pt").is_file() and not (out / "best.pt").exists()
    assert '"kind": "eval"' not in (out / "metrics.jsonl").read_text()
