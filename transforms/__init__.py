"""Graph transforms, torch-free: ONNX files in and out, fp16 conversion, int8 (static Q/DQ and weight-only),
the x86 CPU re-encoding of int8 graphs. Each precision's quantizer (vsal.transforms.quantizers) wraps one."""
