"""`megatron-ddk pipeline`: the whole job from one config (docs/pipeline.md).

The top layer, beside the command line: it imports config, models, data and starts the other
megatron-ddk commands as child processes; nothing in the package imports it.
"""
