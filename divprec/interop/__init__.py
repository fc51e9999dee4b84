"""Applications of the checkpoint format: locate and describe checkpoints, rebuild the whole
model in one process, export it (safetensors, Hugging Face) and import Hugging Face models."""
