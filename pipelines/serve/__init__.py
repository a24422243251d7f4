"""Trained models in use: the registry, the pyfunc predictor, evaluation and prediction over inputs."""
