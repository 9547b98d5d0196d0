"""The Estuary on-device agent: adapter training and onnxruntime serving."""
