"""The ONNX export: above the runtime it feeds (inference) and the model it converts."""
