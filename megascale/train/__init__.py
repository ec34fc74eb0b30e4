"""DeepSpeed engine, training loop, checkpoints and metrics."""
