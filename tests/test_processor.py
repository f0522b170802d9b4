"""CogVLMProcessor: save/load round trip, the processor saved beside adapters, exports and merged models, the
dataset-cache fingerprint, and the model's input names declared once (a new input flows through the collator,
the dataset, generation and the merge probe without editing them)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from data_formats.schema import Conversation, Message
from finetune.models.cogvlm.modeling import CogVLMForCausalLM
from finetune.models.cogvlm.processing import PROCESSOR_CONFIG, CogVLMCollator, CogVLMProcessor
from finetune.tiny import tiny_config
from finetune.tokenization import build_tiny_tokenizer

from .test_merge import in_process_verify, make_run  # noqa: F401 - fixture re-used

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def red_png(tmp_path) -> Path:
    path = tmp_path / "red.png"
    Image.new("RGB", (12, 8), (255, 0, 0)).save(path)
    return path


def _conv(image: Path) -> Conversation:
    return Conversation("r", [str(image)], [Message("user", "<image>What color?"), Message("assistant", "red"),
                                            Message("user", "Where is it?"), Message("assistant", "left")])


def _encoded(processor: CogVLMProcessor, conv: Conversation) -> tuple[list[int], list[int], list[int]]:
    e = processor.encode(conv)
    return e.input_ids, e.token_type_ids, e.labels


# --- save / load ---------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path, red_png):
    tok, cfg = build_tiny_tokenizer(2), tiny_config(2)
    p = CogVLMProcessor.from_config(cfg, tok, template_version="vqa", max_length=40, last_turn_only=True,
                                    allow_multi_image=True)
    path = p.save_pretrained(tmp_path / "proc")
    folder = tmp_path / "proc"
    assert path == folder / PROCESSOR_CONFIG and (folder / "tokenizer.json").is_file()
    assert json.loads(path.read_text()) == {"processor_class": "CogVLMProcessor", **p.settings()}
    assert not [f.name for f in folder.iterdir() if f.name.startswith(".")]  # written atomically, nothing left
    again = CogVLMProcessor.from_pretrained(folder)  # no config.json: processor_config.json holds every setting
    assert again.settings() == p.settings() and again.fingerprint() == p.fingerprint()
    assert _encoded(again, _conv(red_png)) == _encoded(p, _conv(red_png))
    size = cfg.vision_config["image_size"]
    assert again.transform_image(str(red_png)).shape == (3, size, size)
    assert torch.equal(again.transform_image(str(red_png)), p.transform_image(str(red_png)))
    # overrides win over the saved settings; None keeps them
    assert CogVLMProcessor.from_pretrained(folder, template_version="chat").template_version == "chat"
    assert CogVLMProcessor.from_pretrained(folder, template_version=None).template_version == "vqa"


def test_from_pretrained_of_a_checkpoint_reads_its_config(tiny_checkpoints, red_png):
    from finetune.models.cogvlm.configuration import CogVLMConfig

    folder = tiny_checkpoints[2]
    config = CogVLMConfig.from_pretrained(str(folder))
    p = CogVLMProcessor.from_pretrained(folder)
    assert (p.image_tokens, p.image_size, p.template_version, p.prompt_table, p.max_length) == (
        config.image_tokens, config.vision_config["image_size"], config.template_version, "cogvlm", None)
    assert p.model_input_names == CogVLMForCausalLM.model_input_names


def test_bad_folders_and_settings_are_refused(tmp_path):
    tok, cfg = build_tiny_tokenizer(2), tiny_config(2)
    with pytest.raises(FileNotFoundError, match="neither processor_config.json nor config.json"):
        CogVLMProcessor.from_pretrained(tmp_path)
    folder = tmp_path / "p"
    CogVLMProcessor.from_config(cfg, tok).save_pretrained(folder)
    blob = json.loads((folder / PROCESSOR_CONFIG).read_text())
    (folder / PROCESSOR_CONFIG).write_text(json.dumps({**blob, "max_lenght": 5}))
    with pytest.raises(ValueError, match="unknown key.*max_lenght"):
        CogVLMProcessor.from_pretrained(folder)
    (folder / PROCESSOR_CONFIG).write_text(json.dumps({**blob, "processor_class": "OtherProcessor"}))
    with pytest.raises(ValueError, match="written by OtherProcessor"):
        CogVLMProcessor.from_pretrained(folder)
    with pytest.raises(ValueError, match="unknown template_version 'llama3'.*valid: base, chat, vqa"):
        CogVLMProcessor.from_config(cfg, tok, template_version="llama3")
    with pytest.raises(TypeError, match="unknown processor setting.*family_version"):
        CogVLMProcessor.from_config(cfg, tok, family_version=2)


def test_prompt_table_comes_from_the_config(red_png):
    tok, cfg = build_tiny_tokenizer(2), tiny_config(2)
    cfg.prompt_table = "cogagent"  # the flag a CogAgent config sets
    p = CogVLMProcessor.from_config(cfg, tok)
    assert p.prompt_table == "cogagent"
    e = p.encode(Conversation("r", [], [Message("user", "Hi")]), add_generation_prompt=True)
    assert tok.decode(e.input_ids[1:]) == " [INST] Hi [/INST] "


def test_fingerprint_follows_every_setting_and_the_tokenizer():
    tok, cfg = build_tiny_tokenizer(2), tiny_config(2)
    base = CogVLMProcessor.from_config(cfg, tok)
    changes = {"template_version": "vqa", "prompt_table": "cogagent", "image_tokens": 10, "image_size": 28,
               "max_length": 64, "last_turn_only": True, "allow_multi_image": True}
    assert set(changes) == set(CogVLMProcessor.SETTINGS)
    prints = [base.fingerprint()] + [base.with_settings(**{k: v}).fingerprint() for k, v in changes.items()]
    prints.append(CogVLMProcessor.from_config(tiny_config(1), build_tiny_tokenizer(1)).fingerprint())
    assert len(set(prints)) == len(prints)
    assert CogVLMProcessor.from_config(cfg, build_tiny_tokenizer(2)).fingerprint() == base.fingerprint()


# --- saved beside adapters, exports and merged models ------------------------------------------------------------


def test_adapter_export_and_merged_folders_encode_alike(tiny_checkpoints, tmp_path, in_process_verify,  # noqa: F811
                                                         red_png):
    from adapters.export import export_peft
    from adapters.merge import merge_adapter
    from finetune.run_folder import resolve_adapter

    base = tiny_checkpoints[2]
    run = make_run(tmp_path / "run", base, seed=4, template="vqa", max_length=64, last_turn_only=True)
    merged = merge_adapter(run, tmp_path / "merged", dtype="fp32", log=lambda s: None).out
    exported = export_peft(resolve_adapter(run), tmp_path / "export", log=lambda s: None)
    for folder in (run / "adapter", merged, exported):
        assert (folder / PROCESSOR_CONFIG).is_file(), folder
    from_adapter = CogVLMProcessor.from_pretrained(run / "adapter")
    assert CogVLMProcessor.from_pretrained(run).settings() == from_adapter.settings()  # a run folder: its adapter's
    from_merged = CogVLMProcessor.from_pretrained(merged)
    from_export = CogVLMProcessor.from_pretrained(exported)
    assert from_adapter.settings() == from_merged.settings() == from_export.settings()
    conv = _conv(red_png)
    assert _encoded(from_adapter, conv) == _encoded(from_merged, conv) == _encoded(from_export, conv)
    # ... and that is the run's encoding (template vqa, loss on the last answer), not the base's defaults
    ids, _, labels = _encoded(from_merged, conv)
    default_ids, _, default_labels = _encoded(CogVLMProcessor.from_pretrained(base), conv)
    assert ids != default_ids and sum(x != -100 for x in labels) < sum(x != -100 for x in default_labels)


# --- model input names, declared once on the model class ---------------------------------------------------------


class _SizedModel(CogVLMForCausalLM):
    """A family that adds one input, each image's original (width, height): `image_sizes`, (N, 2) long."""

    model_input_names = (*CogVLMForCausalLM.model_input_names, "image_sizes")
    seen: list = []

    def forward(self, *args, image_sizes=None, **kwargs):
        type(self).seen.append(image_sizes)
        return super().forward(*args, **kwargs)


class _SizedProcessor(CogVLMProcessor):
    @classmethod
    def model_class(cls) -> type:
        return _SizedModel

    def encode(self, conversation, add_generation_prompt=False):
        e = super().encode(conversation, add_generation_prompt)
        e.extra["image_sizes"] = [list(Image.open(ref).size) for ref in e.images]
        return e

    def batch_input(self, name, values):
        if name == "image_sizes":
            sizes = [s for per_example in values for s in per_example]
            return torch.tensor(sizes, dtype=torch.long).reshape(-1, 2) if sizes else None  # (N, 2)
        return super().batch_input(name, values)


def test_a_new_model_input_flows_through_collator_dataset_generation_and_probe(tmp_path, red_png):
    from adapters.merge_verify import build_probe, load_probe, probe_logits, save_probe
    from finetune.dataset import build_torch_dataset, encode_jsonl
    from finetune.generation import generate_answers, prepare_batch

    cfg = tiny_config(2)
    processor = _SizedProcessor.from_config(cfg, build_tiny_tokenizer(2))
    assert processor.model_input_names[-1] == "image_sizes"
    model = _SizedModel(cfg).eval()
    want = torch.tensor([[12, 8]])
    # collator: the new key is in the batch, built by the family's processor
    batch = CogVLMCollator(processor)([_conv(red_png)])
    assert set(batch) == {*_SizedModel.model_input_names, "labels"} and torch.equal(batch["image_sizes"], want)
    # dataset: a column of the encoded cache, back in the batch after a DataLoader worker
    (tmp_path / "d.jsonl").write_text(json.dumps({"id": "a", "images": [red_png.name], "messages": [
        {"role": "user", "content": "<image>Color?"}, {"role": "assistant", "content": "red"}]}) + "\n")
    ds, _ = encode_jsonl(tmp_path / "d.jsonl", processor, cache_dir=tmp_path / "cache")
    assert "image_sizes" in ds.column_names
    loaded = CogVLMCollator(processor)([build_torch_dataset(ds, processor)[0]])
    assert torch.equal(loaded["image_sizes"], want)
    # generation: prepare_batch passes it on, generate() hands it to forward
    assert torch.equal(prepare_batch(model, batch)["image_sizes"], want) and "position_ids" not in prepare_batch(
        model, batch)
    _SizedModel.seen.clear()
    generate_answers(model, processor, [_conv(red_png)], max_new_tokens=2)
    assert _SizedModel.seen and torch.equal(_SizedModel.seen[0], want)
    # merge probe: built, stored, loaded and fed to the model with the new input
    probe = build_probe(processor, tmp_path)
    assert probe["image_sizes"].shape == (2, 2)  # the two image probes; the text-only one has none
    save_probe(tmp_path / "probe.safetensors", probe, torch.zeros(1), "chat")
    back = load_probe(tmp_path / "probe.safetensors")
    assert torch.equal(back["image_sizes"], probe["image_sizes"])
    _SizedModel.seen.clear()
    probe_logits(model, back)
    assert torch.equal(_SizedModel.seen[0], probe["image_sizes"])


def test_an_input_no_one_can_batch_fails_loudly(red_png):
    class Unbatched(CogVLMProcessor):
        @classmethod
        def model_class(cls):
            return _SizedModel

    processor = Unbatched.from_config(tiny_config(2), build_tiny_tokenizer(2))
    with pytest.raises(KeyError, match="no value for model input 'image_sizes'"):
        CogVLMCollator(processor)([_conv(red_png)])


def test_no_consumer_hard_codes_the_input_names():
    """The list lives on the model class; collator, dataset, generation, DPO and merge probes read it."""
    listed = re.compile(r"""[(\[]\s*["']input_ids["']\s*,\s*["']token_type_ids["']""")
    declared = re.compile(r"\bmodel_input_names\s*(?::[^=\n]*)?=\s*\(")
    hits = []
    for path in sorted([*(ROOT / "finetune").rglob("*.py"), *(ROOT / "adapters").rglob("*.py")]):
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(ROOT).as_posix()
        hits += [f"{rel}: a list of input names" for _ in listed.finditer(text)]
        hits += [f"{rel}: model_input_names declared" for _ in declared.finditer(text)]
    # Declared once per family, on its model class (CogAgent extends CogVLM's list with cross_images).
    assert hits == ["finetune/models/cogagent/modeling.py: model_input_names declared",
                    "finetune/models/cogvlm/modeling.py: a list of input names",
                    "finetune/models/cogvlm/modeling.py: model_input_names declared"]
    for rel in ("finetune/generation.py", "finetune/dataset.py", "adapters/merge_verify.py"):
        assert '"images"' not in (ROOT / rel).read_text(encoding="utf-8"), rel
