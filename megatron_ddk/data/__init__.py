"""Data layer of megatron-ddk: tokenizer, the domain manifest, the per-domain datasets, the
interval mixture and the offline teacher store; preprocessing (raw corpora -> Megatron-Core
indexed datasets (.bin/.idx), the held-out split) is the preprocessing/ sub-package.

Import the submodules you need (megatron_ddk.data.manifest, .tokenizer, .preprocessing.build,
...); this package file imports nothing so that `import megatron_ddk.data` stays cheap.
"""
