"""One command: a folder of per-domain JSONL -> train + valid + test datasets + manifest.yaml.

Each <name>.jsonl (or <name>.txt, or <name>/ folder of them) in --input is a domain. Every domain
is tokenized (multi-process, output independent of --workers), documents longer than
--max-piece-bytes cut into pieces at paragraph / line boundaries; then pieces drawn in a seeded
random order (every source document's first piece before any second one) are held out: into
valid (DDK's steering set) until they hold --valid-samples x (--valid-seq-length + 1) tokens
(paper defaults 500 x 4097), then into test (reports only) until they hold --test-samples x
(--test-seq-length + 1) tokens (defaults: the valid ones); each set must hold at least
--min-heldout-documents pieces. The rest is the training set, its pieces joined back into
whole runs of text. Writes

    <output-dir>/<name>/{train,valid,test}_text_document.bin/.idx
    <output-dir>/manifest.yaml        (last, only when every domain succeeded)

Everything is built under <output-dir>/.staging-<pid> and moved into place only when every
domain succeeded (the manifest last): a failed or interrupted rebuild leaves the previous
manifest, datasets and tokenizer byte for byte (a killed build's staging folder is removed by
the next build). The index caches beside the manifest (<manifest folder>/cache) are cleared when
a rebuild replaces the datasets (Megatron-Core keys them by path, not content).

    python tools/build_domains.py --input corpus/ --output-dir datasets/ \\
        --tokenizer-model tokenizer/ddk.model [--train-tokenizer --vocab-size 8000]

Preflight: before the tokenizer is trained, the files' sizes bound each domain's tokens; after
tokenization every domain is measured; either check lists every domain too small for the
held-out sets at once (tokens needed vs available, the largest --valid-samples that fits) and
writes nothing. --dry-run stops after measuring and prints that table.

With --train-tokenizer, a SentencePiece model is first trained on the domains (equal shares by
default) and written to --tokenizer-model (see tools/train_tokenizer.py for its flags).

A mixed corpus (docs/data.md, "Four ways in") is first read in one streaming pass into one spill
file per domain under the staging folder (megatron_ddk/data/preprocessing/sources/), then built
as above:

    megatron-ddk build-domains --input 'shards/*.jsonl.zst' \\
        --domain-field meta.redpajama_set_name ...
    megatron-ddk build-domains --input train.parquet --domains auto:4-12 ...

writing domain_sources.json (label -> domain) and, for auto:K, cluster_assignment.npy/.json and
clusters.json/.md beside the datasets.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from typing import List, Optional

from megatron_ddk.commands.train_tokenizer import add_training_args, train_from_args
from megatron_ddk.console import messages, results

warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")


def _parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, action="extend", nargs="+",
                   help="a corpus folder of per-domain files (<domain>.jsonl / .txt); or, with "
                   "--domain-field or --domains auto:K, files, folders and globs of a mixed "
                   "corpus (.jsonl, .jsonl.gz, .jsonl.zst, .txt, .parquet, datasets "
                   "save_to_disk folders); repeatable")
    p.add_argument("--output-dir", required=True, help="where datasets and manifest go")
    p.add_argument("--manifest", default=None, help="default: <output-dir>/manifest.yaml")
    p.add_argument("--tokenizer-model", required=True,
                   help="SentencePiece .model or tokenizer.json (written with --train-tokenizer)")
    p.add_argument("--train-tokenizer", action="store_true",
                   help="train a SentencePiece model on the domains first, at --tokenizer-model")
    p.add_argument("--domains", default=None,
                   help="comma-separated subset/order of domains; or auto:K / auto:A-B to "
                   "cluster the documents into K domains (A to B: the best silhouette)")
    p.add_argument("--valid-samples", type=int, default=500,
                   help="validation samples per domain (paper: 500)")
    p.add_argument("--valid-seq-length", type=int, default=4096,
                   help="tokens per validation sample; each needs seq_length + 1 tokens")
    p.add_argument("--test-samples", type=int, default=None,
                   help="test samples per domain (reports only; default: --valid-samples; "
                   "0: no test set)")
    p.add_argument("--test-seq-length", type=int, default=None,
                   help="tokens per test sample (default: --valid-seq-length)")
    p.add_argument("--max-heldout-share", type=float, default=0.5,
                   help="largest share of a domain's tokens valid + test may take (default 0.5)")
    p.add_argument("--max-piece-bytes", type=int, default=1024,
                   help="documents longer than this (UTF-8 bytes) are cut into pieces at "
                   "paragraph / line boundaries before the held-out draw, so held-out sets "
                   "spread over many documents; training joins its pieces back (default "
                   "1024; 0: never cut)")
    p.add_argument("--min-heldout-documents", type=int, default=16,
                   help="fewest documents (pieces) each valid and test set must hold "
                   "(default 16): a set of one or two documents measures those documents")
    p.add_argument("--dry-run", action="store_true",
                   help="measure every domain, print what the split needs and the largest "
                   "--valid-samples that fits, write no datasets")
    p.add_argument("--initial-weights", default=None,
                   help="name=weight,... stored as initial_weight in the manifest")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--skip-malformed", action="store_true",
                   help="skip and count malformed lines instead of stopping")
    _add_source_args(p)
    add_training_args(p)
    return p.parse_args(argv)


def _add_source_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mixed corpora (docs/data.md)")
    g.add_argument("--text-key", "--json-keys", dest="text_key", default="text",
                   help="record field holding the document (Megatron-LM's --json-keys; "
                   "default text)")
    g.add_argument("--domain-field", default=None,
                   help="dotted path of the record field naming its domain, e.g. "
                   "meta.redpajama_set_name: each value becomes a domain")
    g.add_argument("--default-domain", default=None,
                   help="domain of records without --domain-field (default: an error naming "
                   "file and line)")
    g.add_argument("--domain-map", default=None,
                   help="rename / merge labels: a .yaml/.json file of label: domain, or "
                   "Github=code,StackExchange=code")
    g.add_argument("--min-domain-documents", type=int, default=0,
                   help="labels with fewer documents are small (default 0: none)")
    g.add_argument("--small-domains", choices=["other", "refuse"], default="other",
                   help="small labels: merged into a domain 'other' (default), or refused")
    g.add_argument("--cluster-sample", type=int, default=20000,
                   help="documents the clustering is fitted on (auto:K; default 20000)")


def source_options(args: argparse.Namespace):
    """The SourceOptions of a mixed corpus, or None for a per-domain folder read as it is."""
    from megatron_ddk.data.preprocessing.corpus import discover_domains
    from megatron_ddk.data.preprocessing.sources.cluster import ClusterSpec, parse_auto
    from megatron_ddk.data.preprocessing.sources.labels import SmallDomainRule, parse_domain_map
    from megatron_ddk.data.preprocessing.sources.prepare import SourceOptions

    auto = parse_auto(args.domains)
    folder = len(args.input) == 1 and os.path.isdir(args.input[0])
    if auto and args.domain_field:
        raise ValueError("give --domain-field or --domains auto:K, not both")
    if not auto and not args.domain_field:
        if not folder:
            raise ValueError(f"--input {' '.join(args.input)}: a mixed corpus (files, globs, "
                             "several inputs) needs --domain-field FIELD or --domains auto:K; a "
                             "per-domain corpus is one folder of <domain>.jsonl / .txt files")
        if args.text_key == "text" and not args.domain_map:
            return None
    if args.min_domain_documents < 0 or args.cluster_sample < 1:
        raise ValueError("--min-domain-documents must be >= 0 and --cluster-sample >= 1")
    opts = SourceOptions(
        inputs=list(args.input), text_key=args.text_key, domain_field=args.domain_field,
        default_domain=args.default_domain, domain_map=parse_domain_map(args.domain_map),
        small=SmallDomainRule(args.min_domain_documents, args.small_domains),
        skip_malformed=args.skip_malformed)
    if auto:
        opts.cluster = ClusterSpec(*auto, sample=args.cluster_sample, seed=args.seed)
    elif not args.domain_field:
        opts.by_file = discover_domains(args.input[0])
    return opts


def _select(domains, spec: Optional[str]):
    if not spec or spec.strip().startswith("auto"):
        return domains
    by_name = {d.name: d for d in domains}
    wanted = [n.strip() for n in spec.split(",") if n.strip()]
    missing = [n for n in wanted if n not in by_name]
    if missing:
        raise ValueError(f"--domains {missing} not found in the corpus folder; found "
                         f"{sorted(by_name)}")
    return [by_name[n] for n in wanted]


def _initial_weights(spec: Optional[str], names: List[str]) -> dict:
    out = {}
    for item in (spec.split(",") if spec else []):
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in names:
            raise ValueError(f"--initial-weights item {item!r}: expected name=weight with name "
                             f"one of {names}")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--initial-weights item {item!r}: not a number") from None
    return out


def heldout_spec(args: argparse.Namespace):
    """The HeldOutSpec of the flags (test defaults to the valid settings)."""
    from megatron_ddk.data.preprocessing.heldout import HeldOutSpec

    return HeldOutSpec(
        args.valid_samples, args.valid_seq_length,
        args.valid_samples if args.test_samples is None else args.test_samples,
        args.valid_seq_length if args.test_seq_length is None else args.test_seq_length,
        test_follows_valid=args.test_samples is None, max_heldout_share=args.max_heldout_share,
        min_documents=args.min_heldout_documents)


def _tokenize_all(domains, args, out_dir: str) -> list:
    """Every domain tokenized to its temporary dataset under out_dir (all removed again on
    failure)."""
    from megatron_ddk.data.preprocessing.domain_split import tokenize_domain

    if args.max_piece_bytes < 0:
        raise ValueError(f"--max-piece-bytes ({args.max_piece_bytes}) must be >= 0 (0: never "
                         "cut documents)")
    done = []
    try:
        for domain in domains:
            start = time.perf_counter()
            done.append(tokenize_domain(domain.name, domain.paths, out_dir,
                                        args.tokenizer_model, workers=args.workers,
                                        skip_malformed=args.skip_malformed, progress=True,
                                        max_piece_bytes=args.max_piece_bytes))
            results().info(f"{domain.name}: tokenized in {time.perf_counter() - start:.1f}s")
    except BaseException:
        for t in done:
            t.discard()
        raise
    return done


def _print_preflight(tokenized, spec, seed: int) -> None:
    from megatron_ddk.data.preprocessing.heldout import split_summary

    fits = split_summary({t.name: t.lengths for t in tokenized}, spec, seed,
                         {t.name: t.sources for t in tokenized})
    results().info(f"\npreflight: each domain's held-out sets need {spec.describe()}, at least "
                   f"{spec.min_documents} documents each")
    results().info(f"{'domain':<16} {'sources':>8} {'pieces':>8} {'tokens':>12} "
                   f"{'held-out share':>14} {'max --valid-samples':>19}")
    for t in tokenized:
        total = int(t.lengths.sum())
        share = (spec.valid_tokens + spec.test_tokens) / max(total, 1)
        results().info(f"{t.name:<16} {t.num_sources:>8,} {t.lengths.size:>8,} {total:>12,} "
                       f"{share:>13.1%} {fits[t.name]:>19,}")


def _staged_tokenizer(args: argparse.Namespace, stage, domains) -> list:
    """With --train-tokenizer: train into the staging folder, point args.tokenizer_model there
    and return the (staged, final) moves of its files; else []."""
    if not args.train_tokenizer:
        return []
    prefix = args.tokenizer_model
    prefix = os.path.abspath(prefix[:-len(".model")] if prefix.endswith(".model") else prefix)
    staged = os.path.join(stage.folder, ".tokenizer", os.path.basename(prefix))
    args.tokenizer_model = train_from_args(args, domains, staged, args.skip_malformed)
    meta = "tokenizer_metadata.json"
    return [(staged + ".model", prefix + ".model"), (staged + ".vocab", prefix + ".vocab"),
            (os.path.join(os.path.dirname(staged), meta),
             os.path.join(os.path.dirname(prefix), meta))]


def _dataset_moves(stage, entries) -> list:
    """(staged file, final file) of every dataset; (None, final) removes an old test set."""
    from megatron_ddk.data.dataset_files import DATASET_FILES

    moves = []
    for e in entries:
        prefixes = [*e.train_prefixes, e.valid_prefix]
        prefixes += [e.test_prefix] if e.test_prefix else []
        for prefix in prefixes:
            moves += [(prefix + s if os.path.exists(prefix + s) else None,
                       stage.final(prefix + s)) for s in DATASET_FILES]
        if not e.test_prefix:
            test = stage.final(os.path.join(os.path.dirname(e.valid_prefix), "test_text_document"))
            moves += [(None, test + s) for s in DATASET_FILES]
    return moves


def _finalize(stage, entries) -> None:
    """Point every entry at the final paths (after the swap)."""
    for e in entries:
        e.train_prefixes = [stage.final(p) for p in e.train_prefixes]
        e.valid_prefix = stage.final(e.valid_prefix)
        e.test_prefix = stage.final(e.test_prefix) if e.test_prefix else None


def _report_moves(stage, made: List[str]) -> list:
    """(staged, final) of the report files a mixed corpus made; (None, final) for the others."""
    from megatron_ddk.data.preprocessing.sources.prepare import REPORT_FILES

    return [(os.path.join(stage.folder, n) if n in made else None,
             os.path.join(stage.out_dir, n)) for n in REPORT_FILES]


def _build_staged(args, stage, domains, spec, weights, manifest_path: str,
                  reports: Optional[List[str]] = None) -> Optional[str]:
    from megatron_ddk.data.manifest import DomainManifest, load_manifest, save_manifest
    from megatron_ddk.data.preprocessing.domain_split import split_domain
    from megatron_ddk.data.preprocessing.heldout import check_domains
    from megatron_ddk.data.tokenizer import build_tokenizer, tokenizer_hash

    tokenizer_moves = _staged_tokenizer(args, stage, domains)
    tok = build_tokenizer(args.tokenizer_model)  # a bad tokenizer fails before anything is built
    tokenized = _tokenize_all(domains, args, stage.folder)
    try:
        _print_preflight(tokenized, spec, args.seed)
        check_domains({t.name: t.lengths for t in tokenized}, spec, args.seed,
                      {t.name: t.sources for t in tokenized})
        if args.dry_run:
            return None
        entries = []
        for t in tokenized:
            entry = split_domain(t, spec, args.seed)
            entry.initial_weight = weights.get(t.name)
            entries.append(entry)
    finally:
        for t in tokenized:
            t.discard()
    digest = tokenizer_hash(args.tokenizer_model)
    manifest = DomainManifest(path="", tokenizer_model=os.path.abspath(args.tokenizer_model),
                              tokenizer_hash=digest, vocab_size=int(tok.vocab_size),
                              domains=entries)
    staged_manifest = os.path.join(stage.folder, "manifest.yaml")
    save_manifest(manifest, staged_manifest)
    load_manifest(staged_manifest, expected_tokenizer_hash=digest)  # the staged build reads back
    # The old manifest goes aside first (no manifest ever names a half-swapped build), stale
    # index caches of the old datasets (keyed by path, not content) with it; the new one last.
    cache = os.path.join(os.path.dirname(manifest_path), "cache")
    stage.swap_in([(None, manifest_path), (None, cache), *tokenizer_moves,
                   *_dataset_moves(stage, entries), *_report_moves(stage, reports or [])])
    try:
        _finalize(stage, entries)
        if tokenizer_moves:
            manifest.tokenizer_model = tokenizer_moves[0][1]
        save_manifest(manifest, manifest_path)
        stage.mark_done()
    except BaseException:
        stage.roll_back()
        raise
    load_manifest(manifest_path, expected_tokenizer_hash=digest)
    return manifest_path


def _check_bounds(args, domains, spec) -> None:
    from megatron_ddk.data.preprocessing.heldout import byte_bound_problems, check_byte_bounds

    if args.dry_run:  # measure exactly below instead of stopping at the bound
        for line in byte_bound_problems({d.name: d.paths for d in domains}, spec):
            results().info(f"note: {line}")
    else:
        check_byte_bounds({d.name: d.paths for d in domains}, spec)  # before any slow step


def _prepare(stage, opts):
    """A mixed corpus read into per-domain spill files in the staging folder: (domains, the
    report files made)."""
    from megatron_ddk.data.preprocessing.sources.prepare import prepare_sources

    prepared = prepare_sources(opts, stage.folder, stage.out_dir)
    for line in prepared.lines:
        results().info(line)
    return prepared.domains, prepared.report_files


def build(args: argparse.Namespace) -> Optional[str]:
    """Run the whole pipeline; return the manifest path (None for --dry-run). Everything is
    built under <output-dir>/.staging-<pid> and swapped in only when every domain succeeded:
    a failed or interrupted rebuild leaves the previous manifest, datasets and tokenizer as they
    were. A mixed corpus is first read into per-domain spill files there
    (data/preprocessing/sources/)."""
    from megatron_ddk.atomic import check_writable_folder
    from megatron_ddk.data.preprocessing.build import StagedBuild
    from megatron_ddk.data.preprocessing.corpus import discover_domains

    spec = heldout_spec(args)
    opts = source_options(args)
    if opts is None:  # a per-domain folder, read as it is
        domains = _select(discover_domains(args.input[0]), args.domains)
        weights = _initial_weights(args.initial_weights, [d.name for d in domains])
        _check_bounds(args, domains, spec)
    manifest_path = os.path.abspath(args.manifest or os.path.join(args.output_dir,
                                                                  "manifest.yaml"))
    check_writable_folder(os.path.abspath(args.output_dir), "--output-dir")
    check_writable_folder(os.path.dirname(manifest_path), "--manifest")
    stage = StagedBuild(args.output_dir)
    try:
        reports: List[str] = []
        if opts is not None:
            domains, reports = _prepare(stage, opts)
            domains = _select(domains, args.domains)
            weights = _initial_weights(args.initial_weights, [d.name for d in domains])
            _check_bounds(args, domains, spec)
        return _build_staged(args, stage, domains, spec, weights, manifest_path, reports)
    finally:
        stage.close()


def _print_table(manifest_path: str) -> None:
    from megatron_ddk.data.manifest import load_manifest

    m = load_manifest(manifest_path)
    results().info(f"\n{'domain':<16} {'split':<6} {'documents':>10} {'sources':>8} {'tokens':>12} "
                   f"{'natural w':>9}")
    for d, w in zip(m.domains, m.natural_weights()):
        for split in ("train", "valid", "test"):
            docs = getattr(d, f"num_{split}_documents")
            if docs is None:
                continue
            srcs = getattr(d, f"num_{split}_sources")
            results().info(f"{d.name if split == 'train' else '':<16} {split:<6} {docs:>10,} "
                           f"{'-' if srcs is None else format(srcs, ','):>8} "
                           f"{getattr(d, f'num_{split}_tokens'):>12,} "
                           f"{format(w, '.3f') if split == 'train' else '':>9}")
    results().info(f"\ntokenizer {m.tokenizer_model} ({m.tokenizer_hash}, vocab {m.vocab_size})")
    results().info(f"manifest  {m.path}")


def main(argv: Optional[List[str]] = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:  # a user error (ValueError) or a dead worker: one `error:` line (cli.run_tool)
        manifest_path = build(args)
    except KeyboardInterrupt:
        messages().info("\ninterrupted: nothing was changed (an earlier build is as it was)")
        sys.exit(130)
    if manifest_path is None:
        results().info(f"dry run: nothing written ({time.perf_counter() - start:.1f}s)")
        return 0
    _print_table(manifest_path)
    results().info(f"done in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    main()
