"""skrr-export: deploy Skrr-pruned text encoders (plan -> shared-weight encoder -> ONNX -> TensorRT)."""

__version__ = "0.1.0"
