"""Evaluations that show where each mechanism fails: associative recall (MQAR), needle-in-a-haystack retrieval
over lengths x depths, and the fidelity of a model whose exact attention is swapped for a cheaper one."""

from .fidelity import MECHANISMS, Fidelity, fidelity, replace_attention
from .needle import NeedleGrid, needle_grid, train_needle_model
from .recall import RecallResult, answer_hits, fit_recall, mqar_batches, recall_accuracy, train_and_eval_mqar

__all__ = ["answer_hits", "recall_accuracy", "fit_recall", "mqar_batches", "train_and_eval_mqar", "RecallResult",
           "needle_grid", "train_needle_model", "NeedleGrid", "replace_attention", "fidelity", "Fidelity",
           "MECHANISMS"]
