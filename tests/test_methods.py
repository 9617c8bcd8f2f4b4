"""The method layer: every method's step on the compact model, the weak-to-strong pieces against
their reference definitions, and the registry's errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sclseg.config import ConfigError, load_config, resolve_config_path
from sclseg.cutmix import BoxMaskGenerator, OneBoxGenerator, mix
from sclseg.data import build_data
from sclseg.losses import structured_consistency_loss
from sclseg.methods import METHODS, Method, build_method, method_class
from sclseg.methods.weak_strong import channel_dropout, complementary_dropout
from sclseg.models import create_model
from sclseg.teacher import MeanTeacher

from tiny_config import TINY

WEAK_TO_STRONG = ["fixmatch", "fixmatch_scl", "unimatch_v1", "unimatch_v1_scl", "unimatch_v2", "unimatch_v2_scl"]


def _marked_slow(names, slow: set[str]) -> list:
    """``names`` as parameters, those in ``slow`` (over 5 s on 2 CPU cores) marked ``slow``."""
    return [pytest.param(name, marks=pytest.mark.slow) if name in slow else name for name in names]


def _tiny_setup(method: str, *overrides: str):
    cfg = load_config(resolve_config_path("digits/default"), [*TINY, f"method.name={method}", *overrides])
    data = build_data(cfg)
    torch.manual_seed(0)
    model = create_model(cfg.model, data.num_classes)
    images = torch.stack([data.labeled[i]["image"] for i in range(4)])
    labels = torch.stack([data.labeled[i]["mask"] for i in range(4)])
    samples = [data.unlabeled[i] for i in range(4)]
    unlabeled = {"image": torch.stack([s["image"] for s in samples]),
                 "ignore": torch.stack([s["ignore"] for s in samples])}
    return cfg, model, {"image": images, "mask": labels}, unlabeled


def _method(cfg, model, *, decay: float = 0.9, seed: int = 7, lr: float = 0.05) -> Method:
    teacher = MeanTeacher(model, decay, warmup=method_class(cfg.method.name).uses_ema_warmup(cfg.method))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return build_method(cfg, model, teacher, optimizer, scheduler, generator=torch.Generator().manual_seed(seed))


TERMS = {"supervised": {"loss", "loss_x"}, "cl": {"loss", "loss_x", "loss_c"},
         "scl": {"loss", "loss_x", "loss_c", "loss_sc"}, "fixmatch": {"loss", "loss_x", "loss_u"},
         "unimatch_v2": {"loss", "loss_x", "loss_u"}, "unimatch_v1": {"loss", "loss_x", "loss_u", "loss_fp"}}


@pytest.mark.parametrize("name", _marked_slow(METHODS, {"cl", "scl", "fixmatch_scl", "unimatch_v1", "unimatch_v1_scl",
                                                        "unimatch_v2", "unimatch_v2_scl"}))
def test_every_method_lowers_its_loss_on_a_fixed_batch(name: str) -> None:
    cfg, model, batch, ubatch = _tiny_setup(name, "method.threshold=0.0")
    method = _method(cfg, model)

    def loss_at_fixed_seed() -> float:
        method.generator.manual_seed(7)
        torch.manual_seed(0)
        with torch.no_grad():
            return float(method.loss(batch, ubatch, 1.0)[0])

    before = loss_at_fixed_seed()
    for _ in range(12):
        method.generator.manual_seed(7)
        terms = method.step([batch], [ubatch], 1.0)
    expected = TERMS.get(name.removesuffix("_scl"), set()) | ({"loss_sc"} if name.endswith("_scl") else set())
    assert set(terms) == (expected or TERMS[name])
    assert loss_at_fixed_seed() < before


@pytest.mark.parametrize("name", ["fixmatch", "unimatch_v1", "unimatch_v2"])
def test_a_method_without_scl_never_computes_it_whatever_lambda_sc_says(name: str, monkeypatch) -> None:
    cfg, model, batch, ubatch = _tiny_setup(name, "method.lambda_sc=5.0")
    import sclseg.methods.weak_strong as weak_strong

    monkeypatch.setattr(weak_strong, "structured_consistency_loss", lambda *a, **k: pytest.fail("L_sc computed"))
    _, terms = _method(cfg, model).loss(batch, ubatch, 1.0)
    assert "loss_sc" not in terms


@pytest.mark.parametrize("name", _marked_slow(WEAK_TO_STRONG, {"fixmatch_scl", "unimatch_v1", "unimatch_v1_scl",
                                                               "unimatch_v2_scl"}))
def test_before_the_unlabeled_terms_start_a_method_trains_as_supervised_bit_for_bit(name: str) -> None:
    cfg, model, batch, ubatch = _tiny_setup(name)
    states = []
    for method_name in (name, "supervised"):
        cfg.method.name = method_name
        student = copy.deepcopy(model)
        method = _method(cfg, student)
        torch.manual_seed(0)
        for _ in range(2):
            method.step([batch], None, 0.0)
        states.append(student.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def _record_cutmix(method: Method) -> dict:
    """Make ``method`` record the mixed images and target of its (last) strong view in the dict returned."""
    seen, original = {}, method.cutmix

    def spy(*args):
        seen["mixed"], seen["target"] = original(*args)
        return seen["mixed"], seen["target"]

    method.cutmix = spy
    return seen


def test_fixmatch_loss_is_the_reference_formula_on_its_own_views() -> None:
    """``(L_x + L_u) / 2`` at full weight, ``L_u`` the masked CE to the teacher's mixed labels over the
    pixels that are not padding, recomputed here from the views the method made."""
    cfg, model, batch, ubatch = _tiny_setup("fixmatch", "method.threshold=0.3", "method.cutmix_prob=1.0")
    ubatch["ignore"][0, :5] = 255  # some padding
    method = _method(cfg, model)
    model.eval()  # deterministic passes
    seen = _record_cutmix(method)
    loss, terms = method.loss(batch, ubatch, 1.0)
    with torch.no_grad():
        probs = method.mean_teacher.teacher(ubatch["image"]).softmax(1)
        owner = seen["target"].owner
        label = mix(probs.flip(0), probs, owner).argmax(1)
        conf = mix(probs.flip(0), probs, owner).amax(1)
        ignore = mix(ubatch["ignore"].flip(0), ubatch["ignore"], owner)
        logits = model(torch.cat([batch["image"], seen["mixed"]]))
        ce = F.cross_entropy(logits[4:], label, reduction="none")
        loss_u = (ce * ((conf >= 0.3) & (ignore != 255))).sum() / (ignore != 255).sum()
        loss_x = F.cross_entropy(logits[:4], batch["mask"], ignore_index=255)
    assert (owner >= 0).any(dim=(1, 2)).all()  # every image got its box
    assert float(terms["loss_u"]) == pytest.approx(float(loss_u), rel=1e-5)
    assert float(loss.detach()) == pytest.approx(float((loss_x + loss_u) / 2), rel=1e-5)


def test_the_scl_twin_adds_lambda_sc_times_scl_over_the_box_and_the_rest() -> None:
    cfg, model, batch, ubatch = _tiny_setup("fixmatch_scl", "method.lambda_sc=3.0", "method.max_pairs=null",
                                           "method.cutmix_prob=1.0")
    method = _method(cfg, model)
    model.eval()
    seen = _record_cutmix(method)
    loss, terms = method.loss(batch, ubatch, 1.0)
    target = seen["target"]
    with torch.no_grad():
        student = model(torch.cat([batch["image"], seen["mixed"]]))[4:].softmax(1)
    regions = torch.where(target.owner >= 0, 0, 1).masked_fill(target.ignore == 255, -1)
    by_hand = structured_consistency_loss(student, target.probs, regions, n_boxes=2, last_boxes=2, max_pairs=None)
    assert float(terms["loss_sc"]) == pytest.approx(float(by_hand), rel=1e-5)
    plain = (terms["loss_x"] + terms["loss_u"]) / 2
    assert float(loss.detach()) == pytest.approx(float(plain + 3.0 * terms["loss_sc"]), rel=1e-5)


def test_one_box_generator_follows_unimatchs_box_rule() -> None:
    """Boxes appear with probability ``prob``; their area is int-truncated from U(0.02, 0.4) x H x W
    with aspect in [0.3, 1/0.3], and they lie inside the image; against a sampler written from the rule."""
    gen = OneBoxGenerator(prob=0.5)
    boxes = gen.sample_boxes(4000, 48, 64, torch.Generator().manual_seed(1))[:, 0]
    h, w = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    has = h * w > 0
    assert abs(float(has.float().mean()) - 0.5) < 0.03
    assert (boxes[:, 2] <= 48).all() and (boxes[:, 3] <= 64).all() and (boxes >= 0).all()
    area = (h * w)[has].double() / (48 * 64)
    assert float(area.min()) >= 0.0 and float(area.max()) <= 0.4
    rng = np.random.default_rng(0)
    reference = []
    for _ in range(4000):  # the rule, written out: size, then candidates until one fits
        size = rng.uniform(0.02, 0.4) * 48 * 64
        while True:
            ratio = rng.uniform(0.3, 1 / 0.3)
            cw, ch = int(np.sqrt(size / ratio)), int(np.sqrt(size * ratio))
            x, y = rng.integers(0, 64), rng.integers(0, 48)
            if x + cw <= 64 and y + ch <= 48:
                break
        reference.append(cw * ch / (48 * 64))
    assert float(area.mean()) == pytest.approx(float(np.mean(reference)), abs=0.01)
    owner = gen(8, 48, 64, torch.Generator().manual_seed(2))
    assert set(owner.unique().tolist()) <= {-1, 0}


def test_complementary_dropout_pairs_each_channel_with_its_complement() -> None:
    tokens = [torch.ones(8, 5, 6) for _ in range(2)]
    maps = [torch.ones(8, 3, 2, 2)]
    out = complementary_dropout(tokens + maps, torch.Generator().manual_seed(0))
    first, second = out[0][:4, 0], out[0][4:, 0]  # (pairs, channels) masks of the two views
    assert torch.equal(first + second, torch.full_like(first, 2.0))  # every channel reaches the head once
    assert set(first.unique().tolist()) <= {0.0, 1.0, 2.0}
    assert int((first == 1.0).all(dim=1).sum()) >= 2  # int(4 * 0.5) pairs keep every channel
    assert torch.equal(out[0], out[1])  # taps with one channel count share the mask
    assert out[2].shape == (8, 3, 2, 2) and torch.equal(out[2][:4] + out[2][4:], torch.full((4, 3, 2, 2), 2.0))


def test_channel_dropout_appends_a_copy_with_whole_channels_dropped() -> None:
    feature = torch.rand(4, 16, 3, 3) + 0.1
    clean, dropped = channel_dropout([feature], torch.Generator().manual_seed(0))[0].chunk(2)
    assert torch.equal(clean, feature)
    ratio = dropped / feature
    per_channel = ratio.flatten(2)
    assert torch.allclose(per_channel, per_channel[..., :1].expand_as(per_channel))  # whole channels
    assert set(per_channel[..., 0].unique().tolist()) <= {0.0, 2.0}


def test_methods_that_perturb_features_refuse_a_network_without_them() -> None:
    cfg = load_config(None, ["method.name=unimatch_v2"])
    net = torch.nn.Conv2d(3, 2, 1)
    with pytest.raises(ConfigError, match="method.name: 'unimatch_v2' perturbs the features"):
        build_method(cfg, net, MeanTeacher(net, 0.9), torch.optim.SGD(net.parameters(), lr=0.1),
                     None, generator=torch.Generator())
    with pytest.raises(ConfigError, match="method.name: expected one of"):
        load_config(None, ["method.name=mixmatch"])


def test_unimatch_v1_needs_an_even_unlabeled_batch_to_split() -> None:
    cfg, model, _, _ = _tiny_setup("unimatch_v1", "data.unlabeled_batch_size=3")
    with pytest.raises(ConfigError, match="data.unlabeled_batch_size"):
        _method(cfg, model)


def test_unlabeled_crops_carry_their_padding_as_an_ignore_map() -> None:
    cfg = load_config(resolve_config_path("digits/default"), [*TINY, "data.scale_range=[0.5,0.5]"])
    sample = build_data(cfg).unlabeled[0]
    ignore = sample["ignore"]
    # at scale 0.5 the crop window is twice the image: the image fills a quarter, the rest is padding
    assert ignore.shape == sample["image"].shape[1:] and set(ignore.unique().tolist()) == {0, 255}
    assert float((ignore == 255).float().mean()) == pytest.approx(0.75, abs=0.05)
    assert float((sample["image"][:, ignore == 255] == 0).float().mean()) > 0.9  # resampling blurs the edge


def test_unlabeled_weight_warm_up_and_ramp() -> None:
    cfg, model, _, _ = _tiny_setup("scl", "method.unlabeled_start=10", "method.rampup_iters=100")
    method = _method(cfg, model)
    assert method.unlabeled_weight(5) == 0.0
    assert method.unlabeled_weight(10) == pytest.approx(np.exp(-5.0))
    assert method.unlabeled_weight(60) == pytest.approx(np.exp(-5.0 * 0.25))
    assert method.unlabeled_weight(500) == 1.0
    cfg.method.name = "supervised"
    assert _method(cfg, model).unlabeled_weight(500) == 0.0


def test_confidence_threshold_masks_the_pixel_consistency() -> None:
    cfg, model, batch, ubatch = _tiny_setup("cl")
    method = _method(cfg, model)
    model.eval()  # deterministic forward passes

    def loss_c(confidence):
        cfg.method.confidence = confidence
        method.generator.manual_seed(3)
        return float(method.loss(batch, ubatch, 1.0)[1]["loss_c"])

    assert loss_c(0.0) == pytest.approx(loss_c(None))  # every top probability exceeds 0
    assert loss_c(1.0) == 0.0  # no pixel is that confident: the term is empty


def test_sc_confident_only_drops_the_unconfident_pixels_from_every_region() -> None:
    cfg, model, batch, ubatch = _tiny_setup("scl", "method.max_pairs=null")
    method = _method(cfg, model)
    model.eval()
    unlabeled = ubatch["image"]

    def loss_sc(confidence, only):
        cfg.method.confidence, cfg.method.sc_confident_only = confidence, only
        method.generator.manual_seed(3)
        return float(method.loss(batch, ubatch, 1.0)[1]["loss_sc"])

    # by hand: the same owner map and maps, with the pixels under the threshold given owner -1
    masks = BoxMaskGenerator(cfg.method.n_boxes, cfg.method.box_area)
    owner = masks(unlabeled.shape[0], *unlabeled.shape[-2:], torch.Generator().manual_seed(3))
    with torch.no_grad():
        probs = method.mean_teacher.teacher(unlabeled).float().softmax(1)
        target = mix(probs, probs.roll(1, 0), owner)
        student = model(mix(unlabeled, unlabeled.roll(1, 0), owner)).float().softmax(1)
    threshold = float(target.amax(1).median())
    kept = owner.masked_fill(target.amax(1) <= threshold, -1)
    by_hand = structured_consistency_loss(student, target, kept, n_boxes=cfg.method.n_boxes,
                                          last_boxes=cfg.method.last_boxes, max_pairs=None)
    assert loss_sc(threshold, True) == pytest.approx(float(by_hand), rel=1e-5)
    assert loss_sc(threshold, False) == pytest.approx(loss_sc(None, False))  # the mask alone leaves L_sc as it is
    assert loss_sc(threshold, True) != pytest.approx(loss_sc(threshold, False))
    with pytest.raises(ConfigError, match="method.sc_confident_only"):
        load_config(None, ["method.sc_confident_only=true"])


def test_pair_sampling_reaches_the_structured_loss() -> None:
    cfg, model, batch, ubatch = _tiny_setup("scl", "method.max_pairs=4")  # regions over 2 pixels are sampled
    method = _method(cfg, model)

    def loss_sc(sampling: str) -> float:
        cfg.method.pair_sampling = sampling
        torch.manual_seed(0)  # the same dropout for both
        method.generator.manual_seed(3)
        return float(method.loss(batch, ubatch, 1.0)[1]["loss_sc"])

    pairs, pixels = loss_sc("pairs"), loss_sc("pixels")
    assert pairs > 0 and pixels > 0 and pairs != pixels  # the two estimators draw differently
    with pytest.raises(ConfigError, match="method.pair_sampling"):
        load_config(None, ["method.pair_sampling=boxes"])


@pytest.mark.slow
def test_student_as_teacher_trains_as_a_zero_decay_ema_and_keeps_the_ema_for_evaluation() -> None:
    """``method.teacher: student`` guesses labels with the student in eval mode; the student it
    trains is, bit for bit, the one an EMA of decay 0 (an exact copy) trains, and the EMA of the
    configured decay is still kept, apart from it."""
    cfg, model, batch, ubatch = _tiny_setup("scl")

    def train(teacher: str, decay: float) -> tuple[torch.nn.Module, MeanTeacher]:
        cfg.method.teacher = teacher
        student = copy.deepcopy(model)
        method = _method(cfg, student, decay=decay, seed=5)
        torch.manual_seed(0)  # the decoder's dropout draws from the global generator
        for _ in range(3):
            method.step([batch], [ubatch], 1.0)
        assert student.training  # the teacher's eval-mode pass leaves the student in train mode
        return student, method.mean_teacher

    own, kept = train("student", 0.9)
    copied, _ = train("ema", 0.0)
    own_state, copied_state = own.state_dict(), copied.state_dict()
    assert all(torch.equal(own_state[k], copied_state[k]) for k in own_state)
    ema_state = kept.teacher.state_dict()
    assert any(not torch.equal(ema_state[k], own_state[k]) for k in own_state if own_state[k].is_floating_point())
    with pytest.raises(ConfigError, match="method.teacher"):
        load_config(None, ["method.teacher=previous"])
