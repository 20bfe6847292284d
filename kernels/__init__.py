"""Handwritten Triton kernels, each with its autograd wrapper and a plain-PyTorch reference."""
from kernels.attention import attention_reference, flash_attention  # noqa: F401
