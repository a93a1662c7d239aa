"""Stage 4, evaluation: target loss and task metrics of finetuned checkpoints, with intervals and
Holm-corrected significance."""
