"""Modifying a trained model: quantization, export to other runtimes, adapters."""
