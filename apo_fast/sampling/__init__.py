"""Sampling: APO's hierarchical sampler (:mod:`.hierarchical`), loading a trained run and
generating its anomalies (:mod:`.runs`), and images on disk (:mod:`.images`)."""
from apo_fast.sampling.hierarchical import (
    SampleOutput,
    hierarchical_sample,
    localization_mask,
    schedule_value,
)
from apo_fast.sampling.images import overlay, save_grid, save_images, to_uint8
from apo_fast.sampling.runs import LoadedRun, generate_for_defect, load_run, sample_run

__all__ = [
    "LoadedRun",
    "SampleOutput",
    "generate_for_defect",
    "hierarchical_sample",
    "load_run",
    "localization_mask",
    "overlay",
    "sample_run",
    "save_grid",
    "save_images",
    "schedule_value",
    "to_uint8",
]
