"""Distributed GAN training: models, losses, data, loop, metrics, and the Ray/MLflow adapters."""
