"""Metrics: generated and real images (N, H, W) float in [0, 1] → figures with their protocol; never a model."""
from .features import FeatureExtractor, InceptionFeatures, RandConvFeatures, get_extractor
from .fid import FeatureStats, cached_stats, compute_stats, feature_scores, fid_score, frechet_distance, kid
from .figure import Figure
from .memorization import CopyAudit, copy_threshold, feature_copy_audit, memorization_report, nearest_ncc
from .msssim import diversity, diversity_figure
from .prdc import prdc_scores
from .ssim import PROTOCOL as SSIM_PROTOCOL
from .ssim import nearest_ssim, nearest_ssim_search, nearest_ssim_shortlist, pairwise_ssim, real_halves_reference
from .ssim import ssim_band, ssim_figure

__all__ = [
    "FeatureExtractor", "InceptionFeatures", "RandConvFeatures", "get_extractor",
    "FeatureStats", "cached_stats", "compute_stats", "feature_scores", "fid_score", "frechet_distance", "kid",
    "Figure",
    "CopyAudit", "copy_threshold", "feature_copy_audit", "memorization_report", "nearest_ncc",
    "diversity", "diversity_figure",
    "prdc_scores",
    "SSIM_PROTOCOL", "nearest_ssim", "nearest_ssim_search", "nearest_ssim_shortlist", "pairwise_ssim",
    "real_halves_reference", "ssim_band", "ssim_figure",
]
