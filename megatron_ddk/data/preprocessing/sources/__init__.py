"""Corpora as users have them -> one spill file per domain, for build_domains' usual build.

- readers.py: the input formats (JSONL, .jsonl.gz / .jsonl.zst, plain text, Parquet files or
  folders, `datasets.save_to_disk` Arrow folders) as one stream of records;
- the optional packages (pyarrow, zstandard, scikit-learn) and the extra that installs each are
  decided in one place, megatron_ddk/config/optional.py;
- labels.py: domain names from a record field or a cluster id (sanitised, renamed and merged by a
  domain map), the per-domain spill files and the small-domain rule;
- cluster.py / cluster_report.py: automatic domains (hashed TF-IDF + mini-batch k-means on a
  bounded sample, one streaming assignment pass) and the report beside the manifest;
- prepare.py: what build_domains calls: inputs + options -> DomainInputs under the staging folder.

Everything here stays cheap to import: no torch, no megatron.core; the optional packages are
imported when a format or clustering needs them.
"""
