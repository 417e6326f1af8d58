"""Evaluation of a model or a graft (``graftc eval``): sample quality, agreement with the teacher, cost.

One module per job: ``features`` (the feature extractors sample quality measures images with),
``reference`` (reading a ``--reference`` .npz), ``quality`` (teacher agreement through the model's task), ``run``
(graftc eval: cost, and the model's family adds its figures: graftc.families' DiT sample quality, perplexity and
held-out text) and ``tables`` (the text table). The metrics (FD, IS, precision/recall, output MSE, sentence
embeddings) live in graftc.metrics, outside this package, as the model families build on them and this package
builds on the families; they are re-exported here.
"""
from graftc.evaluate.features import DigitExtractor, FeatureExtractor, InceptionExtractor, parse_features
from graftc.evaluate.quality import agreement
from graftc.evaluate.reference import read_reference
from graftc.evaluate.run import cost, evaluate
from graftc.evaluate.tables import table
from graftc.families.transformers import perplexity
from graftc.metrics import fd_of_features, inception_score, output_error, precision_recall, sentence_embedding

__all__ = ["FeatureExtractor", "DigitExtractor", "InceptionExtractor", "read_reference", "parse_features",
           "fd_of_features", "inception_score", "precision_recall", "output_error", "agreement",
           "sentence_embedding", "perplexity", "cost", "evaluate", "table"]
