"""Evaluation: Recall@K, median and mean rank and RSUM of a model, a checkpoint or an ensemble.

    metrics.py   ranks counted from a similarity matrix or from embeddings (never sorted), the
                 metrics computed from them, the protocols (one table, COCO 1K/5K, n folds), the
                 argsort reference they are tested against, and the printed table
    ensemble.py  several models as one: averaged similarities, or weighted concatenated embeddings
    embedding.py a model or saved checkpoint on a dataset split: embed every image and caption once,
                 then count the ranks (``vseinf eval``, and validation during training)

Evaluation imports nothing from training; training imports :func:`vseinf.eval.embedding.evaluate_split`.
"""

from .embedding import (
    checkpoint_embeddings,
    drop_unusable,
    encode_split,
    evaluate_checkpoints,
    evaluate_split,
    resolve_checkpoint,
    split_sources,
)
from .ensemble import ensemble_embeddings, ensemble_sims
from .metrics import (
    METRIC_KEYS,
    RankDetails,
    evaluate_protocol,
    evaluate_protocol_from_embeddings,
    format_table,
    metrics_from_ranks,
    rank_details,
    rank_details_from_embeddings,
    rank_details_reference,
    retrieval_metrics,
    retrieval_metrics_from_embeddings,
    retrieval_metrics_reference,
    round_metrics,
)

__all__ = [
    "METRIC_KEYS", "RankDetails", "checkpoint_embeddings", "drop_unusable", "encode_split", "ensemble_embeddings",
    "ensemble_sims", "evaluate_checkpoints", "evaluate_protocol", "evaluate_protocol_from_embeddings",
    "evaluate_split", "format_table", "metrics_from_ranks", "rank_details", "rank_details_from_embeddings",
    "rank_details_reference", "resolve_checkpoint", "retrieval_metrics", "retrieval_metrics_from_embeddings",
    "retrieval_metrics_reference", "round_metrics", "split_sources",
]
