"""No deprecation noise from the kit's own calls: a training step, a generation and a merge run with every Python
warning turned into an error and every warning logged by transformers / peft / accelerate counted as a failure.

Renamed APIs the kit must follow on the newest releases: TrainingArguments `gradient_checkpointing` ->
`activation_checkpointing`, `past_key_values` -> `cache` (argument and output field), `use_return_dict`, models
that "don't directly inherit from GenerationMixin". Third-party internals that warn whatever the kit does are
filtered by message, each with the reason; nothing else is.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager

import pytest
import torch

from adapters import merge as merge_mod
from adapters import merge_verify
from adapters.demo import RECIPE, write_task
from finetune.config import load_recipe
from finetune.generation import generate_answers
from finetune.models.cogvlm.processing import CogVLMProcessor
from finetune.recipe import train
from finetune.tokenization import load_tokenizer

from .test_generation import STEPS, build_inputs

# (message regex, category, why it is not the kit's doing)
THIRD_PARTY = [
    # torch's own torch/utils/mkldnn.py decorates with torch.jit.script_method, which torch itself deprecated; it
    # is imported lazily by torch._inductor when transformers/accelerate probe for torch.compile.
    (r"`torch\.jit\.script_method` is deprecated", DeprecationWarning),
    # peft (0.21) reads `model.is_gradient_checkpointing` inside get_peft_model / PeftModel(...), a property
    # transformers renamed; the kit never reads it (finetune/__init__.py silences it for users for the same reason).
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
    # The Trainer's checkpoint rotation on file systems with coarse mtimes (tmpfs in CI); a property of the disk.
    (r"mtime may not be reliable on this filesystem", UserWarning),
]
LIBRARY_LOGGERS = ("transformers", "peft", "accelerate")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()}")


@contextmanager
def strict_warnings():
    """Every warning is an error (but THIRD_PARTY's); library log warnings are collected and must stay empty."""
    from transformers.utils import logging as hf_logging

    handler = _Collect()
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    levels = [lg.level for lg in loggers]
    hf_verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()
    hf_logging.warning_once.cache_clear()  # a deprecation already logged once in this process must show again
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(min(lg.level or logging.WARNING, logging.WARNING))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for message, category in THIRD_PARTY:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)
        hf_logging.set_verbosity(hf_verbosity)
    assert handler.records == [], "library warnings logged during the kit's calls:\n" + "\n".join(handler.records)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    from finetune.tiny import make_tiny

    root = tmp_path_factory.mktemp("warn")
    base = make_tiny(2, root / "base", seed=1)
    train_path, eval_path = write_task(root / "data", n_train=4, n_eval=2, seed=1)
    return root, base, train_path, eval_path


def test_training_step_with_checkpointing_and_generation_eval_is_quiet(task):
    root, base, train_path, eval_path = task
    cfg = load_recipe(RECIPE, [f"model.checkpoint_dir={base}", f"data.train_path={train_path}",
                               f"data.eval_path={eval_path}", f"output.dir={root / 'run'}", "train.max_steps=1",
                               "train.per_device_train_batch_size=2", "train.report_to=[none]",
                               "train.gradient_checkpointing=true", "eval.generation_rows=1"])
    with strict_warnings():
        out = train(cfg, log=lambda *_: None)
    assert (out / "adapter").is_dir()


def test_generation_and_merge_are_quiet(task, tiny_checkpoints, monkeypatch):
    from .test_merge import make_run

    base = tiny_checkpoints[2]
    run = make_run(task[0] / "lora", base, seed=3)
    # Same checks as the fresh process, in this one, so that their warnings are seen here too.
    monkeypatch.setattr(merge_mod, "verify_in_fresh_process", lambda f, p, d, q, log: {
        **merge_verify.verify_folder(f, p, d), "reload_seconds": 0.0})
    with strict_warnings():
        model = merge_mod.attach_adapters(merge_mod.load_base(base, "float32"),
                                          [("default", merge_mod.resolve_adapter(run))], base)
        out = model.generate(**build_inputs(model.config, "batch"), max_new_tokens=STEPS, do_sample=False,
                             pad_token_id=model.config.pad_token_id, output_logits=True,
                             return_dict_in_generate=True)
        tok = load_tokenizer(base, None, model.config)
        convs = [c for c in __import__("tests.test_generation", fromlist=["x"])._conversations()][:2]
        processor = CogVLMProcessor.from_config(model.config, tok, template_version="chat")
        answers = generate_answers(model, processor, convs, max_new_tokens=3, batch_size=2)
        report = merge_mod.merge_adapter(run, task[0] / "merged", dtype="fp32", log=lambda s: None)
    assert len(out.logits) >= 1 and torch.isfinite(out.logits[0]).all() and len(answers) == 2
    assert report.stats["max_abs_diff"] < 1e-4
