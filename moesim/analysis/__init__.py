"""Analysis of routing traces: statistics, residency logs, plots and reports."""
