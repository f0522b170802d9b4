"""From a recipe's data section to the train and eval datasets the Trainer consumes.
"""

from __future__ import annotations

import sys
from typing import Any

import torch


class SkipBadImages(torch.utils.data.Dataset):
    """--skip-invalid at run time: a row whose image cannot be decoded is replaced by the next good row,
    counted (shared across DataLoader workers) and reported, instead of ending the run."""

    def __init__(self, base, counter, log=None) -> None:
        self.base, self.counter = base, counter
        self.log = log or (lambda msg: print(msg, file=sys.stderr))

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        from data_formats.schema import ImageError

        for attempt in range(min(len(self.base), 64)):
            try:
                return self.base[(i + attempt) % len(self.base)]
            except (ImageError, OSError) as err:
                with self.counter.get_lock():
                    self.counter.value += 1
                self.log(f"skipped at run time (--skip-invalid): row {(i + attempt) % len(self.base)}: {err}")
        raise ValueError("64 rows in a row have images that cannot be decoded; run `cogtune validate` on the data")


class WithRowIndex:
    """The training collator plus `row_index`, a (N,) long tensor of the dataset rows in the micro-batch (packed
    rows included), so that the divergence guard can name the rows of a bad step. Items without one (streamed
    rows) add nothing; the trainer removes the key before the model runs."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def __call__(self, items: list[Any]) -> dict[str, Any]:
        flat = [x for item in items for x in (item if isinstance(item, (list, tuple)) else [item])]
        index = [x.get("row_index") for x in flat if isinstance(x, dict)]
        batch = self.collator(items)  # the collator reads only the example fields, not row_index
        if index and all(i is not None for i in index):
            batch["row_index"] = torch.tensor(index, dtype=torch.long)  # (N,)
        return batch


def row_namer(dataset: Any) -> Any:
    """The `row_name` of the `CogVLMDataset` under the wrappers (packing, skipping), or None (streaming)."""
    while dataset is not None and not hasattr(dataset, "row_name"):
        dataset = getattr(dataset, "base", None)
    return getattr(dataset, "row_name", None)


# Recipe keys that are settings of some families' processors only (data.X -> processor setting X).
FAMILY_DATA_SETTINGS = ("num_frames", "fps")


def processor_for_recipe(cfg, config, tokenizer):
    """The processor a recipe trains with: the family's processor class (finetune/models FAMILIES), the
    checkpoint's image span and prompt table, the recipe's template (default: the checkpoint's), max_length,
    label mode and multi-image setting, plus the family's own data settings (video: data.num_frames, data.fps)."""
    from .models import processor_class_for

    cls = processor_class_for(config)
    extra = {k: getattr(cfg.data, k) for k in FAMILY_DATA_SETTINGS if getattr(cfg.data, k, None) is not None}
    unused = sorted(k for k in extra if k not in cls.SETTINGS)
    if unused:
        raise ValueError(f"{', '.join('data.' + k for k in unused)}: not a setting of {cls.__name__} (video models "
                         "only); remove it from the recipe")
    return cls.from_config(config, tokenizer, template_version=cfg.data.template_version,
                           max_length=cfg.data.max_length, last_turn_only=cfg.data.last_turn_only,
                           allow_multi_image=cfg.data.allow_multi_image, **extra)


def read_conversations(path: str, image_root: str | None, cfg, log=print) -> list:
    """Rows of a cogtune JSONL through the same validation as `cogtune validate`.

    Errors stop the run with every problem listed, unless data.skip_invalid is set; then the
    invalid rows are skipped and counted. Nothing is dropped silently.
    """
    from .validate import load_and_validate

    convs, report = load_and_validate(path, image_root=image_root, max_images=None if cfg.data.allow_multi_image
                                      else 1, skip_invalid=cfg.data.skip_invalid,
                                      allow_outside_images=cfg.data.allow_outside_images)
    if report:
        log(report)
    return convs


def build_datasets(cfg, processor, log=print):
    """(train dataset, eval examples or None, eval conversations, collator).

    `processor` (a `CogVLMProcessor` with the recipe's template, max_length, label mode and multi-image
    setting: `processor_for_recipe`) encodes every row and transforms every image.

    Training rows go through `datasets` (finetune/dataset.py): tokenization cached on disk, images decoded
    lazily in DataLoader workers, optional streaming. Before that the whole file is validated like
    `cogtune validate` (skipped in streaming mode, where rows are checked as they are read).
    """
    from .dataset import PackedDataset, build_torch_dataset, encode_jsonl
    from .models.cogvlm.processing import CogVLMCollator

    collator = CogVLMCollator(processor, packing=cfg.data.packing)
    if cfg.data.streaming:
        log("data.streaming: rows are validated as they are read; invalid or too-long rows are skipped without "
            "an up-front count (run `cogtune validate` on the file first)")
    else:
        read_conversations(cfg.data.train_path, cfg.data.image_root, cfg, log)
    settings = dict(image_root=cfg.data.image_root, allow_outside_images=cfg.data.allow_outside_images)
    encoded, stats = encode_jsonl(cfg.data.train_path, processor, streaming=cfg.data.streaming,
                                  streaming_shards=cfg.data.num_workers, **settings)  # a shard per worker
    if stats is not None:
        log(f"train: {stats}")
        for line in stats.examples:
            log(f"  skipped: {line}")
        if stats.kept == 0:
            raise ValueError("no training rows left after encoding; raise data.max_length or check the data")
    train = build_torch_dataset(encoded, processor)
    if cfg.data.packing and not cfg.data.streaming:  # plan packs over the whole dataset (see PackedDataset)
        lengths = [len(ids) for ids in encoded["input_ids"]]
        train = PackedDataset(train, lengths, cfg.data.max_length)
        log(f"packing: {len(lengths)} rows -> {len(train)} sequences of <= {cfg.data.max_length} tokens "
            f"({sum(lengths) / (len(train) * cfg.data.max_length):.0%} filled)")
    eval_convs, eval_examples = [], None
    if cfg.data.eval_path:
        eval_convs = read_conversations(cfg.data.eval_path, cfg.data.image_root, cfg, log)
        encoded_eval, eval_stats = encode_jsonl(cfg.data.eval_path, processor, **settings)
        log(f"eval: {eval_stats}")
        eval_examples = list(encoded_eval)  # small: rows as dicts for the token-weighted eval loss
    return train, eval_examples, eval_convs, collator
