"""ONNX export and GPU deployment (TensorRT engines, Triton model repositories)."""
