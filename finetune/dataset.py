"""cogtune JSONL -> encoded examples through Hugging Face `datasets`, and torch wrappers that decode images lazily.

Why `datasets`: tokenization is cached on disk (Arrow) keyed by a fingerprint of everything that changes
the tokens (source file and the processor's `fingerprint()`: tokenizer, template, max_length, label mode, image
span), so a restart or a second run skips it; `streaming=True` reads files too large to encode up front.
Images stay references until a DataLoader worker asks for the item (docs/architecture.md §19.10): nothing is
decoded in the main process and nothing is moved to a device here.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data_formats.schema import ImageError

from .models.cogvlm.processing import EncodedExample, RowTooLong

# Bump when encoding rules change, so cached Arrow files from older code are not reused.
ENCODING_VERSION = 2


def _columns(processor: Any) -> tuple[str, ...]:
    """Columns of the encoded dataset: the model inputs made per example (the model class declares them,
    `processor.example_input_names`), the labels, and bookkeeping."""
    names = list(processor.example_input_names)
    return (*names, *(c for c in ("labels", "dropped_turns", "id", "skip") if c not in names))


@dataclass
class EncodeStats:
    """What encoding dropped, for the run log (nothing is dropped silently, docs/architecture.md §19.5)."""

    rows: int = 0
    kept: int = 0
    too_long: int = 0
    invalid: int = 0
    dropped_turns: int = 0
    examples: tuple[str, ...] = ()  # first few "file:line: reason" lines

    def __str__(self) -> str:
        return (f"{self.kept}/{self.rows} rows encoded; {self.dropped_turns} oldest history turns dropped to fit "
                f"max_length; {self.too_long} rows too long even so; {self.invalid} invalid rows skipped")


def _fingerprint(source: str, processor: Any, settings: dict[str, Any]) -> str:
    """Cache key of an encoded file: its content signature, the processor's fingerprint (tokenizer and
    encoding settings) and how the rows were read (`settings`: image root, rejected lines, ...)."""
    blob = json.dumps({
        "source": source,
        "processor": processor.fingerprint(),
        "encoding_version": ENCODING_VERSION,
        **settings,
    }, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


_LINE_FEATURES = {"line": "int64", "text": "string", "error": "string"}


def read_lines(path: str, signature: str = "", shards: list[int] | None = None,
               num_shards: int = 1) -> Iterator[dict[str, Any]]:
    """Non-blank lines of a JSONL file as {line, text, error}: the kit's own reader for `datasets`.

    Lines are split on b"\n" only (never on U+2028), a leading BOM is dropped, and each line is decoded
    on its own, so a malformed, truncated or non-UTF-8 line becomes one skipped row instead of reaching
    pyarrow's JSON parser (which fails the whole file). `signature` only keys the cache. `shards` (streaming):
    only the lines of these of `num_shards` interleaved shards (line n is in shard (n - 1) % num_shards).
    """
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if shards is not None and (lineno - 1) % num_shards not in shards:
                continue
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                text, error = raw.decode("utf-8"), ""
            except UnicodeDecodeError as exc:
                text, error = "", f"line: not UTF-8 text ({exc.reason} at byte {exc.start} of the line)"
            if error or text.strip():
                yield {"line": lineno, "text": text, "error": error}


def _file_signature(path: Path) -> str:
    """Content hash (with size and mtime), so an edited file never reuses a stale cache."""
    st = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return f"{st.st_size}-{st.st_mtime_ns}-{digest.hexdigest()}"


def _encode_batch(batch: dict[str, list], *, path: str, base_dir: str, processor: Any,
                  allow_outside_images: bool = False, rejected: dict[int, str] | None = None,
                  with_source: bool = False) -> dict[str, list]:
    """Rows -> encoded columns; rows that are invalid or too long get a `skip` reason (filtered and counted).

    `rejected`: {line: reason} of rows the up-front validation refused (e.g. an image that does not
    decode), skipped here too so that what trains is exactly what validation accepted.
    `with_source` (streaming) adds a `source` column, "file:line", so that a row whose image fails to decode
    later, in a DataLoader worker, can be named where it is.
    """
    from data_formats.schema import loads_row, parse_row

    columns = _columns(processor)
    out: dict[str, list] = {k: [] for k in columns}
    for line, text, error in zip(batch["line"], batch["text"], batch["error"], strict=True):
        source = f"{path}:{line}"
        obj, why = (None, error) if error else loads_row(text)
        conv, problems = None, []
        if why is None and rejected and line in rejected:
            why = rejected[line]
        if why is None:
            conv, problems = parse_row(obj, source, Path(base_dir), default_id=f"{Path(path).stem}-{line}",
                                       max_images=None, check_images=False, require_answer=True,
                                       allow_outside_images=allow_outside_images)
        skip, ex = "", None
        if why is not None:
            skip = f"invalid: {why}"
        elif conv is None:
            errors = [str(p) for p in problems if p.level == "error"]
            skip = "invalid: " + ("; ".join(errors) or "row rejected")
        else:
            try:
                ex = processor.encode(conv)
            except RowTooLong as err:
                skip = f"too long: {err}"
            except ValueError as err:
                skip = f"invalid: {err}"
        ex = ex or EncodedExample([], [], [], [], 0, "" if conv is None else conv.id)
        row = {**ex.to_dict(), "skip": skip}
        for k in columns:
            out[k].append(row.get(k))
        if with_source:
            out.setdefault("source", []).append(source)
    return out


def encode_jsonl(
    path: str | Path,
    processor: Any,
    *,
    image_root: str | Path | None = None,
    allow_outside_images: bool = False,
    streaming: bool = False,
    streaming_shards: int = 1,
    num_proc: int | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[Any, EncodeStats | None]:
    """Read a cogtune JSONL with the kit's line reader into `datasets` and encode every row with
    `processor.encode` (a `CogVLMProcessor`: template, image span, max_length, labels, multi-image).

    Returns (dataset of encoded rows with columns input_ids/token_type_ids/images (the model's per-example
    inputs)/labels/dropped_turns/id, stats). With `streaming=True` the result is a lazy `IterableDataset`,
    rows are encoded as they are read, invalid/too-long rows are skipped on the fly and stats is None (they
    cannot be known up front); the stream has `streaming_shards` interleaved shards (see `read_lines`), which
    `datasets` hands out to DataLoader workers, one each when there are as many workers as shards (a worker
    with no shard stops: with one shard, one worker reads every row). Give it the DataLoader's num_workers.
    Images are absolute refs (resolved against `image_root`, default the JSONL's folder, and refused
    outside it unless `allow_outside_images`), not yet decoded. Rows that `finetune.validate.load_and_validate`
    rejected for this unchanged file (undecodable images included) are skipped and counted as invalid.
    """
    from datasets import Dataset, Features, IterableDataset, Value

    from .validate import rejected_lines

    path = Path(path)
    base_dir = str(Path(image_root) if image_root is not None else path.parent)
    rejected = rejected_lines(path, image_root, allow_outside_images) or {}
    features = Features({k: Value(v) for k, v in _LINE_FEATURES.items()})
    fn_kwargs = dict(path=str(path), base_dir=base_dir, processor=processor,
                     allow_outside_images=allow_outside_images, rejected=rejected)
    if streaming:
        shards = max(1, streaming_shards)  # a list in gen_kwargs is what `datasets` shards by
        raw = IterableDataset.from_generator(read_lines, features=features, gen_kwargs={
            "path": str(path), "shards": list(range(shards)), "num_shards": shards})
        encoded = raw.map(_encode_batch, batched=True, fn_kwargs={**fn_kwargs, "with_source": True},
                          remove_columns=list(_LINE_FEATURES))
        return encoded.filter(lambda row: not row["skip"]).remove_columns(["skip"]), None

    signature = _file_signature(path)
    raw = Dataset.from_generator(read_lines, features=features, gen_kwargs={"path": str(path), "signature": signature},
                                 cache_dir=None if cache_dir is None else str(cache_dir))
    fp = _fingerprint(signature, processor, {"base_dir": base_dir, "path": str(path.resolve()),
                                             "allow_outside_images": allow_outside_images,
                                             "rejected": sorted(rejected.items())})
    encoded = raw.map(_encode_batch, batched=True, fn_kwargs=fn_kwargs, num_proc=num_proc,
                      remove_columns=raw.column_names, new_fingerprint=fp, desc="tokenizing")
    skips = encoded["skip"]
    lines = raw["line"]
    reasons = [f"{path}:{lines[i]}: {s}" for i, s in enumerate(skips) if s]
    stats = EncodeStats(
        rows=len(skips),
        kept=len(skips) - len(reasons),
        too_long=sum(s.startswith("too long") for s in skips),
        invalid=sum(s.startswith("invalid") for s in skips),
        dropped_turns=int(sum(d for d, s in zip(encoded["dropped_turns"], skips, strict=True) if not s)),
        examples=tuple(reasons[:10]),
    )
    if reasons:
        encoded = encoded.filter(lambda s: not s, input_columns=["skip"], new_fingerprint=fp[:16] + "-filtered")
    return encoded.remove_columns(["skip"]), stats


class ImageDecodeError(ImageError):
    """An image of a training row failed to decode when a DataLoader worker loaded it (it broke or changed
    after validation). A distinct type so the trainer can catch it, save a checkpoint and stop cleanly;
    constructible from one message string, as DataLoader workers re-raise exceptions that way."""


def _with_images(row: dict[str, Any], processor: Any) -> dict[str, Any]:
    """The row with its images decoded and transformed by the processor; a decode failure is an `ImageDecodeError`."""
    try:
        return processor.load_images(row)  # images: each (3, S, S)
    except (ImageError, OSError) as exc:
        raise ImageDecodeError(f"row {row.get('id', '?')}: {exc}; run `cogtune validate` on the data, fix or "
                               "remove the image, then resume") from None
    return row


class CogVLMDataset(torch.utils.data.Dataset):
    """Map-style view of encoded rows; `__getitem__` decodes and transforms the row's images (in the worker)."""

    def __init__(self, encoded: Any, processor: Any) -> None:
        self.encoded = encoded
        self.processor = processor

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**_with_images(self.encoded[i], self.processor), "row_index": i}  # row_index: see row_name

    def row_name(self, i: int) -> str:
        """How a report names row i: its id (the JSONL's `id`, else `<file stem>-<line>`)."""
        return str(self.encoded[i]["id"])


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


class CogVLMIterableDataset(torch.utils.data.IterableDataset):
    """Streaming view: images decoded per row, in the DataLoader worker that `datasets` gave the row's shard
    (`encode_jsonl(streaming_shards=...)`; the stream must not be split again here, or rows would be lost).

    There is no validation pass before a stream, so an image that does not decode is met only here. As in
    non-streaming runs (`finetune.data_building.SkipBadImages`): with `skipped` (a counter shared with the
    DataLoader workers, e.g. `multiprocessing.Value`; given when data.skip_invalid is on) the row is skipped,
    counted, and named with its `file:line` and the reason once per process (with DataLoader workers, once per
    pass over the data); without it the row stops the
    run with an `ImageDecodeError` naming `file:line` (the trainer saves a checkpoint first).
    """

    def __init__(self, encoded: Any, processor: Any, skipped: Any = None, log: Any = None) -> None:
        self.encoded = encoded
        self.processor = processor
        self.skipped = skipped
        self.log = log or _to_stderr  # a module function: the dataset is pickled to spawned DataLoader workers
        self._named: set[str] = set()  # rows already warned about in this process

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for row in self.encoded:  # inside a DataLoader worker, `datasets` yields only that worker's shards
            row = dict(row)
            source = row.pop("source", None) or "stream"
            try:
                item = self.processor.load_images(row)  # images: each (3, S, S)
            except (ImageError, OSError) as exc:
                what = f"{source}: row {row.get('id', '?')}: {exc}"
                if self.skipped is None:
                    raise ImageDecodeError(f"{what}; run `cogtune validate` on the data and fix or remove the "
                                           "image, or rerun with --skip-invalid to skip such rows; then resume") \
                        from None
                with self.skipped.get_lock():
                    self.skipped.value += 1
                if source not in self._named:
                    self._named.add(source)
                    self.log(f"skipped at run time (--skip-invalid): {what}")
                continue
            yield item


def build_torch_dataset(encoded: Any, processor: Any, skipped: Any = None) -> CogVLMDataset | CogVLMIterableDataset:
    """The right wrapper for a (streaming or not) encoded dataset; feed its items to CogVLMCollator.

    `skipped` (streaming only): the shared counter that turns on skipping rows whose image does not decode
    (see CogVLMIterableDataset); non-streaming runs wrap the result in `data_building.SkipBadImages` instead.
    """
    from datasets import IterableDataset

    if isinstance(encoded, IterableDataset):
        return CogVLMIterableDataset(encoded, processor, skipped)
    return CogVLMDataset(encoded, processor)


class PackedDataset(torch.utils.data.Dataset):
    """Rows packed over the whole dataset before training: item i is the list of examples of pack i.

    Packing inside each micro-batch does nothing at batch size 1 (the usual setting for these models);
    planning packs up front fills every sequence up to max_length whatever the batch size.
    """

    def __init__(self, base: torch.utils.data.Dataset, lengths: list[int], max_length: int) -> None:
        from .models.cogvlm.processing import pack_examples

        self.base = base
        self.packs = pack_examples(lengths, max_length)

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, i: int) -> list[dict[str, Any]]:
        return [self.base[j] for j in self.packs[i]]
