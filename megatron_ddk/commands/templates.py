"""The configs shipped with the package (megatron_ddk/examples/, package data): where they are,
which exist, and the text `megatron-ddk init` writes from one.

A checkout's examples/ is a link to the same folder, so README commands such as
`--config examples/quickstart/pipeline.yaml` and an installed package read the same files.
Cheap to import: the standard library only.
"""

from __future__ import annotations

import os
import re
from typing import Dict, List

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
"""megatron_ddk/examples/: templates (one folder each), presets/ and manifests/."""

NOT_TEMPLATES = ("presets", "manifests")


def template_names() -> List[str]:
    """Folders of examples/ holding a pipeline.yaml (my_data, quickstart, study, ...)."""
    return sorted(n for n in os.listdir(EXAMPLES) if n not in NOT_TEMPLATES
                  and os.path.isfile(os.path.join(EXAMPLES, n, "pipeline.yaml")))


def preset_names() -> List[str]:
    """Run presets (examples/presets/NAME.yaml): paper-scale layouts for H100 clusters."""
    return sorted(f[:-5] for f in os.listdir(os.path.join(EXAMPLES, "presets"))
                  if f.endswith(".yaml"))


def template_path(name: str, file: str = "pipeline.yaml") -> str:
    """The path of one shipped file; ValueError naming the choices for an unknown template."""
    if name not in template_names():
        raise ValueError(f"--template {name!r}: no such template; choose one of "
                         f"{', '.join(template_names())} (or --preset NAME)")
    return os.path.join(EXAMPLES, name, file)


def template_files(name: str, dest: str) -> Dict[str, str]:
    """dest path -> text of every YAML of template `name`, its `examples/NAME/` paths and `out:`
    pointed at `dest` (relative paths as the user typed them)."""
    folder = os.path.dirname(template_path(name))
    files = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".yaml"):
            with open(os.path.join(folder, f), encoding="utf-8") as fh:
                text = _retarget(fh.read(), name, dest)
            base = re.search(r"^extends: \.\./(\w+)/pipeline\.yaml", text, flags=re.M)
            if base:  # the template builds on another: write that one beside it
                text = text.replace(base.group(0), f"extends: {base.group(1)}.yaml")
                with open(template_path(base.group(1)), encoding="utf-8") as fh:
                    files[os.path.join(dest, f"{base.group(1)}.yaml")] = _retarget(
                        fh.read(), base.group(1), dest)
            files[os.path.join(dest, f)] = text
    return files


def _retarget(text: str, name: str, dest: str) -> str:
    """A shipped template's text with its examples/NAME/ paths and `out:` pointed at dest."""
    text = text.replace(f"examples/{name}/", dest.rstrip("/") + "/")
    return re.sub(r"^out: .*$", f"out: {os.path.join(dest, 'runs')}   "
                  "# where the pipeline writes (--out overrides)", text, flags=re.M)


def preset_files(name: str, dest: str) -> Dict[str, str]:
    """dest path -> text of a preset (run.yaml) and the manifest template it names, if any."""
    path = os.path.join(EXAMPLES, "presets", f"{name}.yaml")
    if not os.path.isfile(path):
        raise ValueError(f"--preset {name!r}: no such preset; choose one of "
                         f"{', '.join(preset_names())}")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    files = {os.path.join(dest, "run.yaml"): text}
    m = re.search(r"manifest: \S*/([^/\s]+)/manifest\.yaml", text)
    manifest = m and os.path.join(EXAMPLES, "manifests", f"{m.group(1)}.yaml")
    if manifest and os.path.isfile(manifest):
        with open(manifest, encoding="utf-8") as fh:
            files[os.path.join(dest, "manifest_template.yaml")] = fh.read()
    return files
