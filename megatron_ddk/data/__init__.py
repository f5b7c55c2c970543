"""Data layer of megatron-ddk: tokenizer, raw corpora, preprocessing to Megatron-Core indexed
datasets (.bin/.idx), the domain manifest, and (in other modules) the per-domain datasets and the
interval mixture.

Import the submodules you need (megatron_ddk.data.manifest, .tokenizer, .preprocess, ...); this
package file imports nothing so that `import megatron_ddk.data` stays cheap.
"""
