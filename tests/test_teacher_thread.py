"""The EMA teacher's forward pass on a thread of its own (``train.teacher_thread``).

The thread must change when the teacher runs, not what it computes: every test compares with
the one-thread step bit for bit (``torch.equal``).
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Optional

import pytest
import torch

from sclseg.config import ConfigError, load_config, resolve_config_path
from sclseg.cutmix import BoxMaskGenerator
from sclseg.data import build_data
from sclseg.engine.step import AMP_DTYPES, TeacherThread, train_step, wants_teacher_thread
from sclseg.engine.trainer import Trainer
from sclseg.models import create_model
from sclseg.teacher import MeanTeacher
from tiny_config import TINY


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["cl", "scl"])
@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_the_teacher_thread_trains_bit_for_bit_as_one_thread(method: str, amp: str) -> None:
    cfg = load_config(resolve_config_path("digits/default"), [*TINY, f"method.name={method}"])
    data = build_data(cfg)
    torch.manual_seed(0)
    model = create_model(cfg.model, data.num_classes)
    batch = {"image": torch.stack([data.labeled[i]["image"] for i in range(4)]),
             "mask": torch.stack([data.labeled[i]["mask"] for i in range(4)])}
    ubatch = {"image": torch.stack([data.unlabeled[i]["image"] for i in range(4)])}
    main_threads = torch.get_num_threads()

    def train(teacher_thread: Optional[TeacherThread]) -> tuple[dict, dict, list, list]:
        student = copy.deepcopy(model)
        mean_teacher = MeanTeacher(student, 0.9)
        seen = []  # (thread name, torch threads, output dtype) of every teacher pass
        mean_teacher.teacher.register_forward_hook(lambda _m, _i, out: seen.append(
            (threading.current_thread().name, torch.get_num_threads(), out.dtype)))
        optimizer = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        masks, generator = BoxMaskGenerator(cfg.method.n_boxes), torch.Generator().manual_seed(5)
        torch.manual_seed(0)  # the decoder's dropout draws from the global generator
        terms = [train_step(student, mean_teacher, optimizer, scheduler, [batch], [ubatch], method=cfg.method,
                            mask_generator=masks, generator=generator, amp_dtype=AMP_DTYPES[amp],
                            teacher_thread=teacher_thread) for _ in range(3)]
        return student.state_dict(), mean_teacher.teacher.state_dict(), terms, seen

    serial = train(None)
    pool = TeacherThread()
    try:
        threaded = train(pool)
    finally:
        pool.close()
    assert _states_equal(serial[0], threaded[0]) and _states_equal(serial[1], threaded[1])
    assert all(_states_equal(a, b) for a, b in zip(serial[2], threaded[2]))
    expected_dtype = torch.float32 if amp == "off" else torch.bfloat16
    assert serial[3] == [(threading.current_thread().name, main_threads, expected_dtype)] * 3
    assert [(name.startswith("sclseg-teacher"), n, dtype) for name, n, dtype in threaded[3]] == \
        [(True, main_threads, expected_dtype)] * 3


def test_a_closed_teacher_thread_starts_again_on_the_next_submit() -> None:
    pool = TeacherThread()
    first = pool.submit(lambda: torch.tensor(threading.current_thread().ident), device_type="cpu").result()
    pool.close()
    second = pool.submit(lambda: torch.tensor(threading.current_thread().ident), device_type="cpu").result()
    pool.close()
    assert int(first) != threading.get_ident() and int(second) != threading.get_ident()


@pytest.mark.parametrize(("setting", "name", "teacher", "device", "threads", "cores", "processes", "wanted"), [
    ("auto", "scl", "ema", "cpu", 1, 2, 1, True),      # the digits default on two cores
    ("auto", "scl", "ema", "cpu", 1, 1, 1, False),     # no core to spare
    ("auto", "scl", "ema", "cpu", 2, 2, 1, False),     # the student's pass uses both cores
    ("auto", "cl", "ema", "cpu", 4, 16, 2, True),      # two processes of 4 threads, twice, on 16 cores
    ("auto", "cl", "ema", "cpu", 1, 2, 2, False),      # two processes on two cores (DDP on a CPU)
    ("auto", "scl", "ema", "cuda", 1, 16, 1, False),   # a GPU runs both passes on one stream
    ("on", "scl", "ema", "cuda", 1, 1, 1, True),
    ("off", "scl", "ema", "cpu", 1, 16, 1, False),
    ("on", "supervised", "ema", "cpu", 1, 16, 1, False),  # no teacher
    ("on", "scl", "student", "cpu", 1, 16, 1, False),     # the teacher is the student itself
])
def test_when_the_teacher_gets_a_thread(setting, name, teacher, device, threads, cores, processes, wanted) -> None:
    cfg = load_config(None, [f"method.name={name}", f"method.teacher={teacher}"])
    assert wants_teacher_thread(setting, cfg.method, device, threads=threads, cores=cores,
                                processes=processes) is wanted


def test_the_trainer_with_and_without_the_teacher_thread_writes_the_same_checkpoint(tmp_path: Path) -> None:
    def run(setting: str) -> tuple[dict, Trainer]:
        cfg = load_config(resolve_config_path("digits/default"),
                          [*TINY, "train.iterations=3", "train.eval_interval=3", "train.checkpoint_interval=3",
                           "train.device=cpu", f"train.teacher_thread={setting}"])
        assert cfg.train.teacher_thread == setting  # YAML reads a bare on/off as a boolean
        trainer = Trainer(cfg, tmp_path / setting, show_progress=False)
        trainer.run(evaluate=False)
        return torch.load(tmp_path / setting / "step_3.pt", weights_only=True), trainer

    (with_thread, trainer_on), (without, trainer_off) = run("on"), run("off")
    assert trainer_on.teacher_thread is not None and trainer_off.teacher_thread is None
    for key in ("student", "teacher", "optimizer"):
        flat_a, flat_b = _tensors(with_thread[key]), _tensors(without[key])
        assert len(flat_a) == len(flat_b) > 0 and all(torch.equal(x, y) for x, y in zip(flat_a, flat_b)), key
    with pytest.raises(ConfigError, match="train.teacher_thread"):
        load_config(None, ["train.teacher_thread=always"])


def _tensors(obj) -> list[torch.Tensor]:
    """Every tensor inside nested dicts and lists, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []
