"""Atomic saves: a pack folder always holds a complete pack, the previous one or the new one.

The main tests SIGKILL a process in the middle of saving, at random moments, over and over, and check
after every kill that the pack folder loads and is exactly one of the packs that were ever saved there
(never a truncated file, never one save's config next to another save's weights). The saving process
is a ``fork`` of the test process (it inherits the models, so each kill costs milliseconds, not a
Python start-up).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
import time

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import ldke_peft
from ldke_peft import LDKEConfig
from ldke_peft.hub import save_edits
from ldke_peft.tuner.io import atomic_dir, atomic_save
from ldke_peft.testing.tiny import tiny_model

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill tests fork the test process (POSIX only)")

PACK_FILES = {"adapter_config.json", "adapter_model.safetensors", "ldke_edits.json", "README.md"}


def _pack(num_slots: int, rank: int = 64, seed: int = 0):
    """A tiny-LLaVA pack with random deltas; rank 64 and a few hundred slots make a ~5 MB file (~50 ms to save)."""
    model, _ = tiny_model("llava")
    cfg = LDKEConfig(slot_layers=[[2 + k % 2] for k in range(num_slots)], probe_layer=1, rank=rank, router_dim=8)
    pm = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in pm.named_parameters():
            if "ldke_" in name:
                t.copy_(torch.randn(t.shape, generator=g))
    return pm


def _digest(folder) -> tuple[int, str]:
    """(num_slots from the config, sha256 of the weights file): what a complete pack pairs together."""
    with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as fh:
        slots = json.load(fh)["num_slots"]
    with open(os.path.join(folder, "adapter_model.safetensors"), "rb") as fh:
        return slots, hashlib.sha256(fh.read()).hexdigest()


def _save_forever(pms, path):
    i = 0
    while True:
        atomic_save(pms[i % len(pms)], path)
        i += 1


def _kill_during(target, args, delays) -> None:
    ctx = multiprocessing.get_context("fork")
    for delay in delays:
        proc = ctx.Process(target=target, args=args, daemon=True)
        proc.start()
        time.sleep(delay)
        proc.kill()  # SIGKILL: no cleanup, no finally, no atexit
        proc.join()
        yield proc.exitcode


def test_atomic_save_survives_sigkill(tmp_path):
    target = str(tmp_path / "pack")
    a, b, c = _pack(8, seed=0), _pack(200, seed=1), _pack(201, seed=2)
    valid = set()
    for pm in (a, b, c):  # the digest of each version, saved once on its own
        ref = str(tmp_path / f"ref{len(valid)}")
        pm.save_pretrained(ref)
        valid.add(_digest(ref))
    assert len(valid) == 3
    atomic_save(a, target)  # the previous pack
    t0 = time.perf_counter()
    atomic_save(b, target)
    t_save = time.perf_counter() - t0
    atomic_save(a, target)
    rng = random.Random(0)
    delays = [rng.uniform(0.02, 0.02 + 4 * t_save) for _ in range(12)]
    for code in _kill_during(_save_forever, ([b, c, a], target), delays):
        assert code == -9
        assert set(os.listdir(target)) == PACK_FILES
        assert _digest(target) in valid
        # and it passes the loader's validation (header, tensor names/shapes vs config, finite values)
        LDKEConfig.from_pretrained(target)
    # the survivor loads onto a fresh base model
    base, _ = tiny_model("llava")
    loaded = PeftModel.from_pretrained(base, target)
    assert loaded.peft_config["default"].num_slots in (8, 200, 201)
    # killed saves leave at most staging folders *next to* the pack, never inside it
    for name in os.listdir(tmp_path):
        assert name in ("pack",) or name.startswith(("ref", ".pack.ldke-tmp-")), name


def _cli_edit(argv):
    from ldke_peft.cli import main

    os._exit(main(argv))


def test_cli_edit_out_survives_sigkill(tmp_path):
    """``ldke edit --out DIR`` killed at random moments: DIR is the previous pack with its report, or the new
    pack with its report."""
    from PIL import Image

    model, proc = tiny_model("llava")
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    proc.save_pretrained(model_dir)
    Image.new("RGB", (32, 32), (200, 20, 20)).save(tmp_path / "red.png")
    Image.new("RGB", (32, 32), (20, 20, 200)).save(tmp_path / "blue.png")
    q = "What is the capital of the country shown?"

    def jsonl(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    one = jsonl("one.jsonl", [{"prompt": q, "target": "Lyon", "image": "red.png"}])
    two = jsonl("two.jsonl", [{"prompt": q, "target": "Rome", "image": "red.png"},
                              {"prompt": q, "target": "Oslo", "image": "blue.png"}])
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"router_steps": 10}))
    out = str(tmp_path / "pack")
    common = ["--layers", "2", "--edit-steps", "2", "--config", str(cfg), "--no-progress", "--out", out]
    from ldke_peft.cli import main

    assert main(["edit", str(model_dir), one, *common]) == 0
    first = _digest(out)
    ctx = multiprocessing.get_context("fork")
    t0 = time.perf_counter()
    full = ctx.Process(target=_cli_edit, args=(["edit", str(model_dir), two, *common],))
    full.start()
    full.join()
    t_run = time.perf_counter() - t0
    assert full.exitcode == 0
    second = _digest(out)
    assert first[0] == 1 and second[0] == 2
    assert main(["edit", str(model_dir), one, *common]) == 0  # back to the one-edit pack
    rng = random.Random(1)
    delays = [rng.uniform(0.4 * t_run, 1.0 * t_run) for _ in range(5)]
    seen = set()
    for code in _kill_during(_cli_edit, (["edit", str(model_dir), two, *common],), delays):
        assert code in (-9, 0)  # killed, or done just before the kill
        slots, _ = _digest(out)
        assert slots in (1, 2)
        with open(os.path.join(out, "ldke_report.json"), encoding="utf-8") as fh:
            assert len(json.load(fh)) == slots  # the report belongs to the pack next to it
        LDKEConfig.from_pretrained(out)
        seen.add(slots)


# ---------------------------------------------------------------------- semantics of an atomic save


def test_ldke_save_replaces_the_folder_and_keeps_other_files(tmp_path):
    target = tmp_path / "pack"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    (target / "sub").mkdir()
    (target / "sub" / "x.txt").write_text("also mine")
    (target / "README.md").write_text("# My pack\n\nHand-written intro.\n")
    inode = os.stat(target).st_ino
    pm = _pack(3, rank=4)
    atomic_save(pm, target)
    assert os.stat(target).st_ino != inode  # a new folder was swapped in
    assert (target / "notes.txt").read_text() == "mine"
    assert (target / "sub" / "x.txt").read_text() == "also mine"
    assert "Hand-written intro." in (target / "README.md").read_text()  # PEFT updates, as in place
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(target))
    assert not [n for n in os.listdir(tmp_path) if ".ldke-" in n]
    # a second adapter goes to its subfolder, the first one stays
    pm.add_adapter("second", LDKEConfig(slot_layers=[[3]], probe_layer=1, rank=4, router_dim=8))
    atomic_save(pm, target, selected_adapters=["second"])
    assert (target / "adapter_model.safetensors").exists() and (target / "second" / "adapter_model.safetensors").exists()


def test_non_ldke_adapters_are_saved_by_peft_unchanged(tmp_path):
    model, _ = tiny_model("llava")
    lora = get_peft_model(model, LoraConfig(target_modules=["q_proj"], r=2))
    target = tmp_path / "lora"
    target.mkdir()
    inode = os.stat(target).st_ino
    lora.save_pretrained(target)
    assert os.stat(target).st_ino == inode  # PEFT's in-place save, untouched by ldke-peft
    assert (target / "adapter_model.safetensors").exists()
    # the explicit function makes any adapter's save atomic
    atomic_save(lora, target)
    assert os.stat(target).st_ino != inode
    PeftModel.from_pretrained(tiny_model("llava")[0], str(target))


def test_failed_save_leaves_the_previous_pack(tmp_path):
    target = tmp_path / "pack"
    atomic_save(_pack(4, rank=4), target)
    before = _digest(target)
    with pytest.raises(ValueError):
        # PEFT refuses unknown adapters after the staging folder was made
        atomic_save(_pack(5, rank=4), target, selected_adapters=["nope"])
    assert _digest(target) == before
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(target) as stage:
            with open(os.path.join(stage, "adapter_config.json"), "w") as fh:
                fh.write("{half a config")
            raise RuntimeError("boom")
    assert _digest(target) == before
    assert not [n for n in os.listdir(tmp_path) if ".ldke-" in n]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="directory"):
        _pack(2, rank=4).save_pretrained(tmp_path / "file")  # PEFT's own error for a file path
    with pytest.raises(NotADirectoryError):
        atomic_save(_pack(2, rank=4), tmp_path / "file")


def test_fallback_without_rename_exchange(tmp_path, monkeypatch):
    """Where ``renameat2(RENAME_EXCHANGE)`` does not exist (macOS, Windows, old kernels) the swap is two renames."""
    import ldke_peft.tuner.io as io

    monkeypatch.setattr(io, "_renameat2", False)
    target = tmp_path / "pack"
    atomic_save(_pack(2, rank=4), target)
    (target / "keep.txt").write_text("k")
    pm = _pack(3, rank=4)
    atomic_save(pm, target)
    assert _digest(target)[0] == 3 and (target / "keep.txt").read_text() == "k"
    assert not [n for n in os.listdir(tmp_path) if ".ldke-" in n]


def test_save_edits_is_atomic_and_keeps_the_report(tmp_path):
    target = tmp_path / "pack"
    target.mkdir()
    (target / "ldke_report.json").write_text("[]")
    inode = os.stat(target).st_ino
    pm = _pack(2, rank=4)
    save_edits(pm, target)
    assert os.stat(target).st_ino != inode
    assert (target / "ldke_report.json").read_text() == "[]"
    assert "LDKE edit pack" in (target / "README.md").read_text()
    base, _ = tiny_model("llava")
    assert ldke_peft.hub.load_edits(base, str(target)).peft_config["default"].num_slots == 2


def test_pack_folders_get_the_umask_mode_not_0700(tmp_path):
    """mkdtemp's private mode must not leak into the pack folder; a replaced folder keeps its own mode."""
    old = os.umask(0o027)
    try:
        with atomic_dir(tmp_path / "pack") as stage:
            open(os.path.join(stage, "f"), "w").close()
        assert (tmp_path / "pack").stat().st_mode & 0o777 == 0o750
        os.chmod(tmp_path / "pack", 0o705)
        with atomic_dir(tmp_path / "pack") as stage:
            open(os.path.join(stage, "g"), "w").close()
        assert (tmp_path / "pack").stat().st_mode & 0o777 == 0o705
    finally:
        os.umask(old)
