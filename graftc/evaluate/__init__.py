"""Evaluation of a model or a graft (``graftc eval``): sample quality, agreement with the teacher, cost.

One module per job: ``features`` (the feature extractors sample quality measures images with),
``reference`` (reading a ``--reference`` .npz), ``metrics`` (FD, IS, precision/recall, output MSE), ``quality``
(what differs by model family: DiT sample quality, teacher agreement, held-out text), ``run`` (what ``graftc
eval`` measures for which model, and cost) and ``tables`` (the text table). The names below are the public ones.
"""
from graftc.evaluate.features import DigitExtractor, FeatureExtractor, InceptionExtractor, parse_features
from graftc.evaluate.metrics import fd_of_features, inception_score, output_error, precision_recall
from graftc.evaluate.quality import (agreement, decode_speed, embedding_quality, heldout_quality, is_causal_lm,
                                     lm_windows, perplexity, sample_quality, sentence_embedding, text_tokenizer)
from graftc.evaluate.reference import read_reference
from graftc.evaluate.run import cost, evaluate
from graftc.evaluate.tables import table

__all__ = ["FeatureExtractor", "DigitExtractor", "InceptionExtractor", "read_reference", "parse_features",
           "fd_of_features", "inception_score", "precision_recall", "output_error", "sample_quality", "agreement",
           "sentence_embedding", "perplexity", "text_tokenizer", "is_causal_lm", "heldout_quality", "lm_windows",
           "decode_speed", "embedding_quality", "cost", "evaluate", "table"]
