"""Video converters: LLaVA-Video / ShareGPT rows with a `video` field, and a folder of clips with captions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from data_formats.convert import main as convert_main
from data_formats.schema import read_jsonl
from finetune.models.cogvlm2_video.video import write_test_video

DATA = Path(__file__).parent / "assets" / "data"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_llava_video_rows_convert_with_relative_video_paths(tmp_path, capsys):
    shutil.copy(DATA / "llava_video.json", tmp_path / "llava_video.json")
    write_test_video(tmp_path / "clips" / "a.mp4", [(255, 0, 0), (0, 0, 255)])
    write_test_video(tmp_path / "clips" / "b.mp4", [(0, 255, 0)])
    out = tmp_path / "out.jsonl"
    assert convert_main(["--from", "llava-video", str(tmp_path / "llava_video.json"), "--out", str(out),
                         "--quiet"]) == 0
    printed = capsys.readouterr()
    assert "2 rows written" in printed.out and "2 skipped" in printed.out
    assert "llava_video.json:12: video: is null" in printed.err  # row 3 has no video
    assert "video not found" in printed.err  # row 4's clip is missing
    rows = _rows(out)
    assert [r["videos"] for r in rows] == [["clips/a.mp4"], ["clips/b.mp4"]]
    assert rows[0]["messages"][0] == {"role": "user", "content": "<video>\nWhat colour comes first in the video?"}
    assert [m["content"] for m in rows[0]["messages"][1:]] == ["Red.", "And last?", "Blue."]
    convs, problems = read_jsonl(out)  # the output is valid canonical data
    assert len(convs) == 2 and not problems and convs[0].videos == [str((tmp_path / "clips" / "a.mp4").resolve())]


def test_video_folder_with_sidecar_and_metadata_captions(tmp_path, capsys):
    clips = tmp_path / "clips"
    write_test_video(clips / "one.mp4", [(255, 0, 0)])
    (clips / "one.txt").write_text("A red screen.\n")
    write_test_video(clips / "sub" / "two.mp4", [(0, 255, 0)])
    write_test_video(clips / "three.mp4", [(0, 0, 255)])  # no caption: reported, skipped
    (clips / "metadata.jsonl").write_text(json.dumps({"file_name": "sub/two.mp4", "caption": "Green."}) + "\n"
                                          + "{broken\n")
    out = tmp_path / "captions.jsonl"
    assert convert_main(["--from", "video-folder", str(clips), "--out", str(out), "--quiet",
                         "--prompt", "Describe this video."]) == 0
    printed = capsys.readouterr()
    assert "2 rows written" in printed.out and "2 skipped" in printed.out
    assert "three.mp4: caption: no caption for this clip" in printed.err and "metadata.jsonl:2: line:" in printed.err
    rows = {r["id"]: r for r in _rows(out)}
    assert set(rows) == {"one", "sub/two"}
    assert rows["one"]["videos"] == ["clips/one.mp4"]
    assert rows["sub/two"]["messages"] == [{"role": "user", "content": "Describe this video."},
                                           {"role": "assistant", "content": "Green."}]
    assert len(read_jsonl(out)[0]) == 2
