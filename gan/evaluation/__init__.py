"""Evaluation: feature networks, backbone loading and checks, statistics, the evaluator. No Ray, no MLflow."""
