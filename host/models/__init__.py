"""Model import: ONNX files to Relax, with their inputs, outputs and hash."""
