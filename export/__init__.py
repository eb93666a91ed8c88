"""PyTorch → ONNX → TensorRT: the on-disk bundle and its manifest. Not built yet (see the README)."""
