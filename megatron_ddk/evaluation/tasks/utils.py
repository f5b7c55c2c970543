"""lm-eval hooks of megatron-ddk's local tasks (loaded by lm-eval from the task YAMLs).

process_rolling: a rolling log-likelihood -> token perplexity (weighted by the document's token
count under the manifest's tokenizer, end-of-document token included), byte perplexity and bits
per byte (weighted by the text's UTF-8 bytes). Imports nothing.
"""


def process_rolling(doc, results):
    """(loglikelihood,) of one document -> {metric: (loglikelihood, weight)}."""
    (loglikelihood,) = results
    return {"token_perplexity": (loglikelihood, int(doc["num_tokens"])),
            "byte_perplexity": (loglikelihood, int(doc["num_bytes"])),
            "bits_per_byte": (loglikelihood, int(doc["num_bytes"]))}
