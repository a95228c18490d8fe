"""Metrics: generated and real images (N, H, W) float in [0, 1] → figures with their protocol; never a model."""
from .features import FeatureExtractor, InceptionFeatures, RandConvFeatures, get_extractor
from .fid import FeatureStats, cached_stats, compute_stats, feature_scores, fid_score, frechet_distance, kid
from .memorization import copy_threshold, memorization_report, nearest_ncc
from .prdc import prdc_scores
from .ssim import PROTOCOL as SSIM_PROTOCOL
from .ssim import nearest_ssim, pairwise_ssim, real_halves_reference, ssim_band, ssim_report

__all__ = [
    "FeatureExtractor", "InceptionFeatures", "RandConvFeatures", "get_extractor",
    "FeatureStats", "cached_stats", "compute_stats", "feature_scores", "fid_score", "frechet_distance", "kid",
    "copy_threshold", "memorization_report", "nearest_ncc",
    "prdc_scores",
    "SSIM_PROTOCOL", "nearest_ssim", "pairwise_ssim", "real_halves_reference", "ssim_band", "ssim_report",
]
