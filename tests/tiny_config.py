"""Overrides that shrink the packaged digits config to a run of seconds, shared by the tests.

The unlabeled terms start at step 0 (the packaged config warms up for 800 steps), so that a
few steps exercise CutMix, L_c and L_sc. Data load in the main process; the tests that
concern workers set ``data.num_workers`` themselves.
"""

TINY = [
    "data.digits.image_size=32",
    "data.digits.n_train=40",
    "data.digits.n_val=6",
    "data.digits.n_test=6",
    "data.digits.n_labeled=8",
    "data.digits.digit_scale=[3,3]",
    "data.crop_size=[32,32]",
    "data.batch_size=4",
    "data.unlabeled_batch_size=4",
    "model.width=8",
    "model.pretrained=null",  # the packaged encoder has width 16
    "train.threads=1",
    "data.num_workers=0",
    "method.rampup_iters=0",
    "method.unlabeled_start=0",
]
