"""xllm_compiler/artifact."""
