"""Stage-independent helpers: validated names, progress lines, integrity checks, memory budgets,
largest-remainder allocation, markdown tables and bar charts, one DuckDB transaction."""
