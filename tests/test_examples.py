"""The example scripts run as a user runs them: in a fresh process, offline, on the toy world.

Each script exits non-zero when its own check fails (reloaded pack differs, edit did not take), so a
zero exit status is a real assertion; the output checks below pin what the user is told.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, *args: str, timeout: int = 900, tmpdir: Path | None = None) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "0"}
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=EXAMPLES.parent)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    # dependency deprecation chatter would land in the middle of the printed results
    assert "FutureWarning" not in proc.stderr, proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow
def test_quickstart(tmp_path):
    out = _run("quickstart.py", "--out", str(tmp_path / "pack"))
    assert "reloaded with PeftModel.from_pretrained: same answers" in out
    lines = {line.split("  ")[1].strip(): line for line in out.splitlines() if line.startswith("  ")}
    assert lines["edit question"].endswith("edit fired") and lines["other country"].endswith("original weights")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "pack"))


@pytest.mark.slow
def test_fix_scope(tmp_path):
    out = _run("fix_scope.py", "--out", str(tmp_path / "pack"))
    assert "reloaded with PeftModel.from_pretrained: same routing" in out
    fixed = [line for line in out.splitlines() if "in-scope anchor" in line]
    assert len(fixed) == 1 and "original weights -> edit fired" in fixed[0] and "NOT OK" not in out
    kept_out = [line for line in out.splitlines() if line.lstrip().startswith("coupled:")]
    assert len(kept_out) == 4 and all("-> original weights" in line for line in kept_out)
    # a near-by question naming the edit's asked-for word fired the edit; an anchor naming it keeps it out
    (named,) = [line for line in kept_out if "national animal of this country eat" in line]
    assert "edit fired       -> original weights" in named and "out-of-scope anchor" in named
    assert "before the fix" in out and {"README.md", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "pack"))
    assert "the pack records 3 scope correction(s)" in out
    assert "## Scope corrections" in (tmp_path / "pack" / "README.md").read_text()


@pytest.mark.slow
def test_hub_share(tmp_path):
    out = _run("hub_share.py", "--cache-dir", str(tmp_path / "hf"), "--repo-id", "org/example-pack")
    assert "pushed: http://127.0.0.1:" in out
    assert "README.md, adapter_config.json, adapter_model.safetensors" in out
    assert "max logit difference 0.0e+00" in out and "offline" in out
    assert (tmp_path / "hf" / "models--org--example-pack" / "refs" / "main").is_file()


@pytest.mark.slow
def test_sequential_editing(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = _run("sequential_editing.py", "--edits", "3", tmpdir=tmp)  # no --out: a temporary pack folder
    # torch's compiler cache, which some transformers versions make at import (torch._dynamo), is not the example's
    left = [p for p in tmp.iterdir() if not p.name.startswith("torchinductor_")]
    assert not left, "the example must remove its temporary folder"
    steps = [line for line in out.splitlines() if line[:4].strip().isdigit()]
    assert len(steps) == 3
    assert "pack: 3 slots" in out and "reloaded metrics match" in out
