"""The ``ldke`` command: help texts, edit/eval/locate/push end to end on a tiny model, one-line errors, demo."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image

from ldke_peft import EditRequest, Probe
from ldke_peft.cli import build_parser, main
from ldke_peft.errors import ImageError, ProcessorNotFoundError
from ldke_peft.requests import image_fingerprint, save_jsonl
from ldke_peft.testing.fake_hub import FakeHub
from ldke_peft.testing.tiny import tiny_model

COMMANDS = ["demo", "edit", "eval", "locate", "push", "route"]
PROMPT = "What is the capital of the country shown?"


def _ldke_executable() -> list[str]:
    exe = shutil.which("ldke", path=os.path.dirname(sys.executable)) or shutil.which("ldke")
    return [exe] if exe else [sys.executable, "-m", "ldke_peft"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny LLaVA saved like a real checkpoint (model + processor in one folder), images and a JSONL file."""
    d = tmp_path_factory.mktemp("cli")
    model, processor = tiny_model("llava")
    model.save_pretrained(d / "model")
    processor.save_pretrained(d / "model")
    other, _ = tiny_model("llava", seed=1)
    other.save_pretrained(d / "other")
    processor.save_pretrained(d / "other")
    (d / "img").mkdir()
    Image.new("RGB", (40, 40), (255, 0, 0)).save(d / "img" / "red.png")
    Image.new("RGB", (40, 40), (0, 0, 255)).save(d / "img" / "blue.png")
    request = EditRequest(
        image=str(d / "img" / "red.png"), prompt=PROMPT, target="Paris", ground_truth="London",
        rephrase_prompts=["Which city is the capital of this country?"],
        locality=[Probe("Describe the image.", "A red flag")],
        m_locality=[Probe(PROMPT, "Berlin", image=str(d / "img" / "blue.png"))],
        subject="Redland", relation="capital",
    )
    save_jsonl([request], d / "requests.jsonl")
    return d


@pytest.fixture(scope="module")
def pack(workdir):
    rc = main(["edit", str(workdir / "model"), str(workdir / "requests.jsonl"), "--out", str(workdir / "pack"), "--no-progress"])
    assert rc == 0
    return workdir / "pack"


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "nothing on stderr"
    return err[-1]


# ---------------------------------------------------------------------- help


def test_top_level_help_via_console_script():
    proc = subprocess.run(_ldke_executable() + ["--help"], capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    for cmd in COMMANDS:
        assert cmd in proc.stdout
    assert "examples:" in proc.stdout and "ldke edit ./llava requests.jsonl" in proc.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_subcommand_help_explains_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: ldke {command}" in out
    assert "example:" in out and f"ldke {command}" in out.split("example:")[1]


def test_bench_is_registered_only_when_a_suite_exists():
    has_suite = importlib.util.find_spec("ldke_peft.bench.run") is not None
    assert ("bench" in build_parser().format_help()) == has_suite


# ---------------------------------------------------------------------- end to end


def test_edit_writes_a_pack_with_card_and_report(pack, capsys):
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "ldke_report.json"} <= set(os.listdir(pack))
    card = ModelCard.load(pack / "README.md")
    assert card.data.library_name == "peft" and "Paris" in card.text
    report = json.loads((pack / "ldke_report.json").read_text())
    assert len(report) == 1 and report[0]["fit_accuracy"] == 1.0 and report[0]["layers"]


def test_edit_append_to_existing_pack(workdir, pack, tmp_path):
    out = tmp_path / "grown"
    rc = main(["edit", str(workdir / "model"), str(workdir / "requests.jsonl"), "--append-to", str(pack),
               "--out", str(out), "--no-progress"])
    assert rc == 0
    assert json.loads((out / "adapter_config.json").read_text())["num_slots"] == 2
    assert [r["slot"] for r in json.loads((out / "ldke_report.json").read_text())] == [0, 1]


def test_eval_json_and_table(workdir, pack, capsys):
    args = [str(workdir / "model"), str(pack), str(workdir / "requests.jsonl")]
    assert main(["eval", *args, "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["n"] == 1
    assert metrics["reliability"] == 1.0 and metrics["t_generality"] == 1.0
    assert metrics["m_locality"] == 1.0 and metrics["m_generality"] is None
    assert main(["eval", *args, "--no-generate"]) == 0
    out = capsys.readouterr().out
    assert "reliability" in out and "1.000" in out and "exact_match" in out


def test_route_shows_where_each_question_goes(workdir, pack, tmp_path, capsys):
    """In-scope questions reach the request's edit, locality probes none; a question the requests file wants
    out of scope that fires the edit is listed with the edit it fired."""
    args = [str(workdir / "model"), str(pack), str(workdir / "requests.jsonl")]
    assert main(["route", *args, "--json", "--batch-size", "2"]) == 0
    routes = json.loads(capsys.readouterr().out)
    by_kind = {r["kind"]: r for r in routes}
    assert set(by_kind) == {"prompt", "rephrase", "locality", "m_locality"}
    assert by_kind["prompt"]["slot"] == 0 and by_kind["rephrase"]["slot"] == 0
    assert by_kind["prompt"]["edit"] == f"{PROMPT!r} -> 'Paris'"
    assert by_kind["locality"]["slot"] == -1 and by_kind["m_locality"]["slot"] == -1
    assert all(r["ok"] for r in routes)
    # the edit question on the edit's own image, filed as an out-of-scope probe: it fires, and is listed
    wrong = EditRequest(image=str(workdir / "img" / "red.png"), prompt=PROMPT, target="Paris",
                        m_locality=[Probe(PROMPT, "London", image=str(workdir / "img" / "red.png"))])
    save_jsonl([wrong], tmp_path / "wrong.jsonl")
    assert main(["route", str(workdir / "model"), str(pack), str(tmp_path / "wrong.jsonl")]) == 0
    out = capsys.readouterr().out
    listed = [line for line in out.splitlines() if line.startswith("0 ")]
    assert len(listed) == 1 and "m_locality" in listed[0] and "'Paris'" in listed[0]
    assert "m_locality  0/1" in out and "prompt      1/1" in out
    assert "slot 0: " in listed[0] and "note:" not in out


def test_route_fix_saves_a_pack_that_routes_the_filed_questions_as_wished(workdir, pack, tmp_path, capsys):
    """--fix: a near question filed as out of scope stops firing, every wording filed as a rephrasing fires,
    a question identical to one of the edit's own wordings is listed as not fixable; the saved pack routes so
    (PEFT's loader, a real forward), keeps its edit report and card, and holds the very same delta tensors."""
    from safetensors.torch import load_file

    red = str(workdir / "img" / "red.png")
    filed = EditRequest(image=red, prompt=PROMPT, target="Paris",
                        rephrase_prompts=["Which city is the capital of this country?", "Capital here?"],
                        coupled=[Probe(q, "x", image=red, kind="near_miss") for q in
                                 ("Tell me the capital of this country.", f"Question: {PROMPT}", "Describe the image.")])
    save_jsonl([filed], tmp_path / "filed.jsonl")
    args = [str(workdir / "model"), str(pack), str(tmp_path / "filed.jsonl")]
    assert main(["route", *args, "--json"]) == 0
    before = {r["prompt"]: r for r in json.loads(capsys.readouterr().out) if r["kind"] != "prompt"}
    assert before["Tell me the capital of this country."]["slot"] == 0 and before[f"Question: {PROMPT}"]["slot"] == 0
    assert main(["route", *args, "--fix", str(tmp_path / "fixed"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    not_fixed = [f for f in out["fixes"] if not f["ok"]]
    assert [f["prompt"] for f in not_fixed] == [f"Question: {PROMPT}"] and "could not fix" in not_fixed[0]["action"]
    assert [r["prompt"] for r in out["routes"] if not r["ok"]] == [f"Question: {PROMPT}"]
    assert {"README.md", "ldke_report.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "fixed"))
    assert "## Scope corrections" in (tmp_path / "fixed" / "README.md").read_text()
    (edit,) = json.loads((tmp_path / "fixed" / "ldke_edits.json").read_text())["edits"]
    with Image.open(red) as im:  # a question filed with an image path is recorded by the image's fingerprint
        assert {x["image"] for x in edit["scope_fixes"]} == {image_fingerprint(im)}
    # the saved pack, loaded afresh, routes as the fixed model did
    assert main(["route", str(workdir / "model"), str(tmp_path / "fixed"), str(tmp_path / "filed.jsonl"), "--json"]) == 0
    assert [(r["prompt"], r["slot"]) for r in json.loads(capsys.readouterr().out)] == \
        [(r["prompt"], r["slot"]) for r in out["routes"]]
    old, new = (load_file(p / "adapter_model.safetensors") for p in (pack, tmp_path / "fixed"))
    deltas = [k for k in old if "ldke_router" not in k]
    assert deltas and all(torch.equal(old[k], new[k]) for k in deltas)
    wrong = [f for f in out["fixes"] if f["before"] != f["wanted"]]
    assert main(["route", *args, "--fix", str(tmp_path / "fixed2")]) == 0
    assert (f"fixed {len(wrong) - 1} of {len(wrong)} question(s) routed against their request's wish"
            in capsys.readouterr().out)


def test_route_tells_edits_of_one_question_apart_and_reads_a_separate_processor(workdir, tmp_path, capsys):
    """Two edits ask the same question of different images with the same answer: each image's questions are
    judged against its own edit. A model folder without its processor works with --processor."""
    red, blue = str(workdir / "img" / "red.png"), str(workdir / "img" / "blue.png")
    reqs = [EditRequest(image=im, prompt=PROMPT, target="Paris", rephrase_prompts=["Which city is the capital of this country?"])
            for im in (red, blue)]
    save_jsonl(reqs, tmp_path / "two.jsonl")
    assert main(["edit", str(workdir / "model"), str(tmp_path / "two.jsonl"), "--out", str(tmp_path / "pack"),
                 "--no-progress"]) == 0
    bare = tmp_path / "bare"
    shutil.copytree(workdir / "model", bare, ignore=lambda d, names: [n for n in names if not (
        n.startswith("model") or n in ("config.json", "generation_config.json"))])
    assert not (bare / "tokenizer_config.json").exists()
    capsys.readouterr()
    assert main(["route", str(bare), str(tmp_path / "pack"), str(tmp_path / "two.jsonl"), "--processor",
                 str(workdir / "model"), "--json"]) == 0
    routes = json.loads(capsys.readouterr().out)
    assert [(r["request"], r["kind"], r["slot"], r["expected_slot"]) for r in routes if r["kind"] == "prompt"] == \
        [(0, "prompt", 0, 0), (1, "prompt", 1, 1)]
    assert all(r["ok"] for r in routes)
    # a request the pack does not hold: noted, its in-scope questions not judged
    other = EditRequest(image=red, prompt=PROMPT, target="Rome")
    save_jsonl([other], tmp_path / "other.jsonl")
    assert main(["route", str(workdir / "model"), str(tmp_path / "pack"), str(tmp_path / "other.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "note: request 0 (" in out and "'Rome'" in out and "prompt" not in out.split("note:")[0]


def test_which_slots_reads_only_active_adapters(workdir, pack):
    from ldke_peft.cli import load_model
    from ldke_peft.hub import load_edits
    from ldke_peft.metrics.routes import route_requests, which_slots

    model, processor = load_model(str(workdir / "model"))
    pm = load_edits(model, str(pack))
    pm.load_adapter(str(pack), adapter_name="second")  # same edit, loaded but not active
    red, blue = Image.open(workdir / "img" / "red.png"), Image.open(workdir / "img" / "blue.png")
    assert which_slots(pm, processor, [red, blue], [PROMPT, PROMPT]) == [{"default": 0, "second": -1},
                                                                          {"default": -1, "second": -1}]
    pm.set_adapter("second")
    assert which_slots(pm, processor, [red], [PROMPT]) == [{"default": -1, "second": 0}]
    # route_requests judges against the active adapter by default
    req = EditRequest(image=str(workdir / "img" / "red.png"), prompt=PROMPT, target="Paris", ground_truth="London")
    (route,) = route_requests(pm, processor, [req])
    assert (route.slot, route.expected_slot, route.ok) == (0, 0, True)
    with pytest.raises(ValueError, match="batch_size"):
        which_slots(pm, processor, [red], [PROMPT], batch_size=0)


def test_which_slots_needs_a_pack():
    from ldke_peft.metrics.routes import which_slots

    model, processor = tiny_model("llava")
    with pytest.raises(ValueError, match="no LDKE adapter"):
        which_slots(model, processor, [None], ["What is this?"])


def test_locate_table_json_and_png(workdir, tmp_path, capsys):
    args = [str(workdir / "model"), str(workdir / "requests.jsonl")]
    png = tmp_path / "layers.png"
    assert main(["locate", *args, "--png", str(png)]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line[:1].isdigit()]
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3]  # the tiny model has 4 decoder layers
    assert sum("edit" in r for r in rows) == 1 and "excluded" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["locate", *args, "--json", "--num-layers", "2"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res) == 1 and len(res[0]["scores"]) == 4 and len(res[0]["layers"]) == 2


def test_push_to_local_hub(workdir, pack, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    metrics_file = tmp_path / "metrics.json"
    metrics_file.write_text(json.dumps({"reliability": 1.0, "coupled_locality": 0.5, "n": 1}))
    with FakeHub() as hub:
        rc = main(["push", str(workdir / "model"), str(pack), "org/cli-pack", "--endpoint", hub.endpoint,
                   "--token", "hf_cli", "--message", "from the cli", "--metrics", str(metrics_file),
                   "--base-model-id", "org/tiny-llava"])
        commits = hub.commits("org/cli-pack")
    assert rc == 0
    assert capsys.readouterr().out.strip().endswith(commits[0].oid)
    assert commits[0].summary == "from the cli"
    assert sorted(commits[0].files) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "ldke_edits.json"]
    card = ModelCard(commits[0].files["README.md"].decode())
    assert card.data.base_model == "org/tiny-llava"
    assert "| coupled_locality | 0.500 |" in card.text and "## Edit reports" in card.text
    assert json.loads(commits[0].files["adapter_config.json"])["base_model_name_or_path"] == "org/tiny-llava"


# ---------------------------------------------------------------------- errors


def test_missing_image_is_one_line_exit_2(workdir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text((workdir / "requests.jsonl").read_text().replace("red.png", "nowhere.png"))
    rc = main(["edit", str(workdir / "model"), str(bad), "--image-root", str(workdir), "--out", str(tmp_path / "p")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ldke: error: ") and "image file not found" in err
    assert "nowhere.png" in err and "Traceback" not in err


def test_missing_image_in_a_real_process(workdir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text((workdir / "requests.jsonl").read_text().replace("red.png", "nowhere.png"))
    proc = subprocess.run(_ldke_executable() + ["locate", str(workdir / "model"), str(bad), "--image-root", str(workdir)],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ldke: error: ") and "image file not found" in lines[0], proc.stderr


def test_debug_shows_the_exception(workdir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text((workdir / "requests.jsonl").read_text().replace("red.png", "nowhere.png"))
    with pytest.raises(ImageError):
        main(["edit", str(workdir / "model"), str(bad), "--image-root", str(workdir), "--debug"])


@pytest.mark.parametrize("model_type", ["bert", "not_a_model_type"])
def test_unknown_model_type_is_one_line_exit_2(workdir, tmp_path, capsys, model_type):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    assert main(["edit", str(folder), str(workdir / "requests.jsonl")]) == 2
    line = _error_line(capsys)
    assert line.startswith("ldke: error: ") and f"model_type {model_type!r} is not supported" in line and "llava" in line


def test_missing_files_are_one_line_exit_2(workdir, pack, tmp_path, capsys):
    assert main(["edit", str(tmp_path / "nope"), str(workdir / "requests.jsonl")]) == 2
    assert "model folder not found" in _error_line(capsys)
    assert main(["eval", str(workdir / "model"), str(pack), str(tmp_path / "none.jsonl")]) == 2
    assert "requests file not found" in _error_line(capsys)
    assert main(["eval", str(tmp_path), str(pack), str(workdir / "requests.jsonl")]) == 2
    assert "has no config.json" in _error_line(capsys)


def test_pack_for_another_base_is_one_line_exit_2(workdir, pack, capsys):
    assert main(["eval", str(workdir / "other"), str(pack), str(workdir / "requests.jsonl")]) == 2
    line = _error_line(capsys)
    assert line.startswith("ldke: error: this LDKE pack was made for a different base model")


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["edit"])
    assert exc.value.code == 2
    assert "the following arguments are required" in capsys.readouterr().err


# ---------------------------------------------------------------------- demo


@pytest.mark.slow
def test_demo_runs_offline_and_reloads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the demo's temporary pack folder goes
    assert main(["demo"]) == 0
    text = capsys.readouterr().out
    assert "answers identical" in text and "MISMATCH" not in text
    for probe in ("edit question", "rephrased question", "another view", "coupled: same image", "unrelated"):
        assert probe in text
    assert "reliability" in text and "coupled_locality" in text
    assert "adapter_config.json, adapter_model.safetensors" in text and "removed at the end" in text
    assert not list(tmp_path.iterdir()), "the demo must remove its temporary pack folder"


@pytest.mark.slow
def test_demo_save_gives_a_model_folder_and_negatives_reach_the_router(world, tmp_path, capsys):
    """`ldke demo --save DIR` is a model folder `ldke edit` takes; `--negatives` gives the CLI edit the
    router the same edit gets in Python with the same pool (and without it, another one)."""
    from ldke_peft import edit
    from ldke_peft.cli import load_model, load_requests

    folder = tmp_path / "toy"
    assert main(["demo", "--save", str(folder)]) == 0
    assert f"ldke edit {folder}" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "processor_config.json", "requests.jsonl", "negatives.jsonl"} <= set(
        os.listdir(folder))
    requests = str(folder / "requests.jsonl")

    def cli_router(*extra: str) -> dict:
        out = tmp_path / f"pack{len(extra)}"
        assert main(["edit", str(folder), requests, "--out", str(out), "--no-progress", *extra]) == 0
        return json.loads((out / "ldke_report.json").read_text())[0]["router"]

    with_file = cli_router("--negatives", str(folder / "negatives.jsonl"))
    model, processor = load_model(str(folder), device="cpu")
    in_python = edit(model, processor, load_requests(requests), negatives=world.negative_pool(), progress=False)
    assert with_file == in_python.ldke_reports[0].router
    assert cli_router() != with_file


def test_missing_processor_names_the_option(workdir, tmp_path, capsys):
    bare = tmp_path / "weights-only"
    shutil.copytree(workdir / "model", bare, ignore=shutil.ignore_patterns("*processor*", "*token*", "chat_template*"))
    assert main(["locate", str(bare), str(workdir / "requests.jsonl")]) == 2
    line = _error_line(capsys)
    assert line.startswith("ldke: error: ") and "has no processor" in line and "--processor DIR" in line
    assert main(["locate", str(bare), str(workdir / "requests.jsonl"), "--processor", str(tmp_path / "nope")]) == 2
    assert "processor folder not found" in _error_line(capsys)
    assert main(["locate", str(bare), str(workdir / "requests.jsonl"), "--processor", str(workdir / "model"), "--json"]) == 0
    with pytest.raises(ProcessorNotFoundError):
        main(["locate", str(bare), str(workdir / "requests.jsonl"), "--debug"])


def test_bad_negatives_file_is_one_line_with_its_line_number(workdir, tmp_path, capsys):
    bad = tmp_path / "negatives.jsonl"
    bad.write_text('{"question": "What is shown?", "relation": "object"}\n\n{"image": "nowhere.png", "entity": "X"}\n')
    rc = main(["edit", str(workdir / "model"), str(workdir / "requests.jsonl"), "--negatives", str(bad),
               "--out", str(tmp_path / "p")])
    assert rc == 2
    line = _error_line(capsys)
    assert line.startswith(f"ldke: error: line 3 of {bad}: image: image file not found") and "nowhere.png" in line
    assert not (tmp_path / "p").exists()


def test_help_lists_every_option_without_running_a_command():
    code = ("import sys\nfrom ldke_peft.cli_front import main\ntry:\n    main(['edit', '--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('ldke_peft.cli', 'ldke_peft.editing.editor') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--negatives" in proc.stdout and proc.stdout.strip().splitlines()[-1] == "[]"