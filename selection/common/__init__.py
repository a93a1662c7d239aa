"""Stage-independent helpers: validated names, progress lines, integrity checks, memory budgets."""
