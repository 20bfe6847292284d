"""Handwritten Triton kernels, each with its autograd wrapper and a plain-PyTorch reference."""
from kernels.attention import attention_reference, flash_attention
from kernels.cross_entropy import cross_entropy, cross_entropy_reference, linear_cross_entropy

__all__ = ["flash_attention", "attention_reference", "cross_entropy", "cross_entropy_reference",
           "linear_cross_entropy"]
