"""Triton kernels, each beside its pure-PyTorch reference.

Installed as ``megascale.kernels`` (see setup.py). The kernels themselves
arrive with their own issue; the model reaches attention through
``megascale.model.attention`` whose backend switch selects them on CUDA.
"""
