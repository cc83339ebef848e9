"""File formats: safetensors writer and checked reader, posterior files, released BayesVLM
factors, fit checkpoints."""
