"""Evaluation of a model or a graft (``graftc eval``): sample quality, agreement with the teacher, cost.

One module per job: ``features`` (the feature extractors sample quality measures images with),
``reference`` (reading a ``--reference`` .npz), ``metrics`` (FD, IS, precision/recall, output MSE), ``quality``
(teacher agreement and perplexity through the model's task), ``run`` (graftc eval: cost, and the model's family
adds its figures: graftc.families' DiT sample quality and held-out text) and ``tables`` (the text table).
"""
from graftc.evaluate.features import DigitExtractor, FeatureExtractor, InceptionExtractor, parse_features
from graftc.evaluate.metrics import fd_of_features, inception_score, output_error, precision_recall
from graftc.evaluate.quality import agreement, perplexity, sentence_embedding
from graftc.evaluate.reference import read_reference
from graftc.evaluate.run import cost, evaluate
from graftc.evaluate.tables import table

__all__ = ["FeatureExtractor", "DigitExtractor", "InceptionExtractor", "read_reference", "parse_features",
           "fd_of_features", "inception_score", "precision_recall", "output_error", "agreement",
           "sentence_embedding", "perplexity", "cost", "evaluate", "table"]
