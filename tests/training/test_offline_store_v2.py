"""Format-2 stores end to end (real processes): `megatron-ddk cache-teacher` writes them,
`distill.teacher_logits` runs read them.

References are independent of the store code: the online DDK run with the real teacher (a
format-2 store with K = the vocabulary, top_p = 1 and float32 log-probabilities must reproduce
it), an uninterrupted run (resume must be bit-exact), a TP = 1 run on the same store (TP = 2 must
equal it), and a format-1 store written by the same producer (it must still train).
"""

import json
import math
import os

import pytest

from megatron_ddk.testing import tiny_run

VOCAB = 512  # tiny_run.build_tiny_domains' tokenizer
COVER = 40
STEPS, INTERVAL, GBS = 10, 2, 8
EXACT = ("loss", "lm_loss", "kd_loss", "lr", "grad_norm", "consumed_samples", "weights", "step")


def records(run_dir, kind):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def cache(cfg_path, out, *flags):
    tiny_run.run_tool(["-m", "megatron_ddk.cli", "cache-teacher", "--config", cfg_path, "--out",
                       out, "--max-samples-per-domain", str(COVER), "--shard-samples", "8",
                       *flags])
    return out


def train_on(cfg_path, store, run_dir, *extra, nproc=1):
    tiny_run.train(cfg_path, nproc=nproc, overrides=[
        f"distill.teacher_logits={store}", f"logging.run_dir={run_dir}",
        f"checkpoint.save={run_dir}/ckpt", *extra])
    return str(run_dir)


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("store_v2")
    cfg = tiny_run.run_config(tiny["manifest"], str(root / "online"), teacher_load=tiny["teacher"],
                              policy="ddk", train_iters=STEPS, interval=INTERVAL)
    cfg["checkpoint"]["save_interval"] = 3
    cfg_path = tiny_run.write_config(cfg, str(root / "online" / "run.yaml"))
    tiny_run.train(cfg_path)  # the online reference
    zstd = []
    try:
        import zstandard  # noqa: F401
        zstd = ["--compression", "zstd"]
    except ImportError:
        pass
    stores = {
        "full": cache(cfg_path, str(root / "full"), "--top-k", str(VOCAB), "--top-p", "1",
                      "--logprob-codec", "float32"),
        "compact": cache(cfg_path, str(root / "compact"), "--top-k", "128", "--top-p", "0.3",
                         "--logprob-codec", "q8", *zstd),
    }
    return {"root": root, "cfg": cfg_path, "online": str(root / "online"), **stores}


def test_full_vocabulary_v2_store_reproduces_online_ddk(setup):
    header = json.load(open(os.path.join(setup["full"], "header.json")))
    assert header["format_version"] == 2 and header["entries_per_token"] == VOCAB
    assert header["encoding"]["id_codec"] == "ef"  # the producer's default: Elias-Fano ids
    off = train_on(setup["cfg"], setup["full"], setup["root"] / "off_full")
    a, b = records(setup["online"], "step"), records(off, "step")
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        for key in ("loss", "lm_loss", "kd_loss", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), (ra["step"], key)
    for ra, rb in zip(records(setup["online"], "interval"), records(off, "interval")):
        assert rb["weights"] == pytest.approx(ra["weights"], rel=1e-5)


@pytest.fixture(scope="module")
def compact_run(setup):
    return train_on(setup["cfg"], setup["compact"], setup["root"] / "off_compact")


def test_compact_store_is_small_and_serves_every_sample(setup, compact_run):
    header = json.load(open(os.path.join(setup["compact"], "header.json")))
    assert header["encoding"]["id_bits"] == 9 and header["encoding"]["logprob_codec"] == "q8"
    assert header["encoding"]["id_codec"] == "ef"
    # the tiny teacher is flat: ~68 of its 512 tokens reach 0.3 (adaptive, below K = 128)
    assert 1 <= header["entries_per_token"] < 128
    v1 = 128 * (2 + 2) + 4  # format 1 at K = 128, float16
    assert header["measured_bytes_per_token"] < v1 / 2, header["measured_bytes_per_token"]
    assert records(compact_run, "end")[-1]["teacher_store_samples"] == STEPS * GBS
    online = records(setup["online"], "step")
    for ra, rb in zip(online, records(compact_run, "step")):  # same data, close teacher signal
        assert rb["consumed_samples"] == ra["consumed_samples"]
        assert rb["lm_loss"] == pytest.approx(ra["lm_loss"], rel=0.05)


def test_resume_with_a_compact_store_is_bit_exact(setup, compact_run, tmp_path):
    run_dir = tmp_path / "resumed"
    train_on(setup["cfg"], setup["compact"], run_dir, "train.exit_interval=6")
    assert records(str(run_dir), "end")[-1]["step"] == 6
    train_on(setup["cfg"], setup["compact"], run_dir, "--load", f"{run_dir}/ckpt")
    a, b = records(compact_run, "step"), records(str(run_dir), "step")
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        assert {k: ra[k] for k in EXACT} == {k: rb[k] for k in EXACT}, ra["step"]


def test_tp2_on_a_compact_store_equals_tp1(setup, compact_run, tmp_path):
    run_dir = train_on(setup["cfg"], setup["compact"], tmp_path / "tp2",
                       "parallel.tensor_model_parallel_size=2", nproc=2)
    a, b = records(compact_run, "step"), records(run_dir, "step")
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        assert rb["weights"] == pytest.approx(ra["weights"], rel=1e-6)
        for key in ("loss", "lm_loss", "kd_loss"):  # the loss test's TP tolerance, over steps
            assert rb[key] == pytest.approx(ra[key], abs=1e-4), (ra["step"], key)
    # DP = 1: the logging rank (last stage, TP rank 0) read every sample of every step
    assert records(run_dir, "end")[-1]["teacher_store_samples"] == STEPS * GBS


def test_format1_store_from_the_producer_still_trains(setup, compact_run, tmp_path):
    store = cache(setup["cfg"], str(tmp_path / "v1"), "--top-k", "32", "--store-format", "1")
    header = json.load(open(os.path.join(store, "header.json")))
    assert header["format_version"] == 1 and header["bytes_per_token"] == 32 * 4 + 4
    run_dir = train_on(setup["cfg"], store, tmp_path / "off_v1")
    assert records(run_dir, "end")[-1]["teacher_store_samples"] == STEPS * GBS


def test_cover_runs_covers_what_the_run_draws(setup, tmp_path):
    store = str(tmp_path / "covered")
    tiny_run.run_tool(["-m", "megatron_ddk.cli", "cache-teacher", "--config", setup["cfg"],
                       "--out", store, "--cover-runs", setup["cfg"], "--top-k", "8"])
    header = json.load(open(os.path.join(store, "header.json")))
    assert header["encoding"]["tail_samples"] == 8  # the producer's default at top_p 1, K < V
    run_dir = train_on(setup["cfg"], store, tmp_path / "off_cover")  # no uncovered sample
    assert records(run_dir, "end")[-1]["teacher_store_samples"] == STEPS * GBS
    steps = records(run_dir, "step")  # K + 8 entries per token, no rest: a finite loss
    assert all(math.isfinite(r["kd_loss"]) and r["kd_loss"] > 0 for r in steps)


def test_tail_sample_store_draws_the_dense_teacher_s_tail(setup, tmp_path):
    """--tail-samples against the full-vocabulary store (the dense teacher, float32): the head is
    its top K, the draws are the systematic draws of its tail with the producer's uniforms
    (computed here in numpy float64)."""
    import numpy as np

    from megatron_ddk.data.store_shards import open_shard
    from megatron_ddk.data.teacher_store import shard_dir
    from megatron_ddk.training.teacher_cache import tail_uniforms

    k, m = 8, 16
    store = cache(setup["cfg"], str(tmp_path / "tail"), "--top-k", str(k), "--tail-samples",
                  str(m), "--logprob-codec", "float32")
    header = json.load(open(os.path.join(store, "header.json")))
    full_header = json.load(open(os.path.join(setup["full"], "header.json")))
    assert header["encoding"]["tail_samples"] == m and header["entries_per_token"] == k
    seed, seq = header["identity"]["seed"], header["identity"]["seq_length"]
    draws = mismatched = 0
    for d, name in enumerate(header["identity"]["domains"]):
        if name not in header["domains"]:
            continue
        tail, full = (open_shard(shard_dir(s, name, 0), h) for s, h in
                      ((store, header), (setup["full"], full_header)))
        assert list(tail.sample_ids) == list(full.sample_ids)
        for row, sample in enumerate(tail.sample_ids):
            ids, logp, rest = tail.row(row)
            f_ids, f_logp, _ = full.row(row)
            dense = np.full((seq, VOCAB), -np.inf)
            np.put_along_axis(dense, f_ids, f_logp.astype(np.float64), axis=1)
            assert np.all(rest == -np.inf)
            assert np.allclose(np.exp(logp.astype(np.float64)).sum(1), 1.0, atol=1e-5)
            u = tail_uniforms(seed, d, int(sample), seq)
            for t in range(seq):
                p = np.exp(dense[t])
                top = np.sort(ids[t, :k])
                assert np.array_equal(top, np.sort(np.argsort(-p, kind="stable")[:k])) or \
                    np.allclose(np.sort(p)[-k:], np.sort(p[ids[t, :k]]), rtol=1e-5)
                p[ids[t, :k]] = 0.0
                cum = np.cumsum(p)
                ref = np.searchsorted(cum, (np.arange(m) + u[t]) / m * cum[-1], side="right")
                uniq, hits = np.unique(ref, return_counts=True)
                got = ids[t, k:][ids[t, k:] >= 0]
                draws += 1
                if not (np.array_equal(got, uniq) and np.allclose(
                        np.exp(logp[t, k:k + len(got)].astype(np.float64)),
                        hits / m * cum[-1], rtol=1e-4)):
                    mismatched += 1
    # the producer draws from exp(z / T - max) of the live logits, the reference from the full
    # store's float32 log-probabilities: a target within ~1e-6 of a boundary may land on the
    # neighbour (probability ~ m x 1e-6 per token); 1% of tokens bounds that with a wide margin
    assert draws > 1000 and mismatched <= 0.01 * draws, (mismatched, draws)
    # a run on a tail-sample store: test_cover_runs_covers_what_the_run_draws (the default)
