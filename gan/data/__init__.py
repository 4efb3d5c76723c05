"""Data: reading sources, the dataset tool, prepared datasets and their node cache, storage URIs. No Ray, no MLflow."""
