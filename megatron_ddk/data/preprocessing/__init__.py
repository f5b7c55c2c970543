"""Preprocessing: raw corpora -> Megatron-Core indexed datasets and the domain manifest's inputs.

What `megatron-ddk build-domains`, `preprocess` and `train-tokenizer` run, before any training;
nothing here is imported at train time (what training reads back, check_dataset and the
tokenizer record, is megatron_ddk/data/dataset_files.py):

- corpus.py: the raw input formats (JSONL, .txt), domain folders, the tokenizer's text sample;
- sources/: corpora as users have them (mixed JSONL / Parquet / Arrow, automatic domains) ->
  one spill file per domain;
- pieces.py / sentences.py: long documents cut at paragraph and line boundaries; sentence
  splitting for --split-sentences (nltk punkt);
- engine.py: the streaming encoder (lines -> token ids in worker processes, in input order);
  writer.py: the bounded-memory .bin/.idx writer; progress.py: the progress bar / lines;
- build.py: files -> one dataset per json key (tokenize_to_datasets) and the staged,
  all-or-nothing build-domains output (StagedBuild);
- heldout.py / domain_split.py: the per-domain train / valid / test hold-out, planned and written;
- megatron_cli.py: Megatron-LM's preprocess_data.py command line on this engine.

Cheap to import: this file imports nothing; the modules import no torch and megatron.core only
lazily (to read datasets back).
"""
