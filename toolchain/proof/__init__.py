"""What fuse-export and verify prove: fusion equivalence, ONNX export and graph comparison, accuracy and latency parity, what fusion saves."""
