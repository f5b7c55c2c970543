"""Unwritable output folders (logging.run_dir, checkpoint.save) stop `megatron-ddk train` with
one line naming the field and the path, exit status 2, before any model is built."""

import os
import sys

import pytest

from megatron_ddk.atomic import check_writable_folder
from megatron_ddk.testing import tiny_run
from megatron_ddk.testing.commands import run_command


def test_check_writable_folder(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    check_writable_folder(str(tmp_path / "new" / "run"), "logging.run_dir")  # created
    assert os.listdir(str(tmp_path / "new" / "run")) == []  # the probe is gone
    with pytest.raises(ValueError, match=r"^logging.run_dir=.*a_file/run: cannot write there: "
                                         r"Not a directory; choose a writable folder$"):
        check_writable_folder(str(blocker / "run"), "logging.run_dir")
    with pytest.raises(ValueError, match=r"^checkpoint.save=/proc/megatron_ddk_run: cannot"):
        check_writable_folder("/proc/megatron_ddk_run", "checkpoint.save")


@pytest.mark.parametrize("field", ["logging.run_dir", "checkpoint.save"])
def test_train_refuses_unwritable_folder_in_one_line(tmp_path, field):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cfg = tiny_run.run_config(str(tmp_path / "no_manifest.yaml"), str(tmp_path / "run"),
                              policy="static")
    path = tiny_run.write_config(cfg, str(tmp_path / "run.yaml"))
    bad = str(blocker / "out")
    code, out = run_command([sys.executable, "-m", "megatron_ddk.train", "--config", path,
                             f"{field}={bad}"], dict(os.environ, OMP_NUM_THREADS="1"),
                            tiny_run.ROOT, 300)
    assert code == 2, out[-2000:]
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("error")]
    assert errors == [f"error: {field}={bad}: cannot write there: Not a directory; choose a "
                      f"writable folder"], errors
