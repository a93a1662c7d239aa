"""Stage 2a, influence (LESS/BIDS branch): the warmup checkpoints, per-example LoRA gradients,
random projection, the gradient datastore and its filling, checkpoint-weighted cosine influence,
feature diagnostics, and their lineage tables (``influence_store``).
"""
