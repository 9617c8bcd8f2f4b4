"""The side thread: the EMA teacher's forward pass (``train.teacher_thread``) and the next step's
batches (``train.prefetch``) beside the training thread's work.

The thread must change when the work runs, not what it computes: the training tests compare with
the one-thread step bit for bit (``torch.equal``), and the batches loaded ahead with those loaded
in place.
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

from sclseg.config import ConfigError, load_config, resolve_config_path
from sclseg.cutmix import BoxMaskGenerator
from sclseg.data import build_data
from sclseg.engine.side_thread import SideThread, wants_prefetch, wants_teacher_thread
from sclseg.engine.step import AMP_DTYPES, train_step
from sclseg.engine.step_batches import StepBatches
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

    def train(teacher_thread: Optional[SideThread]) -> tuple[dict, dict, list, list]:
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
    pool = SideThread()
    try:
        threaded = train(pool)
    finally:
        pool.close()
    assert _states_equal(serial[0], threaded[0]) and _states_equal(serial[1], threaded[1])
    assert all(_states_equal(a, b) for a, b in zip(serial[2], threaded[2]))
    expected_dtype = torch.float32 if amp == "off" else torch.bfloat16
    assert serial[3] == [(threading.current_thread().name, main_threads, expected_dtype)] * 3
    assert [(name.startswith("sclseg-side"), n, dtype) for name, n, dtype in threaded[3]] == \
        [(True, main_threads, expected_dtype)] * 3


def test_a_closed_side_thread_starts_again_on_the_next_submit() -> None:
    pool = SideThread()
    first = pool.submit(lambda: torch.tensor(threading.current_thread().ident), device_type="cpu").result()
    pool.close()
    second = pool.submit(lambda: torch.tensor(threading.current_thread().ident), device_type="cpu").result()
    pool.close()
    assert int(first) != threading.get_ident() and int(second) != threading.get_ident()


def test_the_side_thread_runs_under_the_callers_autocast_only_when_asked() -> None:
    pool = SideThread()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = pool.submit(torch.is_autocast_enabled, "cpu", device_type="cpu").result()
            without = pool.submit(torch.is_autocast_enabled, "cpu").result()
            product = pool.submit(torch.mm, torch.ones(2, 2), torch.ones(2, 2), device_type="cpu").result()
    finally:
        pool.close()
    assert inside is True and without is False and product.dtype == torch.bfloat16


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


@pytest.mark.parametrize(("setting", "checkpointing", "device", "threads", "cores", "processes", "wanted"), [
    ("auto", "off", "cpu", 1, 2, 1, True),        # the digits default on two cores
    ("auto", "off", "cpu", 2, 2, 1, False),       # no core to spare
    ("auto", "off", "cpu", 1, 2, 2, False),       # two processes on two cores
    ("auto", "off", "cuda", 1, 16, 1, False),     # GPUs get their batches from loader workers
    ("auto", "encoder", "cpu", 1, 16, 1, False),  # the replay resets the global random state
    ("on", "off", "cuda", 4, 1, 1, True),
    ("on", "all", "cpu", 1, 16, 1, False),
    ("off", "off", "cpu", 1, 16, 1, False),
])
def test_when_the_next_batches_load_ahead(setting, checkpointing, device, threads, cores, processes, wanted) -> None:
    assert wants_prefetch(setting, checkpointing, device, threads=threads, cores=cores, processes=processes) is wanted


def test_the_side_thread_settings_read_a_bare_on_and_refuse_what_they_cannot_do() -> None:
    assert load_config(None, ["train.prefetch=on"]).train.prefetch == "on"  # YAML reads on as a boolean
    assert load_config(None, ["train.teacher_thread=on"]).train.teacher_thread == "on"
    with pytest.raises(ConfigError, match="train.teacher_thread"):
        load_config(None, ["train.teacher_thread=always"])
    with pytest.raises(ConfigError, match="train.prefetch"):
        load_config(None, ["train.prefetch=on", "train.activation_checkpointing=encoder"])
    assert load_config(None, ["train.activation_checkpointing=encoder"]).train.prefetch == "auto"


class _CountingStream:
    """A stream of the integers from its start; remembers whether it was closed."""

    def __init__(self, role: str, start: int) -> None:
        self.role, self.next_value, self.closed = role, start, False

    def __next__(self) -> tuple[str, int]:
        self.next_value += 1
        return self.role, self.next_value - 1

    def close(self) -> None:
        self.closed = True


def _two_batches(stream: _CountingStream) -> list:
    return [next(stream), next(stream)]


def _step_batches(log: list, next_batches=_two_batches) -> StepBatches:
    """Two batches per step; a stream opened at step k starts at 2k (``log``: the streams opened)."""
    def open_stream(role: str, step: int) -> _CountingStream:
        log.append((role, step))
        return _CountingStream(role, 2 * step)
    return StepBatches(open_stream, next_batches)


def test_step_batches_loaded_ahead_are_those_loaded_in_place() -> None:
    opened_in_place, opened_ahead = [], []
    in_place, ahead, pool = _step_batches(opened_in_place), _step_batches(opened_ahead), SideThread()
    uses_unlabeled = [False, False, True, True]  # a warm-up of two steps
    try:
        expected = [in_place.take(k, unlabeled=u) for k, u in enumerate(uses_unlabeled)]
        got = [ahead.take(0, unlabeled=False)]
        for k in range(1, 4):
            ahead.load_ahead(pool, k, unlabeled=uses_unlabeled[k]).result()
            got.append(ahead.take(k, unlabeled=uses_unlabeled[k]))
    finally:
        pool.close()
    assert got == expected
    assert expected[1] == ([("labeled", 2), ("labeled", 3)], None)
    assert expected[2] == ([("labeled", 4), ("labeled", 5)], [("unlabeled", 4), ("unlabeled", 5)])
    assert opened_in_place == opened_ahead == [("labeled", 0), ("unlabeled", 2)]
    streams = list(ahead.streams.values())
    ahead.close()
    assert all(stream.closed for stream in streams) and not ahead.streams


def test_step_batches_refuse_a_step_out_of_order_and_close_waits_for_the_load() -> None:
    batches, pool, release = _step_batches([]), SideThread(), threading.Event()
    try:
        batches.load_ahead(pool, 3, unlabeled=False)
        with pytest.raises(RuntimeError, match="loaded ahead already"):
            batches.load_ahead(pool, 4, unlabeled=False)
        with pytest.raises(RuntimeError, match=r"\(3, False\) were loaded ahead, but \(2, False\)"):
            batches.take(2, unlabeled=False)
        batches.load_ahead(pool, 3, unlabeled=False)
        with pytest.raises(RuntimeError, match=r"\(3, False\) were loaded ahead, but \(3, True\)"):
            batches.take(3, unlabeled=True)
        finished = []

        def slow_batches(stream: _CountingStream) -> list:
            release.wait(5)
            finished.append(True)
            return _two_batches(stream)

        slow = _step_batches([], slow_batches)
        future = slow.load_ahead(pool, 0, unlabeled=False)
        threading.Timer(0.2, release.set).start()
        slow.close()
        assert future.done() and finished == [True] and not slow.streams
    finally:
        release.set()
        pool.close()


def _run_tiny(tmp_path: Path, name: str, overrides: list[str],
              wrap_next_batches: Optional[Callable] = None) -> tuple[Trainer, Optional[BaseException]]:
    """Four steps with a checkpoint after each; the trainer and what its run raised."""
    cfg = load_config(resolve_config_path("digits/default"),
                      [*TINY, "train.iterations=4", "train.eval_interval=4", "train.checkpoint_interval=1",
                       "train.device=cpu", *overrides])
    trainer = Trainer(cfg, tmp_path / name, show_progress=False)
    if wrap_next_batches is not None:
        trainer._next_batches = wrap_next_batches(trainer._next_batches)
    try:
        trainer.run(evaluate=False)
    except Exception as exc:  # noqa: BLE001 - the test compares what each setting raises
        return trainer, exc
    return trainer, None


def _thread_log(names: list[str]):
    def wrap(next_batches):
        def logged(stream):
            names.append(threading.current_thread().name)
            return next_batches(stream)
        return logged
    return wrap


@pytest.mark.parametrize(("method", "first_step_loads"), [
    (["method.name=scl"], 2),
    (["method.name=scl", "train.grad_accum=2", "method.unlabeled_start=2"], 1),  # crosses the warm-up's end
    (["method.name=supervised"], 1),
])
def test_the_trainer_with_and_without_the_side_thread_writes_the_same_checkpoint(tmp_path: Path, method: list[str],
                                                                                 first_step_loads: int) -> None:
    names: dict[str, list[str]] = {}
    checkpoints = {}
    for prefetch, teacher in [("off", "off"), ("on", "off"), ("on", "on")]:
        key = f"{prefetch}-{teacher}"
        names[key] = []
        trainer, error = _run_tiny(tmp_path, key, [*method, f"train.prefetch={prefetch}",
                                                  f"train.teacher_thread={teacher}"],
                                   wrap_next_batches=_thread_log(names[key]))
        assert error is None and (trainer.prefetch_thread is not None) == (prefetch == "on")
        assert (trainer.teacher_thread is not None) == (teacher == "on" and "method.name=supervised" not in method)
        checkpoints[key] = torch.load(tmp_path / key / "step_4.pt", weights_only=True)
    for key in ("student", "teacher", "optimizer"):
        reference = _tensors(checkpoints["off-off"][key])
        for other in ("on-off", "on-on"):
            flat = _tensors(checkpoints[other][key])
            assert len(flat) == len(reference) > 0 and all(torch.equal(x, y) for x, y in zip(flat, reference)), key
    loads = len(names["off-off"])
    assert not any(name.startswith("sclseg-side") for name in names["off-off"])
    for other in ("on-off", "on-on"):  # the first step's batches load in the training thread, the rest ahead
        assert [name.startswith("sclseg-side") for name in names[other]] == \
            [False] * first_step_loads + [True] * (loads - first_step_loads)


def test_a_loading_error_stops_the_run_at_the_same_step_with_and_without_prefetch(tmp_path: Path) -> None:
    def failing_third_call(next_batches):
        calls = []
        def load(stream):
            calls.append(stream)
            if len(calls) == 3:
                raise ValueError("a corrupt image")
            return next_batches(stream)
        return load

    outcomes = {}
    for prefetch in ("off", "on"):
        trainer, error = _run_tiny(tmp_path, prefetch, ["method.name=supervised", f"train.prefetch={prefetch}"],
                                   wrap_next_batches=failing_third_call)
        outcomes[prefetch] = (type(error), str(error), trainer.state.iteration,
                              sorted(p.name for p in (tmp_path / prefetch).glob("step_*.pt")))
    assert outcomes["on"] == outcomes["off"]
    assert outcomes["off"][0] is ValueError and outcomes["off"][2] == 2
    assert outcomes["off"][3] == ["step_1.pt", "step_2.pt"]


def _tensors(obj) -> list[torch.Tensor]:
    """Every tensor inside nested dicts and lists, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []
