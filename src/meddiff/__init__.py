"""meddiff: diffusion models for medical images."""
