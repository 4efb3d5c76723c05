"""The GAN library: config, models, losses, augmentation, the training loop, sampling. No Ray, no MLflow."""
