"""Training runs: the trainer, its sessions (in-process and Ray Train workers), checkpoints."""
