"""Shared test setup.

Without a GPU, Triton kernels run under Triton's interpreter so the fast paths are still checked
against the plain-torch reference on CPU. The variable must be set before any kernel is defined.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
