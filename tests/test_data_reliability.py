"""Data promises under bad input (issues 9 and 14): outputs complete or absent, paths stay under the data
root, every image decode-checked before training, malformed rows skipped (never a crash), no silent blanks."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import stat
import sys

import numpy as np
import pytest
from PIL import Image

from data_formats import schema
from data_formats.convert import main as convert
from data_formats.schema import ImageError, load_image, read_jsonl
from finetune.dataset import CogVLMDataset, ImageDecodeError, build_torch_dataset, encode_jsonl
from finetune.tiny import tiny_config
from finetune.tokenization import build_tiny_tokenizer
from finetune.validate import DataValidationError, check_file, load_and_validate
from finetune.validate import main as validate

QA = [{"role": "user", "content": "<image>What colour?"}, {"role": "assistant", "content": "red"}]
TEXT = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "hello"}]


def _jsonl(path, rows):
    """Rows (dicts, or raw strings written as they are) as a JSONL file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def _red(folder, name="red.png", size=(16, 16)):
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (255, 0, 0)).save(folder / name)
    return folder / name


def _processor(version=2, image_size=28):
    from finetune.models.cogvlm.processing import CogVLMProcessor

    return CogVLMProcessor.from_config(tiny_config(version), build_tiny_tokenizer(version), template_version="chat",
                                       max_length=256, image_size=image_size)


def _validate(capsys, *argv):
    rc = validate([str(a) for a in argv])
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    return rc, out.out, out.err


# ---------------------------------------------------------------------------------------------
# 14.2 / 9.7: convert publishes a complete, non-empty output or nothing
# ---------------------------------------------------------------------------------------------

SHAREGPT_ROW = {"id": "s1", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}


@pytest.fixture()
def keep(tmp_path):
    out = _jsonl(tmp_path / "keep.jsonl", [{"id": f"k{i}", "messages": TEXT} for i in range(5)])
    return out, out.read_bytes()


def _convert(capsys, *argv):
    rc = convert([str(a) for a in argv] + ["--quiet"])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return rc, captured.out, captured.err


@pytest.mark.parametrize("content", [b'{"id": "\xe9\xff"}\n', b"", b"\n\n", b'{"conversations": 3}\n'],
                         ids=["not-utf8", "empty", "blank", "no-valid-row"])
def test_convert_failure_leaves_existing_output_untouched(tmp_path, capsys, keep, content):
    out, before = keep
    src = tmp_path / "in.jsonl"
    src.write_bytes(content)
    rc, stdout, err = _convert(capsys, "--from", "sharegpt", src, "--out", out)
    assert rc == 1 and out.read_bytes() == before  # the 5 rows are still there
    assert "left as it was" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "keep.jsonl"]  # no temp file left


def test_convert_zero_rows_writes_no_file(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text("")
    rc, _, err = _convert(capsys, "--from", "sharegpt", src, "--out", tmp_path / "new" / "out.jsonl")
    assert rc == 1 and "was not written" in err
    assert not (tmp_path / "new").exists()


def test_convert_interrupted_midway_keeps_old_output(tmp_path, capsys, keep, monkeypatch):
    out, before = keep
    src = _jsonl(tmp_path / "in.jsonl", [SHAREGPT_ROW] * 3)
    from data_formats import convert as convert_module

    real = convert_module.records

    def dying(*args):
        for i, record in enumerate(real(*args)):
            if i == 2:
                raise KeyboardInterrupt  # Ctrl-C / a kill between two rows
            yield record

    monkeypatch.setattr(convert_module, "records", dying)
    with pytest.raises(KeyboardInterrupt):
        convert(["--from", "sharegpt", str(src), "--out", str(out), "--quiet"])
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "keep.jsonl"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_convert_output_respects_umask(tmp_path, capsys, umask):
    src = _jsonl(tmp_path / "in.jsonl", [SHAREGPT_ROW])
    old = os.umask(umask)
    try:
        rc, _, _ = _convert(capsys, "--from", "sharegpt", src, "--out", tmp_path / "out.jsonl")
    finally:
        os.umask(old)
    assert rc == 0
    assert stat.S_IMODE((tmp_path / "out.jsonl").stat().st_mode) == 0o666 & ~umask


def test_convert_success_replaces_output(tmp_path, capsys, keep):
    out, _ = keep
    src = _jsonl(tmp_path / "in.jsonl", [SHAREGPT_ROW, {"bad": 1}])
    rc, stdout, _ = _convert(capsys, "--from", "sharegpt", src, "--out", out)
    assert rc == 0 and "1 rows written" in stdout and "1 skipped" in stdout
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["s1"]


# ---------------------------------------------------------------------------------------------
# 14.6: every image decode-checked before training; lazy failures raise ImageDecodeError
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def broken_images(tmp_path, monkeypatch):
    """A data folder with one good image and a truncated, a zero-byte and an oversized one."""
    good = _red(tmp_path)
    data = good.read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    _red(tmp_path, "huge.png", size=(300, 300))
    monkeypatch.setattr(schema, "MAX_IMAGE_PIXELS", 200 * 200)  # "oversized" without a 64 Mpx file
    rows = [{"id": f"ok{i}", "images": ["red.png"], "messages": QA} for i in range(3)]
    rows += [{"id": name, "images": [f"{name}"], "messages": QA} for name in ("truncated.png", "empty.jpg",
                                                                             "huge.png")]
    return _jsonl(tmp_path / "train.jsonl", rows)


def test_training_validation_decodes_every_image(broken_images):
    # what training calls (data_building.read_conversations), with its default arguments
    with pytest.raises(DataValidationError) as info:
        load_and_validate(broken_images)
    msg = str(info.value)
    assert msg.count("cannot decode image") == 2 and "decompression bomb" in msg
    for line in (4, 5, 6):
        assert f"train.jsonl:{line}: images[0]:" in msg


def test_skip_invalid_skips_bad_images_and_encoding_agrees(broken_images, tmp_path):
    convs, report = load_and_validate(broken_images, skip_invalid=True)
    assert len(convs) == 3 and report.invalid_rows == 3 and "3 invalid rows skipped" in str(report)
    ds, stats = encode_jsonl(broken_images, _processor(), cache_dir=tmp_path / "cache")
    # the rows that train are exactly the rows validation accepted
    assert (stats.rows, stats.kept, stats.invalid) == (6, 3, 3) and ds["id"] == ["ok0", "ok1", "ok2"]
    tds = build_torch_dataset(ds, _processor())
    assert all(tds[i]["images"][0].shape == (3, 28, 28) for i in range(len(tds)))  # nothing left to fail


def test_trainer_data_path_skips_and_counts_what_it_says(broken_images, tmp_path):
    """data_building.build_datasets (what `cogtune train` runs): bad images, a malformed line and a BOM, with
    data.skip_invalid: the run starts, the log's counts match the rows in the training set, all of which load."""
    from dataclasses import replace

    from finetune.config import RunConfig
    from finetune.data_building import build_datasets, processor_for_recipe

    text = broken_images.read_text()
    broken_images.write_bytes(b"\xef\xbb\xbf" + (text + '{"id": "cut", "messages": [{"ro\n').encode())
    cfg = RunConfig()
    cfg = replace(cfg, data=replace(cfg.data, train_path=str(broken_images), skip_invalid=True, max_length=256,
                                    num_workers=0))
    logs: list[str] = []
    train, *_ = build_datasets(cfg, processor_for_recipe(cfg, tiny_config(2), build_tiny_tokenizer(2)),
                               log=lambda x: logs.append(str(x)))
    log = "\n".join(logs)
    assert log.count("4 invalid rows skipped") == 2 and "3/7 rows encoded" in log  # validation and encoder agree
    assert len(train) == 3 and [train[i]["id"] for i in range(3)] == ["ok0", "ok1", "ok2"]


def test_parallel_decode_check_finds_truncated_jpegs_once_per_image(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for i in range(12):  # enough distinct images for the thread pool
        Image.fromarray((rng.random((48, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.jpg", quality=90)
    for i in (3, 7):  # truncated JPEGs (a cut download): JPEG draft decoding must still see it
        data = (tmp_path / f"{i}.jpg").read_bytes()
        (tmp_path / f"{i}.jpg").write_bytes(data[: len(data) * 2 // 3])
    (tmp_path / "11.jpg").write_bytes(b"")
    rows = [{"id": f"r{i}-{k}", "images": [f"{i}.jpg"], "messages": QA} for i in range(12) for k in range(2)]
    path = _jsonl(tmp_path / "train.jsonl", rows)
    calls = []
    real = schema.check_image
    monkeypatch.setattr(schema, "check_image", lambda ref: (calls.append(ref), real(ref))[1])
    convs, report = check_file(path)
    bad = sorted({p.source for p in report.errors})
    assert bad == sorted(f"{path}:{n}" for i in (3, 7, 11) for n in (2 * i + 1, 2 * i + 2))
    assert len(convs) == 18 and len(calls) == 12  # each distinct image decoded once


def test_lazy_decode_failure_is_an_image_decode_error(tmp_path):
    good = _red(tmp_path)
    path = _jsonl(tmp_path / "train.jsonl", [{"id": "r1", "images": ["red.png"], "messages": QA}])
    ds, _ = encode_jsonl(path, _processor(), cache_dir=tmp_path / "cache")
    good.write_bytes(good.read_bytes()[:40])  # the image breaks after validation, during training
    tds = CogVLMDataset(ds, _processor())
    with pytest.raises(ImageDecodeError, match="row r1"):
        tds[0]
    assert issubclass(ImageDecodeError, ImageError)
    # the type survives a DataLoader worker (re-raised from the worker's message)
    loader = torch_loader(tds, workers=1)
    with pytest.raises(ImageDecodeError):
        next(iter(loader))


def torch_loader(ds, workers):
    import torch

    return torch.utils.data.DataLoader(ds, batch_size=1, num_workers=workers, collate_fn=lambda x: x)


def test_streaming_skips_rows_whose_image_does_not_decode(tmp_path, capsys):
    _red(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    rows = [{"id": "a", "images": ["red.png"], "messages": QA}, {"id": "b", "images": ["bad.png"], "messages": QA},
            {"id": "c", "images": ["red.png"], "messages": QA}]
    path = _jsonl(tmp_path / "train.jsonl", rows)
    stream, _ = encode_jsonl(path, _processor(), streaming=True)
    skipped = multiprocessing.Value("i", 0)  # --skip-invalid: the counter shared with DataLoader workers
    tds = build_torch_dataset(stream, _processor(), skipped)
    assert [item["id"] for item in tds] == ["a", "c"] and skipped.value == 1
    assert [item["id"] for item in tds] == ["a", "c"] and skipped.value == 2  # counted per pass, named once
    err = capsys.readouterr().err
    assert err.count(f"{path}:2: row b: cannot decode image") == 1
    # without --skip-invalid the row stops the stream, named file:line, the way out included
    with pytest.raises(ImageDecodeError, match=rf"{re.escape(str(path))}:2: row b: cannot decode .*--skip-invalid"):
        list(build_torch_dataset(stream, _processor()))


# ---------------------------------------------------------------------------------------------
# 14.7: wide greyscale images are scaled to 8 bits, not clipped to white or black
# ---------------------------------------------------------------------------------------------


def test_16bit_png_scaled_by_bit_depth(tmp_path):
    arr = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as raw:
        assert raw.mode.startswith("I")  # PIL reads it as I;16 (or I)
    im = load_image(str(tmp_path / "g16.png"))
    assert im.mode == "RGB" and [im.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (1, 1, 1), (128, 128, 128),
                                                                            (255, 255, 255)]


def test_float_tiff_unit_range_scaled(tmp_path):
    arr = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    Image.fromarray(arr).save(tmp_path / "f.tif")
    im = load_image(str(tmp_path / "f.tif"))
    assert [im.getpixel((x, 0))[0] for x in range(4)] == [0, 64, 128, 255]


def test_float_tiff_other_range_uses_actual_range(tmp_path):
    arr = np.array([[-1.0, 0.0, 1.0, 3.0]], dtype=np.float32)
    Image.fromarray(arr).save(tmp_path / "f.tif")
    im = load_image(str(tmp_path / "f.tif"))
    assert [im.getpixel((x, 0))[0] for x in range(4)] == [0, 64, 128, 255]


def test_32bit_int_tiff_with_16bit_values(tmp_path):
    arr = np.array([[0, 1000, 4000, 65535]], dtype=np.int32)
    Image.fromarray(arr).save(tmp_path / "i.tif")
    with Image.open(tmp_path / "i.tif") as raw:
        assert raw.mode == "I"
    im = load_image(str(tmp_path / "i.tif"))
    assert [im.getpixel((x, 0))[0] for x in range(4)] == [0, 4, 16, 255]


def test_float_with_nan_is_rejected_with_a_message(tmp_path):
    Image.fromarray(np.array([[0.0, np.nan]], dtype=np.float32)).save(tmp_path / "nan.tif")
    with pytest.raises(ImageError, match="NaN"):
        load_image(str(tmp_path / "nan.tif"))


def test_validate_and_training_see_the_scaled_16bit_image(tmp_path):
    ramp = (np.arange(64, dtype=np.uint32).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    path = _jsonl(tmp_path / "d.jsonl", [{"images": ["g16.png"], "messages": QA}])
    convs, report = check_file(path)
    assert len(convs) == 1 and not report.errors
    from finetune.models.cogvlm.processing import load_and_transform_image

    pixels = load_and_transform_image(convs[0].images[0], 8)
    assert float(pixels.std()) > 0.5  # a ramp, not a blank (all-white) picture


# ---------------------------------------------------------------------------------------------
# 14.8: --skip-invalid never crashes on the rows it skips; counts agree; "\n" is the only line break
# ---------------------------------------------------------------------------------------------


def _messy(tmp_path):
    return _jsonl(tmp_path / "train.jsonl", [
        {"id": "a", "messages": TEXT},
        '{"id": "truncated", "messages": [{"role": "user", "con',
        '["not", "an", "object"]',
        '{"id": 3, "messages": "x", "extra": {"nested": [1, 2]}}',
        {"id": "b", "messages": TEXT},
    ])


def test_skip_invalid_malformed_lines_never_reach_pyarrow(tmp_path):
    path = _messy(tmp_path)
    convs, report = load_and_validate(path, skip_invalid=True)
    assert [c.id for c in convs] == ["a", "b"] and report.invalid_rows == 3
    ds, stats = encode_jsonl(path, _processor(), cache_dir=tmp_path / "cache")
    assert (stats.rows, stats.kept, stats.invalid) == (5, 2, 3) and ds["id"] == ["a", "b"]
    assert any("train.jsonl:2: invalid: not valid JSON" in e for e in stats.examples)


def test_streaming_skips_malformed_lines(tmp_path):
    stream, _ = encode_jsonl(_messy(tmp_path), _processor(), streaming=True)
    assert [row["id"] for row in stream] == ["a", "b"]


def test_bom_file_counts_agree(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps({"id": f"r{i}", "messages": TEXT}) + "\n"
                                               for i in range(4)).encode())
    convs, report = load_and_validate(path, skip_invalid=True)
    assert len(convs) == 4 and report.invalid_rows == 0
    _, stats = encode_jsonl(path, _processor(), cache_dir=tmp_path / "cache")
    assert (stats.rows, stats.kept, stats.invalid) == (4, 4, 0)


def test_unicode_line_separators_inside_strings_are_not_line_breaks(tmp_path, capsys):
    text = "first\u2028second\u2029third\x85fourth\x0cfifth"
    src = _jsonl(tmp_path / "in.jsonl", [{"id": "u", "conversations": [{"from": "human", "value": text},
                                                                        {"from": "gpt", "value": "ok"}]}])
    out = tmp_path / "out.jsonl"
    rc, _, _ = _convert(capsys, "--from", "sharegpt", src, "--out", out)
    assert rc == 0 and "\u2028" in out.read_text(encoding="utf-8")  # convert writes the character raw
    rc, stdout, _ = _validate(capsys, out, "--model", "cogvlm2-llama3-chat-19b")
    assert rc == 0 and "1 rows in" in stdout and "1 valid, 0 with errors" in stdout
    convs, problems = read_jsonl(out)
    assert problems == [] and convs[0].messages[0].content == text
    _, stats = encode_jsonl(out, _processor(), cache_dir=tmp_path / "cache")
    assert (stats.rows, stats.kept) == (1, 1)


# ---------------------------------------------------------------------------------------------
# 14.9: image paths stay under the data root
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def outside(tmp_path):
    """data/ (the root) with an inside image; secret/ beside it with a file that must never be opened."""
    root = tmp_path / "data"
    _red(root / "imgs")
    _red(tmp_path / "secret", "secret.png")
    (root / "link.png").symlink_to(tmp_path / "secret" / "secret.png")
    (root / "linkdir").symlink_to(tmp_path / "secret")
    refs = ["../secret/secret.png", "../secret/missing.png", str(tmp_path / "secret" / "secret.png"),
            f"file://{tmp_path / 'secret' / 'secret.png'}", "link.png", "linkdir/secret.png", "imgs/../../etc/passwd",
            "/etc/shadow", "~/.ssh/id_rsa", f"/proc/{os.getpid()}/environ"]
    rows = [{"id": f"o{i}", "images": [ref], "messages": QA} for i, ref in enumerate(refs)]
    rows.append({"id": "in", "images": ["imgs/../imgs/red.png"], "messages": QA})
    return root, _jsonl(root / "train.jsonl", rows), len(refs)


def test_outside_paths_refused_before_opening(outside, monkeypatch):
    root, path, n = outside
    opened, probed = [], []
    real_open, real_isfile = Image.open, os.path.isfile
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: (opened.append(str(fp)), real_open(fp, *a, **k))[1])
    monkeypatch.setattr(os.path, "isfile", lambda p: (probed.append(str(p)), real_isfile(p))[1])
    convs, report = check_file(path)
    assert [c.id for c in convs] == ["in"]
    outside_errors = [p for p in report.errors if "outside the data root" in p.message]
    assert len(outside_errors) == n == len(report.errors)
    assert all(p.hint and "--allow-outside-images" in p.hint for p in outside_errors)
    # nothing outside the root was opened or even probed for existence: the message is the same either way
    assert all(str(root.resolve()) in x for x in opened + probed), opened + probed
    assert not any("not found" in p.message or "decode" in p.message for p in report.problems)


def test_outside_paths_with_image_root(outside, capsys):
    """With --image-root the root is that folder alone, even for paths under the JSONL's own folder."""
    root, _, _ = outside
    (root / "imgs" / "up.png").symlink_to(root.parent / "secret" / "secret.png")
    path = _jsonl(root / "other.jsonl", [{"id": i, "images": [ref], "messages": QA} for i, ref in enumerate(
        ["red.png", "../../secret/secret.png", "up.png", str(root / "link.png"), "../train.jsonl"])])
    rc, out, _ = _validate(capsys, path, "--model", "cogvlm2-llama3-chat-19b", "--image-root", root / "imgs")
    assert rc == 1 and out.count("outside the data root") == 4 and ": 1 valid, 4 with errors" in out


def test_outside_paths_allowed_on_request(tmp_path, capsys):
    _red(tmp_path / "elsewhere")
    path = _jsonl(tmp_path / "data" / "d.jsonl", [{"images": ["../elsewhere/red.png"], "messages": QA}])
    rc, out, _ = _validate(capsys, path, "--model", "cogvlm2-llama3-chat-19b")
    assert rc == 1 and "outside the data root" in out
    rc, out, _ = _validate(capsys, path, "--model", "cogvlm2-llama3-chat-19b", "--allow-outside-images")
    assert rc == 0 and "1 valid" in out
    convs, _ = load_and_validate(path, allow_outside_images=True)
    assert len(convs) == 1


def test_training_encoder_refuses_outside_paths(outside, tmp_path):
    root, path, n = outside
    ds, stats = encode_jsonl(path, _processor(), cache_dir=tmp_path / "cache")
    assert stats.invalid == n and ds["id"] == ["in"]
    assert all("outside the data root" in e for e in stats.examples)


def test_convert_refuses_outside_paths(tmp_path, capsys):
    _red(tmp_path / "secret", "secret.png")
    src = _jsonl(tmp_path / "in" / "llava.jsonl", [
        {"id": "x", "image": "../secret/secret.png", "conversations": SHAREGPT_ROW["conversations"]},
        {"id": "y", "conversations": SHAREGPT_ROW["conversations"]}])
    out = tmp_path / "in" / "out.jsonl"
    rc, stdout, err = _convert(capsys, "--from", "llava", src, "--out", out)
    assert rc == 0 and "outside the data root" in err and "1 rows written" in stdout
    rc, stdout, err = _convert(capsys, "--from", "llava", src, "--out", out, "--allow-outside-images")
    assert rc == 0 and "2 rows written" in stdout and "absolute paths" in stdout


# ---------------------------------------------------------------------------------------------
# 14.11: NaN/Infinity boxes and deeply nested JSON are per-row problems
# ---------------------------------------------------------------------------------------------

NASTY_BOXES = [
    '{"id": "nan", "messages": [{"role": "user", "content": "Find <box>"}, {"role": "assistant", "content": "ok"}], '
    '"boxes": [[NaN, 0, 0.5, 0.5]], "box_format": "norm"}',
    '{"id": "inf", "messages": [{"role": "user", "content": "Find <box>"}, {"role": "assistant", "content": "ok"}], '
    '"boxes": [[0, 0, Infinity, 10]], "box_format": "cog"}',
    '{"id": "big", "messages": [{"role": "user", "content": "Find <box>"}, {"role": "assistant", "content": "ok"}], '
    '"boxes": [[0, 0, 1e999, 1]], "box_format": "norm"}',
]
DEEP = "[" * 100_000 + "]" * 100_000
DEEP_OBJ = '{"id": "d", "messages": ' + "[" * 100_000 + "]" * 100_000 + "}"


def test_nonfinite_boxes_are_row_errors_and_skippable(tmp_path, capsys):
    path = _jsonl(tmp_path / "d.jsonl", [*NASTY_BOXES, {"id": "fine", "messages": TEXT}])
    rc, out, _ = _validate(capsys, path, "--model", "cogvlm2-llama3-chat-19b")
    assert rc == 1 and out.count("values must be finite numbers") == 3
    convs, report = load_and_validate(path, skip_invalid=True)
    assert [c.id for c in convs] == ["fine"] and report.invalid_rows == 3
    ds, stats = encode_jsonl(path, _processor(), cache_dir=tmp_path / "cache")
    assert ds["id"] == ["fine"] and stats.invalid == 3


def test_deeply_nested_json_is_a_row_error_everywhere(tmp_path, capsys):
    path = _jsonl(tmp_path / "d.jsonl", [DEEP, DEEP_OBJ, {"id": "fine", "messages": TEXT}])
    rc, out, _ = _validate(capsys, path, "--model", "cogvlm2-llama3-chat-19b")
    assert rc == 1 and out.count("nested too deeply") == 2 and "1 valid" in out
    convs, report = load_and_validate(path, skip_invalid=True)
    assert [c.id for c in convs] == ["fine"]
    ds, stats = encode_jsonl(path, _processor(), cache_dir=tmp_path / "cache")
    assert ds["id"] == ["fine"] and stats.invalid == 2
    jsonl = _jsonl(tmp_path / "sg.jsonl", [SHAREGPT_ROW, DEEP, DEEP_OBJ])
    rc, stdout, err = _convert(capsys, "--from", "sharegpt", jsonl, "--out", tmp_path / "o.jsonl")
    assert rc == 0 and err.count("nested too deeply") == 2 and "1 rows written" in stdout  # deep rows skipped
    arr = tmp_path / "a.json"
    arr.write_text("[" + json.dumps(SHAREGPT_ROW) + ", " + DEEP + "]")
    rc, stdout, err = _convert(capsys, "--from", "llava", arr, "--out", tmp_path / "o.jsonl")
    assert rc == 1 and "nested too deeply" in err and "left as it was" in err  # the array is not complete


def test_validate_rows_survives_depth_close_to_the_limit(tmp_path):
    depth = sys.getrecursionlimit() - 60  # parses, then recursion-heavy checks (repr) would overflow
    row = '{"id": ' + "[" * depth + "]" * depth + ', "messages": ' + json.dumps(TEXT) + "}"
    path = _jsonl(tmp_path / "d.jsonl", [row])
    convs, report = check_file(path)
    assert convs == [] and len(report.errors) == 1


# ---------------------------------------------------------------------------------------------
# 9.5: an unconverted JSON array gets one message naming the converter
# ---------------------------------------------------------------------------------------------

LLAVA = [{"id": f"l{i}", "image": "red.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                               {"from": "gpt", "value": "Red."}]} for i in range(40)]


@pytest.mark.parametrize("indent", [None, 2], ids=["one-line", "pretty"])
def test_validate_sniffs_llava_array(tmp_path, capsys, indent):
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(LLAVA, indent=indent))
    rc, out, _ = _validate(capsys, path, "--model", "cogvlm2-llama3-chat-19b")
    assert rc == 1 and "not valid JSON" not in out
    problems = [line for line in out.splitlines() if line.startswith(str(path))]
    assert len(problems) == 1 and "JSON array in LLaVA layout (40 rows)" in problems[0]
    assert f"cogtune convert --from llava {path} --out {tmp_path / 'llava.jsonl'}" in problems[0]


def test_validate_sniffs_sharegpt_and_broken_arrays(tmp_path, capsys):
    path = tmp_path / "sg.json"
    path.write_text(json.dumps([SHAREGPT_ROW] * 3, indent=1))
    rc, out, _ = _validate(capsys, path, "--model", "cogvlm2-llama3-chat-19b")
    assert rc == 1 and "ShareGPT layout (3 rows)" in out and "--from sharegpt" in out
    path.write_text(json.dumps([SHAREGPT_ROW] * 3, indent=1)[:-30])  # truncated download
    rc, out, _ = _validate(capsys, path, "--model", "cogvlm2-llama3-chat-19b")
    problems = [line for line in out.splitlines() if line.startswith(f"{path}:")]
    assert rc == 1 and len(problems) == 1 and "starts like a JSON array" in problems[0]


def test_validate_sniffs_llava_jsonl(tmp_path, capsys):
    path = _jsonl(tmp_path / "llava.jsonl", LLAVA[:30])
    rc, out, _ = _validate(capsys, path, "--model", "cogvlm2-llama3-chat-19b")
    problems = [line for line in out.splitlines() if line.startswith(f"{path}:")]
    assert rc == 1 and len(problems) == 1 and "every row (30) is in LLaVA layout" in problems[0]
    assert "cogtune convert --from llava" in problems[0]


def test_jsonl_with_a_bad_first_line_is_still_checked_row_by_row(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", ['{"id": "broken", ', {"id": "a", "messages": TEXT},
                                          {"id": "b", "messages": TEXT}])
    convs, report = check_file(path)
    assert [c.id for c in convs] == ["a", "b"] and len(report.errors) == 1


# ---------------------------------------------------------------------------------------------
# 9.6: the LLaVA converter keeps boxes
# ---------------------------------------------------------------------------------------------


def test_llava_converter_keeps_boxes(tmp_path, capsys):
    _red(tmp_path, size=(200, 100))
    row = {"id": "g1", "image": "red.png", "boxes": [[20, 10, 100, 50]], "box_format": "xyxy",
           "conversations": [{"from": "human", "value": "<image>\nWhere is the square?"},
                             {"from": "gpt", "value": "Here <box>."}]}
    src = tmp_path / "llava.json"
    src.write_text(json.dumps([row]))
    out = tmp_path / "out.jsonl"
    rc, stdout, err = _convert(capsys, "--from", "llava", src, "--out", out)
    assert rc == 0 and "1 rows written" in stdout, err
    written = json.loads(out.read_text())
    assert written["boxes"] == [[20, 10, 100, 50]] and written["box_format"] == "xyxy"
    assert written["messages"][1]["content"] == "Here <box>."
    convs, problems = read_jsonl(out)
    assert problems == [] and convs[0].messages[1].content == "Here [[100,100,500,500]]."


# --------------------------------------------------------------------------------------------------
# Found by bench/fault_sweep.py: one bad line costs one row, never the file or the run
# --------------------------------------------------------------------------------------------------


def test_a_non_utf8_line_is_one_bad_row_that_skip_invalid_skips(tmp_path):
    from dataclasses import replace

    from finetune.config import RunConfig
    from finetune.data_building import build_datasets, processor_for_recipe

    path = tmp_path / "mixed.jsonl"
    good = json.dumps({"id": "ok0", "messages": TEXT}).encode()
    bad = json.dumps({"id": "bad", "messages": TEXT}).encode().replace(b"hello", b"hel\xfflo")
    path.write_bytes(good + b"\n" + bad + b"\n" + good.replace(b"ok0", b"ok1") + b"\n")
    convs, problems = read_jsonl(path)
    assert [c.id for c in convs] == ["ok0", "ok1"]
    assert [p.source for p in problems] == [f"{path}:2"] and "not UTF-8" in problems[0].message
    convs, report = check_file(path)
    assert report.rows == 3 and [str(p).split(": ")[0] for p in report.errors] == [f"{path}:2"]
    with pytest.raises(DataValidationError, match=r"mixed.jsonl:2"):
        load_and_validate(path)
    cfg = RunConfig()
    cfg = replace(cfg, data=replace(cfg.data, train_path=str(path), skip_invalid=True, max_length=256, num_workers=0))
    train, *_ = build_datasets(cfg, processor_for_recipe(cfg, tiny_config(2), build_tiny_tokenizer(2)),
                               log=lambda _: None)
    assert sorted(train[i]["id"] for i in range(len(train))) == ["ok0", "ok1"]


def test_a_lone_surrogate_escape_is_a_row_error_not_a_tokenizer_crash(tmp_path, capsys):
    path = tmp_path / "s.jsonl"
    lone = '{"id": "s", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\\ud800"}]}'
    pair = lone.replace('"s"', '"p"').replace("\\ud800", "\\ud83d\\ude00")  # a valid pair: an emoji
    path.write_text(lone + "\n" + pair + "\n", encoding="utf-8")
    assert schema.loads_row(lone)[0] is None and "surrogate" in schema.loads_row(lone)[1]
    assert schema.loads_row(pair)[0]["messages"][1]["content"] == "\U0001F600"
    convs, report = check_file(path)
    assert [c.id for c in convs] == ["p"] and [p.source for p in report.errors] == [f"{path}:1"]
    tiny = tmp_path / "tiny"
    from finetune.tiny import main as make_tiny

    make_tiny(["--family", "cogvlm2", "--out", str(tiny)])
    code, out, _ = _validate(capsys, str(path), "--model", str(tiny))
    assert code == 1 and f"{path}:1" in out


def test_validate_refuses_a_model_folder_that_is_not_cogvlm(tmp_path, capsys):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "vocab_size": 10}))
    data = _jsonl(tmp_path / "d.jsonl", [{"id": "a", "messages": TEXT}])
    code, out, err = _validate(capsys, str(data), "--model", str(folder))
    assert code != 0 and "gpt2" in out + err and "not a CogVLM" in out + err
