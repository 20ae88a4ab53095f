"""Training: datasets from bundled data, trainers that write artifacts to the model store."""
