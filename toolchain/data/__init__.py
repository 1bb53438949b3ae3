"""The data path: file formats, recording groups, the source -> target protocol, the embedded datasets."""
