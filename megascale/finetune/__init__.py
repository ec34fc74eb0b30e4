"""Trace fine-tuning (seed 2): (query, trace, response) examples, a loss on trace and response, held-out evaluation.

``arithmetic``: the embedded generated problems; ``data``: template, roles, packing;
``evaluate``: generation accuracy and trace metrics; ``stage``: the hooks that run it
on the pretraining loop (``finetune(cfg, ctx)``).
"""
