"""Cityscapes layout, label mapping, splits and class-uniform sampling on synthetic trees."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("cityscapesscripts", reason="the 'cityscapes' extra (cityscapesscripts) is not installed")
from cityscapesscripts.helpers.labels import id2label  # noqa: E402
from cityscapesscripts.helpers.labels import labels as CS_LABELS

from sclseg.config import ConfigError, config_from_dict, load_config  # noqa: E402
from sclseg.data import build_data  # noqa: E402
from sclseg.data import cityscapes as cs  # noqa: E402
from sclseg.data.class_uniform import (  # noqa: E402
    TrainingView,
    class_centroids,
    scale_crop,
    tile_centroids,
)
from sclseg.data.splits import fraction_split, read_split_dir, read_split_file  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "sclseg" / "configs"
VALID_IDS = sorted(label.id for label in CS_LABELS if label.id >= 0)  # 0..33
TREE_CITIES = {"train": ["aachen", "bochum"], "val": ["frankfurt"], "train_extra": ["augsburg"]}


def random_label_ids(rng: np.random.Generator, height: int, width: int, block: int = 4) -> np.ndarray:
    """A labelIds map of ``block``-sized squares with random ids (ignored ids included)."""
    coarse = rng.choice(VALID_IDS, size=(height // block, width // block))
    return np.kron(coarse, np.ones((block, block), dtype=np.int64)).astype(np.uint8)


def instance_ids(label_ids: np.ndarray, block: int = 4) -> np.ndarray:
    """instanceIds as in gtFine: id*1000+k for classes with instances (one per block), else id."""
    out = label_ids.astype(np.uint16)  # 16-bit PNG, as in gtFine
    h, w = label_ids.shape
    k = 0
    for y in range(0, h, block):
        for x in range(0, w, block):
            lid = int(label_ids[y, x])
            if id2label[lid].hasInstances:
                out[y : y + block, x : x + block] = lid * 1000 + k
                k += 1
    return out


def build_tree(root: Path, *, n_per_city=None, size=(16, 32), seed=0) -> dict[str, list[str]]:
    """A Cityscapes-format tree of tiny PNGs. Returns {split: [CITY_SEQ_FRAME, ...]}."""
    n_per_city = n_per_city or {"train": 3, "val": 2, "train_extra": 2}
    rng = np.random.default_rng(seed)
    names: dict[str, list[str]] = {}
    colours = np.array([label.color for label in sorted(CS_LABELS, key=lambda entry: entry.id) if label.id >= 0],
                       dtype=np.uint8)
    for split, cities in TREE_CITIES.items():
        names[split] = []
        for city in cities:
            for k in range(n_per_city[split]):
                stem = f"{city}_{k:06d}_{19 + k:06d}"
                names[split].append(stem)
                label_ids = random_label_ids(rng, *size)
                image = colours[label_ids] // 2 + rng.integers(0, 60, (*size, 3)).astype(np.uint8)
                img_dir = root / "leftImg8bit" / split / city
                img_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(img_dir / f"{stem}_leftImg8bit.png")
                if split == "train_extra":
                    continue  # unlabeled images need no label file
                gt_dir = root / "gtFine" / split / city
                gt_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray(label_ids).save(gt_dir / f"{stem}_gtFine_labelIds.png")
                Image.fromarray(instance_ids(label_ids)).save(gt_dir / f"{stem}_gtFine_instanceIds.png")
    return names


@pytest.fixture()
def tree(tmp_path: Path) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path / "cityscapes"
    return root, build_tree(root)


def cfg_for(root: Path, **cityscapes) -> object:
    return config_from_dict({
        "data": {"name": "cityscapes", "root": str(root), "crop_size": [12, 12], "scale_range": [0.5, 2.0],
                 "hflip": True, "cityscapes": cityscapes},
    })


# --------------------------------------------------------------------------- label mapping


def test_label_table_matches_cityscapesscripts():
    table = cs.label_table()
    names = [c.name for c in table.classes]
    assert len(names) == 19 and names[0] == "road" and names[-1] == "bicycle"
    ids = np.arange(256)
    mapped = cs.label_ids_to_train_ids(ids)
    for label in CS_LABELS:
        if label.id < 0:
            continue
        expected = label.trainId if 0 <= label.trainId < 255 else 255
        assert mapped[label.id] == expected, label.name
        assert table.classes[expected].color == label.color if expected != 255 else True
    assert (mapped[34:] == 255).all()  # ids outside the table are ignored
    # tensors map the same way; negative ids are ignored
    t = cs.label_ids_to_train_ids(torch.tensor([[7, 8, 0, 33, -1, 300]]))
    assert t.tolist() == [[0, 1, 255, 18, 255, 255]]
    # train ids -> labelIds -> train ids is the identity on 0..18; 255 -> 0 ('unlabeled') -> 255
    train = np.array([list(range(19)) + [255]])
    back = cs.label_ids_to_train_ids(cs.train_ids_to_label_ids(train))
    assert back.tolist() == train.tolist()
    assert cs.train_ids_to_label_ids(np.array([255, 19, -3])).tolist() == [0, 0, 0]


def test_missing_extra_is_a_clear_error(monkeypatch):
    cs.label_table.cache_clear()
    monkeypatch.setitem(sys.modules, "cityscapesscripts.helpers.labels", None)  # import now fails
    try:
        with pytest.raises(cs.MissingExtraError, match=r"sclseg\[cityscapes\]") as info:
            cs.label_table()
        assert isinstance(info.value, ImportError) and isinstance(info.value, ValueError)
    finally:
        cs.label_table.cache_clear()


# --------------------------------------------------------------------------- dataset and layout


def test_dataset_layout_and_labels(tree):
    root, names = tree
    data = build_data(cfg_for(root))
    assert data.num_classes == 19 and data.ignore_index == 255
    assert len(data.labeled) == len(names["train"])  # all fine train images labeled
    assert len(data.unlabeled) == len(names["train_extra"])  # train_extra, no label files
    val = data.eval_splits["val"]
    assert [it.name for it in val.items] == sorted(names["val"])
    image, mask, name = val.load(0)
    raw = np.asarray(Image.open(val.items[0].label))
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 32)
    assert mask.tolist() == cs.label_ids_to_train_ids(raw).astype(np.int64).tolist()
    assert name == val.items[0].name and "_leftImg8bit" not in name
    # training samples: crops of the configured size, unlabeled ones without a mask
    sample = data.labeled[0]
    assert sample["image"].shape == (3, 12, 12) and sample["mask"].shape == (12, 12)
    u = data.unlabeled[0]
    assert u["image"].shape == (3, 12, 12) and "mask" not in u


def test_pretrained_train_ids_are_read_as_is(tree):
    root, names = tree
    items = cs.scan_split(root, "val")
    raw = np.asarray(Image.open(items[0].label))
    train_ids = cs.label_ids_to_train_ids(raw)
    converted = items[0].label.with_name(items[0].label.name.replace("_labelIds", "_labelTrainIds"))
    Image.fromarray(train_ids).save(converted)
    ds = cs.CityscapesDataset(root, [cs.CityscapesItem(items[0].image, converted, items[0].name)], split="val")
    assert ds.load_label(0).tolist() == train_ids.astype(np.int64).tolist()
    Image.fromarray(np.full_like(train_ids, 30)).save(converted)  # a labelIds map misnamed as train ids
    with pytest.raises(ValueError, match="labelTrainIds"):
        ds.load_label(0)


def test_layout_errors_name_what_is_missing(tmp_path):
    root = tmp_path / "cs"
    build_tree(root)
    with pytest.raises(FileNotFoundError, match="leftImg8bit/test"):
        cs.scan_split(root, "test")
    victim = sorted((root / "gtFine" / "train").glob("*/*_labelIds.png"))[0]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        build_data(cfg_for(root))
    with pytest.raises(ConfigError, match="data.root"):
        build_data(config_from_dict({"data": {"name": "cityscapes"}}))
    with pytest.raises(FileNotFoundError, match="extra_unlabeled"):
        root2 = tmp_path / "cs2"
        build_tree(root2)
        import shutil

        shutil.rmtree(root2 / "leftImg8bit" / "train_extra")
        build_data(cfg_for(root2))


# --------------------------------------------------------------------------- splits


def test_split_file_parsing(tmp_path):
    f = tmp_path / "labeled.txt"
    f.write_text("# comment\n\na.png b.png\n  c.png\td.png  \ne.png\n")
    entries = read_split_file(f)
    assert [(e.image, e.label) for e in entries] == [("a.png", "b.png"), ("c.png", "d.png"), ("e.png", None)]
    f.write_text("a.png b.png extra\n")
    with pytest.raises(ValueError, match=r"labeled.txt:1: expected"):
        read_split_file(f)
    f.write_text("a.png b.png\na.png c.png\n")
    with pytest.raises(ValueError, match="listed twice"):
        read_split_file(f)
    f.write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="no entries"):
        read_split_file(f)
    f.write_text("a.png\n")
    (tmp_path / "unlabeled.txt").write_text("a.png\n")
    with pytest.raises(ValueError, match="also in labeled.txt"):
        read_split_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="labeled.txt"):
        read_split_dir(tmp_path / "nowhere")


def test_unimatch_split_dir(tree):
    """UniMatch/CPS lists: labelTrainIds paths (pre-converted or not), unlabeled with/without labels."""
    root, names = tree
    train = cs.scan_split(root, "train")
    rel = lambda p: str(p.relative_to(root))  # noqa: E731
    lab = train[:2]
    # the first label is pre-converted, the second is not (falls back to *_labelIds.png)
    raw = np.asarray(Image.open(lab[0].label))
    tid = lab[0].label.with_name(lab[0].label.name.replace("_labelIds", "_labelTrainIds"))
    Image.fromarray(cs.label_ids_to_train_ids(raw)).save(tid)
    split = root / "splits" / "cityscapes" / "2"
    split.mkdir(parents=True)
    lines = [f"{rel(it.image)} {rel(it.label).replace('_labelIds', '_labelTrainIds')}" for it in lab]
    (split / "labeled.txt").write_text("\n".join(lines) + "\n")
    unl = train[2:]
    (split / "unlabeled.txt").write_text(
        f"{rel(unl[0].image)} {rel(unl[0].label)}\n" + "".join(f"{rel(it.image)}\n" for it in unl[1:])
    )
    for it in unl:  # unlabeled images never need label files
        it.label.unlink()
    data = build_data(cfg_for(root, split_dir="splits/cityscapes/2", extra_unlabeled=False))
    assert [it.name for it in data.labeled.base.items] == [it.name for it in lab]
    assert data.labeled.base.items[0].label == tid and data.labeled.base.items[1].label == lab[1].label
    assert [it.name for it in data.unlabeled.base.items] == [it.name for it in unl]
    assert all(it.label is None for it in data.unlabeled.base.items)
    assert data.labeled.base.load_label(0).tolist() == data.labeled.base.load_label(0).tolist()
    data.unlabeled[0]  # loads without a label file
    # image ids (one token, no path) and a missing listed label
    (split / "labeled.txt").write_text(f"{lab[0].name}\n")
    (split / "unlabeled.txt").unlink()
    data = build_data(cfg_for(root, split_dir=str(split), extra_unlabeled=False))
    assert [it.name for it in data.labeled.base.items] == [lab[0].name]
    # no unlabeled.txt: the rest of the fine pool is held back as unlabeled
    assert sorted(it.name for it in data.unlabeled.base.items) == sorted(it.name for it in train[1:])
    (split / "labeled.txt").write_text(f"{rel(lab[0].image)} gtFine/train/nowhere/x_gtFine_labelIds.png\n")
    with pytest.raises(FileNotFoundError, match="x_gtFine_labelIds.png"):
        build_data(cfg_for(root, split_dir=str(split), extra_unlabeled=False))
    with pytest.raises(ConfigError, match="at most one"):
        build_data(cfg_for(root, split_dir=str(split), labeled_count=2))


def test_fraction_splits_deterministic_disjoint_nested():
    a1, r1 = fraction_split(2975, count=372, seed=0)
    a2, r2 = fraction_split(2975, count=372, seed=0)
    assert np.array_equal(a1, a2) and np.array_equal(r1, r2)
    assert len(a1) == 372 and len(r1) == 2975 - 372
    assert not set(a1) & set(r1) and set(a1) | set(r1) == set(range(2975))
    quarter, _ = fraction_split(2975, fraction=0.25, seed=0)
    assert set(a1) <= set(quarter)  # nested within one seed
    other, _ = fraction_split(2975, count=372, seed=1)
    assert not np.array_equal(a1, other)
    assert len(fraction_split(10, fraction=0.01)[0]) == 1  # at least one labeled item
    for bad in ({"fraction": 0.0}, {"fraction": 1.5}, {"count": 0}, {"count": 11}, {}, {"fraction": 0.5, "count": 2}):
        with pytest.raises(ValueError):
            fraction_split(10, **bad)


def test_fraction_split_of_the_cityscapes_pool(tree):
    root, names = tree
    data = build_data(cfg_for(root, labeled_count=2, split_seed=3))
    again = build_data(cfg_for(root, labeled_count=2, split_seed=3))
    labeled = [it.name for it in data.labeled.base.items]
    assert labeled == [it.name for it in again.labeled.base.items] and len(labeled) == 2
    unlabeled = [it.name for it in data.unlabeled.base.items]
    held = [n for n in unlabeled if n in names["train"]]
    assert not set(labeled) & set(held) and sorted(labeled + held) == sorted(names["train"])
    assert sorted(set(unlabeled) - set(held)) == sorted(names["train_extra"])
    only_extra = build_data(cfg_for(root, labeled_fraction=0.5, held_back_unlabeled=False))
    assert sorted(it.name for it in only_extra.unlabeled.base.items) == sorted(names["train_extra"])
    assert len(only_extra.labeled) == 3
    for name in held:  # held-back fine images need no label files
        next((root / "gtFine" / "train").glob(f"*/{name}_gtFine_labelIds.png")).unlink()
    rebuilt = build_data(cfg_for(root, labeled_count=2, split_seed=3))
    assert [it.name for it in rebuilt.unlabeled.base.items] == unlabeled
    rebuilt.unlabeled[0]


# --------------------------------------------------------------------------- class-uniform sampling


def brute_force_centroids(label: np.ndarray, num_classes: int, tile: int):
    """Per (tile, class): the centroid, and the minimal squared distance of a class pixel to it."""
    out = {}
    h, w = label.shape
    for y0 in range(0, h, tile):
        for x0 in range(0, w, tile):
            for c in range(num_classes):
                pts = [(y, x) for y in range(y0, min(y0 + tile, h)) for x in range(x0, min(x0 + tile, w))
                       if label[y, x] == c]
                if not pts:
                    continue
                my = sum(p[0] for p in pts) / len(pts)
                mx = sum(p[1] for p in pts) / len(pts)
                out[(y0 // tile, x0 // tile, c)] = (min((y - my) ** 2 + (x - mx) ** 2 for y, x in pts), my, mx)
    return out


def test_tile_centroids_against_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(4):
        h, w, tile, n = 23, 31, [8, 10, 64, 7][trial], 5
        label = rng.integers(0, n, (h, w))
        label[rng.random((h, w)) < 0.2] = 255  # ignore pixels are skipped
        label[:, 13:17] = 3 if trial % 2 else label[:, 13:17]  # a band crossing tiles
        rows = tile_centroids(label, n, tile)
        ref = brute_force_centroids(label, n, tile)
        assert len(rows) == len(ref)
        for c, y, x in rows:
            key = (y // tile, x // tile, int(c))
            assert key in ref, key
            assert label[y, x] == c  # the point is a pixel of its class ...
            dmin, my, mx = ref[key]
            assert math.isclose((y - my) ** 2 + (x - mx) ** 2, dmin, abs_tol=1e-9)  # ... nearest the centroid


def test_centroids_of_a_dataset_are_cached(tree, tmp_path, monkeypatch):
    root, names = tree
    ds = cs.CityscapesDataset(root, cs.scan_split(root, "train"))
    cache = tmp_path / "cache"
    first = class_centroids(ds, tile_size=8, cache_dir=cache, progress=False)
    files = list(cache.glob("class_uniform_*.npz"))
    assert len(files) == 1
    for c, rows in first.items():  # (image, y, x) rows point at pixels of their class
        for i, y, x in rows:
            assert int(ds.load_label(int(i))[y, x]) == c
    # every (image, tile, class) occurrence is there
    expected = sum(len(tile_centroids(ds.load_label(i).numpy(), 19, 8)) for i in range(len(ds)))
    assert sum(len(r) for r in first.values()) == expected
    import sclseg.data.class_uniform as cu

    monkeypatch.setattr(cu, "_compute", lambda *a, **k: pytest.fail("recomputed despite the cache"))
    second = class_centroids(ds, tile_size=8, cache_dir=cache, progress=False)
    assert first.keys() == second.keys() and all(np.array_equal(first[c], second[c]) for c in first)
    monkeypatch.undo()
    class_centroids(cs.CityscapesDataset(root, cs.scan_split(root, "train")[:2]), tile_size=8, cache_dir=cache,
                    progress=False)
    assert len(list(cache.glob("class_uniform_*.npz"))) == 2  # another file list, another key


def blob_dataset(n_images=4, size=(40, 48)):
    """Label maps of background 0 with 6x6 rectangles of the rarer classes; image = label colour."""
    from sclseg.data.base import ClassInfo, SegmentationDataset

    rng = np.random.default_rng(1)
    masks = []
    for i in range(n_images):
        m = np.zeros(size, dtype=np.int64)
        for c in range(1, 5):
            if rng.random() < 0.6 or c == 1 + i % 4:
                y, x = rng.integers(0, size[0] - 6), rng.integers(0, size[1] - 6)
                m[y : y + 6, x : x + 6] = c
        masks.append(m)

    class Blobs(SegmentationDataset):
        classes = [ClassInfo(str(c), (c * 40, 0, 0)) for c in range(5)]

        def __len__(self):
            return n_images

        def load(self, i):
            m = torch.from_numpy(masks[i])
            return (m * 40).to(torch.uint8)[None].repeat(3, 1, 1), m, f"img{i}"

    return Blobs()


@pytest.mark.parametrize("scale_range", [(1.0, 1.0), (0.5, 2.0)])
def test_class_uniform_crops_contain_the_chosen_class(scale_range):
    ds = blob_dataset()
    centroids = class_centroids(ds, tile_size=16, progress=False)
    view = TrainingView(ds, crop_size=(16, 16), scale_range=scale_range, centroids=centroids, fraction=1.0)
    chosen = []
    for seed in range(60):
        torch.manual_seed(seed)
        source, center, c = view.choose(seed % len(ds))
        torch.manual_seed(seed)
        sample = view[seed % len(ds)]
        assert c is not None and (sample["mask"] == c).any(), (seed, c, center)
        assert sample["name"] == f"img{source}"
        chosen.append(c)
    counts = np.bincount(chosen, minlength=5)
    assert (counts > 0).all()  # classes drawn uniformly: each of 5 about 12 times in 60
    assert counts.max() <= 25


def test_class_uniform_fraction_and_random_crops():
    ds = blob_dataset()
    centroids = class_centroids(ds, tile_size=16, progress=False)
    view = TrainingView(ds, crop_size=(16, 16), centroids=centroids, fraction=0.3)
    torch.manual_seed(0)
    picks = [view.choose(i % 4)[2] is not None for i in range(2000)]
    assert abs(np.mean(picks) - 0.3) < 0.04
    plain = TrainingView(ds, crop_size=(16, 16), centroids=centroids, fraction=0.0)
    assert all(plain.choose(i)[1] is None for i in range(10))


def test_class_uniform_centroid_at_a_random_position_inside_the_crop():
    """NVIDIA's rule: the crop start uniform among those whose crop holds the centroid, clamped
    into the image; the label stays aligned with the image."""
    height, width = 20, 30
    index = torch.arange(height * width).view(height, width)
    img = torch.stack([index // width, index % width]).float()  # each pixel holds its (y, x)
    for center in [(0, 0), (19, 29), (10, 15), (0, 29), (6, 3)]:
        for crop in [(8, 8), (5, 12), (25, 40)]:
            positions = set()
            for seed in range(200):
                torch.manual_seed(seed)
                out, mask = scale_crop(img, index, crop, 1.0, center=center, ignore_index=-1)
                inside = mask >= 0
                assert torch.equal(mask[inside], (out[0] * width + out[1]).long()[inside])  # aligned
                hit = (mask == center[0] * width + center[1]).nonzero()
                assert len(hit) == 1, (center, crop, seed)  # the centroid is inside the crop
                positions.add(tuple(hit[0].tolist()))
            # along each axis, every position the image allows (the crop inside it where it fits) is reached
            ys = (range(max(0, center[0] - (height - crop[0])), min(crop[0], center[0] + 1))
                  if crop[0] < height else [None])
            xs = (range(max(0, center[1] - (width - crop[1])), min(crop[1], center[1] + 1))
                  if crop[1] < width else [None])
            if ys != [None]:
                assert {y for y, _ in positions} == set(ys), (center, crop)
            if xs != [None]:
                assert {x for _, x in positions} == set(xs), (center, crop)


def test_class_uniform_through_build_data(tree):
    root, _ = tree
    cfg = config_from_dict({
        "data": {"name": "cityscapes", "root": str(root), "crop_size": [12, 12],
                 "class_uniform": {"enabled": True, "fraction": 1.0, "tile_size": 8}},
    })
    data = build_data(cfg)
    assert data.labeled.fraction == 1.0 and data.labeled.centroid_classes
    assert list((root / ".sclseg_cache").glob("class_uniform_*.npz"))  # cached beside the dataset
    assert data.unlabeled.fraction == 0.0  # unlabeled crops are random
    sample = data.labeled[0]
    assert sample["mask"].shape == (12, 12)
    import shutil

    shutil.rmtree(root / ".sclseg_cache")
    for_eval = build_data(cfg, for_training=False)  # evaluation needs no centroid scan
    assert for_eval.labeled.fraction == 0.0 and not (root / ".sclseg_cache").exists()
    assert len(for_eval.eval_splits["val"]) == len(data.eval_splits["val"])


# --------------------------------------------------------------------------- configs


def test_paper_config():
    cfg = load_config(CONFIGS / "cityscapes" / "scl_wrn38.yaml")
    m, o, d = cfg.method, cfg.optim, cfg.data
    assert (m.name, m.n_boxes, m.last_boxes, m.max_pairs, m.lambda_c, m.lambda_sc) == ("scl", 32, 16, 9000, 20.0, 3.0)
    assert (m.ema_decay, m.relax_window) == (0.999, 3)
    assert (o.lr, o.poly_power, o.momentum, o.weight_decay) == (0.002, 1.0, 0.9, 0.001)
    assert (d.batch_size, d.unlabeled_batch_size, d.crop_size, d.scale_range) == (1, 2, [800, 800], [0.5, 2.0])
    assert d.hflip and d.blur_prob > 0 and d.color_jitter > 0 and d.class_uniform.enabled
    assert cfg.train.iterations == math.ceil(175 * 2975 / 8)
    assert cfg.model.name == "deeplabv3plus_wrn38" and cfg.model.output_stride == 8
    assert (cfg.eval.scales, cfg.eval.flip, cfg.eval.tile) == ([0.5, 1.0, 2.0], True, [800, 800])
    assert d.cityscapes.extra_unlabeled and d.cityscapes.labeled == "train"


def test_resnet101_split_config(tree):
    cfg = load_config(CONFIGS / "cityscapes" / "scl_resnet101_1-8.yaml")
    assert cfg.model.name == "deeplabv3plus_resnet101"
    assert cfg.data.cityscapes.labeled_count == 372 and not cfg.data.cityscapes.extra_unlabeled
    assert cfg.method.name == "scl" and cfg.data.unlabeled_batch_size >= 2
    root, _ = tree  # the config's data section builds on a Cityscapes tree (count shrunk to fit)
    small = load_config(CONFIGS / "cityscapes" / "scl_resnet101_1-8.yaml",
                        [f"data.root={root}", "data.cityscapes.labeled_count=2", "data.crop_size=[12,12]",
                         "data.class_uniform.tile_size=8"])
    data = build_data(small)
    assert len(data.labeled) == 2 and len(data.unlabeled) == 4
