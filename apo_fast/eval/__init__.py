"""Evaluation: generation metrics, the downstream detector test, baselines and the report.

Modules: :mod:`.metrics` (every metric), :mod:`.segmentation` (DRAEM-style
detector), :mod:`.judge` (the fidelity judge), :mod:`.cutpaste` (pasted-patch baseline), :mod:`.downstream`
(one detector per data source and seed), :mod:`.sample_quality` (generation
metrics with missing-weight skipping), :mod:`.report` (JSON, Markdown, figures);
:mod:`.evaluate` is the entry point (`apo-fast eval`).
"""
from .cutpaste import cutpaste_anomalies
from .downstream import downstream_comparison
from .metrics import DETECTION_METRICS, MissingWeightsError
from .report import save_sample_grid, summarize, write_report
from .sample_quality import GENERATION_METRICS, generation_metrics
from .segmentation import DiscriminativeUNet, evaluate_segmenter, train_segmenter

__all__ = [
    "DETECTION_METRICS", "GENERATION_METRICS", "DiscriminativeUNet", "MissingWeightsError",
    "cutpaste_anomalies", "downstream_comparison", "evaluate_segmenter", "generation_metrics",
    "save_sample_grid", "summarize", "train_segmenter", "write_report",
]
