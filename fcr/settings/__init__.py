"""Settings: the embedded default and Stable Diffusion (data, text encoders, models, prompts, generation)."""
