"""Stage 1, data: source formats, ingestion into the pool, targets, tokenization, exports.

Tables: `pool`, `pool_rejects`, `pool_duplicates`, `pool_versions` (pool_store); `targets` (target_store).
"""
