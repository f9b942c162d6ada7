"""Weight quantization passes: linear layers rewritten onto quantized weights stored in the artifact."""
