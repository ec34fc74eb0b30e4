"""Untying tied blocks during training: when (``conditions``), and how (``transfer``, ``untie``)."""
