"""Evaluation: torch-fidelity metrics (:mod:`.fidelity`), the paper's FID protocol (:mod:`.protocol`) and its
reference files (:mod:`.references`); ``python -m sidlib.metrics`` is the command line (EDM's ``fid.py``)."""

from .fidelity import (INCEPTION, INCEPTION_WEIGHTS_FILE, INCEPTION_WEIGHTS_URL, METRIC_KEYS, FeatureExtractor,
                       InceptionWeightsMissing, UInt8ImageDataset, as_uint8_images, compute_metrics,
                       ensure_inception_weights, feature_statistics, fid_from_statistics, inception_score,
                       inception_weights_path, is_registered, module_extractor, precision_recall,
                       register_feature_extractor)

__all__ = ['INCEPTION', 'INCEPTION_WEIGHTS_FILE', 'INCEPTION_WEIGHTS_URL', 'METRIC_KEYS', 'FeatureExtractor',
           'InceptionWeightsMissing', 'UInt8ImageDataset', 'as_uint8_images', 'compute_metrics',
           'ensure_inception_weights', 'feature_statistics', 'fid_from_statistics', 'inception_score',
           'inception_weights_path', 'is_registered', 'module_extractor', 'precision_recall',
           'register_feature_extractor']
