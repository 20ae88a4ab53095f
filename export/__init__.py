"""Export of model-zoo models: ONNX graphs and their parity checks."""
