"""Task heads, losses and metrics (VQA, NLVR, retrieval, text classification)."""

from .heads import ClassifierHead, ITMHead, PairHead, contrastive_loss
from .metrics import accuracy, macro_f1, recall_at_k
from .runner import TASKS, TaskModel, TaskSpec, finetune, get_task

__all__ = ["ClassifierHead", "ITMHead", "PairHead", "contrastive_loss", "accuracy", "macro_f1", "recall_at_k",
           "TASKS", "TaskModel", "TaskSpec", "finetune", "get_task"]
