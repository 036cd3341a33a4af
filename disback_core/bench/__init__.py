"""Built-in problems, offline metrics and the benchmark runner (used by the CLI and benchmarks)."""
