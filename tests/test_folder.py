"""The folder dataset ("train on your own data"): layout, bad input, augmentation alignment."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sclseg.config import ConfigError, config_from_dict, load_config
from sclseg.data import build_data
from sclseg.data.folder import default_palette, read_image

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "sclseg" / "configs"
CLASSES = ["background", "a", "b"]
COLOURS = np.array([[20, 20, 20], [230, 40, 40], [40, 200, 60]], dtype=np.uint8)


def make_pair(folder: Path, stem: str, rng: np.random.Generator, size=(24, 32), suffix=".png", block=6) -> np.ndarray:
    """An image painted from its mask: class colours on blocks (+ an ignore block)."""
    h, w = size
    coarse = rng.integers(0, len(CLASSES), (h // block + 1, w // block + 1))
    mask = np.kron(coarse, np.ones((block, block), dtype=np.int64))[:h, :w].astype(np.uint8)
    mask[:block, :block] = 255
    image = COLOURS[np.minimum(mask, 2)]
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / "images" / f"{stem}{suffix}", quality=100)
    Image.fromarray(mask).save(folder / "masks" / f"{stem}.png")
    return mask


def make_root(root: Path, n=6, *, val=0, unlabeled=0, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        make_pair(root, f"img{i:02d}", rng)
    for i in range(val):
        make_pair(root / "val", f"v{i}", rng)
    if unlabeled:
        (root / "unlabeled").mkdir(parents=True)
        for i in range(unlabeled):
            Image.fromarray(rng.integers(0, 255, (20, 28, 3), dtype=np.uint8)).save(root / "unlabeled" / f"u{i}.jpg")
    return root


def cfg_for(root: Path, **folder):
    folder = {"classes": CLASSES, **folder}
    return config_from_dict({
        "data": {"name": "folder", "root": str(root), "crop_size": [16, 16], "hflip": True, "folder": folder},
    })


# --------------------------------------------------------------------------- layout


def test_layout_splits_and_classes(tmp_path):
    root = make_root(tmp_path / "d", n=6, val=2, unlabeled=3)
    data = build_data(cfg_for(root))
    assert [c.name for c in data.classes] == CLASSES and data.num_classes == 3
    assert [tuple(c.color) for c in data.classes] == default_palette(3)
    assert len(data.labeled) == 6 and len(data.unlabeled) == 3 and len(data.eval_splits["val"]) == 2
    sample = data.labeled[0]
    assert sample["image"].shape == (3, 16, 16) and sample["mask"].shape == (16, 16)
    assert "mask" not in data.unlabeled[0]
    image, mask, name = data.eval_splits["val"].load(0)
    assert name == "v0" and image.shape == (3, 24, 32) and set(mask.unique().tolist()) <= {0, 1, 2, 255}


def test_val_fraction_labeled_fraction_and_ignore_value(tmp_path):
    root = make_root(tmp_path / "d", n=10)
    data = build_data(cfg_for(root, val_fraction=0.2, labeled_fraction=0.5, colors=COLOURS.tolist()))
    train = [p.stem for p, _ in data.labeled.base.items]
    val = [p.stem for p, _ in data.eval_splits["val"].items]
    held = [p.stem for p, _ in data.unlabeled.base.items]
    assert (len(val), len(train), len(held)) == (2, 4, 4)
    assert sorted(train + val + held) == [f"img{i:02d}" for i in range(10)]
    assert all(m is None for _, m in data.unlabeled.base.items)
    assert data.classes[1].color == (230, 40, 40)
    again = build_data(cfg_for(root, val_fraction=0.2, labeled_fraction=0.5))
    assert [p.stem for p, _ in again.labeled.base.items] == train  # seeded: the same every time
    # an ignore value other than data.ignore_index is remapped to it
    for mask_path in (root / "masks").glob("*.png"):
        m = np.asarray(Image.open(mask_path)).copy()
        m[m == 255] = 7
        Image.fromarray(m).save(mask_path)
    data = build_data(cfg_for(root, ignore_value=7, val_fraction=0.0))
    _, mask, _ = data.labeled.base.load(0)
    assert mask[0, 0] == 255 and 7 not in mask.unique().tolist()
    assert "val" not in data.eval_splits


# --------------------------------------------------------------------------- bad input


def test_missing_root_and_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_data(cfg_for(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"images not found"):
        build_data(cfg_for(tmp_path / "empty"))
    (tmp_path / "empty" / "images").mkdir()
    with pytest.raises(FileNotFoundError, match=r"masks not found"):
        build_data(cfg_for(tmp_path / "empty"))
    (tmp_path / "empty" / "masks").mkdir()
    with pytest.raises(ValueError, match="no images.*empty"):
        build_data(cfg_for(tmp_path / "empty"))
    with pytest.raises(ConfigError, match="data.root"):
        build_data(config_from_dict({"data": {"name": "folder", "folder": {"classes": CLASSES}}}))


def test_pairing_errors_name_the_file(tmp_path):
    root = make_root(tmp_path / "d", n=3)
    (root / "masks" / "img01.png").unlink()
    with pytest.raises(ValueError, match=r"img01\.png: no mask; expected .*masks/img01\.png"):
        build_data(cfg_for(root))
    root = make_root(tmp_path / "e", n=3)
    (root / "images" / "img02.png").unlink()
    with pytest.raises(ValueError, match=r"img02\.png: mask without an image"):
        build_data(cfg_for(root))
    root = make_root(tmp_path / "f", n=3)
    Image.new("RGB", (32, 24)).save(root / "images" / "img00.jpg")
    with pytest.raises(ValueError, match="share the stem 'img00'"):
        build_data(cfg_for(root))
    root = make_root(tmp_path / "g", n=3)
    (root / "unlabeled").mkdir()
    with pytest.raises(ValueError, match="unlabeled: no images"):
        build_data(cfg_for(root))


def test_config_errors(tmp_path):
    root = make_root(tmp_path / "d", n=3)
    with pytest.raises(ConfigError, match="classes is empty"):
        build_data(cfg_for(root, classes=[]))
    with pytest.raises(ConfigError, match="data.folder.ignore_value: expected a value that is no class index"):
        build_data(cfg_for(root, ignore_value=1))
    with pytest.raises(ConfigError, match="2 entries for 3 classes"):
        build_data(cfg_for(root, colors=[[0, 0, 0], [1, 1, 1]]))
    with pytest.raises(ValueError, match="1 image"):
        build_data(cfg_for(make_root(tmp_path / "one", n=1)))  # cannot hold out val from one image


def test_bad_samples_are_reported_when_loaded(tmp_path):
    root = make_root(tmp_path / "d", n=5, val=0)
    data = build_data(cfg_for(root, val_fraction=0.0))
    ds = data.labeled.base
    index = {p.stem: i for i, (p, _) in enumerate(ds.items)}
    # a mask of another size than its image
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(root / "masks" / "img00.png")
    with pytest.raises(ValueError, match=r"img00\.png: mask is 10x10 \(WxH\) but its image img00\.png is 32x24"):
        ds.load(index["img00"])
    # mask values outside the classes and not the ignore value
    m = np.zeros((24, 32), dtype=np.uint8)
    m[3, 4], m[5, 6] = 3, 200
    Image.fromarray(m).save(root / "masks" / "img01.png")
    with pytest.raises(ValueError, match=r"img01\.png: mask values 3, 200 are neither class indices 0\.\.2"):
        ds[index["img01"]]
    # an RGB colour mask instead of an index PNG
    Image.fromarray(np.zeros((24, 32, 3), dtype=np.uint8)).save(root / "masks" / "img02.png")
    with pytest.raises(ValueError, match=r"img02\.png: label image has mode RGB.*index PNG"):
        ds.load(index["img02"])
    # a truncated image and a file that is no image
    raw = (root / "images" / "img03.png").read_bytes()
    (root / "images" / "img03.png").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"img03\.png: cannot read image"):
        ds.load(index["img03"])
    (root / "images" / "img04.png").write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match=r"img04\.png: cannot read image"):
        read_image(root / "images" / "img04.png")
    # the training view reports the same errors
    with pytest.raises(ValueError, match="img03"):
        data.labeled[index["img03"]]


# --------------------------------------------------------------------------- alignment


def nearest_class(image: torch.Tensor) -> torch.Tensor:
    """Per pixel, the class whose colour is nearest (image in [0, 1])."""
    colours = torch.from_numpy(COLOURS).float().div(255)
    dist = ((image.permute(1, 2, 0)[..., None, :] - colours) ** 2).sum(-1)
    return dist.argmin(-1)


def interior(mask: torch.Tensor) -> torch.Tensor:
    """Pixels whose 3x3 neighbourhood has one label (and is no ignore)."""
    m = mask.float()[None, None]
    hi = torch.nn.functional.max_pool2d(m, 3, 1, 1)[0, 0]
    lo = -torch.nn.functional.max_pool2d(-m, 3, 1, 1)[0, 0]
    return (hi == lo) & (mask != 255)


@pytest.mark.parametrize("class_uniform", [False, True])
def test_label_still_matches_the_image_after_augmentation(tmp_path, class_uniform):
    """Masks painted from the image: after scale, crop, flip (and class-centred crops) each
    interior label must still be the class of the image colour under it."""
    root = make_root(tmp_path / "d", n=4)
    cfg = config_from_dict({
        "data": {"name": "folder", "root": str(root), "crop_size": [20, 28], "scale_range": [0.5, 2.0],
                 "hflip": True, "color_jitter": 0.0, "blur_prob": 0.0,
                 "folder": {"classes": CLASSES, "val_fraction": 0.0},
                 "class_uniform": {"enabled": class_uniform, "fraction": 1.0, "tile_size": 8}},
    })
    data = build_data(cfg)
    checked = 0
    for seed in range(40):
        torch.manual_seed(seed)
        sample = data.labeled[seed % len(data.labeled)]
        image, mask = sample["image"], sample["mask"]
        keep = interior(mask)
        assert (nearest_class(image)[keep] == mask[keep]).float().mean() > 0.99
        checked += int(keep.sum())
    assert checked > 1000
    # a flip of the image alone would be caught: the check is not trivially satisfied
    torch.manual_seed(0)
    sample = data.labeled[0]
    keep = interior(sample["mask"])
    wrong = nearest_class(sample["image"].flip(-1))[keep] != sample["mask"][keep]
    assert wrong.float().mean() > 0.2


def test_folder_example_config(tmp_path):
    cfg = load_config(CONFIGS / "folder" / "example.yaml")
    assert cfg.data.name == "folder" and cfg.data.folder.classes and cfg.data.unlabeled_batch_size >= 2
    assert len(cfg.data.folder.colors) == len(cfg.data.folder.classes)
    root = tmp_path / "my_data"
    rng = np.random.default_rng(0)
    for i in range(4):
        make_pair(root, f"x{i}", rng)
    small = load_config(CONFIGS / "folder" / "example.yaml", [f"data.root={root}", "data.crop_size=[16,16]",
                                                               "data.folder.val_fraction=0.25"])
    data = build_data(small)
    assert len(data.labeled) == 3 and len(data.eval_splits["val"]) == 1 and data.unlabeled is None
    assert data.labeled[0]["image"].shape == (3, 16, 16)
