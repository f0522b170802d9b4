"""CogVLM2-Video data: PyAV decoding and frame sampling, the frame transform, the video layout (time-index
tokens, positions), the collator with a frame cache, the `videos` schema field and `cogtune validate`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_formats.schema import Conversation, Message, read_jsonl
from finetune.families import CLIP_MEAN, CLIP_STD
from finetune.models.cogvlm.processing import CogVLMCollator
from finetune.models.cogvlm2_video.configuration import tiny_video_config
from finetune.models.cogvlm2_video.modeling import CogVLMVideoForCausalLM
from finetune.models.cogvlm2_video.processing import (
    CogVLMVideoProcessor,
    encode_video_conversation,
    transform_video,
    video_span,
)
from finetune.models.cogvlm2_video.video import (
    FrameCache,
    FrameSampling,
    VideoDecodeError,
    VideoInfo,
    decode_frames,
    probe_video,
    sample_indices,
    write_test_video,
)
from finetune.token_types import build_position_ids
from finetune.tokenization import build_tiny_tokenizer

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _info(times: list[float], fps: float) -> VideoInfo:
    return VideoInfo("v.mp4", tuple(times), fps, 32, 24)


# ---------------------------------------------------------------------------------------------------------------
# Decoding and sampling
# ---------------------------------------------------------------------------------------------------------------


def test_decode_solid_colour_video_in_order(tmp_path):
    path = write_test_video(tmp_path / "c.mp4", [RED, GREEN, BLUE, WHITE], fps=2, frames_per_colour=2)
    info = probe_video(path)
    assert info.frames == 8 and info.avg_fps == 2.0 and (info.width, info.height) == (32, 24)
    assert info.timestamps == (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5) and info.duration == 4.0
    frames = decode_frames(path, [0, 2, 4, 6, 6])
    assert frames.shape == (5, 24, 32, 3) and frames.dtype == np.uint8
    centre = frames[:, 12, 16].astype(int)
    for got, want in zip(centre, [RED, GREEN, BLUE, WHITE, WHITE]):
        assert np.abs(got - np.array(want)).max() <= 6, (got, want)


def test_sampling_follows_the_official_demo():
    # chat: the frame nearest each whole second, first on a tie, up to num_frames; last second = round(max t)
    info = _info([0.0, 0.4, 0.9, 1.3, 1.6, 2.1, 2.4], fps=2.5)
    assert sample_indices(info, FrameSampling("seconds")) == [0, 2, 5]
    assert sample_indices(info, FrameSampling("seconds", num_frames=2)) == [0, 2]
    assert sample_indices(info, FrameSampling("seconds", fps=2.0)) == [0, 1, 2, 4, 5, 6]
    assert sample_indices(_info([0.0, 0.5, 1.5], 2.0), FrameSampling("seconds")) == [0, 1, 2]  # tie: the first
    assert sample_indices(_info([0.0, 1.0, 2.0, 2.5], 2.0), FrameSampling("seconds")) == [0, 1, 2]  # round(2.5) = 2
    # base: linspace over the first 60 s, truncated to ints
    long = _info([i / 2 for i in range(400)], fps=2.0)  # 200 s at 2 fps
    assert sample_indices(long, FrameSampling("uniform", num_frames=4)) == [0, 39, 79, 119]  # end = 120 frames
    assert sample_indices(long, FrameSampling("uniform", num_frames=3, clip_seconds=None)) == [0, 199, 399]
    assert FrameSampling.for_template("chat").policy == "seconds"
    assert FrameSampling.for_template("base", num_frames=8) == FrameSampling("uniform", 8, 1.0, 60.0)
    with pytest.raises(ValueError, match="num_frames"):
        FrameSampling("uniform", 0)


def test_broken_video_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    with pytest.raises(VideoDecodeError, match="bad.mp4"):
        probe_video(bad)


def test_frame_cache_decodes_once_across_epochs_and_processes(tmp_path):
    path = write_test_video(tmp_path / "c.mp4", [RED, GREEN, BLUE], fps=1)
    sampling = FrameSampling("seconds")
    cache = FrameCache(tmp_path / "cache")
    first = cache.frames(path, sampling)
    for _ in range(3):  # later epochs
        assert cache.frames(path, sampling) is first
    assert cache.decodes == 1
    other = FrameCache(tmp_path / "cache")  # another process / a later run: read from disk
    assert np.array_equal(other.frames(path, sampling), first) and other.decodes == 0
    write_test_video(path, [BLUE, BLUE], fps=1)  # the file changes: decoded again
    assert other.frames(path, sampling).shape[0] == 2 and other.decodes == 1


# ---------------------------------------------------------------------------------------------------------------
# Transform and layout
# ---------------------------------------------------------------------------------------------------------------


def test_transform_normalises_then_scales_short_side_and_centre_crops():
    solid = np.full((2, 30, 50, 3), (10, 128, 250), dtype=np.uint8)
    out = transform_video(solid, 14)
    assert out.shape == (2, 3, 14, 14) and out.dtype == torch.float32
    want = (torch.tensor([10, 128, 250]) / 255.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(out[0, :, 5, 5], want)
    # short side 10 already: width 20 -> crop columns round((20 - 10) / 2) = 5 .. 14
    ramp = np.zeros((1, 10, 20, 3), dtype=np.uint8)
    ramp[..., 0] = np.arange(20, dtype=np.uint8)[None, None, :] * 10
    red = transform_video(ramp, 10)[0, 0, 0] * CLIP_STD[0] + CLIP_MEAN[0]
    torch.testing.assert_close(red * 255.0, torch.arange(5, 15, dtype=torch.float32) * 10, atol=1e-3, rtol=0)


def test_chat_layout_has_time_indices_and_base_is_one_run():
    tok = build_tiny_tokenizer(2)
    conv = Conversation("r", [], [Message("user", "<video>What colour comes first?"),
                                  Message("assistant", "red")], videos=["/x.mp4"])
    chat = encode_video_conversation(conv, tok, n_frames=3, frame_tokens=6, template_version="chat")
    stamps = [tok.encode(str(t), add_special_tokens=False) for t in range(3)]
    span, _ = video_span(tok, 3, 6, "chat")
    assert span == sum(([tok.pad_token_id] * 6 + s for s in stamps), [])
    assert chat.input_ids[:1 + len(span)] == [tok.bos_token_id] + span
    prompt = tok.encode("Question: What colour comes first? Answer:", add_special_tokens=False)
    answer = tok.encode("red", add_special_tokens=False) + [tok.eos_token_id]
    assert chat.input_ids[1 + len(span):] == prompt + answer  # the marker is not text
    assert chat.labels == [-100] * (1 + len(span) + len(prompt)) + answer
    assert chat.images == ["/x.mp4"]
    pos = build_position_ids(torch.tensor([chat.token_type_ids]))[0].tolist()
    # each frame: boi, shared interior, eoi (3 ids), then its time token
    assert pos[:1 + 6 + 1 + 6 + 1] == [0, 1, 2, 2, 2, 2, 3, 4, 5, 6, 6, 6, 6, 7, 8]
    base = encode_video_conversation(conv, tok, n_frames=3, frame_tokens=6, template_version="base")
    types = base.token_type_ids
    assert types[:19] == [0] + [1] * 18 and types[19] == 0
    pos = build_position_ids(torch.tensor([types]))[0].tolist()
    assert pos[:20] == [0, 1] + [2] * 16 + [3, 4]  # the whole video costs 3 position ids
    # truncation never cuts the video
    from finetune.models.cogvlm.processing import RowTooLong

    with pytest.raises(RowTooLong, match="18 tokens of video"):
        encode_video_conversation(conv, tok, n_frames=3, frame_tokens=6, template_version="base", max_length=20)


def test_collator_batches_videos_of_different_lengths_like_one_at_a_time(tmp_path):
    tok = build_tiny_tokenizer(2)
    config = tiny_video_config(template_version="chat")
    torch.manual_seed(0)
    model = CogVLMVideoForCausalLM(config).eval()
    a = write_test_video(tmp_path / "a.mp4", [RED, GREEN, BLUE], fps=1)
    b = write_test_video(tmp_path / "b.mp4", [WHITE], fps=1)
    rows = [Conversation(str(i), [], [Message("user", "What colour comes first?"), Message("assistant", ans)],
                         videos=[str(p)]) for i, (p, ans) in enumerate([(a, "red"), (b, "white")])]
    processor = CogVLMVideoProcessor.from_config(config, tok, template_version="chat", cache_dir=tmp_path / "cache")
    collator = CogVLMCollator(processor)
    batch = collator(rows)
    assert batch["images"].shape == (3 + 1, 3, 56, 56)
    assert int((batch["token_type_ids"] == 1).sum()) == 4 * config.image_tokens
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "position_ids"}, loss_only=False)
        for r, row in enumerate(rows):
            one = collator([row])
            alone = model(**{k: v for k, v in one.items() if k != "position_ids"}, loss_only=False)
            n = one["input_ids"].shape[1]
            torch.testing.assert_close(out.logits[r, :n], alone.logits[0], atol=1e-5, rtol=1e-5)
    assert processor.cache.decodes == 2  # encoding reads timestamps only; each video is decoded once


def test_video_processor_settings_saved_fingerprinted_and_in_the_family_table(tmp_path):
    import pickle

    from finetune.models import FAMILIES, processor_class_for
    from finetune.models.cogvlm2_video.configuration import CogVLMVideoConfig

    tok = build_tiny_tokenizer(2)
    config = tiny_video_config(template_version="chat")
    assert processor_class_for(config) is CogVLMVideoProcessor
    assert FAMILIES["cogvlm2_video"].processor_class.endswith(":CogVLMVideoProcessor")
    assert CogVLMVideoProcessor.model_class() is CogVLMVideoForCausalLM
    assert CogVLMVideoProcessor.config_class() is CogVLMVideoConfig
    p = CogVLMVideoProcessor.from_config(config, tok, num_frames=None, fps=None)  # None: the demo's defaults
    assert (p.num_frames, p.fps, p.clip_seconds) == (24, 1.0, 60.0) and p.sampling.policy == "seconds"
    q = CogVLMVideoProcessor.from_config(config, tok, num_frames=4, fps=2.0)
    assert q.sampling == FrameSampling("seconds", 4, 2.0, 60.0)
    fingerprints = {x.fingerprint() for x in (p, q, p.with_settings(clip_seconds=None), p.with_settings(fps=3.0))}
    assert len(fingerprints) == 4  # every frame setting changes the cache key of encoded rows
    q.save_pretrained(tmp_path / "proc")
    saved = json.loads((tmp_path / "proc" / "processor_config.json").read_text())
    assert saved["processor_class"] == "CogVLMVideoProcessor" and (saved["num_frames"], saved["fps"]) == (4, 2.0)
    back = CogVLMVideoProcessor.from_pretrained(tmp_path / "proc")
    assert back.settings() == q.settings() and back.fingerprint() == q.fingerprint()
    # base template: 24 frames spread uniformly over the first clip_seconds
    assert q.with_settings(template_version="base").sampling.policy == "uniform"
    # DataLoader workers get the processor without its frame arrays, and rebuild the cache on first use
    video = write_test_video(tmp_path / "a.mp4", [RED, GREEN], fps=1)
    q.cache_dir = str(tmp_path / "cache")
    q.transform_image(str(video))
    clone = pickle.loads(pickle.dumps(q))
    assert clone._cache is None and clone.cache.decodes == 0
    torch.testing.assert_close(clone.transform_image(str(video)), q.transform_image(str(video)))
    assert clone.cache.decodes == 0  # read back from the disk cache, not decoded again


def test_video_processor_refuses_unreadable_videos_and_image_recipes_refuse_frame_settings(tmp_path):
    from data_formats.schema import ImageError
    from finetune.config import RunConfig
    from finetune.data_building import processor_for_recipe
    from finetune.tiny import tiny_config

    tok = build_tiny_tokenizer(2)
    p = CogVLMVideoProcessor.from_config(tiny_video_config(), tok, cache_dir=tmp_path / "cache")
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 300)
    row = Conversation("b", [], [Message("user", "Colour?"), Message("assistant", "red")], videos=[str(broken)])
    with pytest.raises(ValueError, match="videos\\[0\\]: .*broken.mp4"):
        p.encode(row)
    with pytest.raises(ImageError, match="broken.mp4"):
        p.transform_image(str(broken))
    cfg = RunConfig()
    cfg.data.num_frames, cfg.data.fps = 5, 2.0
    got = processor_for_recipe(cfg, tiny_video_config(template_version="chat"), tok)
    assert isinstance(got, CogVLMVideoProcessor) and (got.num_frames, got.fps) == (5, 2.0)
    with pytest.raises(ValueError, match="data.fps, data.num_frames: not a setting of CogVLMProcessor"):
        processor_for_recipe(cfg, tiny_config(2), tok)


# ---------------------------------------------------------------------------------------------------------------
# Schema and validate
# ---------------------------------------------------------------------------------------------------------------


def _write_rows(tmp_path, rows):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def _msgs(q="<video>What colour comes first?", a="red"):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def test_schema_videos_field_rules(tmp_path):
    write_test_video(tmp_path / "v" / "a.mp4", [RED], fps=1)
    (tmp_path / "img.png").write_bytes(b"")
    data = _write_rows(tmp_path, [
        {"id": "ok", "videos": ["v/a.mp4"], "messages": _msgs()},
        {"id": "no-marker", "videos": ["v/a.mp4"], "messages": _msgs("What colour?")},
        {"id": "two", "videos": ["v/a.mp4", "v/a.mp4"], "messages": _msgs()},
        {"id": "missing", "videos": ["v/nope.mp4"], "messages": _msgs()},
        {"id": "outside", "videos": ["../elsewhere.mp4"], "messages": _msgs()},
        {"id": "string", "videos": "v/a.mp4", "messages": _msgs()},
        {"id": "marker-only", "messages": _msgs()},
        {"id": "both", "images": ["img.png"], "videos": ["v/a.mp4"], "messages": _msgs("What colour?")},
    ])
    convs, problems = read_jsonl(data)
    assert [c.id for c in convs] == ["ok", "no-marker"]
    assert convs[0].videos == [str((tmp_path / "v" / "a.mp4").resolve())]
    assert convs[0].to_json()["videos"] == convs[0].videos
    text = "\n".join(str(p) for p in problems)
    for line, what in [(3, "2 videos; CogVLM2-Video takes one"), (4, "video not found"),
                       (5, "lies outside the data root"), (6, "expected a list with one video path"),
                       (7, "'<video>' marker(s) but no 'videos' field"), (8, "both images and a video")]:
        assert f"data.jsonl:{line}: " in text and what in text, (line, what, text)


def test_validate_reports_duration_fps_frames_and_broken_videos(tmp_path, capsys):
    from finetune.tiny import make_tiny
    from finetune.validate import main

    ckpt = make_tiny(2, tmp_path / "tiny", architectures=["CogVLMVideoForCausalLM"], template_version="chat")
    write_test_video(tmp_path / "a.mp4", [RED, GREEN, BLUE], fps=2, frames_per_colour=2)
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 300)
    data = _write_rows(tmp_path, [{"id": "a", "videos": ["a.mp4"], "messages": _msgs()},
                                  {"id": "b", "videos": ["broken.mp4"], "messages": _msgs()}])
    code = main([str(data), "--model", str(ckpt)])
    out = capsys.readouterr().out
    assert code == 1
    assert "data.jsonl:2: videos[0]: " in out and "broken.mp4" in out
    assert f"{tmp_path / 'a.mp4'}: 3.00 s, 2 fps, 6 frames, 32x24 -> 3 frames x 6 tokens" in out
    tok = build_tiny_tokenizer(2)
    enc = [tok.encode(t, add_special_tokens=False) for t in ("Question: What colour comes first? Answer:", "red")]
    n = 1 + 3 * (6 + 1) + len(enc[0]) + len(enc[1]) + 1  # BOS, 3 frames + time tokens, prompt, answer, EOS
    assert f"template 'chat'): min {n} / median {n}" in out, out
    code = main([str(data), "--model", str(ckpt), "--num-frames", "2"])
    assert "-> 2 frames x 6 tokens" in capsys.readouterr().out
