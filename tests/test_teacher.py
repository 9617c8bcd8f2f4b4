"""MeanTeacher: a frozen deep copy, and an EMA checked by hand in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sclseg.teacher import MeanTeacher


class Net(nn.Module):
    """Conv + BatchNorm (float running stats, integer num_batches_tracked) + extra buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Conv2d(4, 2, 1)
        self.register_buffer("scale", torch.tensor([1.5, -0.5]))  # floating buffer
        self.register_buffer("counter", torch.tensor([3], dtype=torch.long))  # integer buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x)))) * self.scale[None, :, None, None]


class HasModuleAttribute(nn.Module):
    """A user model that stores a submodule as ``self.module``: not a wrapper."""

    def __init__(self) -> None:
        super().__init__()
        self.module = nn.Linear(2, 2)
        self.other = nn.Linear(2, 2)


def make_student(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def state64(model: nn.Module) -> dict:
    """Every parameter and buffer by name, copied to float64 (integers kept as they are)."""
    out = {}
    for name, x in list(model.named_parameters()) + list(model.named_buffers()):
        out[name] = x.detach().clone().double() if x.is_floating_point() else x.detach().clone()
    return out


def perturb(student: Net, seed: int) -> None:
    """Change every parameter and all BatchNorm statistics, as a training step would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=g))
        student.scale.mul_(1.1).add_(0.3)
        student.counter.add_(2)
    student.train()
    student(torch.randn(4, 3, 5, 5, generator=g))  # updates running_mean/var, num_batches_tracked


def assert_ema(teacher: nn.Module, before: dict, student_state: dict, decay: float) -> None:
    after = state64(teacher)
    assert after.keys() == before.keys() == student_state.keys()
    n_float = n_int = 0
    for name in after:
        t0, s, t1 = before[name], student_state[name], after[name]
        if t0.is_floating_point():
            expected = decay * t0 + (1.0 - decay) * s  # by hand, float64
            assert torch.allclose(t1, expected, rtol=1e-6, atol=1e-6), name
            n_float += 1
        else:
            assert torch.equal(t1, s), name
            n_int += 1
    assert n_float >= 8 and n_int == 2  # conv/bn/head weights+biases, bn stats, scale; two int buffers


# ----------------------------------------------------------------------------- construction


def test_teacher_is_frozen_deep_copy_in_eval_mode():
    student = make_student()
    student.train()
    mt = MeanTeacher(student, decay=0.99)
    teacher = mt.teacher
    assert teacher is not student and isinstance(teacher, Net)
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert student.training  # the student is left as it was
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())
    t_state, s_state = state64(teacher), state64(student)
    assert t_state.keys() == s_state.keys()
    for name in t_state:
        assert torch.equal(t_state[name], s_state[name]), name
    # no shared storage: the pointers differ, and writing into the student leaves the teacher alone
    t_ptrs = {x.untyped_storage().data_ptr() for x in list(teacher.parameters()) + list(teacher.buffers())}
    s_ptrs = {x.untyped_storage().data_ptr() for x in list(student.parameters()) + list(student.buffers())}
    assert not t_ptrs & s_ptrs
    with torch.no_grad():
        student.conv.weight.add_(1.0)
        student.bn.running_mean.add_(1.0)
    assert torch.equal(teacher.conv.weight.double(), t_state["conv.weight"])
    assert torch.equal(teacher.bn.running_mean.double(), t_state["bn.running_mean"])


def test_teacher_call_runs_the_teacher_without_grad_tracking():
    student = make_student()
    mt = MeanTeacher(student)
    x = torch.randn(2, 3, 5, 5)
    out = mt(x)
    assert torch.equal(out, mt.teacher(x))
    assert not out.requires_grad
    # in eval mode the BatchNorm statistics are not touched by a teacher forward pass
    before = state64(mt.teacher)
    mt(torch.randn(2, 3, 5, 5) * 10)
    for name, value in state64(mt.teacher).items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize("decay", [-0.1, 1.5])
def test_bad_decay(decay):
    with pytest.raises(ValueError, match="decay"):
        MeanTeacher(make_student(), decay=decay)


# ----------------------------------------------------------------------------- update


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9, 0.999, 1.0])
def test_update_is_ema_of_every_floating_tensor(decay):
    student = make_student(1)
    mt = MeanTeacher(student, decay=decay)
    perturb(student, seed=2)
    before, s_state = state64(mt.teacher), state64(student)
    assert not torch.equal(before["bn.running_mean"], s_state["bn.running_mean"])
    assert not torch.equal(before["bn.num_batches_tracked"], s_state["bn.num_batches_tracked"])
    mt.update(student)
    assert_ema(mt.teacher, before, s_state, decay)
    # a second step from the new teacher state
    perturb(student, seed=3)
    before, s_state = state64(mt.teacher), state64(student)
    mt.update(student)
    assert_ema(mt.teacher, before, s_state, decay)
    # the teacher stays frozen and in eval mode
    assert all(not p.requires_grad for p in mt.teacher.parameters())
    assert not mt.teacher.training
    # the student is not modified by the update
    for name, value in state64(student).items():
        assert torch.equal(value, s_state[name]), name


def test_update_with_ddp_student(tmp_path):
    import torch.distributed as td

    td.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        inner = make_student(4)
        wrapped = nn.parallel.DistributedDataParallel(inner)
        mt = MeanTeacher(wrapped, decay=0.8)
        assert isinstance(mt.teacher, Net)  # the wrapper is not copied
        assert state64(mt.teacher).keys() == state64(inner).keys()
        perturb(inner, seed=5)
        before, s_state = state64(mt.teacher), state64(inner)
        mt.update(wrapped)
        assert_ema(mt.teacher, before, s_state, 0.8)
        # the unwrapped student works with the same teacher
        perturb(inner, seed=6)
        before, s_state = state64(mt.teacher), state64(inner)
        mt.update(inner)
        assert_ema(mt.teacher, before, s_state, 0.8)
    finally:
        td.destroy_process_group()


def test_model_with_module_attribute_is_not_unwrapped():
    model = HasModuleAttribute()
    mt = MeanTeacher(model, decay=0.5)
    assert isinstance(mt.teacher, HasModuleAttribute)
    assert set(dict(mt.teacher.named_parameters())) == set(dict(model.named_parameters()))


@pytest.mark.skipif(torch.cuda.is_available(), reason="DataParallel wants the model on a GPU there")
def test_update_with_data_parallel_student():
    inner = make_student(7)
    wrapped = nn.DataParallel(inner)
    mt = MeanTeacher(wrapped, decay=0.6)
    assert isinstance(mt.teacher, Net)
    perturb(inner, seed=8)
    before, s_state = state64(mt.teacher), state64(inner)
    mt.update(wrapped)
    assert_ema(mt.teacher, before, s_state, 0.6)


def test_repeated_updates_converge_to_student():
    student = make_student(9)
    mt = MeanTeacher(student, decay=0.9)
    perturb(student, seed=10)
    start, target = state64(mt.teacher), state64(student)
    steps = 200
    for _ in range(steps):
        mt.update(student)
    final = state64(mt.teacher)
    for name, value in final.items():
        if value.is_floating_point():
            # distance shrinks by decay ** steps (0.9 ** 200 ~ 7e-10)
            gap0 = (start[name] - target[name]).abs().max().item()
            assert (value - target[name]).abs().max().item() <= 0.9**steps * gap0 + 1e-5, name
        else:
            assert torch.equal(value, target[name]), name
    x = torch.randn(2, 3, 5, 5)
    student.eval()
    assert torch.allclose(mt(x), student(x).detach(), atol=1e-4)


def test_update_rejects_a_different_model():
    mt = MeanTeacher(make_student())
    with pytest.raises(ValueError, match="different"):
        mt.update(nn.Linear(3, 3))


def test_update_follows_a_different_student_object():
    first, second = make_student(11), make_student(12)
    mt = MeanTeacher(first, decay=0.5)
    mt.update(first)  # builds the cached tensor lists for ``first``
    before, s_state = state64(mt.teacher), state64(second)
    mt.update(second)  # a new object: the lists must be rebuilt, not reused
    assert_ema(mt.teacher, before, s_state, 0.5)


def test_warmup_rate_is_min_of_one_minus_one_over_t_plus_one_and_decay() -> None:
    """FixMatch / UniMatch V2's rule, by hand on a one-parameter network: the first update copies the
    student (rate 0), then 1/2, 2/3, ... up to the decay."""
    student = torch.nn.Linear(1, 1, bias=False)
    mean_teacher = MeanTeacher(student, decay=0.6, warmup=True)
    expected = float(student.weight.detach())
    for t, value in enumerate([3.0, -1.0, 5.0, 2.0]):
        with torch.no_grad():
            student.weight.fill_(value)
        rate = min(1 - 1 / (t + 1), 0.6)
        assert mean_teacher.rate() == pytest.approx(rate)
        mean_teacher.update(student)
        expected = rate * expected + (1 - rate) * value
        assert float(mean_teacher.teacher.weight.detach()) == pytest.approx(expected, rel=1e-6)
    assert mean_teacher.updates == 4
