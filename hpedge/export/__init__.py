"""``hpedge export``: ONNX, ModelOpt INT4, TensorRT engines, Polygraphy parity, packages."""
