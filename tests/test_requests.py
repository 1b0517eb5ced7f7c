"""Request loaders: EasyEdit dataset JSON, EasyEdit editor dicts, our JSONL; malformed-input errors."""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ldke_peft.errors import ImageError, InvalidRequestError
from ldke_peft.requests import (
    EditRequest,
    Probe,
    image_fingerprint,
    load_easyedit,
    load_image,
    load_jsonl,
    load_negatives,
    parse_easyedit_record,
    parse_request,
    requests_from_easyedit_dicts,
    save_jsonl,
    save_negatives,
    validate_requests,
)


def _png(path, color, size=(24, 16)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


@pytest.fixture
def coco(tmp_path):
    """An EasyEdit-like layout: coco images under one root, rephrase images under another."""
    root = tmp_path / "coco"
    rroot = tmp_path / "rephrase"
    _png(str(root / "val2014" / "a.jpg.png"), (200, 0, 0))
    _png(str(root / "val2014" / "loc.png"), (0, 0, 200))
    _png(str(rroot / "a_view2.png"), (190, 10, 0))
    _png(str(rroot / "a_view3.png"), (180, 20, 0))
    (root / "not_an_image.png").write_text("hello")
    (root / "empty.png").write_bytes(b"")
    return root, rroot


def _vqa_record(**over):
    rec = {
        "src": "What color is the flag?",
        "pred": "red",
        "alt": "green",
        "rephrase": "Which colour does the flag have?",
        "image": "val2014/a.jpg.png",
        "image_rephrase": "a_view2.png",
        "loc": "nq question: who wrote hamlet",
        "loc_ans": "Shakespeare",
        "m_loc": "val2014/loc.png",
        "m_loc_q": "What is in the picture?",
        "m_loc_a": "a blue square",
    }
    rec.update(over)
    return {k: v for k, v in rec.items() if v is not _DROP}


_DROP = object()


def _write_json(path, records):
    path.write_text(json.dumps(records))
    return path


# ---------------------------------------------------------------------- EasyEdit dataset JSON


def test_load_easyedit_vqa_and_caption_records(tmp_path, coco):
    root, rroot = coco
    caption = _vqa_record(
        src="a photo of", pred=["a red flag"], alt=["a green flag", "green flag"],
        rephrase=["a picture of", "an image of"], image_rephrase=["a_view2.png", "a_view3.png"],
    )
    path = _write_json(tmp_path / "data.json", [_vqa_record(), caption])
    reqs = load_easyedit(path, root, rroot)
    assert len(reqs) == 2
    r = reqs[0]
    assert (r.prompt, r.target, r.ground_truth) == ("What color is the flag?", "green", "red")
    assert r.rephrase_prompts == ["Which colour does the flag have?"]
    assert r.image == os.path.join(str(root), "val2014/a.jpg.png")  # kept as a path (lazy)
    assert r.rephrase_images == [os.path.join(str(rroot), "a_view2.png")]
    assert r.locality == [Probe("nq question: who wrote hamlet", "Shakespeare", None, "easyedit_loc")]
    assert len(r.m_locality) == 1 and r.m_locality[0].prompt == "What is in the picture?"
    assert r.m_locality[0].answer == "a blue square"
    assert r.m_locality[0].image == os.path.join(str(root), "val2014/loc.png")  # m_loc is under image_root
    assert load_image(r.image).getpixel((0, 0)) == (200, 0, 0)
    c = reqs[1]
    assert (c.target, c.ground_truth) == ("a green flag", "a red flag")  # lists: first element
    assert c.rephrase_prompts == ["a picture of", "an image of"]
    assert [load_image(im).getpixel((0, 0)) for im in c.rephrase_images] == [(190, 10, 0), (180, 20, 0)]


def test_load_easyedit_open_images_and_default_rephrase_root(tmp_path, coco):
    root, _ = coco
    path = _write_json(tmp_path / "d.json", [_vqa_record(image_rephrase="val2014/loc.png")])
    (r,) = load_easyedit(path, root, open_images=True)
    assert isinstance(r.image, Image.Image) and r.image.getpixel((1, 1)) == (200, 0, 0)
    assert r.rephrase_images[0].getpixel((0, 0)) == (0, 0, 200)


def test_load_easyedit_optional_groups(tmp_path, coco):
    root, rroot = coco
    rec = _vqa_record(loc=_DROP, loc_ans=_DROP, m_loc=_DROP, m_loc_q=_DROP, m_loc_a=_DROP,
                      rephrase=_DROP, image_rephrase=_DROP, pred=_DROP)
    (r,) = load_easyedit(_write_json(tmp_path / "d.json", [rec]), root, rroot)
    assert r.locality == [] and r.m_locality == [] and r.rephrase_prompts == [] and r.ground_truth is None


@pytest.mark.parametrize(
    "over, field, error",
    [
        ({"src": _DROP}, "src", InvalidRequestError),
        ({"src": 3}, "src", InvalidRequestError),
        ({"src": "  "}, "src", InvalidRequestError),
        ({"alt": ""}, "alt", InvalidRequestError),
        ({"alt": []}, "alt", InvalidRequestError),
        ({"alt": [5]}, "alt", InvalidRequestError),
        ({"alt": _DROP}, "alt", InvalidRequestError),
        ({"pred": {"a": 1}}, "pred", InvalidRequestError),
        ({"rephrase": 7}, "rephrase", InvalidRequestError),
        ({"rephrase": ["ok", ""]}, "rephrase", InvalidRequestError),
        ({"image": _DROP}, "image", ImageError),
        ({"image": "val2014/missing.png"}, "image", ImageError),
        ({"image": "not_an_image.png"}, "image", ImageError),
        ({"image": "empty.png"}, "image", ImageError),
        ({"image": "val2014"}, "image", ImageError),
        ({"image": ""}, "image", ImageError),
        ({"image": 12}, "image", ImageError),
        ({"image": ["val2014/a.jpg.png", "val2014/loc.png"]}, "image", ImageError),
        ({"image_rephrase": "nope.png"}, "image_rephrase", ImageError),
        ({"loc_ans": _DROP}, "loc_ans", InvalidRequestError),
        ({"loc": ""}, "loc", InvalidRequestError),
        ({"m_loc": _DROP}, "m_loc", InvalidRequestError),
        ({"m_loc_a": None}, "m_loc_a", InvalidRequestError),
        ({"m_loc": "val2014/missing.png"}, "m_loc", ImageError),
        ({"m_loc_q": ["x"]}, "m_loc_q", InvalidRequestError),
    ],
)
def test_load_easyedit_malformed_record_names_index_and_field(tmp_path, coco, over, field, error):
    root, rroot = coco
    path = _write_json(tmp_path / "bad.json", [_vqa_record(), _vqa_record(**over)])
    with pytest.raises(error) as info:
        load_easyedit(path, root, rroot)
    assert info.value.field == field
    assert str(info.value).startswith("record 1: ")
    assert field in str(info.value)
    assert info.value.index == 1
    # skip_invalid drops it, like upstream drops "dirty" records
    assert len(load_easyedit(path, root, rroot, skip_invalid=True)) == 1


def test_load_easyedit_bad_files(tmp_path, coco):
    root, _ = coco
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        load_easyedit(bad, root)
    bad.write_text('"just a string"')
    with pytest.raises(InvalidRequestError, match="expected a JSON list"):
        load_easyedit(bad, root)
    bad.write_text('[["a list, not a record"]]')
    with pytest.raises(InvalidRequestError, match="record 0: expected a JSON object"):
        load_easyedit(bad, root)


# ---------------------------------------------------------------------- EasyEdit editor dicts


def test_requests_from_easyedit_dicts_list_and_bare_dict(tmp_path):
    img = Image.new("RGB", (20, 20), (1, 2, 3))
    view = Image.new("RGBA", (20, 20), (4, 5, 6, 255))
    loc_img = Image.new("RGB", (8, 8), (9, 9, 9))
    d = {
        "prompt": "What is the capital of the country shown?",
        "target": "Lyon",
        "image": [img],  # EasyEdit's processors return a list of PIL images
        "rephrase_prompt": "Which city is the capital?",
        "image_rephrase": [view],
        "locality_prompt": "Who wrote Hamlet?",
        "locality_ground_truth": "Shakespeare",
        "multimodal_locality_image": [loc_img],
        "multimodal_locality_prompt": "What color is it?",
        "multimodal_locality_ground_truth": "grey",
        "file_type": "image",
        "cond": "Paris >> Lyon || ...",  # extra keys are ignored
        "pred": "Paris",
    }
    (r,) = requests_from_easyedit_dicts(d)
    assert (r.prompt, r.target, r.ground_truth) == (d["prompt"], "Lyon", "Paris")
    assert r.image is img
    assert r.rephrase_prompts == ["Which city is the capital?"]
    assert r.rephrase_images[0].mode == "RGB"
    assert r.locality[0].answer == "Shakespeare" and r.locality[0].image is None
    assert r.m_locality[0].image is loc_img and r.m_locality[0].prompt == "What color is it?"
    two = requests_from_easyedit_dicts([d, dict(d, target="Nice", image=img)])
    assert [x.target for x in two] == ["Lyon", "Nice"]
    # a path image, resolved against image_root
    _png(str(tmp_path / "x.png"), (7, 7, 7))
    (p,) = requests_from_easyedit_dicts({"prompt": "q?", "target": "a", "image": "x.png"}, image_root=tmp_path)
    assert p.image.getpixel((0, 0)) == (7, 7, 7)


@pytest.mark.parametrize(
    "over, field",
    [
        ({"prompt": None}, "prompt"),
        ({"target": ""}, "target"),
        ({"target": 3.5}, "target"),
        ({"image": None}, "image"),
        ({"image": []}, "image"),
        ({"image": "does/not/exist.png"}, "image"),
        ({"image": object()}, "image"),
        ({"image_rephrase": [Image.new("RGB", (0, 4))]}, "image_rephrase"),
        ({"locality_prompt": "q?"}, "locality_ground_truth"),
        ({"multimodal_locality_prompt": "q?", "multimodal_locality_ground_truth": "a"}, "multimodal_locality_image"),
        ({"file_type": "video"}, "file_type"),
        ({"rephrase_prompt": [1]}, "rephrase_prompt"),
    ],
)
def test_requests_from_easyedit_dicts_errors(over, field):
    good = {"prompt": "q?", "target": "a", "image": Image.new("RGB", (4, 4))}
    bad = dict(good, **over)
    with pytest.raises(InvalidRequestError) as info:
        requests_from_easyedit_dicts([good, good, bad])
    assert info.value.field == field
    assert str(info.value).startswith("record 2: ")


def test_requests_from_easyedit_dicts_rejects_non_lists():
    for junk in (None, 3, "prompt", Image.new("RGB", (2, 2))):
        with pytest.raises(InvalidRequestError):
            requests_from_easyedit_dicts(junk)
    with pytest.raises(InvalidRequestError, match="record 1: expected a dict"):
        requests_from_easyedit_dicts([{"prompt": "q", "target": "a", "image": Image.new("RGB", (2, 2))}, 5])


# ---------------------------------------------------------------------- our JSONL


def _full_request(tmp_path):
    on_disk = _png(str(tmp_path / "pics" / "flag.png"), (10, 20, 30))
    mem = Image.new("RGB", (16, 12), (100, 0, 50))  # no file: must be saved by save_jsonl
    look_alike = Image.new("RGB", (16, 12), (100, 0, 60))
    return EditRequest(
        prompt="What is the capital of the country shown?",
        target="Lyon",
        image=mem,
        ground_truth="Paris",
        rephrase_prompts=["Which city is its capital?", "Name the capital."],
        rephrase_images=[on_disk, mem],
        locality=[Probe("Who wrote Hamlet?", "Shakespeare")],
        m_locality=[Probe("What is shown?", "a flag", image=on_disk, kind="other_entity")],
        coupled=[Probe("What currency is used there?", "euro", image=mem, kind="same_image"),
                 Probe("What is the capital of the country shown?", "Rome", image=look_alike, kind="look_alike")],
        portability=[Probe("Which river flows through the capital?", "Rhone", image=mem, kind="multi_hop")],
        consequences=[Probe("In which country is the capital of the country shown?", "France")],
        subject="France",
        relation="capital",
    )


def _pixels(req):
    ims = [req.image, *req.rephrase_images] + [p.image for f in ("locality", "m_locality", "coupled", "portability")
                                               for p in getattr(req, f)]
    return [None if im is None else image_fingerprint(load_image(im)) for im in ims]


def test_jsonl_round_trip(tmp_path):
    req = _full_request(tmp_path)
    text_only = EditRequest(prompt="Who is the CEO of X?", target="Alice")
    out = tmp_path / "out" / "edits.jsonl"
    mem, views = req.image, list(req.rephrase_images)
    save_jsonl([req, text_only], out)
    assert req.image is mem and req.rephrase_images == views  # the caller's requests are not modified
    assert not getattr(mem, "filename", "")
    lines = out.read_text().splitlines()
    assert len(lines) == 2
    saved = json.loads(lines[0])
    assert saved["image"].startswith("images/") and saved["image"].endswith(".png")
    assert saved["rephrase_images"][0] == os.path.join("..", "pics", "flag.png")  # relative to the JSONL folder
    assert len(os.listdir(out.parent / "images")) == 2  # mem + look_alike, deduplicated by content
    back = load_jsonl(out)
    assert len(back) == 2
    assert _pixels(back[0]) == _pixels(req)
    for name in ("prompt", "target", "ground_truth", "rephrase_prompts", "subject", "relation"):
        assert getattr(back[0], name) == getattr(req, name)
    assert [(p.prompt, p.answer, p.kind) for p in back[0].coupled] == [(p.prompt, p.answer, p.kind) for p in req.coupled]
    assert [(p.prompt, p.answer) for p in back[0].consequences] == [(p.prompt, p.answer) for p in req.consequences]
    assert back[0].without_probes().consequences == back[0].consequences  # edit material, not a probe
    assert back[1].image is None and back[1].to_dict() == text_only.to_dict()
    assert "consequences" not in json.loads(lines[1])  # written only when given (older readers keep working)
    # saving what was loaded gives the same file
    again = tmp_path / "out" / "again.jsonl"
    save_jsonl(back, again)
    assert again.read_text() == out.read_text()
    # open_images gives PIL images with the same pixels
    pil = load_jsonl(out, open_images=True)
    assert isinstance(pil[0].image, Image.Image) and _pixels(pil[0]) == _pixels(req)


def test_jsonl_image_root(tmp_path):
    req = _full_request(tmp_path)
    save_jsonl([req], tmp_path / "a" / "e.jsonl", image_root=tmp_path)
    saved = json.loads((tmp_path / "a" / "e.jsonl").read_text())
    assert saved["rephrase_images"][0] == os.path.join("pics", "flag.png")
    assert saved["image"].startswith(os.path.join("a", "images"))
    with pytest.raises(ImageError, match="^line 1 of "):
        load_jsonl(tmp_path / "a" / "e.jsonl")  # paths are relative to tmp_path, not a/
    (back,) = load_jsonl(tmp_path / "a" / "e.jsonl", image_root=tmp_path)
    assert _pixels(back) == _pixels(req)


@pytest.mark.parametrize(
    "line, field, error",
    [
        ('{"prompt": "q?"}', "target", InvalidRequestError),
        ('{"prompt": "q?", "target": ""}', "target", InvalidRequestError),
        ('{"prompt": "q?", "target": "a", "taget": "b"}', "taget", InvalidRequestError),
        ('{"prompt": 1, "target": "a"}', "prompt", InvalidRequestError),
        ('{"prompt": "q?", "target": "a", "image": "missing.png"}', "image", ImageError),
        ('{"prompt": "q?", "target": "a", "rephrase_images": ["missing.png"]}', "rephrase_images[0]", ImageError),
        ('{"prompt": "q?", "target": "a", "locality": [{"prompt": "x"}]}', "locality", InvalidRequestError),
        ('{"prompt": "q?", "target": "a", "coupled": [{"prompt": "x", "answer": "y", "img": null}]}', "coupled", InvalidRequestError),
        ('{"prompt": "q?", "target": "a", "m_locality": [{"prompt": "x", "answer": "y", "image": "m.png"}]}',
         "m_locality[0].image", ImageError),
        ('{"prompt": "q?", "target": "a", "portability": "not a list"}', "portability", InvalidRequestError),
        ('{"prompt": "q?", "target": "a", "consequences": [{"prompt": "x", "answer": ""}]}', "consequences",
         InvalidRequestError),
        # a consequence is asked about the edit's own image: another image is an error, not silently ignored
        ('{"prompt": "q?", "target": "a", "consequences": [{"prompt": "x", "answer": "y", "image": "m.png"}]}',
         "consequences", InvalidRequestError),
        ('{"prompt": "q?", "target": "a", "subject": 3}', "subject", InvalidRequestError),
        ('[1, 2]', None, InvalidRequestError),
        ('{"prompt": "q?", "target": ', None, InvalidRequestError),
    ],
)
def test_jsonl_malformed_records(tmp_path, line, field, error):
    good = json.dumps({"prompt": "q?", "target": "a"})
    path = tmp_path / "e.jsonl"
    path.write_text(f"{good}\n\n{good}\n{line}\n")
    _raises_at_line(load_jsonl, path, error, field, line=4, index=2)


def _raises_at_line(load, path, error, field, *, line: int, index: int) -> None:
    """``load(path)`` raises ``error`` naming ``field`` and the line a user's editor shows (from 1, blank
    lines counted); ``exc.index`` is the record index (from 0, blank lines not counted)."""
    with pytest.raises(error) as info:
        load(path)
    assert info.value.field == field
    assert str(info.value).startswith(f"line {line} of {path}: ")
    assert info.value.line == line and info.value.index == index


def test_negatives_round_trip_and_relative_images(tmp_path):
    from ldke_peft.editing.editor import NegativePool

    red = Image.new("RGB", (8, 8), (255, 0, 0))
    pool = NegativePool(questions=[("What is the currency?", "currency"), ("What is shown?", None)],
                        images=[(red, "Redland"), (Image.new("RGB", (8, 8), (0, 0, 255)), None)])
    save_negatives(pool, tmp_path / "n" / "negatives.jsonl")
    lines = [json.loads(t) for t in (tmp_path / "n" / "negatives.jsonl").read_text().splitlines()]
    assert lines[0] == {"question": "What is the currency?", "relation": "currency"}
    assert lines[2]["entity"] == "Redland" and not os.path.isabs(lines[2]["image"])
    back = load_negatives(tmp_path / "n" / "negatives.jsonl")
    assert back.questions == pool.questions
    assert [e for _, e in back.images] == ["Redland", None]
    assert back.images[0][0].tobytes() == red.tobytes()
    with pytest.raises(ImageError, match="^line 3 of "):  # relative to --image-root when given
        load_negatives(tmp_path / "n" / "negatives.jsonl", image_root=tmp_path)


@pytest.mark.parametrize(
    "line, field, error",
    [
        ('{"question": "", "relation": "r"}', "question", InvalidRequestError),
        ('{"question": "q?", "relation": 3}', "relation", InvalidRequestError),
        ('{"question": "q?", "entity": "E"}', "entity", InvalidRequestError),
        ('{"question": "q?", "image": "a.png"}', "image", InvalidRequestError),
        ('{"relation": "r"}', None, InvalidRequestError),
        ('{"image": "missing.png", "entity": "E"}', "image", ImageError),
        ('{"image": 7}', "image", ImageError),
        ('["q?", "r"]', None, InvalidRequestError),
        ('{"question": ', None, InvalidRequestError),
    ],
)
def test_negatives_malformed_lines(tmp_path, line, field, error):
    path = tmp_path / "negatives.jsonl"
    path.write_text(f'{{"question": "q?", "relation": "r"}}\n\n{line}\n')
    _raises_at_line(load_negatives, path, error, field, line=3, index=1)


def test_negatives_file_without_negatives(tmp_path):
    path = tmp_path / "negatives.jsonl"
    path.write_text("\n\n")
    with pytest.raises(InvalidRequestError, match="holds no negatives"):
        load_negatives(path)


def test_validate_requests_names_index():
    ok = EditRequest(prompt="q?", target="a")
    assert validate_requests([ok, {"prompt": "p", "target": "t"}])[1].target == "t"
    with pytest.raises(InvalidRequestError, match=r"^request 1: .*target") as info:
        validate_requests([ok, EditRequest(prompt="q?", target="  ")])
    assert info.value.field == "target"
    with pytest.raises(InvalidRequestError, match=r"^record 2: "):
        validate_requests([ok, ok, {"prompt": "p"}])
    with pytest.raises(InvalidRequestError):
        validate_requests(42)


def test_validate_with_tokenizer():
    from ldke_peft.testing._tokenizer import word_tokenizer

    tok = word_tokenizer(["the capital is Paris"])
    validate_requests([EditRequest(prompt="q?", target="Paris")], tok)


# ---------------------------------------------------------------------- property tests: only documented errors

_json_leaf = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=12)
_json_value = st.recursive(_json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=8)


@pytest.fixture(scope="module")
def real_pngs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pngs")
    return [_png(str(d / f"{i}.png"), (i * 40, 0, 0)) for i in range(2)] + [str(d)]


def _values(paths):
    pil = st.builds(lambda w, h: Image.new("RGB", (w, h)), st.integers(0, 3), st.integers(0, 3))
    leaf = _json_leaf | st.sampled_from(paths) | pil
    return st.recursive(leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=8)


def _dicts(keys, paths):
    return st.dictionaries(st.sampled_from(keys) | st.text(max_size=5), _values(paths), max_size=len(keys) + 1)


def _mutated(base, paths):
    """A valid dict with some keys dropped and some replaced by arbitrary values (reaches deep checks)."""
    keys = sorted(base)
    return st.builds(
        lambda drop, over: {**{k: v for k, v in base.items() if k not in drop}, **over},
        st.sets(st.sampled_from(keys), max_size=2),
        st.dictionaries(st.sampled_from(keys), _values(paths), max_size=2),
    )


def _valid_ours(paths):
    return {"prompt": "q?", "target": "a", "image": paths[0], "rephrase_prompts": ["r?"], "rephrase_images": [paths[1]],
            "locality": [{"prompt": "l?", "answer": "x"}], "m_locality": [{"prompt": "m?", "answer": "y", "image": paths[0]}],
            "coupled": [], "portability": [{"prompt": "p?", "answer": "z", "image": None, "kind": "k"}],
            "ground_truth": "b", "subject": "s", "relation": "r"}


def _valid_ee(paths):
    img = Image.new("RGB", (3, 3))
    return {"prompt": "q?", "target": "a", "image": [img], "rephrase_prompt": "r?", "image_rephrase": [paths[1]],
            "locality_prompt": "l?", "locality_ground_truth": "x", "multimodal_locality_image": [img],
            "multimodal_locality_prompt": "m?", "multimodal_locality_ground_truth": "y", "pred": "b"}


def _valid_rec(paths):
    return {"src": "q?", "pred": ["b"], "alt": "a", "rephrase": "r?", "image": paths[0], "image_rephrase": paths[1],
            "loc": "l?", "loc_ans": "x", "m_loc": paths[0], "m_loc_q": "m?", "m_loc_a": "y"}


_OUR_KEYS = ["prompt", "target", "image", "ground_truth", "rephrase_prompts", "rephrase_images", "locality",
             "m_locality", "coupled", "portability", "subject", "relation"]
_EE_KEYS = ["prompt", "target", "image", "rephrase_prompt", "image_rephrase", "locality_prompt", "locality_ground_truth",
            "multimodal_locality_image", "multimodal_locality_prompt", "multimodal_locality_ground_truth", "pred", "file_type"]
_REC_KEYS = ["src", "pred", "alt", "rephrase", "image", "image_rephrase", "loc", "loc_ans", "m_loc", "m_loc_q", "m_loc_a"]
_PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_PROPERTY
@given(data=st.data())
def test_parse_request_only_raises_documented_errors(real_pngs, data):
    d = data.draw(_mutated(_valid_ours(real_pngs), real_pngs) | _dicts(_OUR_KEYS, real_pngs) | _values(real_pngs))
    try:
        req = parse_request(d)
    except InvalidRequestError:
        return
    assert isinstance(req, EditRequest) and req.validate() is req


@_PROPERTY
@given(data=st.data())
def test_requests_from_easyedit_dicts_only_raises_documented_errors(real_pngs, data):
    one = _mutated(_valid_ee(real_pngs), real_pngs) | _dicts(_EE_KEYS, real_pngs)
    d = data.draw(st.lists(one, max_size=2) | one | _values(real_pngs))
    try:
        out = requests_from_easyedit_dicts(d)
    except InvalidRequestError:
        return
    assert all(isinstance(r, EditRequest) and r.validate() is r for r in out)


@_PROPERTY
@given(data=st.data())
def test_parse_easyedit_record_only_raises_documented_errors(real_pngs, data):
    rec = data.draw(_mutated(_valid_rec(real_pngs), real_pngs) | _dicts(_REC_KEYS, real_pngs) | _values(real_pngs))
    try:
        req = parse_easyedit_record(rec, image_root=None, index=0)
    except InvalidRequestError as exc:
        assert str(exc).startswith("record 0: ")
        return
    assert isinstance(req, EditRequest) and req.validate() is req


@settings(max_examples=60, deadline=None)
@given(d=st.dictionaries(st.sampled_from(_OUR_KEYS), _json_value, max_size=12))
def test_editrequest_kwargs_validate_only_raises_documented_errors(d):
    """``EditRequest(**d).validate()``: construction needs prompt/target; validation must not crash."""
    d = {"prompt": d.pop("prompt", "q?"), "target": d.pop("target", "a"), **d}
    try:
        EditRequest(**d).validate()
    except InvalidRequestError:
        pass


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    prompt=st.text(min_size=1, max_size=20).filter(str.strip),
    target=st.text(min_size=1, max_size=20).filter(str.strip),
    rephrases=st.lists(st.text(min_size=1, max_size=10).filter(str.strip), max_size=2),
    subject=st.none() | st.text(max_size=8),
)
def test_jsonl_round_trip_property(tmp_path_factory, prompt, target, rephrases, subject):
    d = tmp_path_factory.mktemp("rt")
    req = EditRequest(prompt=prompt, target=target, rephrase_prompts=rephrases, subject=subject,
                      locality=[Probe(prompt, target, kind="k")])
    save_jsonl([req], d / "r.jsonl")
    (back,) = load_jsonl(d / "r.jsonl")
    assert back.to_dict() == req.to_dict()


def test_fingerprints_are_memoized_only_within_a_block():
    """One edit fingerprints each image object once; outside the block a changed image gets a new fingerprint."""
    from PIL import Image

    from ldke_peft.requests import image_fingerprint
    from ldke_peft.requests.images import fingerprints_memoized

    im = Image.new("RGB", (8, 8), (10, 20, 30))
    before = image_fingerprint(im)
    with fingerprints_memoized():
        assert image_fingerprint(im) == before
        im.putpixel((0, 0), (255, 0, 0))
        assert image_fingerprint(im) == before, "within the block the first fingerprint is reused"
    after = image_fingerprint(im)
    assert after != before, "outside the block the image is read again"
    with fingerprints_memoized():
        assert image_fingerprint(Image.new("RGB", (8, 8), (10, 20, 30))) == before
