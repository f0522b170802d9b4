"""Frozen-vision feature cache: cached and uncached training agree; what trains decides what is cached."""

import json

import pytest
import torch
from safetensors.torch import load_file

from adapters.demo import RECIPE, write_task
from finetune.config import load_recipe
from finetune.feature_cache import FeatureCache, cache_stage
from finetune.recipe import train
from finetune.tiny import make_tiny


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("fc")
    base = make_tiny(2, root / "base", seed=3)
    train_path, eval_path = write_task(root / "data", n_train=12, n_eval=4, seed=3)
    return base, train_path, eval_path


def _run(task, out, *extra):
    base, train_path, eval_path = task
    cfg = load_recipe(RECIPE, [f"model.checkpoint_dir={base}", f"data.train_path={train_path}",
                               f"data.eval_path={eval_path}", f"output.dir={out}", "train.max_steps=6",
                               "train.num_train_epochs=3", "train.per_device_train_batch_size=4",
                               "train.logging_steps=1", "train.report_to=[none]", "eval.generation_rows=0",
                               "data.num_workers=0", "lora.lora_dropout=0.0", *extra])
    logs = []
    out = train(cfg, log=logs.append)
    return out, load_file(str(out / "adapter" / "adapter_model.safetensors")), "\n".join(map(str, logs))


def test_cached_training_equals_uncached_and_reuses_the_cache(task, tmp_path):
    cache = tmp_path / "cache"
    frozen = "lora.targets=[experts]"  # tower and GLU frozen: the GLU's output is cached
    plain_out, plain, _ = _run(task, tmp_path / "plain", frozen)
    cached_out, cached, log1 = _run(task, tmp_path / "cached", frozen, f"data.feature_cache={cache}")
    assert "16 computed now" in log1 and "vision weights released" in log1  # 12 train + 4 eval images, once each
    again_out, again, log2 = _run(task, tmp_path / "again", frozen, f"data.feature_cache={cache}")
    assert "0 computed now" in log2  # a second run on the same base reads every image from disk
    for name in plain:
        torch.testing.assert_close(cached[name], plain[name], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(again[name], plain[name], atol=1e-6, rtol=1e-5)
    losses = [json.loads((o / "run.json").read_text())["train_loss"] for o in (plain_out, cached_out, again_out)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) and losses[2] == pytest.approx(losses[0], rel=1e-5)
    files = list(cache.glob("glu-*/*.safetensors"))
    assert len(files) == 16


def test_trained_glu_caches_the_tower_only_and_a_trained_tower_is_refused(task, tmp_path):
    # the demo recipe puts LoRA on the GLU adapter
    _, _, log = _run(task, tmp_path / "glu", f"data.feature_cache={tmp_path / 'c'}", "train.max_steps=2")
    assert "tower (the GLU adapter trains)" in log and list((tmp_path / "c").glob("tower-*/*.safetensors"))
    with pytest.raises(ValueError, match="needs a frozen vision tower"):
        _run(task, tmp_path / "tower", f"data.feature_cache={tmp_path / 'c'}",
             "lora.targets=[language_expert_attn,vision_tower]", "train.max_steps=1")


def test_cache_key_follows_pixels_and_producer(tmp_path):
    a = FeatureCache(tmp_path, {"base_fingerprint": "x", "dtype": "float32"}, "glu")
    b = FeatureCache(tmp_path, {"base_fingerprint": "y", "dtype": "float32"}, "glu")
    assert a.dir != b.dir  # another base never reads these features
    img = torch.rand(3, 8, 8)
    assert FeatureCache.key(img) == FeatureCache.key(img.clone())
    assert FeatureCache.key(img) != FeatureCache.key(img.to(torch.bfloat16))
    bumped = img.clone()
    bumped[0, 0, 0] += 1e-3
    assert FeatureCache.key(img) != FeatureCache.key(bumped)
    calls = []

    def compute(x):
        calls.append(x.shape[0])
        return x.flatten(1)[:, :5] * 2

    batch = torch.stack([img, bumped, img])
    first = a.lookup(batch, compute)
    second = a.lookup(batch, compute)
    assert calls == [3] and torch.equal(first, second) and (a.hits, a.misses) == (3, 3)


def test_cache_stage_reads_what_trains():
    from finetune.models.cogvlm.modeling import CogVLMForCausalLM
    from finetune.tiny import tiny_config

    model = CogVLMForCausalLM(tiny_config(2))
    vision = model.model.vision
    for p in model.parameters():
        p.requires_grad_(False)
    vision.boi.requires_grad_(True)  # boi/eoi run live, whatever the stage
    assert cache_stage(vision) == "glu"
    vision.linear_proj.gate_proj.weight.requires_grad_(True)
    assert cache_stage(vision) == "tower"


def test_memory_plan_drops_the_released_tower(task):
    from finetune.loading import build_meta_model
    from finetune.memory import plan_memory

    base, train_path, _ = task
    meta = build_meta_model(base)
    args = [f"model.checkpoint_dir={base}", f"data.train_path={train_path}", "lora.targets=[experts]"]
    plain = plan_memory(meta, load_recipe(RECIPE, args), 0, 0, "bfloat16")
    cached = plan_memory(meta, load_recipe(RECIPE, [*args, "data.feature_cache=/tmp/x"]), 0, 0, "bfloat16")
    tower = sum(p.numel() for n, p in meta.named_parameters()
                if n.startswith(("model.vision.patch_embedding", "model.vision.transformer", "model.vision.conv",
                                 "model.vision.linear_proj")))
    assert plain.total_gib - cached.total_gib >= tower * 2 / 2**30 * 0.999  # bf16 weights no longer counted


def _adapter_pair(base, train_path, eval_path, tmp_path, *extra):
    """(plain run's adapter, cached run's adapter, cached run's log) on `base`."""
    out = []
    for name, more in (("plain", ()), ("cached", (f"data.feature_cache={tmp_path / 'cache'}",))):
        out.append(_run((base, train_path, eval_path), tmp_path / name, "train.max_steps=3", *extra, *more))
    return out[0][1], out[1][1], out[1][2]


def test_cogagent_caches_both_towers_and_trains_the_same_adapter(tmp_path):
    """The 224-px tower (its `pos_embed` + GLU run live: the demo recipe trains the GLU) and the frozen 56-px cross
    tower are both cached; the adapter equals the uncached run's."""
    base = make_tiny(1, tmp_path / "base", seed=4, family="cogagent")
    train_path, eval_path = write_task(tmp_path / "data", n_train=8, n_eval=2, seed=4)
    plain, cached, log = _adapter_pair(base, train_path, eval_path, tmp_path, "lora.targets=[experts,glu_adapter]")
    assert "tower (the GLU adapter trains)" in log and "cross tower features cached" in log
    assert len(list((tmp_path / "cache").glob("tower-*/*.safetensors"))) == 10
    assert len(list((tmp_path / "cache").glob("cross-*/*.safetensors"))) == 10
    assert plain.keys() == cached.keys()
    for name in plain:
        torch.testing.assert_close(cached[name], plain[name], atol=1e-6, rtol=1e-5)


def test_cogagent_trained_cross_tower_runs_live():
    from finetune.feature_cache import attach_cross
    from finetune.models.cogagent.configuration import tiny_cogagent_config
    from finetune.models.cogagent.modeling import CogAgentForCausalLM
    from finetune.tiny import _special_ids

    model = CogAgentForCausalLM(tiny_cogagent_config(_special_ids(1)))
    model.model.cross_vision.vit.model.blocks[0].attn.q_proj.weight.requires_grad_(True)
    logs = []
    assert attach_cross(model, "unused", "unused", log=logs.append) is None
    assert model.model.cross_vision.feature_cache is None and "cross tower trains" in logs[0]
    # the low-res tower's pos_embed is applied after the cache, like the GLU: training it keeps the tower cached
    vision = model.model.vision
    for p in vision.parameters():
        p.requires_grad_(False)
    vision.pos_embed.requires_grad_(True)
    assert cache_stage(vision) == "tower"


def test_video_frames_are_cached_one_by_one_and_train_the_same_adapter(tmp_path):
    from finetune.models.cogvlm2_video.video import write_test_video
    from finetune.tiny import main as make_tiny_main

    assert make_tiny_main(["--family", "cogvlm2-video", "--out", str(tmp_path / "base")]) == 0
    colours = [(220, 40, 40), (40, 180, 60), (40, 70, 220)]
    rows = []
    for i in range(6):  # 1 to 3 frames per clip, batches mix frame counts
        write_test_video(tmp_path / "clips" / f"c{i}.mp4", [colours[(i + k) % 3] for k in range(1 + i % 3)], fps=1,
                         size=(64, 48))
        rows.append({"id": f"c{i}", "videos": [f"clips/c{i}.mp4"], "messages": [
            {"role": "user", "content": "<video>What colour comes first?"},
            {"role": "assistant", "content": ["red", "green", "blue"][i % 3]}]})
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plain, cached, log = _adapter_pair(tmp_path / "base", data, data, tmp_path, "lora.targets=[language_expert]",
                                       "data.template_version=chat", "data.max_length=128",
                                       "train.per_device_train_batch_size=3")
    assert "12 computed now" in log  # 1+2+3+1+2+3 frames
    assert len(list((tmp_path / "cache").glob("glu-*/*.safetensors"))) == 3  # three distinct frames (colours)
    for name in plain:
        torch.testing.assert_close(cached[name], plain[name], atol=1e-6, rtol=1e-5)


def test_memory_plan_drops_cogagents_frozen_cross_tower_too(tmp_path):
    """The plan releases what release_tower releases: for CogAgent also the frozen cross tower's ViT."""
    from finetune.loading import build_meta_model
    from finetune.memory import plan_memory

    base = make_tiny(1, tmp_path / "base", seed=4, family="cogagent")
    train_path, _ = write_task(tmp_path / "data", n_train=2, n_eval=1, seed=4)
    meta = build_meta_model(base)
    args = [f"model.checkpoint_dir={base}", f"data.train_path={train_path}", "lora.targets=[experts]"]

    def rest_gib(*more):  # bf16 weights still held (the released ones are not)
        plan = plan_memory(meta, load_recipe(RECIPE, [*args, *more]), 0, 0, "bfloat16")
        return next(gib for name, gib, _ in plan.rows if name.startswith("weights: rest"))

    cross = sum(p.numel() for n, p in meta.named_parameters() if n.startswith("model.cross_vision.vit."))
    frozen = rest_gib("data.feature_cache=/tmp/x")
    trained = rest_gib("data.feature_cache=/tmp/x", "lora.targets=[experts,cross_tower]")
    assert cross > 0 and (trained - frozen) * 2**30 == pytest.approx(cross * 2, rel=1e-6)
