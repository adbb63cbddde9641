"""imgserve: serve ONNX image classifiers over HTTP with dynamic batching."""

__version__ = "0.1.0"
