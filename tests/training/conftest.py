"""Session fixtures: one tiny corpus + datasets + manifest and one pre-trained teacher."""

import os

import pytest

from megatron_ddk.testing import tiny_run


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """{'manifest': path, 'teacher': checkpoint dir, 'root': folder}."""
    root = str(tmp_path_factory.mktemp("tiny"))
    manifest = tiny_run.build_tiny_domains(root)
    teacher = tiny_run.pretrain_teacher(manifest, os.path.join(root, "teacher"))
    return {"manifest": manifest, "teacher": teacher, "root": root}
