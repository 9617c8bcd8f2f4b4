"""Bad input: every case is a clear error naming the file or key and what was expected.

Data errors are driven through ``sclseg train`` on a tiny folder dataset (the user's path);
they surface the same way whether the sample is loaded in the main process or in a data worker.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from sclseg.cli import main
from sclseg.config import load_config, resolve_config_path
from sclseg.data import build_data
from sclseg.data.stream import make_stream
from sclseg.engine.checkpoint import load_checkpoint, save_atomic
from sclseg.engine.trainer import Trainer

from tiny_config import TINY

TINY = [*TINY, "train.eval_interval=100"]


def _folder(root: Path, n: int = 2) -> Path:
    """``root/images``, ``root/masks`` (2 classes) and a one-image ``root/val``."""
    rng = np.random.default_rng(0)
    for sub, count in (("", n), ("val", 1)):
        (root / sub / "images").mkdir(parents=True, exist_ok=True)
        (root / sub / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image = Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8))
            image.save(root / sub / "images" / f"im{i}.png")
            mask = Image.fromarray(rng.integers(0, 2, (24, 24), dtype=np.uint8), mode="L")
            mask.save(root / sub / "masks" / f"im{i}.png")
    return root


def _train_folder(root: Path, out: Path, *extra: str) -> int:
    return main(["train", "digits/default", "--out", str(out), "data.name=folder", f"data.root={root}",
                 "data.folder.classes=[bg,fg]", "data.crop_size=[16,16]", "data.batch_size=2", "method.name=supervised",
                 "model.width=8", "model.pretrained=null", "train.iterations=2", "train.threads=1",
                 "train.eval_interval=100", *extra])


def test_the_tiny_folder_dataset_trains(tmp_path) -> None:
    assert _train_folder(_folder(tmp_path / "data"), tmp_path / "run") == 0


def _corrupt(root: Path) -> str:
    (root / "images" / "im0.png").write_bytes(b"this is not a PNG file")
    return r"im0\.png: cannot read image"


def _truncated(root: Path) -> str:
    path = root / "images" / "im0.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    return r"im0\.png: cannot read image"


def _wrong_size(root: Path) -> str:
    Image.fromarray(np.zeros((20, 24), dtype=np.uint8), mode="L").save(root / "masks" / "im0.png")
    return r"masks/im0\.png: mask is 24x20 .* expected a mask of the image's size"


def _bad_values(root: Path) -> str:
    mask = np.zeros((24, 24), dtype=np.uint8)
    mask[0, 0], mask[1, 1] = 7, 255  # 7 is no class; 255 is the ignore value and fine
    Image.fromarray(mask, mode="L").save(root / "masks" / "im0.png")
    return r"masks/im0\.png: mask values 7 are neither class indices 0\.\.1 .* nor the ignore value 255"


@pytest.mark.parametrize("num_workers", [0, 1])
@pytest.mark.parametrize("damage", [_corrupt, _truncated, _wrong_size, _bad_values])
def test_bad_samples_are_errors_naming_the_file(tmp_path, capsys, damage, num_workers) -> None:
    root = _folder(tmp_path / "data")
    expected = damage(root)
    assert _train_folder(root, tmp_path / "run", f"data.num_workers={num_workers}") == 2
    err = capsys.readouterr().err
    message = err.split("sclseg train: error: ")[1]
    assert __import__("re").search(expected, message.splitlines()[0]), message
    assert "Traceback" not in message.splitlines()[0]  # the original message, not a worker dump


def test_empty_split_and_missing_root_are_errors_naming_the_folder(tmp_path, capsys) -> None:
    root = _folder(tmp_path / "data")
    for path in (root / "images").iterdir():
        path.unlink()
    for path in (root / "masks").iterdir():
        path.unlink()
    assert _train_folder(root, tmp_path / "run") == 2
    assert f"{root / 'images'}: no images" in capsys.readouterr().err
    assert _train_folder(tmp_path / "nowhere", tmp_path / "run") == 2
    assert f"data.root {tmp_path / 'nowhere'} not found" in capsys.readouterr().err


def test_an_empty_stream_or_one_smaller_than_the_process_count_is_an_error() -> None:
    class Empty(Dataset):
        def __len__(self):
            return 0

    with pytest.raises(ValueError, match="the unlabeled split is empty"):
        make_stream(Empty(), 2, seed=0, name="unlabeled")

    class One(Empty):
        def __len__(self):
            return 1

    with pytest.raises(ValueError, match="labeled split has 1 image.*fewer than the 2 training processes"):
        make_stream(One(), 1, seed=0, rank=1, world_size=2, name="labeled")


class SampleError(Exception):
    """A dataset's own exception type, raised in a worker."""


class _Failing(Dataset):
    def __init__(self, how: str) -> None:
        self.how = how

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict:
        if self.how == "raise":
            raise SampleError(f"sample {index}: /data/broken_{index}.png is not an image")
        os._exit(3)  # a worker that dies without an exception (killed, native crash, ...)


def test_a_worker_exception_surfaces_with_its_type_and_message() -> None:
    stream = make_stream(_Failing("raise"), 2, seed=0, num_workers=1, name="labeled")
    with pytest.raises(SampleError) as info:
        next(stream)
    assert __import__("re").fullmatch(r"sample \d: /data/broken_\d\.png is not an image", str(info.value))
    assert any("data worker" in note for note in getattr(info.value, "__notes__", []))
    stream.close()


def test_a_worker_that_dies_says_so_and_how_to_see_the_error() -> None:
    stream = make_stream(_Failing("die"), 2, seed=0, num_workers=1, name="labeled")
    with pytest.raises(RuntimeError, match=r"data worker of the labeled stream died.*data\.num_workers=0"):
        next(stream)
    stream.close()


# ------------------------------------------------------------------ config
# ------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "digits/default", "--out", str(out), *TINY, "train.iterations=1"]) == 0
    return out


def test_resuming_a_checkpoint_of_another_architecture_names_file_and_setting(run, tmp_path, capsys) -> None:
    ckpt = run / "step_1.pt"
    code = main(["train", "digits/default", "--out", str(tmp_path / "r"), *TINY, "train.iterations=2", "model.width=16",
                 "--resume", str(ckpt)])
    assert code == 2
    err = capsys.readouterr().err
    assert str(ckpt) in err and "model.width=8" in err and "model.width=16" in err


def test_resuming_a_checkpoint_of_another_class_count_names_file_and_counts(run, tmp_path) -> None:
    cfg = load_config(resolve_config_path("digits/default"), [*TINY, "train.iterations=2"])
    data = build_data(cfg)
    data.classes = data.classes[:5]
    with pytest.raises(ValueError, match=rf"{run / 'step_1.pt'}: checkpoint was trained for 11 classes .* has 5"):
        Trainer(cfg, tmp_path / "r", data=data, resume=run / "step_1.pt", show_progress=False)


def test_weights_that_do_not_fit_their_config_name_the_file(run, tmp_path, capsys) -> None:
    ckpt = load_checkpoint(run / "step_1.pt")
    ckpt["config"]["model"]["width"] = 16
    bad = tmp_path / "mismatch.pt"
    save_atomic(ckpt, bad)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    assert main(["predict", str(tmp_path / "x.png"), "--checkpoint", str(bad), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "mismatch.pt" in err and "do not fit model 'compact'" in err
    not_sclseg = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, not_sclseg)
    with pytest.raises(ValueError, match=r"other\.pt: not an sclseg checkpoint"):
        load_checkpoint(not_sclseg)


# ------------------------------------------------------------------ non-finite loss
def test_a_nan_loss_stops_the_run_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    code = main(["train", "digits/default", "--out", str(out), *TINY, "method.name=supervised", "optim.lr=1.0e+30",
                 "train.iterations=20", "train.checkpoint_interval=1", "train.log_interval=5", "train.keep_last=3"])
    assert code == 3
    err = capsys.readouterr().err
    message = err.split("sclseg train: ")[-1]
    step = int(message.split("became NaN/Inf at step ")[1].split()[0])
    assert 2 <= step < 20
    kept = sorted(int(p.stem.split("_")[1]) for p in out.glob("step_*.pt"))
    assert kept and max(kept) < step  # nothing written at or after the bad step
    last = out / f"step_{max(kept)}.pt"
    assert f"last good checkpoint is {last}" in message
    ckpt = load_checkpoint(last)
    assert all(torch.isfinite(t).all() for t in ckpt["student"].values() if t.is_floating_point())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["kind"] == "nonfinite" and records[-1]["iteration"] == step
    assert not (out / "final.json").exists()
