"""LoRA training shared by the warmup and the finetuning stages: models, training loop, checkpoints,
schedule preflight and generation.

Tables: `checkpoints` (checkpoints).
"""
