"""Student and teacher GPTModels: layer spec choice, vocabulary padding, building, checkpoints."""
