"""Embedding models: registry (which model, its model_ver), preprocess (its reference transform),
runtime (loaded once per process, ONNX Runtime or torch), onnx_export (torch -> ONNX, verified).
"""
