"""Typed run configuration: schema, YAML loading with overrides, static and host checks."""

from megatron_ddk.config.loader import (
                                        ConfigError,
                                        apply_overrides,
                                        config_from_data,
                                        config_to_yaml,
                                        dump_config,
                                        from_dict,
                                        load_config,
                                        to_dict,
)
from megatron_ddk.config.schema import (
                                        CheckpointConfig,
                                        DataConfig,
                                        DDKConfig,
                                        DistillConfig,
                                        LoggingConfig,
                                        ModelConfig,
                                        ParallelConfig,
                                        RunConfig,
                                        TrainConfig,
)
from megatron_ddk.config.validate import static_checks, static_errors, train_iters

__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "DDKConfig", "DistillConfig", "LoggingConfig",
    "ModelConfig", "ParallelConfig", "RunConfig", "TrainConfig", "apply_overrides",
    "config_from_data", "config_to_yaml", "dump_config", "from_dict", "load_config",
    "static_checks", "static_errors", "to_dict", "train_iters",
]
