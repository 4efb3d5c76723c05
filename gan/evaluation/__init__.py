"""Evaluation, no Ray, no MLflow: features (the networks images are measured in), backbone
(finding, reading and checking them), evaluator_file (what an evaluator file holds), build
(training one), stats (FID, KID, precision/recall, leakage as pure functions) and evaluator
(scoring a generator with them)."""
