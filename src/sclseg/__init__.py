"""sclseg: semi-supervised semantic segmentation with the Structured Consistency Loss."""

from sclseg.cutmix import BoxMaskGenerator, box_owner_map, mix, sample_boxes
from sclseg.losses import consistency_loss, relaxed_boundary_loss, structured_consistency_loss
from sclseg.teacher import MeanTeacher

__version__ = "0.1.0"

__all__ = [
    "BoxMaskGenerator",
    "MeanTeacher",
    "box_owner_map",
    "consistency_loss",
    "mix",
    "relaxed_boundary_loss",
    "sample_boxes",
    "structured_consistency_loss",
]
