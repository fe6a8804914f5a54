"""Export: adapter, merged 16-bit weights, GGUF (f16, q8_0, q4_k_m) and an Ollama Modelfile, each proven."""
