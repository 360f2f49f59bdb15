"""The Stable Diffusion backend: SD 1.5 / 2.1 / OpenJourney models, local data and prompt sources."""
