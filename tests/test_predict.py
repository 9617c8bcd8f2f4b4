"""``sclseg predict``: one output per input (relative paths kept), and flag errors without a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sclseg.cli import main
from sclseg.config import config_to_dict, load_config, resolve_config_path
from sclseg.data.digits import DIGIT_CLASSES
from sclseg.engine.checkpoint import WEIGHTS_FORMAT
from sclseg.models import create_model

from tiny_config import TINY

SCLSEG = str(Path(sys.executable).with_name("sclseg"))


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported weights file of an untrained compact model (11 digit classes)."""
    cfg = load_config(resolve_config_path("digits/default"), TINY)
    torch.manual_seed(0)
    model = create_model(cfg.model, len(DIGIT_CLASSES), load_pretrained=False)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save({"format": WEIGHTS_FORMAT, "model": model.state_dict(), "weights": "teacher",
                "config": config_to_dict(cfg), "num_classes": len(DIGIT_CLASSES),
                "class_names": [c.name for c in DIGIT_CLASSES], "class_colors": [list(c.color) for c in DIGIT_CLASSES],
                "iteration": 0, "source": "test"}, path)
    return path


def _image(path: Path, seed: int, size: tuple[int, int] = (16, 20)) -> np.ndarray:
    """Write a random RGB image; ``seed`` makes each input distinct."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([SCLSEG, *args], capture_output=True, text=True, cwd=cwd)


def test_inputs_of_one_stem_in_several_folders_get_distinct_outputs(tmp_path: Path, weights: Path) -> None:
    inputs = tmp_path / "in"
    _image(inputs / "cam1" / "0001.jpg", 0)
    _image(inputs / "cam2" / "0001.jpg", 1, size=(12, 24))
    _image(inputs / "cam2" / "0001.png", 2, size=(8, 10))
    single = _image(tmp_path / "other" / "x.png", 3, size=(10, 14))
    out = tmp_path / "out"
    assert main(["predict", str(inputs), str(tmp_path / "other" / "x.png"), "--checkpoint", str(weights),
                 "--out", str(out), "--device", "cpu"]) == 0
    expected = {
        inputs / "cam1" / "0001.jpg": out / "cam1" / "0001_labels.png",
        inputs / "cam2" / "0001.jpg": out / "cam2" / "0001_jpg_labels.png",
        inputs / "cam2" / "0001.png": out / "cam2" / "0001_png_labels.png",
        tmp_path / "other" / "x.png": out / "x_labels.png",
    }
    listed = json.loads((out / "predictions.json").read_text())["files"]
    assert {Path(f["input"]): Path(f["labels"]) for f in listed} == expected
    for source, labels in expected.items():  # each output is its own input's label map
        assert Image.open(labels).size == Image.open(source).size
        assert Path(str(labels).replace("_labels.png", "_overlay.png")).is_file()
    assert Image.open(out / "x_labels.png").size == (single.shape[1], single.shape[0])
    assert len(list(out.rglob("*_labels.png"))) == 4


@pytest.mark.slow
def test_two_files_that_still_collide_are_an_error_naming_both(tmp_path: Path, weights: Path) -> None:
    a, b = tmp_path / "a" / "0001.jpg", tmp_path / "b" / "0001.jpg"
    _image(a, 0)
    _image(b, 1)
    proc = _run("predict", str(a), str(b), "--checkpoint", str(weights), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(a) in proc.stderr and str(b) in proc.stderr and "0001_jpg_labels.png" in proc.stderr
    assert not list((tmp_path / "out").rglob("*.png"))


def test_outputs_inside_the_input_folder_are_not_labeled_again(tmp_path: Path, weights: Path) -> None:
    _image(tmp_path / "0001.png", 0)
    for _ in range(2):
        assert main(["predict", str(tmp_path), "--checkpoint", str(weights), "--out", str(tmp_path / "pred")]) == 0
    listed = json.loads((tmp_path / "pred" / "predictions.json").read_text())["files"]
    assert [Path(f["input"]).name for f in listed] == ["0001.png"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--device", "foo"], "--device 'foo': expected auto, cpu, cuda, cuda:N or mps"),
        (["--tile", "0", "0"], "--tile 0 0: expected two positive integers"),
        (["--scales", "0"], "--scales 0: expected positive numbers"),
        (["--scales", "1", "-0.5"], "--scales 1 -0.5: expected positive numbers"),
    ],
)
def test_bad_flags_exit_2_with_one_line(tmp_path: Path, weights: Path, flags: list[str], message: str,
                                        capsys: pytest.CaptureFixture) -> None:
    _image(tmp_path / "in" / "a.png", 0)
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "in"), "--checkpoint", str(weights), "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not out.exists()


@pytest.mark.slow
def test_out_naming_a_file_exits_2_without_a_traceback(tmp_path: Path, weights: Path) -> None:
    _image(tmp_path / "a.png", 0)
    existing = tmp_path / "out.txt"
    existing.write_text("keep me")
    proc = _run("predict", str(tmp_path / "a.png"), "--checkpoint", str(weights), "--out", str(existing), cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"--out {existing}: is a file; expected a folder" in proc.stderr
    assert existing.read_text() == "keep me"


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_exits_2_before_loading_the_model(tmp_path: Path) -> None:
    _image(tmp_path / "a.png", 0)
    # the checkpoint does not exist: the device is refused before it is looked at
    proc = _run("predict", str(tmp_path / "a.png"), "--checkpoint", str(tmp_path / "missing.pt"),
                "--out", str(tmp_path / "out"), "--device", "cuda", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--device cuda: CUDA is not available on this machine" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cityscapes_ids_keep_the_relative_folders(tmp_path: Path, weights: Path) -> None:
    pytest.importorskip("cityscapesscripts")
    inputs = tmp_path / "in"
    for city in ("aachen", "bremen"):
        _image(inputs / city / "x_000000_000019_leftImg8bit.png", len(city))
    out = tmp_path / "out"
    assert main(["predict", str(inputs), "--checkpoint", str(weights), "--out", str(out), "--cityscapes-ids"]) == 0
    listed = json.loads((out / "predictions.json").read_text())["files"]
    written = sorted(Path(f["cityscapes_label_ids"]).relative_to(out).as_posix() for f in listed)
    assert written == [f"cityscapes_label_ids/{city}/x_000000_000019_labelIds.png" for city in ("aachen", "bremen")]
    assert all((out / w).is_file() for w in written)
