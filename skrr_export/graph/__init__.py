"""The ONNX layer, torch-free: reading ONNX files, the weights-once invariant, saving at the memory floor."""
