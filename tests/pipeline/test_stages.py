"""Stage stamps: skip when unchanged, rerun a changed stage and everything after it, resume a
killed resumable stage, and fail with the log's tail. Stages here are tiny Python commands that
append to a file, so what ran is counted independently of the runner's own bookkeeping."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from megatron_ddk.pipeline.stage import Stage, StageFailed, StageRunner


def _append(path, text):
    return [sys.executable, "-c", f"open({path!r}, 'a').write({text!r} + '\\n')"]


def _lines(path):
    return open(path).read().split() if os.path.exists(path) else []


def _stages(tmp, a_setting="x", b_setting="y"):
    log = str(tmp / "ran.txt")
    a = Stage(name="a", command=lambda _r: _append(log, "a"), settings={"v": a_setting},
              outputs=[log])
    b = Stage(name="b", command=lambda _r: _append(log, "b"), settings={"v": b_setting},
              deps=["a"], outputs=[log])
    return log, [a, b]


def _run(out, stages):
    runner = StageRunner(str(out))
    for s in stages:
        runner.run(s)
    return runner


def test_rerun_skips_unchanged_and_reruns_downstream_of_a_change(tmp_path):
    log, stages = _stages(tmp_path)
    _run(tmp_path / "out", stages)
    assert _lines(log) == ["a", "b"]
    runner = _run(tmp_path / "out", _stages(tmp_path)[1])
    assert _lines(log) == ["a", "b"] and runner.ran == []
    runner = _run(tmp_path / "out", _stages(tmp_path, b_setting="z")[1])
    assert _lines(log) == ["a", "b", "b"] and runner.ran == ["b"]
    runner = _run(tmp_path / "out", _stages(tmp_path, a_setting="w", b_setting="z")[1])
    assert _lines(log) == ["a", "b", "b", "a", "b"] and runner.ran == ["a", "b"]


def test_input_file_change_reruns(tmp_path):
    data = tmp_path / "input.txt"
    data.write_text("one")
    log = str(tmp_path / "ran.txt")

    def stage():
        return Stage(name="s", command=lambda _r: _append(log, "s"), inputs=[str(data)],
                     outputs=[log])

    _run(tmp_path / "out", [stage()])
    _run(tmp_path / "out", [stage()])
    assert _lines(log) == ["s"]
    time.sleep(0.01)
    data.write_text("two!")
    _run(tmp_path / "out", [stage()])
    assert _lines(log) == ["s", "s"]


def test_missing_output_reruns_that_stage(tmp_path):
    """A stage whose output vanished runs again; its key is unchanged, so (its output being a
    function of that key) the stages after it are not redone."""
    log, stages = _stages(tmp_path)
    _run(tmp_path / "out", stages)
    os.remove(log)
    runner = _run(tmp_path / "out", _stages(tmp_path)[1])
    assert _lines(log) == ["a"] and runner.ran == ["a"]


def test_failure_names_stage_and_log_and_is_not_stamped_done(tmp_path):
    bad = Stage(name="bad", command=lambda _r: [sys.executable, "-c",
                                                "import sys; print('boom here'); sys.exit(3)"])
    with pytest.raises(StageFailed, match=r"(?s)stage bad failed \(exit 3\).*bad.log.*\nboom here"):
        _run(tmp_path / "out", [bad])
    with pytest.raises(StageFailed):  # not skipped on the rerun
        _run(tmp_path / "out", [bad])


def test_killed_resumable_stage_resumes(tmp_path):
    """A stage whose runner process is SIGKILLed mid-command is resumed (command(resume=True))
    on the next run, and the child it started died with the runner."""
    out, marker = tmp_path / "out", tmp_path / "child_alive"
    script = tmp_path / "pipe.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from megatron_ddk.pipeline.stage import Stage, StageRunner
        def command(resume):
            code = ("import time,sys; open({str(tmp_path / 'mode.txt')!r}, 'a').write("
                    "sys.argv[1] + '\\\\n'); "
                    "[open({str(marker)!r}, 'w').write(str(i)) or time.sleep(0.2) "
                    "for i in range(int(sys.argv[2]))]")
            return [sys.executable, '-c', code, 'resume' if resume else 'fresh',
                    '3' if resume else '1000']
        StageRunner({str(out)!r}).run(Stage(name='long', command=command, resumable=True))
    """))
    proc = subprocess.Popen([sys.executable, str(script)], env=dict(os.environ))
    for _ in range(200):
        if marker.exists():
            break
        time.sleep(0.1)
    assert marker.exists(), "the stage's child never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(1.0)
    before = marker.read_text()
    time.sleep(1.0)
    assert marker.read_text() == before, "the child kept running after the pipeline died"
    subprocess.run([sys.executable, str(script)], check=True, env=dict(os.environ))
    assert _lines(tmp_path / "mode.txt") == ["fresh", "resume"]
