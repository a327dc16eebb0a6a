"""Test session set-up.

No machine of this project has a GPU: the Triton kernel runs under its interpreter, which reads
TRITON_INTERPRET when triton is imported, so it is set here before any test module can import
triton. On a CUDA machine the variable is left alone and the kernel runs for real.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

