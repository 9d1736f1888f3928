"""Every evaluation metric in one namespace.

* detection / segmentation (:mod:`.detection`): ``auroc``, ``average_precision``,
  ``f1_max``, ``pro_score``, ``image_metrics``, ``pixel_metrics``;
* diversity (:mod:`.diversity`): ``ic_lpips`` and the distance-agnostic
  ``intra_cluster_diversity``, ``ms_ssim_diversity``, ``l2_diversity``,
  ``ic_l2``, ``ic_ms_ssim``;
* fidelity (:mod:`.fidelity`): ``kid``, ``inception_score`` from features/logits;
* image similarity (:mod:`.similarity`): ``ssim``, ``ms_ssim``;
* pretrained networks (:mod:`.pretrained`), local files only, and
  ``MissingWeightsError`` when they are absent.
"""
from .detection import (
    DETECTION_METRICS,
    IMAGE_METRICS,
    PIXEL_METRICS,
    UndefinedMetricError,
    auroc,
    average_precision,
    binary_clf_curve,
    f1_max,
    image_metrics,
    pixel_metrics,
    pro_curve,
    pro_score,
)
from .diversity import (
    ClusteredDiversity,
    assign_to_clusters,
    ic_l2,
    ic_lpips,
    ic_ms_ssim,
    intra_cluster_diversity,
    l2_distance,
    l2_diversity,
    mean_pairwise_distance,
    ms_ssim_distance,
    ms_ssim_diversity,
    pairwise_distance_matrix,
)
from .fidelity import inception_score, kid, polynomial_mmd2_unbiased
from .pretrained import (
    InceptionFeatureExtractor,
    MissingWeightsError,
    inception_features,
    load_inception,
    load_lpips,
    lpips_distance,
)
from .similarity import ms_ssim, ssim

__all__ = [
    "DETECTION_METRICS", "IMAGE_METRICS", "PIXEL_METRICS", "UndefinedMetricError",
    "auroc", "average_precision", "binary_clf_curve", "f1_max", "image_metrics", "pixel_metrics",
    "pro_curve", "pro_score",
    "ClusteredDiversity", "assign_to_clusters", "ic_l2", "ic_lpips", "ic_ms_ssim", "intra_cluster_diversity",
    "l2_distance", "l2_diversity", "mean_pairwise_distance", "ms_ssim_distance", "ms_ssim_diversity",
    "pairwise_distance_matrix",
    "inception_score", "kid", "polynomial_mmd2_unbiased",
    "InceptionFeatureExtractor", "MissingWeightsError", "inception_features", "load_inception", "load_lpips",
    "lpips_distance",
    "ms_ssim", "ssim",
]
