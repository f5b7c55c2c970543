"""Domain labels -> domain names -> one spill file per domain.

A label is a record's domain field value (`meta.redpajama_set_name`: "ArXiv") or a cluster's id
("cluster_03"). The domain map renames or merges labels ({"Github": "code", "StackExchange":
"code"}); the result is sanitised to the manifest's domain-name rule (corpus.domain_name: runs of
other characters become "_", "Wikipedia (en)" -> "Wikipedia_en"); two labels that sanitise to one
name without the map saying so are an error (merge them through the map if that is meant).

SpillWriter appends each document as {"text": ...} to <folder>/<name>.jsonl, so build_domains
tokenizes a mixed corpus exactly as it tokenizes a per-domain folder; at most MAX_OPEN_FILES
are open at once (more domains reopen in append mode), memory is one document. After the pass,
apply_min_documents merges (or refuses) labels with fewer than --min-domain-documents documents.

Cheap to import (the standard library and corpus.py).
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from megatron_ddk.data.preprocessing.corpus import DOMAIN_NAME_RULE, DomainInput, domain_name

logger = logging.getLogger(__name__)

MAX_OPEN_FILES = 64
"""Spill files kept open at once (a field with thousands of values reopens them)."""

OTHER = "other"
"""The domain small labels are merged into (--small-domains other)."""


def parse_domain_map(spec: Optional[str]) -> Dict[str, str]:
    """--domain-map: a .yaml/.yml/.json file, an inline JSON object, or `a=b,c=b`."""
    if not spec:
        return {}
    if spec.lower().endswith((".yaml", ".yml", ".json")):
        if not os.path.isfile(spec):
            raise ValueError(f"--domain-map {spec}: no such file")
        import yaml

        with open(spec) as f:
            try:
                data = yaml.safe_load(f)
            except yaml.YAMLError as err:
                raise ValueError(f"--domain-map {spec}: not valid YAML/JSON ({err})") from None
    elif spec.lstrip().startswith("{"):
        try:
            data = json.loads(spec)
        except json.JSONDecodeError as err:
            raise ValueError(f"--domain-map {spec!r}: not a JSON object ({err})") from None
    else:
        data = {}
        for item in spec.split(","):
            value, sep, name = item.partition("=")
            if not sep or not value.strip() or not name.strip():
                raise ValueError(f"--domain-map item {item!r}: expected value=name (e.g. "
                                 "Github=code,StackExchange=code) or a .yaml/.json file")
            data[value.strip()] = name.strip()
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in data.items()):
        raise ValueError(f"--domain-map {spec}: expected a mapping of label -> domain name "
                         "(strings)")
    return data


@dataclass
class LabelStats:
    """What one label became and how much of it there is."""

    label: str
    """The field value or cluster id as found."""

    spill: str
    """Its spill file's domain name (after the map and sanitising)."""

    name: str = ""
    """The domain it went to in the end (after the small-domain rule too)."""

    num_documents: int = 0
    """Documents (records) with this label."""

    num_bytes: int = 0
    """UTF-8 bytes of their text."""


class SpillWriter:
    """Per-domain spill files under one folder; see the module docstring."""

    def __init__(self, folder: str, domain_map: Optional[Dict[str, str]] = None) -> None:
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self.domain_map = dict(domain_map or {})
        self.labels: Dict[str, LabelStats] = {}
        self._origin: Dict[str, str] = {}  # sanitised name -> the mapped label that made it
        self._open: "OrderedDict[str, object]" = OrderedDict()

    def name_of(self, label: str) -> str:
        """The domain name of a label (module docstring); ValueError for a collision."""
        stats = self.labels.get(label)
        if stats is not None:
            return stats.spill
        mapped = self.domain_map.get(label, label)
        name = domain_name(mapped)
        if name is None:
            raise ValueError(f"domain label {label!r} (mapped to {mapped!r}) leaves no "
                             f"characters of {DOMAIN_NAME_RULE}; give it a name with "
                             f"--domain-map {label}=NAME")
        origin = self._origin.setdefault(name, mapped)
        if origin != mapped:
            raise ValueError(f"domain labels {origin!r} and {mapped!r} both become domain "
                             f"{name!r}; merge them on purpose with --domain-map "
                             f"'{mapped}={name}' or give one another name")
        self.labels[label] = LabelStats(label, name, name)
        return name

    def path(self, name: str) -> str:
        """The spill file of a domain."""
        return os.path.join(self.folder, f"{name}.jsonl")

    def _handle(self, name: str):
        f = self._open.pop(name, None)
        if f is None:
            if len(self._open) >= MAX_OPEN_FILES:
                self._open.popitem(last=False)[1].close()
            f = open(self.path(name), "ab")
        self._open[name] = f
        return f

    def write(self, label: str, text: str) -> None:
        """Append one document of `label` to its domain's spill file."""
        name = self.name_of(label)
        data = text.encode("utf-8")
        stats = self.labels[label]
        stats.num_documents += 1
        stats.num_bytes += len(data)
        self._handle(name).write(json.dumps({"text": text}, ensure_ascii=False)
                                 .encode("utf-8") + b"\n")

    def close(self) -> None:
        """Close every spill file (idempotent)."""
        while self._open:
            self._open.popitem()[1].close()


@dataclass
class SmallDomainRule:
    """--min-domain-documents / --small-domains."""

    min_documents: int = 0
    """Labels with fewer documents are small (0: none is)."""

    policy: str = "other"
    """'other': merge small labels into the domain `other`; 'refuse': stop, naming them."""


def apply_min_documents(writer: SpillWriter, rule: SmallDomainRule) -> List[DomainInput]:
    """The domains of a finished spill, small labels merged into `other` (or refused): each a
    DomainInput of its spill files (a merged domain lists several, in label order)."""
    per_name: Dict[str, List[LabelStats]] = {}
    for stats in writer.labels.values():
        per_name.setdefault(stats.spill, []).append(stats)
    small = sorted(n for n, group in per_name.items()
                   if sum(s.num_documents for s in group) < rule.min_documents)
    if small and rule.policy == "refuse":
        listing = ", ".join(f"{n} ({sum(s.num_documents for s in per_name[n])} documents; "
                            f"labels {[s.label for s in per_name[n]]})" for n in small)
        raise ValueError(f"{len(small)} domain(s) have fewer than --min-domain-documents "
                         f"{rule.min_documents} documents: {listing}; merge them into "
                         f"'{OTHER}' with --small-domains other, rename or merge them with "
                         "--domain-map, or lower --min-domain-documents")
    paths: Dict[str, List[str]] = {}
    for name in sorted(per_name):
        target = OTHER if name in small else name
        paths.setdefault(target, []).append(writer.path(name))
        for stats in per_name[name]:
            stats.name = target
    if small:
        logger.warning("merged %d small domain(s) into %r: %s", len(small), OTHER, small)
    return [DomainInput(name=n, paths=sorted(paths[n])) for n in sorted(paths)]


@dataclass
class LabelReport:
    """domain_sources.json: which label went to which domain (written beside the manifest)."""

    mode: str
    """'field' (a record field named the domain) or 'cluster'."""

    source: str
    """The field's dotted path, or 'auto:K'."""

    labels: List[LabelStats] = field(default_factory=list)
    """Every label, sorted."""

    def to_json(self) -> str:
        """The file's text."""
        rows = [{"label": s.label, "domain": s.name, "documents": s.num_documents,
                 "bytes": s.num_bytes} for s in self.labels]
        return json.dumps({"mode": self.mode, "source": self.source, "labels": rows},
                          indent=1, ensure_ascii=False) + "\n"

    def lines(self) -> List[str]:
        """The table build_domains prints."""
        width = max([len(s.label) for s in self.labels] + [5])
        out = [f"{'label':<{width}}  {'domain':<20} {'documents':>10} {'bytes':>12}"]
        out += [f"{s.label:<{width}}  {s.name:<20} {s.num_documents:>10,} {s.num_bytes:>12,}"
                for s in self.labels]
        return out


def label_report(writer: SpillWriter, mode: str, source: str) -> LabelReport:
    """The report of a finished spill (after apply_min_documents)."""
    return LabelReport(mode, source, [writer.labels[k] for k in sorted(writer.labels)])

