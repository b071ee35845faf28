"""Serving the exported generator: the onnxruntime session (`runtime`), request batching
(`batching`), the FastAPI service and its web page (`app`, `static/`).

Nothing here imports torch or unpickles anything: the model is an .onnx file whose
metadata carries the generator config, the gold templates and the default reference face.
"""
