"""What runs on the driver: config and dataset checks, MLflow runs, the TorchTrainer/Tuner set-up,
sweep reports, results tables."""
