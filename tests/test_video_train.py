"""CogVLM2-Video through the kit: make-tiny, the shipped recipe, train (batches of videos), merge (verified,
official layout), predict on video rows, chat --video, the memory plan, and refused vision-expert targets."""

from __future__ import annotations

import json

import pytest
import torch

from adapters.demo import RECIPE
from finetune.config import load_recipe
from finetune.models.cogvlm2_video.video import write_test_video

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220)}


@pytest.fixture(scope="module")
def video_task(tmp_path_factory):
    from finetune.tiny import main as make_tiny_main

    root = tmp_path_factory.mktemp("video")
    assert make_tiny_main(["--family", "cogvlm2-video", "--out", str(root / "base")]) == 0
    rows = []
    names = list(COLOURS)
    for i in range(12):
        order = [names[(i + k) % 3] for k in range(1 + i % 3)]  # 1 to 3 frames: batches mix frame counts
        write_test_video(root / "clips" / f"c{i}.mp4", [COLOURS[n] for n in order], fps=1, size=(64, 48))
        rows.append({"id": f"c{i}", "videos": [f"clips/c{i}.mp4"], "messages": [
            {"role": "user", "content": "<video>What colour comes first?"},
            {"role": "assistant", "content": order[0]}]})
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, data


def _cfg(root, data, out, *extra):
    return load_recipe(RECIPE, [f"model.checkpoint_dir={root / 'base'}", f"data.train_path={data}",
                                f"data.eval_path={data}", f"output.dir={out}", "train.max_steps=3",
                                "train.per_device_train_batch_size=4", "train.logging_steps=1",
                                "train.report_to=[none]", "eval.generation_rows=2", "data.template_version=chat",
                                "data.max_length=128", "lora.targets=[language_expert,glu_adapter]", *extra])


def test_make_tiny_video_is_an_official_video_layout(video_task):
    from finetune.loading import build_meta_model

    root, _ = video_task
    config = json.loads((root / "base" / "config.json").read_text())
    assert config["architectures"] == ["CogVLMVideoForCausalLM"] and "vision_expert" not in config
    meta = build_meta_model(root / "base")
    assert not [k for k in meta.state_dict() if "vision_expert" in k or "vision_mlp" in k]


def test_train_merge_predict_chat_on_videos(video_task, tmp_path, monkeypatch, capsys):
    from adapters.chat import main as chat_main
    from adapters.merge import merge_adapter
    from adapters.predict import main as predict_main
    from finetune.models.cogvlm2_video.modeling import CogVLMVideoForCausalLM
    from finetune.recipe import train

    monkeypatch.setenv("COGTUNE_CACHE", str(tmp_path / "cache"))
    root, data = video_task
    run = train(_cfg(root, data, tmp_path / "run"), log=lambda *_: None)
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert list((tmp_path / "cache" / "video-frames").glob("*.npy"))  # frames were cached for later epochs
    saved = json.loads((run / "adapter" / "processor_config.json").read_text())  # the family's processor, saved
    assert saved["processor_class"] == "CogVLMVideoProcessor" and (saved["num_frames"], saved["fps"]) == (24, 1.0)
    plan = (run / "plan.txt").read_text()
    assert "activations: vision tower" in plan

    merged = merge_adapter(run, tmp_path / "merged", max_shard_size="300KB", log=lambda *_: None).out
    config = json.loads((merged / "config.json").read_text())
    assert config["architectures"] == ["CogVLMVideoForCausalLM"] and "vision_expert" not in config
    model = CogVLMVideoForCausalLM.from_pretrained(merged)  # strict: the official key set, no experts
    assert len(model.state_dict()) == len(CogVLMVideoForCausalLM.from_pretrained(root / "base").state_dict())

    pred = tmp_path / "pred.jsonl"
    assert predict_main([str(data), "--model", str(merged), "--out", str(pred), "--max-new-tokens", "3",
                         "--batch-size", "5"]) == 0
    lines = [json.loads(x) for x in pred.read_text().splitlines()]
    assert len(lines) == 12 and all("prediction" in x for x in lines)

    capsys.readouterr()
    assert chat_main(["--model", str(merged), "--video", str(root / "clips" / "c2.mp4"), "--prompt",
                      "What colour comes first?", "--max-new-tokens", "3"]) == 0
    assert chat_main(["--model", str(merged), "--video", str(data), "--prompt", "hi"]) == 1
    assert "cannot open as a video" in capsys.readouterr().err


def test_vision_expert_targets_are_refused_with_the_reason(video_task, tmp_path):
    from finetune.recipe import train

    root, data = video_task
    with pytest.raises(ValueError, match="no vision-expert weights.*language_expert"):
        train(_cfg(root, data, tmp_path / "run", "lora.targets=[experts]"), log=lambda *_: None)


def test_memory_plan_counts_frames_times_frame_tokens(video_task):
    from finetune.loading import build_meta_model
    from finetune.memory import plan_memory

    root, data = video_task
    meta = build_meta_model(root / "base")

    def tower(frames: int) -> float:
        cfg = _cfg(root, data, "unused", "train.gradient_checkpointing=false", f"data.num_frames={frames}")
        rows = {name: gib for name, gib, _ in plan_memory(meta, cfg, 1000, 0, "float32").rows}
        return rows["activations: vision tower"]

    assert tower(8) == pytest.approx(2 * tower(4))  # the tower runs once per sampled frame
    with pytest.raises(ValueError, match="data.num_frames"):
        _cfg(root, data, "unused", "data.num_frames=0")
    assert torch.get_default_dtype() == torch.float32
