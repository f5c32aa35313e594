"""POVID toolkit library: LLaVA-1.5 on torchtune components, checkpoints, losses, generation."""
