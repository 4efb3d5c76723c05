"""MLflow: run tracking, the generator as a registered model, promotion and its pyfunc entry."""
