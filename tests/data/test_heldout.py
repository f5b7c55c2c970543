"""megatron_ddk.data.preprocessing.heldout and tools/build_domains.py's preflight: the
train/valid/test document split against an independent walk, the largest fitting --valid-samples
against a brute-force scan, the byte bound against real token counts, and the all-at-once
refusals."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from megatron_ddk.data.preprocessing.heldout import (
    HeldOutSpec,
    byte_bound_problems,
    check_byte_bounds,
    check_domains,
    domain_seed,
    max_valid_samples,
    plan_split,
)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _reference_split(lengths, valid_target, test_target, seed, share):
    """Walk the seeded permutation: valid until its sum reaches valid_target, then test until
    its sum reaches test_target; None when no document is left or the share is exceeded."""
    order = list(np.random.default_rng(seed).permutation(len(lengths)))
    valid, test, total = [], [], 0
    while sum(lengths[i] for i in valid) < valid_target:
        if not order:
            return None
        valid.append(order.pop(0))
    while test_target > 0 and sum(lengths[i] for i in test) < test_target:
        if not order:
            return None
        test.append(order.pop(0))
    taken = sum(lengths[i] for i in valid + test)
    total = sum(lengths)
    if not order or taken > share * total:
        return None
    return sorted(int(i) for i in valid), sorted(int(i) for i in test)


@pytest.mark.parametrize("seed", [0, 3, 11])
def test_split_matches_reference_walk(seed):
    rng = np.random.default_rng(seed)
    for _ in range(30):
        lengths = rng.integers(1, 60, size=int(rng.integers(1, 30)))
        spec = HeldOutSpec(int(rng.integers(1, 6)), int(rng.integers(1, 20)),
                           int(rng.integers(0, 6)), int(rng.integers(1, 20)),
                           max_heldout_share=float(rng.uniform(0.2, 0.9)))
        got = plan_split(lengths, spec, seed)
        ref = _reference_split(list(lengths), spec.valid_tokens, spec.test_tokens, seed,
                               spec.max_heldout_share)
        if ref is None:
            assert got is None
            continue
        valid, test = got
        assert (valid.tolist(), test.tolist()) == ref
        assert not set(valid.tolist()) & set(test.tolist())
        assert lengths[valid].sum() >= spec.valid_tokens
        assert lengths[test].sum() >= spec.test_tokens


def test_valid_set_unchanged_by_adding_a_test_set():
    lengths = np.random.default_rng(1).integers(5, 80, size=200)
    without = plan_split(lengths, HeldOutSpec(10, 31, 0, 31), seed=7)
    with_test = plan_split(lengths, HeldOutSpec(10, 31, 10, 31), seed=7)
    assert without[1].size == 0 and with_test[1].size > 0
    assert without[0].tolist() == with_test[0].tolist()


def test_domain_seed_depends_on_name_only_through_crc():
    import zlib

    assert domain_seed(1234, "code") == (1234 + zlib.crc32(b"code")) % 2**32
    assert domain_seed(1234, "code") != domain_seed(1234, "prose")


@pytest.mark.parametrize("follows", [True, False])
def test_max_valid_samples_against_brute_force(follows):
    rng = np.random.default_rng(5)
    for trial in range(8):
        lengths = rng.integers(3, 60, size=int(rng.integers(2, 25)))
        spec = HeldOutSpec(1, int(rng.integers(4, 40)), 1 if follows else 3,
                           int(rng.integers(4, 40)), test_follows_valid=follows,
                           max_heldout_share=0.5)
        fits = [n for n in range(1, int(lengths.sum()) + 2)
                if plan_split(lengths, spec.with_valid_samples(n), trial) is not None]
        brute = max(fits, default=0)
        # every n below the largest fitting one fits too (what the bisection relies on)
        assert fits == list(range(1, brute + 1))
        assert max_valid_samples(lengths, spec, trial) == brute


def test_check_domains_names_every_small_domain_with_numbers():
    big = np.full(400, 50)
    small_a, small_b = np.full(6, 50), np.full(3, 40)
    spec = HeldOutSpec(10, 63, 10, 63)  # 640 + 640 tokens
    check_domains({"big": big}, spec, seed=1)  # fits: no error
    with pytest.raises(ValueError) as err:
        check_domains({"a": small_a, "big": big, "b": small_b}, spec, seed=1)
    text = str(err.value)
    assert text.startswith("2 domain(s) too small")
    assert ("domain a: the held-out sets need valid 10 x 64 + test 10 x 64 = 1280 tokens but "
            "the domain has 300 tokens in 6 documents, so nothing would be left for training"
            in text)
    assert "domain b:" in text and "120 tokens in 3 documents" in text and "domain big" not in text
    # the advice names the flags, and the largest fitting value is exact
    assert "lower --valid-samples (with --test-samples, which follows it)" in text
    assert "--valid-seq-length" in text and "--domains" in text
    # a: 150 tokens may be held out (share 0.5) in documents of 50; one valid + one test
    # sample need 64 tokens each = 2 documents each = 200 tokens: nothing fits
    assert max_valid_samples(small_a, spec, domain_seed(1, "a")) == 0
    assert "domain a:" in text and text.split("domain a:")[1].split("\n")[0].endswith(
        "no --valid-samples fits at these sequence lengths")


def test_share_limit_is_reported_as_such():
    lengths = np.full(10, 100)  # 1000 tokens
    spec = HeldOutSpec(3, 99, 3, 99)  # 600 tokens: documents remain, but 60% > 50%
    assert plan_split(lengths, spec, 0) is None
    assert plan_split(lengths, HeldOutSpec(3, 99, 3, 99, max_heldout_share=0.7), 0) is not None
    with pytest.raises(ValueError, match=r"would be 60% of it, above --max-heldout-share 0.5; "
                       r"the largest --valid-samples .* is 2"):
        check_domains({"d": lengths}, spec, seed=0)


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(valid_samples=0), r"--valid-samples \(0\) and --valid-seq-length"),
    (dict(test_samples=-1), r"--test-samples \(-1\) must be >= 0"),
    (dict(test_seq_length=0), r"--test-seq-length \(0\) >= 1"),
    (dict(max_heldout_share=1.0), r"--max-heldout-share \(1.0\) must be in \(0, 1\)"),
])
def test_spec_flag_errors(kwargs, pattern):
    args = dict(valid_samples=1, valid_seq_length=8, test_samples=1, test_seq_length=8)
    with pytest.raises(ValueError, match=pattern):
        HeldOutSpec(**dict(args, **kwargs))


def test_byte_bound_holds_for_a_real_tokenizer(tmp_path, tiny_tokenizer, make_jsonl, make_texts):
    """The bound (bytes + 3 x lines) is never below the real token count (EOD included)."""
    from megatron_ddk.data.preprocessing.build import tokenize_to_datasets

    texts = make_texts(40, seed=4) + ["\u4e2d" * 50, "emoji \U0001F600 \U0001F680", "x"]
    src = make_jsonl(tmp_path / "d.jsonl", texts)
    res = tokenize_to_datasets([src], {"text": str(tmp_path / "d")}, tiny_tokenizer)
    tokens = res.num_tokens["text"]
    # a spec needing exactly tokens + 1 held-out tokens at share 0.99 must not be refused by
    # the bound if the bound is right (it is refused only when bound x share < need)
    size = os.path.getsize(src)
    lines = len(texts)
    bound = size + 3 * lines
    assert bound >= tokens
    need_just_above_bound = HeldOutSpec(1, int(bound * 0.99) + 5, 0, 1, max_heldout_share=0.99)
    assert byte_bound_problems({"d": [src]}, need_just_above_bound)
    need_real = HeldOutSpec(1, int(tokens * 0.99) - 2, 0, 1, max_heldout_share=0.99)
    assert byte_bound_problems({"d": [src]}, need_real) == []


def test_byte_bound_lists_every_domain(tmp_path, make_jsonl):
    a = make_jsonl(tmp_path / "a.jsonl", ["short text"] * 5)
    b = make_jsonl(tmp_path / "b.jsonl", ["other"] * 3)
    spec = HeldOutSpec(500, 4096, 500, 4096)
    with pytest.raises(ValueError) as err:
        check_byte_bounds({"a": [a], "b": [b]}, spec)
    text = str(err.value)
    assert "2 domain(s) too small" in text
    assert f"domain a: the held-out sets need valid 500 x 4097 + test 500 x 4097 = 4097000 " \
           f"tokens but its {os.path.getsize(a)} bytes of files hold at most" in text
    assert "domain b:" in text


def _tool():
    from megatron_ddk.commands import build_domains

    return build_domains


class _Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _build(capsys, tmp_path, corpus, tok, *flags):
    """`megatron-ddk build-domains` main() in this process (its exit code, stdout, stderr)."""
    args = ["--input", str(corpus), "--output-dir", str(tmp_path / "out"), "--workers", "1",
            "--min-heldout-documents", "1", *tok, *flags]
    try:
        code = _tool().main(args)
    except ValueError as err:  # cli.run_tool: one `error:` line, exit 2
        code = 2
        print(f"error: {err}", file=sys.stderr)
    out = capsys.readouterr()
    return _Result(code, out.out, out.err)


def test_build_domains_preflight_after_tokenizing(tmp_path, tiny_tokenizer, make_jsonl,
                                                  make_texts, capsys):
    """Two domains pass the byte bound but fail the exact check: both are reported, with the
    exact largest --valid-samples, and nothing is written; --dry-run prints the table; the
    numbers the preflight suggests then build."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    make_jsonl(corpus / "big.jsonl", make_texts(120, seed=1))
    make_jsonl(corpus / "small1.jsonl", make_texts(12, seed=2))
    make_jsonl(corpus / "small2.jsonl", make_texts(10, seed=3))
    tok = ["--tokenizer-model", tiny_tokenizer]
    res = _build(capsys, tmp_path, corpus, tok, "--valid-samples", "12", "--valid-seq-length", "63")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "2 domain(s) too small" in res.stderr
    assert "domain small1:" in res.stderr and "domain small2:" in res.stderr
    assert "domain big:" not in res.stderr
    out = tmp_path / "out"
    assert not any(f.endswith((".bin", ".idx", ".yaml")) for _, _, fs in os.walk(out)
                   for f in fs)
    dry = _build(capsys, tmp_path, corpus, tok, "--valid-samples", "12", "--valid-seq-length", "63",
                 "--dry-run")
    assert dry.returncode == 2 and "max --valid-samples" in dry.stdout
    row = next(ln for ln in dry.stdout.split("preflight:")[1].splitlines()
               if ln.startswith("small2"))
    fit = int(row.split()[-1].replace(",", ""))
    assert f"is {fit}" in dry.stderr.split("domain small2:")[1].splitlines()[0]
    ok = _build(capsys, tmp_path, corpus, tok, "--valid-samples", str(fit),
                "--valid-seq-length", "63", "--dry-run")
    assert ok.returncode == 0 and "dry run: nothing written" in ok.stdout
    assert not os.path.exists(out / "manifest.yaml")
    built = _build(capsys, tmp_path, corpus, tok, "--valid-samples", str(fit),
                   "--valid-seq-length", "63", "--test-samples", "2", "--test-seq-length", "31")
    assert built.returncode == 0, built.stderr
    from megatron_ddk.data.manifest import load_manifest

    m = load_manifest(str(out / "manifest.yaml"))
    assert m.version == 2 and m.has_test_split()
    for d in m.domains:
        assert d.num_valid_tokens >= fit * 64 and d.num_test_tokens >= 2 * 32
    assert not [f for _, _, fs in os.walk(out) for f in fs if ".tmp" in f or f.startswith(".all")]
