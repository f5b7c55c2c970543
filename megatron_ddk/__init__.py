"""megatron-ddk: distil large language models into small ones with DDK on Megatron-Core.

Layers (arrows give the only allowed import direction):
    config <- parallel <- models, losses, data, ddk <- training <- cli
"""

__version__ = "0.1.0"
