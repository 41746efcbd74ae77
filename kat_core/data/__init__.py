"""Datasets: dual-regime synthesis, I/O and validation."""
