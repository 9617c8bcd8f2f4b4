"""The engine on a CUDA device, against the CPU or against itself (skipped without a GPU).

CUDA kernels may add in another order from one call to the next (atomics in the backward passes
of convolutions, interpolation and scatters), so floats are compared with tolerances here, TF32
off where a test compares float32 results; what is not float (iterations, stream positions,
every random generator's state) must be equal. The CPU tests elsewhere compare bit for bit.
``benchmarks/gpu_check.sh`` runs this module (``-k cuda``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import sclseg.engine.trainer as trainer_module
from sclseg.config import ModelConfig
from sclseg.cutmix import BoxMaskGenerator
from sclseg.data.stream import batch_to_device
from sclseg.data.transforms import PhotometricAugment
from sclseg.engine.checkpoint import load_checkpoint
from sclseg.engine.guards import NonFiniteWatch
from sclseg.engine.inference import predict_probs
from sclseg.engine.trainer import Trainer
from sclseg.losses import relaxed_boundary_loss, structured_consistency_loss
from sclseg.models import create_model
from sclseg.models.activation_checkpointing import apply_activation_checkpointing
from test_checkpointing import batchnorm_state, fwd_bwd, small_model

# the scl run of the resume tests, its data (a fixture) and its model behind channel dropout (a fixture)
from test_resume import SCL, _cfg, data, dropout_model  # noqa: F401

from toy_models import Pointwise

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def no_tf32():
    """float32 convolutions and matrix products in float32, not TF32 (10-bit mantissas)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def flatten_state(state, path: str = "checkpoint") -> dict[str, object]:
    """Every leaf of a checkpoint (tensors and plain values) by its path."""
    if isinstance(state, dict):
        return {k: v for key in state for k, v in flatten_state(state[key], f"{path}.{key}").items()}
    if isinstance(state, (list, tuple)):
        return {k: v for i, item in enumerate(state) for k, v in flatten_state(item, f"{path}[{i}]").items()}
    return {path: state}


def float_distance(a: dict[str, object], b: dict[str, object]) -> float:
    """L2 distance over every floating tensor of two flattened checkpoints."""
    return sum(float((a[k].double() - b[k].double()).square().sum()) for k in a
               if torch.is_tensor(a[k]) and a[k].is_floating_point()) ** 0.5


def assert_resumed_like_the_run(before: dict, reference: dict, resumed: dict) -> None:
    """``resumed`` is in the state of ``reference``, one step after ``before``: equal in everything
    that is not a floating tensor (iteration, schedule, stream positions, scaler, every generator's
    state), and in the floating tensors (weights, momenta, BatchNorm statistics, the teacher) within
    1% of the step's own change (the L2 distance over all of them from ``before`` to ``reference``).

    Replayed from the same state, the step differs only by the rounding of the GPU's atomics; a
    resume that loses a random state (CutMix boxes, dropout masks) takes a different step: 77-141%
    of the step's change on the CPU, where a correct resume is exact.
    """
    ref, res = flatten_state(reference), flatten_state(resumed)
    assert ref.keys() == res.keys()
    for key, value in ref.items():
        other = res[key]
        if torch.is_tensor(value):
            assert torch.is_tensor(other) and value.dtype == other.dtype and value.shape == other.shape, key
            assert value.is_floating_point() or torch.equal(value, other), f"{key} differs"
            assert not value.is_floating_point() or torch.isfinite(other).all(), f"{key} is not finite"
        else:
            assert value == other, f"{key}: {value!r} != {other!r}"
    change, error = float_distance(flatten_state(before), ref), float_distance(ref, res)
    assert change > 0 and error <= 0.01 * change, (
        f"resumed step {error:.3g} from the run's, whose change was {change:.3g}")


def _checkpoint(out: Path, step: int) -> dict:
    ckpt = load_checkpoint(out / f"step_{step}.pt")
    del ckpt["config"], ckpt["best"]  # evaluation scores: a flipped pixel may move them
    return ckpt


def _every_step(*overrides: str):
    """The resume tests' scl run on the GPU, with a checkpoint after every step."""
    return _cfg(*SCL, "train.device=cuda", "train.checkpoint_interval=1", "train.keep_last=10", *overrides)


@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_cuda_training_resumes_from_a_checkpoint_like_the_uninterrupted_run(data, dropout_model, tmp_path, amp):
    """scl on the GPU with each precision (fp16: GradScaler): checkpoints load on the CPU, and a
    run resumed from the uninterrupted run's checkpoint of step 2 reaches step 3 in that run's
    state. The model's dropout draws from the CUDA generator, which the checkpoint must carry.

    The resumed run starts from the run's own checkpoint, so that the two step-3 states differ by
    one step's rounding only: two runs from scratch diverge chaotically on a GPU (in bf16 on an
    H200, a repeat of the run ended 0.042 from it at step 3, a run stopped at step 2 and resumed
    2.71, while on the CPU both are exact). Stopping and resuming from scratch is compared bit for
    bit on the CPU (tests/test_resume.py).
    """
    cfg = _every_step(f"train.amp={amp}")
    straight = tmp_path / "straight"
    final = Trainer(cfg, straight, data=data, show_progress=False).run()
    assert final["iteration"] == 6 and final["last_eval"] is not None
    ckpt = _checkpoint(straight, 6)
    tensors = [v for v in ckpt["student"].values()]
    assert all(t.device.type == "cpu" for t in tensors)
    assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())
    if amp == "fp16":
        assert ckpt["scaler"] and ckpt["scaler"]["scale"] > 0
    cpu_model = trainer_module.create_model(cfg.model, data.num_classes, load_pretrained=False)
    cpu_model.load_state_dict(ckpt["student"])  # a GPU run's weights predict on a CPU machine

    resumed = tmp_path / "resumed"
    Trainer(cfg, resumed, data=data, show_progress=False, resume=straight / "step_2.pt").run(until=3)
    assert_resumed_like_the_run(*(_checkpoint(out, step) for out, step in ((straight, 2), (straight, 3), (resumed, 3))))


@pytest.mark.parametrize("scramble", ["cutmix_generator", "global_rng"])
def test_cuda_the_state_comparison_detects_a_lost_random_state(data, dropout_model, tmp_path, scramble):
    """Negative controls of the test above: a resume that loses a random state is caught."""
    cfg = _every_step()
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    Trainer(cfg, straight, data=data, show_progress=False).run(until=3)
    trainer = Trainer(cfg, resumed, data=data, show_progress=False, resume=straight / "step_2.pt")
    if scramble == "cutmix_generator":
        trainer.method.generator.manual_seed(12345)
    else:
        torch.cuda.manual_seed(12345)
    trainer.run(until=3)
    before, reference, other = (_checkpoint(out, step) for out, step in ((straight, 2), (straight, 3), (resumed, 3)))
    with pytest.raises(AssertionError):
        assert_resumed_like_the_run(before, reference, other)
    # the floats alone catch it too (a generator's state is also compared for equality)
    before, reference, other = (flatten_state(c) for c in (before, reference, other))
    assert float_distance(reference, other) > 0.01 * float_distance(before, reference)


def test_cuda_batches_are_augmented_on_the_device_as_on_the_cpu():
    augment = PhotometricAugment(color_jitter=0.4, blur_prob=0.5, blur_kernel=5)
    generator = torch.Generator().manual_seed(0)
    params = torch.stack([augment.draw(generator) for _ in range(8)])
    params[:2, 0], params[2:4, 5] = 1.0, 1.5  # jitter and blur both present
    batch = {"image": torch.rand(8, 3, 40, 56, generator=generator),
             "mask": torch.randint(0, 5, (8, 40, 56), generator=generator), "photometric": params}
    on_gpu = batch_to_device(batch, torch.device("cuda"), photometric=augment, channels_last=True)
    assert on_gpu["image"].is_cuda and "photometric" not in on_gpu
    assert on_gpu["image"].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(on_gpu["image"].cpu(), augment(batch["image"], params), rtol=0, atol=2e-5)
    assert torch.equal(on_gpu["mask"].cpu(), batch["mask"])


def assert_same_loss_and_gradient(cpu: tuple[Tensor, Tensor], gpu: tuple[Tensor, Tensor]) -> None:
    """(loss, input gradient) pairs equal to float32 rounding (the losses compute in float32)."""
    torch.testing.assert_close(gpu[0].double(), cpu[0].double(), rtol=1e-5, atol=0)
    worst = (gpu[1] - cpu[1]).abs().max() / cpu[1].abs().max()
    assert cpu[1].abs().max() > 0 and worst < 1e-5


@pytest.mark.parametrize("window", [1, 3, 5])
def test_cuda_relaxed_boundary_loss_values_and_gradients_equal_the_cpu(window):
    generator = torch.Generator().manual_seed(window)
    logits = torch.randn(2, 19, 48, 64, generator=generator, dtype=torch.float64)
    blocks = torch.randint(0, 19, (2, 6, 8), generator=generator)
    target = blocks.repeat_interleave(8, dim=1).repeat_interleave(8, dim=2)
    target[:, :5, :7] = 255
    results = []
    for device in ("cpu", "cuda"):
        x = logits.detach().to(device, copy=True).requires_grad_()
        loss = relaxed_boundary_loss(x, target.to(device), window=window)
        loss.backward()
        results.append((loss.detach().cpu(), x.grad.cpu()))
    assert_same_loss_and_gradient(*results)


def test_cuda_structured_consistency_gradients_equal_the_cpu():
    """The exact Eq. 8 form (no sampling, so CPU and GPU generators do not matter)."""
    generator = torch.Generator().manual_seed(7)
    student = torch.randn(2, 5, 24, 32, generator=generator, dtype=torch.float64).softmax(1)
    teacher = torch.randn(2, 5, 24, 32, generator=generator, dtype=torch.float64).softmax(1)
    owner = BoxMaskGenerator(n_boxes=8)(2, 24, 32, generator)
    results = []
    for device in ("cpu", "cuda"):
        s = student.detach().to(device, copy=True).requires_grad_()
        loss = structured_consistency_loss(s, teacher.to(device), owner.to(device), n_boxes=8, last_boxes=4,
                                           max_pairs=None)
        loss.backward()
        results.append((loss.detach().cpu(), s.grad.cpu()))
    assert_same_loss_and_gradient(*results)


@pytest.mark.parametrize("mode", ["encoder", "all"])
def test_cuda_activation_checkpointing_replays_dropout_and_equals_plain(mode):
    """float64 on the GPU: dropout masks come from the CUDA generator, which must be replayed."""
    plain = small_model().cuda()
    ckpt = apply_activation_checkpointing(copy.deepcopy(plain), mode)
    images = torch.rand(3, 3, 24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).cuda()
    for step in range(2):
        torch.testing.assert_close(fwd_bwd(ckpt, images, seed=10 + step), fwd_bwd(plain, images, seed=10 + step),
                                   rtol=1e-12, atol=1e-12)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=f"gradient of {name}")
    for key, value in batchnorm_state(plain).items():
        torch.testing.assert_close(batchnorm_state(ckpt)[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_cuda_wrn38_with_checkpointing_equals_plain(amp, no_tf32):
    """The paper's network on the GPU (its dropout in mod6-7), with and without bf16 autocast."""
    torch.manual_seed(0)
    plain = create_model(ModelConfig(name="deeplabv3plus_wrn38"), 19, load_pretrained=False).cuda().train()
    ckpt = apply_activation_checkpointing(copy.deepcopy(plain), "all")
    images = torch.rand(2, 3, 48, 48, device="cuda")
    outs = []
    for model in (plain, ckpt):
        with torch.autocast("cuda", dtype=amp, enabled=amp is not None):
            outs.append(fwd_bwd(model, images, seed=3).float())
    tol = dict(rtol=1e-5, atol=1e-5) if amp is None else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(outs[1], outs[0], **tol)
    worst = max(((q.grad - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-12)).item()
                for p, q in zip(plain.parameters(), ckpt.parameters()))
    assert worst < (1e-4 if amp is None else 5e-2)


def test_cuda_tiled_multiscale_flip_inference_equals_the_cpu():
    model = Pointwise(classes=5)
    images = torch.rand(2, 3, 37, 53, generator=torch.Generator().manual_seed(0))
    kwargs = dict(scales=(0.5, 1.0, 1.5), flip=True, tile=(16, 24), overlap=1 / 3)
    with torch.no_grad():
        cpu = predict_probs(model, images, **kwargs)
        gpu = predict_probs(model.cuda(), images.cuda(), **kwargs)
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-6)


def test_cuda_non_finite_watch_keeps_the_first_bad_step_on_the_device():
    watch = NonFiniteWatch(torch.device("cuda"))
    for step, value in enumerate([1.0, 2.0, float("nan"), float("inf"), 3.0], start=1):
        watch.update(torch.tensor(value, device="cuda"), step)
    assert watch.first_bad_step() == 3
    clean = NonFiniteWatch(torch.device("cuda"))
    clean.update(F.relu(torch.ones((), device="cuda")), 1)
    assert clean.first_bad_step() is None
