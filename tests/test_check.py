"""The full data check (``sclseg check`` and :func:`sclseg.data.check.check_data`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sclseg.cli import main
from sclseg.config import ConfigError, config_from_dict, load_config, resolve_config_path
from sclseg.data import build_data
from sclseg.data.check import check_data

from tiny_config import TINY

SCLSEG = str(Path(sys.executable).with_name("sclseg"))
H, W = 6, 8


def _image(path: Path, rng: np.random.Generator, size: tuple[int, int] = (H, W)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def _mask(path: Path, array: np.ndarray, *, palette: bool = False) -> None:
    """An 8-bit index PNG (mode L, or P with a palette)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array.astype(np.uint8))
    if palette:
        img.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])
        assert img.mode == "P"
    img.save(path)


def _folder(root: Path, n: int = 4, *, classes: int = 3, values=None, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` labeled pairs in images/ + masks/ and 2 in val/; returns the masks written, by path."""
    rng = np.random.default_rng(seed)
    values = list(range(classes)) + [255] if values is None else values
    written = {}
    for base, count in ((root, n), (root / "val", 2)):
        for i in range(count):
            _image(base / "images" / f"im{i}.png", rng)
            mask = rng.choice(values, (H, W))
            _mask(base / "masks" / f"im{i}.png", mask, palette=base != root)
            written[str(base / "masks" / f"im{i}.png")] = mask
    return written


def _cfg(root: Path, classes=("a", "b", "c"), **folder):
    return config_from_dict({"data": {"name": "folder", "root": str(root),
                                      "folder": {"classes": list(classes), "val_fraction": 0.0, **folder}}})


def _write_cfg(tmp_path: Path, root: Path, classes=("a", "b", "c")) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(json.dumps({"data": {"name": "folder", "root": str(root), "folder": {"classes": list(classes)}}}))
    return path


def _break_everything(root: Path) -> dict[str, str]:
    """One file of every bad kind; returns {file: what it should be reported for}."""
    rng = np.random.default_rng(1)
    data = (root / "images" / "im0.png").read_bytes()
    (root / "images" / "im0.png").write_bytes(data[: len(data) // 2])  # truncated
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(root / "masks" / "im1.png")  # RGB mask
    _mask(root / "masks" / "im2.png", np.zeros((H + 1, W)))  # size
    _mask(root / "masks" / "im3.png", np.full((H, W), 7))  # value outside the classes
    _image(root / "images" / "lonely.png", rng)  # image without a mask
    _mask(root / "masks" / "orphan.png", np.zeros((H, W)))  # mask without an image
    _mask(root / "val" / "masks" / "im1.png", np.full((H, W), 9))  # a bad file of another split
    Image.fromarray(np.full((H, W), 300, np.uint16)).save(root / "val" / "masks" / "im0.png")  # 16-bit, too large
    (root / "unlabeled").mkdir()
    (root / "unlabeled" / "u0.jpg").write_bytes(b"not a jpeg")  # unreadable unlabeled image
    return {
        str(root / "images" / "im0.png"): "truncated",
        str(root / "masks" / "im1.png"): "mode RGB",
        str(root / "masks" / "im2.png"): "8x7 (WxH)",
        str(root / "masks" / "im3.png"): "values 7",
        str(root / "images" / "lonely.png"): "no mask",
        str(root / "masks" / "orphan.png"): "mask without an image",
        str(root / "val" / "masks" / "im1.png"): "values 9",
        str(root / "val" / "masks" / "im0.png"): "values 300",
        str(root / "unlabeled" / "u0.jpg"): "cannot read image",
    }


def test_every_bad_file_is_reported_in_one_run(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _folder(root)
    expected = _break_everything(root)
    report = check_data(_cfg(root), workers=2, cache=False)
    found = {p.file: p.what for p in report.problems}
    assert set(found) == set(expected)
    for file, what in expected.items():
        assert what in found[file], (file, found[file])
    assert {p.split for p in report.problems} == {"train", "val", "unlabeled"}
    with pytest.raises(ConfigError, match="9 problem"):
        report.raise_for_problems()


@pytest.mark.slow
def test_the_command_exits_2_with_one_line_per_problem(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _folder(root)
    expected = _break_everything(root)
    report_path = tmp_path / "check.json"
    proc = subprocess.run([SCLSEG, "check", str(_write_cfg(tmp_path, root)), "data.folder.val_fraction=0",
                           "--workers", "2", "--report", str(report_path)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("problem: ")]
    assert len(lines) == len(expected)
    assert all(any(line.startswith(f"problem: {file} ") for line in lines) for file in expected)
    saved = json.loads(report_path.read_text())
    assert not saved["ok"] and {p["file"] for p in saved["problems"]} == set(expected)


def test_a_clean_folder_passes_and_counts_every_pixel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "data"
    masks = _folder(root, n=5)
    monkeypatch.chdir(tmp_path)
    assert main(["check", str(_write_cfg(tmp_path, root)), "data.folder.val_fraction=0"]) == 0
    saved = json.loads((tmp_path / "runs" / "cfg" / "check.json").read_text())
    assert saved["ok"] and saved["files"] == 2 * (5 + 2)
    assert saved["splits"] == {"train": 5, "val": 2}
    train = [m for path, m in masks.items() if "/val/" not in path]
    assert saved["class_pixels"] == {name: int(sum((m == c).sum() for m in train)) for c, name in enumerate("abc")}
    assert saved["ignored_pixels"] == int(sum((m == 255).sum() for m in train))


def test_binary_0_255_masks_are_the_ignore_trap_with_the_fix(tmp_path: Path) -> None:
    root = tmp_path / "data"
    masks = _folder(root, classes=2, values=[0, 255])
    report = check_data(_cfg(root, classes=("background", "object")), cache=False)
    (trap,) = report.problems
    assert "class 1 ('object') never occurs" in trap.what
    share = sum((m == 255).sum() for p, m in masks.items() if "/val/" not in p) / (4 * H * W)
    assert f"{share:.1%}" in trap.what
    assert "data.folder.ignore_value" in trap.expected and "255 -> 1" in trap.expected
    for path, mask in masks.items():  # the fix: the objects carry their class index
        _mask(Path(path), np.where(mask == 255, 1, mask))
    assert check_data(_cfg(root, classes=("background", "object")), cache=False).ok


def test_a_missing_class_without_much_ignore_is_a_warning(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _folder(root, values=[0, 1])  # class 2 never occurs, nothing ignored
    report = check_data(_cfg(root), cache=False)
    assert report.ok
    (warning,) = report.warnings
    assert "class 2 ('c') never occurs" in warning.what and "0.0%" in warning.what


def test_the_cache_skips_unchanged_files_and_rechecks_changed_ones(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _folder(root)
    first = check_data(_cfg(root), workers=2)
    assert first.ok and first.read == first.files == 12
    assert first.cache == str(root / ".sclseg_cache" / "data_check.json") and Path(first.cache).is_file()
    second = check_data(_cfg(root), workers=2)
    assert second.ok and second.read == 0 and second.files == 12

    changed = root / "masks" / "im2.png"
    _mask(changed, np.full((H, W), 5))
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a coarse file-system clock
    third = check_data(_cfg(root), workers=2)
    assert third.read == 2  # the changed mask and its image
    assert [(p.file, "values 5" in p.what) for p in third.problems] == [(str(changed), True)]
    fourth = check_data(_cfg(root), workers=2)  # a cached problem is still reported
    assert fourth.read == 0 and [p.file for p in fourth.problems] == [str(changed)]
    assert check_data(_cfg(root), cache=False).read == 12


def test_raise_for_problems_lists_twenty_and_counts_the_rest(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _folder(root, n=25)
    for i in range(25):
        _mask(root / "masks" / f"im{i}.png", np.full((H, W), 200))
    report = check_data(_cfg(root), cache=False)
    assert len(report.problems) == 25
    with pytest.raises(ConfigError) as info:
        report.raise_for_problems()
    message = str(info.value)
    assert message.count("values 200") == 20 and "and 5 more" in message


def test_digit_scenes_are_checked_in_memory() -> None:
    cfg = load_config(resolve_config_path("digits/default"), TINY)
    report = check_data(cfg)
    assert report.ok and report.files == 0 and report.cache is None
    assert report.splits == {"train": 8, "unlabeled": 32, "test": 6, "val": 6}
    assert sum(report.class_pixels.values()) == 8 * 32 * 32  # every labeled pixel is a class
    bundle = build_data(cfg)  # splits a trainer built already are reused, not built again
    assert check_data(cfg, bundle=bundle).class_pixels == report.class_pixels


def test_cityscapes_labels_missing_and_foreign_ids_are_reported(tmp_path: Path) -> None:
    pytest.importorskip("cityscapesscripts")
    from cityscapesscripts.helpers.labels import id2label

    root = tmp_path / "cs"
    rng = np.random.default_rng(0)
    ids = np.array([7, 8, 11, 21, 26, 0, 4], dtype=np.uint8)  # road, sidewalk, building, vegetation, car, two ignored
    labels = {}
    splits = (("train", ["a_000000_000001", "a_000000_000002", "b_000000_000003"]), ("val", ["c_000000_000004"]))
    for split, names in splits:
        for stem in names:
            city = stem.split("_")[0]
            _image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", rng)
            label = rng.choice(ids, (H, W))
            path = root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
            _mask(path, label)
            labels[path] = label
    cfg = config_from_dict({"data": {"name": "cityscapes", "root": str(root),
                                     "cityscapes": {"extra_unlabeled": False}}})
    clean = check_data(cfg, cache=False)
    assert clean.ok
    train = [m for p, m in labels.items() if "/train/" in str(p)]
    for label_id in (7, 8, 11, 21, 26):
        name = id2label[label_id].name
        assert clean.class_pixels[name] == sum(int((m == label_id).sum()) for m in train)
    assert clean.ignored_pixels == sum(int(np.isin(m, [0, 4]).sum()) for m in train)

    missing = root / "gtFine" / "train" / "a" / "a_000000_000002_gtFine_labelIds.png"
    missing.unlink()
    foreign = root / "gtFine" / "val" / "c" / "c_000000_000004_gtFine_labelIds.png"
    _mask(foreign, np.full((H, W), 200))
    report = check_data(cfg, cache=False)
    found = {p.file: p.what for p in report.problems}
    assert set(found) == {str(root / "leftImg8bit" / "train" / "a" / "a_000000_000002_leftImg8bit.png"), str(foreign)}
    assert "no fine label" in found[next(f for f in found if "leftImg8bit" in f)]
    assert "200 are no Cityscapes labelIds" in found[str(foreign)]
