"""Stage 2a, influence (LESS/BIDS branch): per-example LoRA gradients, random projection, the
sharded gradient datastore, checkpoint-weighted cosine influence and feature diagnostics.
"""
