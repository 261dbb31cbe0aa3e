"""Neural-network building blocks: Module, layers, losses, initializers."""
from pycnn.nn import init
from pycnn.nn.layers import (AvgPool2d, Conv2d, Dropout, Flatten, LeakyReLU, Linear, MaxPool2d, ModuleDict,
                             ModuleList, ReLU, Sequential, Sigmoid, Tanh)
from pycnn.nn.loss import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss, SmoothL1Loss
from pycnn.nn.module import Module, Parameter

__all__ = ["Module", "Parameter", "Conv2d", "Linear", "MaxPool2d", "AvgPool2d", "Flatten", "ReLU",
           "LeakyReLU", "Sigmoid", "Tanh", "Dropout", "Sequential", "ModuleList", "ModuleDict",
           "CrossEntropyLoss", "BCEWithLogitsLoss", "MSELoss", "SmoothL1Loss", "init"]
