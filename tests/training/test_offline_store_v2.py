"""Format-2 stores end to end (real processes): `megatron-ddk cache-teacher` writes them,
`distill.teacher_logits` runs read them.

References are independent of the store code: the online DDK run with the real teacher (a
format-2 store with K = the vocabulary, top_p = 1 and float32 log-probabilities must reproduce
it), an uninterrupted run (resume must be bit-exact), a TP = 1 run on the same store (TP = 2 must
equal it), and a format-1 store written by the same producer (it must still train).
"""

import json
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
    run_dir = train_on(setup["cfg"], store, tmp_path / "off_cover")  # no uncovered sample
    assert records(run_dir, "end")[-1]["teacher_store_samples"] == STEPS * GBS
