"""Evaluation: zero-shot image-text retrieval (ITC ranking, ITM re-ranking) as BLIP evaluates it."""
from .retrieval import (RetrievalSet, evaluate_retrieval, format_metrics, recall_at_k, retrieval_scores,
                        retrieval_set_from_json, retrieval_set_synthetic)

__all__ = ["RetrievalSet", "evaluate_retrieval", "format_metrics", "recall_at_k", "retrieval_scores",
           "retrieval_set_from_json", "retrieval_set_synthetic"]
