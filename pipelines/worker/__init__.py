"""What runs inside a training process: the Ray runtime for the loop, rank-sliced data, process tuning."""
