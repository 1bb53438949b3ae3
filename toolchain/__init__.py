"""edgetool: TT-LoRA adaptation of CNNs for edge devices, dense fusion, ONNX/TensorRT export and parity proofs."""

__version__ = "0.1.0"
