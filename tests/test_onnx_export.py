"""``sclseg export CKPT model.onnx``: onnxruntime's logits against PyTorch's at two input sizes from
one file (dynamic batch, height and width), and ``sclseg predict`` running the ONNX file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from PIL import Image

from sclseg.cli import main
from sclseg.config import config_to_dict, load_config, resolve_config_path
from sclseg.data.digits import DIGIT_CLASSES
from sclseg.engine.checkpoint import WEIGHTS_FORMAT
from sclseg.models import create_model

from tiny_config import TINY


def weights_file(folder: Path, model_name: str) -> tuple[Path, torch.nn.Module]:
    """A weights file of ``model_name`` for the digit classes, every tensor random, and its network."""
    overrides = [o for o in TINY if not o.startswith("model.")] + [f"model.name={model_name}", "model.width=8"]
    cfg = load_config(resolve_config_path("digits/default"), overrides)
    model = create_model(cfg.model, len(DIGIT_CLASSES), load_pretrained=False).eval()
    g = torch.Generator().manual_seed(0)
    state = {k: 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
             for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.abs() + 0.5 if k.endswith("running_var") else v for k, v in state.items()})
    path = folder / f"{model_name}.pt"
    torch.save({"format": WEIGHTS_FORMAT, "model": model.state_dict(), "weights": "teacher",
                "config": config_to_dict(cfg), "num_classes": len(DIGIT_CLASSES),
                "class_names": [c.name for c in DIGIT_CLASSES], "class_colors": [list(c.color) for c in DIGIT_CLASSES],
                "iteration": 7, "source": "test"}, path)
    return path, model


def assert_same_logits(onnx_path: Path, model: torch.nn.Module, shapes) -> None:
    """Within 1e-4 of the largest logit, and the same argmax on at least 99.9% of pixels."""
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for shape in shapes:
        images = torch.rand(shape, generator=torch.Generator().manual_seed(shape[-1]))
        with torch.no_grad():
            expected = model(images).numpy()
        logits = session.run(["logits"], {"images": images.numpy()})[0]
        assert logits.shape == expected.shape
        assert np.abs(logits - expected).max() <= 1e-4 * np.abs(expected).max()
        assert (logits.argmax(1) == expected.argmax(1)).mean() >= 0.999


@pytest.fixture(scope="module")
def compact(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("onnx")
    path, model = weights_file(folder, "compact")
    out = folder / "model.onnx"
    assert main(["export", str(path), str(out), "--opset", "18"]) == 0
    return {"pt": path, "onnx": out, "model": model}


@pytest.mark.slow
def test_the_onnx_file_matches_pytorch_at_two_sizes_and_batches(compact) -> None:
    assert_same_logits(compact["onnx"], compact["model"], [(1, 3, 64, 96), (2, 3, 40, 72)])
    info = json.loads(Path(f"{compact['onnx']}.json").read_text())
    assert (info["format"], info["opset"], info["model"], info["iteration"]) == ("onnx", 18, "compact", 7)


def test_the_export_writes_one_self_contained_file_and_its_summary(compact) -> None:
    folder = compact["onnx"].parent
    assert sorted(p.name for p in folder.iterdir()) == ["compact.pt", "model.onnx", "model.onnx.json"]
    import onnx

    proto = onnx.load(str(compact["onnx"]), load_external_data=False)
    assert all(init.data_location != onnx.TensorProto.EXTERNAL for init in proto.graph.initializer)


def test_predict_runs_the_onnx_file_as_it_runs_the_checkpoint(compact, tmp_path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "scene.png")
    for name in ("pt", "onnx"):
        assert main(["predict", str(tmp_path / "scene.png"), "--checkpoint", str(compact[name]),
                     "--out", str(tmp_path / name), "--device", "cpu"]) == 0
    labels = [np.array(Image.open(tmp_path / name / "scene_labels.png")) for name in ("pt", "onnx")]
    assert labels[0].shape == (40, 56) and (labels[0] == labels[1]).mean() >= 0.999
    written = json.loads((tmp_path / "onnx" / "predictions.json").read_text())
    assert written["class_names"] == [c.name for c in DIGIT_CLASSES]


@pytest.mark.slow
@pytest.mark.parametrize("model_name, shapes", [
    ("dpt_dinov3_small", [(1, 3, 64, 96), (2, 3, 48, 32)]),
    # DINOv2's position embedding is resized to the input's grid (traced at 16x16 patches): other grids,
    # and the 37x37 grid of 518x518 that Meta keeps as it is
    ("dpt_dinov2_small", [(1, 3, 56, 84), (2, 3, 42, 28), (1, 3, 518, 518)]),
])
def test_dpt_exports_with_dynamic_sizes(tmp_path, model_name, shapes) -> None:
    path, model = weights_file(tmp_path, model_name)
    out = tmp_path / "dpt.onnx"
    assert main(["export", str(path), str(out)]) == 0
    assert_same_logits(out, model, shapes)


def test_an_onnx_file_not_written_by_sclseg_exits_2_naming_it(tmp_path, capsys) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["logits"])], "g",
                              [helper.make_tensor_value_info("images", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)])
    onnx.save(helper.make_model(graph), str(tmp_path / "other.onnx"))
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "scene.png")
    code = main(["predict", str(tmp_path / "scene.png"), "--checkpoint", str(tmp_path / "other.onnx"),
                 "--out", str(tmp_path / "o")])
    assert code == 2 and "other.onnx has no sclseg metadata" in capsys.readouterr().err
