"""Export a NeMo Streaming Sortformer into stateful ONNX streaming steps and a Triton repository.

Export-time only: this package imports torch and nemo; serving never imports it.
"""
