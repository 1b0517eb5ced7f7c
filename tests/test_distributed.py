"""Sharded editing and evaluation in two real CPU processes (``accelerate``, gloo backend).

The edit runs through the launcher-free path (``edit_main([..., "--num-processes", "2"])`` spawns
``accelerate launch`` itself); the evaluation through an explicit ``accelerate launch`` command line.
Both use ``--model toy``: every process loads the toy world from the shared cache.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from peft import PeftModel

import ldke_peft
from ldke_peft.distributed import aggregate_rows, edit_main, shard_indices
from ldke_peft.distributed_launch import _free_port
from ldke_peft.metrics import METRIC_KEYS, collect_pre, compute_metrics
from ldke_peft.requests import load_jsonl, save_jsonl

from _dist_utils import assert_metrics_close, fresh

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

LAUNCH_TIMEOUT = 240  # seconds; a 2-process run takes ~40 s on 2 shared cores


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true", TOKENIZERS_PARALLELISM="false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    # the processes must find the same toy-world cache the test session uses
    from ldke_peft.testing.toy_world import default_cache_root

    env["LDKE_CACHE"] = str(default_cache_root().parent)
    return env


def test_shard_indices_cover_every_request_once():
    for n in range(7):
        for world in (1, 2, 3):
            got = sorted(i for r in range(world) for i in shard_indices(n, r, world))
            assert got == list(range(n))
    with pytest.raises(ValueError):
        shard_indices(4, 2, 2)


def test_aggregate_rows_is_compute_metrics_aggregation():
    rows = [{k: 1.0 for k in METRIC_KEYS}, {k: (0.5 if k != "portability" else None) for k in METRIC_KEYS},
            {k: (float("nan") if k == "exact_match" else 0.0) for k in METRIC_KEYS}]
    agg = aggregate_rows(rows)
    assert agg["reliability"] == pytest.approx(0.5)
    assert agg["portability"] == pytest.approx(0.5) and agg["counts"]["portability"] == 2
    assert agg["exact_match"] == pytest.approx(0.75) and agg["counts"]["exact_match"] == 2
    assert agg["n"] == 3 and agg["per_request"] == rows


@pytest.fixture(scope="module")
def requests_file(world, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dist") / "requests.jsonl"
    save_jsonl(world.edit_requests(4, seed=33), path)
    return path


@pytest.mark.slow
def test_two_process_edit_and_eval_match_one_process(world, world_pool, requests_file, tmp_path, monkeypatch):
    """4 edits in 2 processes (2 each), merged on rank 0, give the metrics of the same 4 edits made in one
    process; the 2-process evaluation gives the metrics of an in-process evaluation of the merged pack."""
    for k, v in _env(tmp_path).items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "pack"
    assert edit_main(["--model", "toy", "--requests", str(requests_file), "--out", str(out),
                      "--num-processes", "2", "--cpu", "--keep-shards"]) == 0
    reqs = load_jsonl(requests_file, open_images=True)

    cfg = ldke_peft.LDKEConfig.from_pretrained(out)  # validated like any pack
    assert cfg.num_slots == 4 and cfg.router_groups == 2
    assert [e["request_index"] for e in cfg.edits] == [0, 1, 2, 3], "merged slots follow the request file"
    assert [e["prompt"] for e in cfg.edits] == [r.prompt for r in reqs]
    for k in (0, 1):
        shard = ldke_peft.LDKEConfig.from_pretrained(out / "shards" / f"rank{k}")
        assert [e["request_index"] for e in shard.edits] == shard_indices(4, k, 2)
    report = json.loads((out / "ldke_report.json").read_text())
    assert [r["slot"] for r in report] == [0, 1, 2, 3] and [r["request_index"] for r in report] == [0, 1, 2, 3]

    pre = collect_pre(world.model, world.processor, reqs)
    merged = PeftModel.from_pretrained(fresh(world), out)
    m_merged = compute_metrics(merged, world.processor, reqs, pre)
    single = ldke_peft.edit(world.model, world.processor, reqs, negatives=world_pool, progress=False)
    try:
        m_single = compute_metrics(single, world.processor, reqs, pre)
    finally:
        single.unload()
    assert m_merged["reliability"] >= 0.99, m_merged  # the edits fire: the comparison is not vacuous
    # each shard fits the router projection on its own requests (one projection group per shard), one
    # process fits one on all of them: the edits and the locality are the same, the generality of an
    # unseen wording may differ by a few probes (4 of the 24 here)
    same = ("reliability", "t_locality", "m_locality", "coupled_locality", "exact_match")
    assert_metrics_close({k: m_merged[k] for k in same}, {k: m_single[k] for k in same}, keys=same,
                         what="merged vs one process: ")
    for k in ("t_generality", "m_generality"):
        assert abs(m_merged[k] - m_single[k]) <= 0.2, (k, m_merged, m_single)

    # distributed evaluation through an explicit `accelerate launch` command line
    result = tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "ldke_peft.distributed", "eval", "--model", "toy", "--pack", str(out), "--requests",
           str(requests_file), "--out", str(result)]
    proc = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(result.read_text())
    assert got["world_size"] == 2 and got["n"] == 4
    assert_metrics_close(got, m_merged, what="2-process eval vs in-process: ")
    for a, b in zip(got["per_request"], m_merged["per_request"]):
        for k in METRIC_KEYS:
            assert (a[k] is None and b[k] is None) or math.isclose(a[k], b[k], abs_tol=1e-6), (k, a, b)
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed["reliability"] == got["reliability"] and printed["world_size"] == 2


@pytest.mark.slow
def test_conflict_across_shards_fails_every_process(world, tmp_path, monkeypatch):
    """The same fact edited to two targets lands in two shards: the merge on rank 0 refuses, and the
    launch as a whole fails with that reason (no process hangs on a barrier)."""
    for k, v in _env(tmp_path).items():
        monkeypatch.setenv(k, v)
    r = world.edit_requests(1, seed=5)[0]
    other = [a for a in world.answer_vocab(r.relation) if a not in (r.target, r.ground_truth)][0]
    twin = type(r)(**{**r.__dict__, "target": other})
    path = tmp_path / "twice.jsonl"
    save_jsonl([r, twin], path)
    cmd = [sys.executable, "-m", "ldke_peft.distributed", "edit", "--model", "toy", "--requests", str(path),
           "--out", str(tmp_path / "pack"), "--num-processes", "2", "--cpu", "--edit-steps", "2"]
    proc = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode != 0
    assert "different targets" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "pack" / "adapter_config.json").exists()
