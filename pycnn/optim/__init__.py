"""Optimizers and learning-rate schedulers."""
from pycnn.optim import lr_scheduler
from pycnn.optim.lr_scheduler import CosineAnnealingLR, OneCycleLR, StepLR
from pycnn.optim.optimizer import SGD, Adam, AdamW, Optimizer

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "StepLR", "CosineAnnealingLR", "OneCycleLR", "lr_scheduler"]
