"""``sclseg predict`` over many files: bad files reported, not fatal; outputs whole; images read as displayed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sclseg.cli as cli
from sclseg.cli import EXIT_USAGE, main
from sclseg.config import config_to_dict, load_config, resolve_config_path
from sclseg.data.digits import DIGIT_CLASSES
from sclseg.engine.checkpoint import WEIGHTS_FORMAT
from sclseg.models import create_model

from tiny_config import TINY


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = load_config(resolve_config_path("digits/default"), TINY)
    torch.manual_seed(0)
    model = create_model(cfg.model, len(DIGIT_CLASSES), load_pretrained=False)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save({"format": WEIGHTS_FORMAT, "model": model.state_dict(), "weights": "teacher",
                "config": config_to_dict(cfg), "num_classes": len(DIGIT_CLASSES),
                "class_names": [c.name for c in DIGIT_CLASSES], "class_colors": [list(c.color) for c in DIGIT_CLASSES],
                "iteration": 0, "source": "test"}, path)
    return path


def _image(path: Path, seed: int, size: tuple[int, int] = (16, 20)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def test_every_readable_image_is_labeled_and_every_unreadable_one_listed(tmp_path, weights, capsys) -> None:
    folder = tmp_path / "in"
    _image(folder / "a.png", 0)
    (folder / "b.png").write_bytes(b"not an image")
    _image(folder / "c.png", 1)
    full = (folder / "c.png").read_bytes()
    (folder / "d.jpg").write_bytes(full[: len(full) // 3])  # cut short
    _image(folder / "e.png", 2)
    out = tmp_path / "out"
    assert main(["predict", str(folder), "--checkpoint", str(weights), "--out", str(out)]) == EXIT_USAGE
    err = capsys.readouterr().err
    record = json.loads((out / "predictions.json").read_text())
    assert [Path(f["input"]).name for f in record["files"]] == ["a.png", "c.png", "e.png"]
    assert [Path(f["input"]).name for f in record["unreadable"]] == ["b.png", "d.jpg"]
    assert all(f"{folder / n}" in err for n in ("b.png", "d.jpg")) and "2 of 5 images could not be read" in err
    assert sorted(p.name for p in out.glob("*_labels.png")) == ["a_labels.png", "c_labels.png", "e_labels.png"]


def test_out_equal_to_the_input_folder_labels_its_images_and_never_its_own_outputs(tmp_path, weights) -> None:
    _image(tmp_path / "a.png", 0)
    _image(tmp_path / "b.jpg", 1)
    for _ in range(2):
        assert main(["predict", str(tmp_path), "--checkpoint", str(weights), "--out", str(tmp_path)]) == 0
        record = json.loads((tmp_path / "predictions.json").read_text())
        assert sorted(Path(f["input"]).name for f in record["files"]) == ["a.png", "b.jpg"]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["a.png", "a_labels.png", "a_overlay.png",
                                                               "b_labels.png", "b_overlay.png"]


def test_ctrl_c_keeps_predictions_json_true_to_the_whole_files_on_disk(tmp_path, weights, monkeypatch,
                                                                     capsys) -> None:
    for i in range(4):
        _image(tmp_path / "in" / f"{i}.png", i)
    out = tmp_path / "out"
    real = cli._write_prediction
    calls = []

    def interrupted_at_the_third(out_dir, name, rgb, labels, palette, ids):
        calls.append(name)
        if len(calls) == 3:  # Ctrl-C after this image's label map was written, before its overlay
            from sclseg.viz import save_png

            save_png(labels, out_dir / f"{name}_labels.png", palette=palette)
            raise KeyboardInterrupt
        return real(out_dir, name, rgb, labels, palette, ids)

    monkeypatch.setattr(cli, "_write_prediction", interrupted_at_the_third)
    assert main(["predict", str(tmp_path / "in"), "--checkpoint", str(weights), "--out", str(out)]) == 130
    assert "the 2 label maps and overlays written before it are whole" in capsys.readouterr().err
    record = json.loads((out / "predictions.json").read_text())
    assert record["interrupted"] is True
    listed = {Path(p) for f in record["files"] for p in (f["labels"], f["overlay"])}
    on_disk = {p for p in out.iterdir() if p.name.endswith(("_labels.png", "_overlay.png"))}
    assert listed == on_disk - {out / "2_labels.png"} and len(listed) == 4
    assert not list(out.glob(".*.tmp"))


def test_a_write_cut_short_leaves_no_file_of_that_image(tmp_path, monkeypatch) -> None:
    real_save = Image.Image.save

    def interrupted_save(self, fp, *args, **kwargs):
        if "overlay" in str(fp):
            Path(fp).write_bytes(b"\x89PNG half")  # the temporary file is cut short
            raise KeyboardInterrupt
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", interrupted_save)
    palette = np.zeros((256, 3), dtype=np.uint8)
    with pytest.raises(KeyboardInterrupt):
        cli._write_prediction(tmp_path, Path("x"), np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.uint8),
                              palette, False)
    assert list(tmp_path.iterdir()) == []  # neither the label map written before it nor a part file


# ------------------------------------------------------------------ photos read as they are shown
def _rotated_photo(path: Path, stored: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(path, exif=exif.tobytes(), quality=100)


def test_predict_labels_a_photo_at_its_displayed_size(tmp_path, weights) -> None:
    stored = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)  # stored 64 wide, 48 high
    _rotated_photo(tmp_path / "phone.jpg", stored, 6)  # 6: shown turned 90 degrees clockwise -> 48 wide, 64 high
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "phone.jpg"), "--checkpoint", str(weights), "--out", str(out)]) == 0
    assert Image.open(out / "phone_labels.png").size == (48, 64)  # PIL: (width, height)


def test_sixteen_bit_images_are_read_over_their_full_range(tmp_path) -> None:
    from sclseg.data.folder import read_image

    values = np.array([[0, 1000, 32768], [50000, 65535, 20000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "wide.png")
    image = read_image(tmp_path / "wide.png")
    expected = np.rint(values / 65535 * 255).astype(np.uint8)  # by hand: 0 4 128 / 195 255 78
    assert expected.tolist() == [[0, 4, 128], [195, 255, 78]]
    assert all(np.array_equal(image[c].numpy(), expected) for c in range(3))


def test_read_image_applies_every_orientation_tag(tmp_path) -> None:
    from sclseg.data.folder import read_image

    stored = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10  # a 3 wide, 2 high picture
    shown = {1: stored, 3: stored[::-1, ::-1], 6: np.rot90(stored, -1), 8: np.rot90(stored, 1),
             2: stored[:, ::-1], 4: stored[::-1], 5: np.rot90(stored[:, ::-1], 1), 7: np.rot90(stored[:, ::-1], -1)}
    for tag, expected in shown.items():
        exif = Image.Exif()
        exif[0x0112] = tag
        Image.fromarray(stored).save(tmp_path / f"o{tag}.png", exif=exif.tobytes())
        got = read_image(tmp_path / f"o{tag}.png").permute(1, 2, 0).numpy()
        assert np.array_equal(got, expected), tag
