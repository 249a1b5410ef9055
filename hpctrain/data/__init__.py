"""Datasets and samplers: framework-neutral (numpy + Pillow), keyed by (index, epoch)."""
