"""Tests of megatron_ddk.models."""
