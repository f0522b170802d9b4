"""`cogtune validate DATA.jsonl --model DIR_OR_FAMILY`: every data problem at once, then token lengths.

Output: one line per problem (`file:line: field: what is wrong; how to fix`), then a summary with
token lengths (image tokens included) and how many rows `max_length` would truncate (oldest turns
dropped) or drop. Exit code 1 when any row has an error, 0 otherwise; bad data never raises.

`--model` is a checkpoint folder (config.json + tokenizer) or a family name from
`finetune/families.py`. Token lengths need a tokenizer: a family name alone (or a CogVLM1 folder,
which ships none) gives the structural checks and image-token counts; add `--tokenizer-dir`.
Training calls `load_and_validate`, which applies the same checks. A file of preference rows
(`chosen` / `rejected`, for DPO) gets the same checks as pairs, and the token lengths of prompt+chosen and
prompt+rejected (`finetune/dpo_data.py`).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_formats.schema import Conversation, Problem, loads_row, read_jsonl_lines, validate_rows


class DataValidationError(ValueError):
    """Raised by `load_and_validate` when rows have errors and skip_invalid is off; lists every problem."""


@dataclass
class ValidationReport:
    """What validation found in one file; `str()` is the printable report, falsy when there is nothing to say."""

    path: str
    rows: int
    valid: int
    problems: list[Problem] = field(default_factory=list)
    videos: dict[str, Any] = field(default_factory=dict)  # path -> VideoInfo (duration, fps, frames) of valid rows

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.level == "warning"]

    @property
    def invalid_rows(self) -> int:
        return self.rows - self.valid

    def summary(self) -> str:
        return (f"{self.rows} rows in {self.path}: {self.valid} valid, {self.invalid_rows} with errors "
                f"({len(self.errors)} errors, {len(self.warnings)} warnings)")

    def __str__(self) -> str:
        return "\n".join([*(str(p) for p in self.problems), self.summary()]) if self.problems else ""

    def __bool__(self) -> bool:
        return bool(self.problems)


def _layout(rows: list) -> tuple[str, str | None]:
    """(description, converter name or None) of a JSON array of rows in another tool's layout."""
    sample = [r for r in rows[:50] if isinstance(r, dict)]

    def turns_have(key: str, field: str) -> bool:
        return any(isinstance(r.get(key), list) and any(isinstance(t, dict) and field in t for t in r[key])
                   for r in sample)

    if turns_have("conversations", "from") or turns_have("conversations", "value"):
        return ("LLaVA", "llava") if any("image" in r for r in sample) else ("ShareGPT", "sharegpt")
    if turns_have("messages", "from"):
        return "ShareGPT", "sharegpt"
    if any(isinstance(r.get("messages"), list) and any(isinstance(t, dict) and isinstance(t.get("content"), list)
                                                       for t in r["messages"]) for r in sample):
        return "OpenAI", "openai"
    if any("query" in r and "response" in r for r in sample):
        return "swift", "swift"
    if any("messages" in r for r in sample):
        return "cogtune (role/content)", "sharegpt"
    return "unknown", None


def sniff_whole_file(text: str, path: Path) -> tuple[Problem, int] | None:
    """One problem for a file that is a single JSON document (an unconverted LLaVA/ShareGPT array, a
    pretty-printed object) instead of JSONL, so the user reads one useful line, not "not valid JSON" per line.

    Returns (problem, number of rows the document holds) or None when the file looks like JSONL.
    """
    body = text.lstrip("\ufeff \t\r\n")
    if not body.startswith(("[", "{")):
        return None
    head = [loads_row(line) for line in body.split("\n", 200)[:200] if line.strip()][:5]
    if any(why is None and isinstance(obj, dict) for obj, why in head):
        return None  # JSONL: its rows get their own problems
    data, why_whole = loads_row(body)
    out = path.with_suffix(".jsonl") if path.suffix != ".jsonl" else path.with_name(f"{path.stem}-converted.jsonl")
    if why_whole is not None:
        if not body.startswith("["):
            return None
        return (Problem(str(path), "file", f"starts like a JSON array, not JSONL, and is not valid JSON "
                        f"({why_whole})", "cogtune reads JSONL (one object per line); if this is LLaVA/ShareGPT "
                        f"data, repair the JSON, then run `cogtune convert --from llava {path} --out {out}`",
                        "error", "json document"), 1)
    if isinstance(data, dict):
        return (Problem(str(path), "file", "is one JSON object, not JSONL",
                        "write one conversation object per line (data_formats/README.md)", "error",
                        "json document"), 1)
    if not isinstance(data, list):
        return None
    name, fmt = _layout(data)
    if fmt is None:
        return (Problem(str(path), "file", f"is a JSON array ({len(data)} elements), not JSONL",
                        "write one conversation object per line, or convert it (`cogtune convert --help` lists "
                        "the formats it reads)", "error", "json document"), len(data))
    return (Problem(str(path), "file", f"is a JSON array in {name} layout ({len(data)} rows), not cogtune JSONL",
                    f"run `cogtune convert --from {fmt} {path} --out {out}` and validate the output", "error",
                    "json document"), len(data))


def check_file(path: str | Path, *, image_root: str | Path | None = None, max_images: int | None = 1,
               check_images: bool = True,
               allow_outside_images: bool = False) -> tuple[list[Conversation], ValidationReport]:
    """Structural validation of one file (no tokenizer): the valid rows and the report.

    Lines are split on "\n" only (JSONL), never on U+2028/U+2029; image paths must lie under the data
    root (`image_root`, default the file's folder) unless `allow_outside_images`.
    """
    path = Path(path)
    lines, bad_lines = read_jsonl_lines(path)
    if lines is None:
        return [], ValidationReport(str(path), 0, 0, bad_lines)
    sniffed = sniff_whole_file("\n".join(lines), path)
    if sniffed is not None:
        return [], ValidationReport(str(path), sniffed[1], 0, [sniffed[0]])
    convs, problems = validate_rows(lines, path=path, image_root=image_root, max_images=max_images,
                                    check_images=check_images, allow_outside_images=allow_outside_images)
    problems = bad_lines + problems
    videos: dict[str, Any] = {}
    # Every video opens; duration, fps, frames are recorded (docs/architecture.md §21).
    if check_images and any(c.videos for c in convs):
        from finetune.models.cogvlm2_video.validation import check_videos

        convs, videos = check_videos(convs, problems)
    rows = sum(1 for line in lines if line.strip()) + len(bad_lines)
    foreign = [p for p in problems if p.kind == "foreign format"]
    if rows > 1 and not convs and len(foreign) == rows == len(problems):  # a whole file in another layout: say it once
        sample = [obj for obj, why in (loads_row(line) for line in lines[:200] if line.strip()) if why is None]
        name, fmt = _layout(sample)
        out = path.with_name(f"{path.stem}-converted.jsonl")
        problems = [Problem(str(path), "file", f"every row ({rows}) is in {name} layout, not cogtune's "
                            "(role/content `messages`)", f"run `cogtune convert --from {fmt or 'llava'} {path} --out "
                            f"{out}` and validate the output", "error", "foreign format")]
    if rows == 0:
        problems.append(Problem(str(path), "file", "has no rows", "each line must be one JSON object (see "
                                "data_formats/README.md); `cogtune convert` writes such a file", "error",
                                "empty file"))
    return convs, ValidationReport(str(path), rows, len(convs), problems, videos)


# What `load_and_validate` rejected, per file version, so that `finetune.dataset.encode_jsonl` skips
# exactly those rows: the rows that train are the rows validation accepted (image decoding included).
_REJECTED: dict[tuple, dict[int, str]] = {}


def _file_key(path: str | Path, image_root: str | Path | None, allow_outside_images: bool) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    root = None if image_root is None else str(Path(image_root).resolve())
    return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino, root, bool(allow_outside_images))


def rejected_lines(path: str | Path, image_root: str | Path | None = None,
                   allow_outside_images: bool = False) -> dict[int, str] | None:
    """{line: reason} of rows the last `load_and_validate` of this unchanged file rejected; None if never validated."""
    key = _file_key(path, image_root, allow_outside_images)
    return None if key is None else _REJECTED.get(key)


def load_and_validate(path: str | Path, image_root: str | Path | None = None, *, max_images: int | None = 1,
                      skip_invalid: bool = False, check_images: bool = True,
                      allow_outside_images: bool = False) -> tuple[list[Conversation], ValidationReport]:
    """Rows for training. Any error raises `DataValidationError` listing every problem, unless
    `skip_invalid`: then invalid rows are skipped and the report counts them (nothing dropped silently).

    Every image is decoded (`check_images`, on by default): a corrupt, truncated, empty or oversized
    image is a row error here, before training, not a crash after hours.
    """
    convs, report = check_file(path, image_root=image_root, max_images=max_images, check_images=check_images,
                               allow_outside_images=allow_outside_images)
    key = _file_key(path, image_root, allow_outside_images)
    if key is not None:
        rejected: dict[int, str] = {}
        for p in report.errors:
            line = _line_of(p.source)[1]
            if line:
                rejected.setdefault(line, f"{p.field}: {p.message}")
        _REJECTED[key] = rejected
    if report.errors and not skip_invalid:
        raise DataValidationError(f"{report}\nfix the rows above (or set data.skip_invalid: true to skip them); "
                                  f"`cogtune validate {path} --model ...` prints the same list")
    if report.errors:
        report.problems.append(Problem(str(path), "rows", f"{report.invalid_rows} invalid rows skipped "
                                       "(data.skip_invalid is on)", "", "warning", "skipped rows"))
    if not convs:
        raise DataValidationError(f"{report}\nno valid rows left in {path}")
    return convs, report


# ---------------------------------------------------------------------------------------------
# Model side: family version, image tokens, template, tokenizer
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelInfo:
    """What token counting needs to know about the target model."""

    name: str
    version: int
    image_tokens: int
    template_version: str
    tokenizer: Any = None
    tokenizer_note: str = ""
    processor: Any = None  # the family's processor when there is a tokenizer: what token counts encode with
    video: bool = False  # CogVLM2-Video: rows carry a video, each sampled frame is one image span


def resolve_model(model: str, tokenizer_dir: str | None, template: str | None) -> ModelInfo:
    """Checkpoint folder or family name -> ModelInfo; ValueError with the fix when neither."""
    folder = Path(model)
    if folder.is_dir():
        from finetune.loading import read_checkpoint_config
        from finetune.models import config_class, family_of, processor_class

        try:  # the same check as every other verb: a CogVLM/CogVLM2 config.json, not any model's
            raw = read_checkpoint_config(folder)
            family = family_of(raw, f"{folder}/config.json")
            cfg = config_class(family)(**raw)
        except (OSError, TypeError, ValueError) as exc:
            raise ValueError(f"--model {model}: {exc}") from None
        info = ModelInfo(str(folder), cfg.cogvlm_version, cfg.image_tokens, template or cfg.template_version,
                         video=not cfg.vision_expert)
        from finetune.tokenization import load_tokenizer

        try:
            info.tokenizer = load_tokenizer(folder, tokenizer_dir, config=cfg)
        except (OSError, ValueError) as exc:  # TokenizerNotFoundError and id mismatches
            info.tokenizer_note = str(exc)
        if info.tokenizer is not None:
            info.processor = processor_class(family).from_config(cfg, info.tokenizer, template_version=template)
        return info
    from finetune.families import FAMILIES, get_family

    if model not in FAMILIES:
        get_family(model)  # raises with the nearest names
    spec = FAMILIES[model]
    info = ModelInfo(model, spec.version, spec.image_tokens, template or spec.template_version,
                     video="video" in model or "caption" in model)
    if tokenizer_dir:
        from finetune.tokenization import load_tokenizer

        try:
            info.tokenizer = load_tokenizer(tokenizer_dir, tokenizer_dir)
        except (OSError, ValueError) as exc:
            info.tokenizer_note = str(exc)
        if info.tokenizer is not None:
            from finetune.models import FAMILIES as MODEL_FAMILIES
            from finetune.models import processor_class

            cls = processor_class(MODEL_FAMILIES["cogvlm2_video" if info.video else "cogvlm"])
            info.processor = cls(info.tokenizer, image_tokens=spec.image_tokens, image_size=spec.image_size,
                                 template_version=info.template_version,
                                 prompt_table="cogagent" if model.startswith("cogagent") else "cogvlm")
    else:
        info.tokenizer_note = (f"{model} is a family name and no --tokenizer-dir was given; pass --tokenizer-dir, or "
                              f"a checkpoint folder as --model. {spec.tokenizer_note}")
    return info


def _percentile(sorted_values: list[int], q: float) -> int:
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


def token_report(convs: list[Conversation], info: ModelInfo, max_length: int | None,
                 max_images: int | None) -> tuple[list[str], list[Problem]]:
    """Summary lines about token lengths, and problems for rows the encoder rejects."""
    from finetune.models.cogvlm.processing import RowTooLong

    lengths: list[int] = []
    truncated = dropped = 0
    problems: list[Problem] = []
    full = info.processor.with_settings(allow_multi_image=max_images is None or max_images > 1, max_length=None)
    cut = full.with_settings(max_length=max_length)
    for conv in convs:
        try:
            n = len(full.encode(conv).input_ids)
        except ValueError as exc:
            problems.append(Problem(conv.source, "row", f"cannot be encoded: {exc}", "", "error", "encode error"))
            continue
        lengths.append(n)
        if max_length is not None and n > max_length:
            try:
                cut.encode(conv)
                truncated += 1
            except RowTooLong:
                dropped += 1
    if not lengths:
        return ["token lengths: no valid rows to measure"], problems
    s = sorted(lengths)
    lines = [f"token lengths ({len(s)} rows, image tokens included: {info.image_tokens} per image; template "
             f"'{info.template_version}'): min {s[0]} / median {int(statistics.median(s))} / "
             f"p95 {_percentile(s, 0.95)} / max {s[-1]}"]
    if max_length is not None:
        lines.append(f"at --max-length {max_length}: {truncated} rows truncated (oldest history turns dropped), "
                     f"{dropped} rows dropped entirely (the last turn alone does not fit)")
    return lines, problems


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cogtune validate", description=__doc__.split("\n")[0])
    p.add_argument("data", help="cogtune JSONL file")
    p.add_argument("--model", required=True, help="checkpoint folder, or a family name (see finetune/families.py)")
    p.add_argument("--tokenizer-dir", help="tokenizer folder (CogVLM1 checkpoints ship none: the Vicuna-7B v1.5 one)")
    p.add_argument("--template", help="prompt template (base/chat/vqa); default: the model's")
    p.add_argument("--max-length", type=int, default=2048, help="tokens per row, image span included (default 2048)")
    p.add_argument("--max-images", type=int, default=1,
                   help="images allowed per row (official checkpoints: 1; 0 = no limit)")
    p.add_argument("--image-root", help="folder relative image paths refer to (default: the JSONL's folder)")
    p.add_argument("--no-decode", action="store_true", help="check that images exist, without decoding them")
    p.add_argument("--num-frames", type=int, help="video models: frames sampled per video (default 24)")
    p.add_argument("--fps", type=float, help="video models, chat template: frames per second of video (default 1)")
    p.add_argument("--allow-outside-images", action="store_true",
                   help="accept image paths outside the data root (the file's folder or --image-root)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        info = resolve_model(args.model, args.tokenizer_dir, args.template)
        if args.template and info.tokenizer is not None:
            from finetune.models.cogvlm.processing import get_template

            get_template(args.template)  # an unknown name fails here once, not once per row
    except ValueError as exc:
        print(f"cogtune validate: {exc}", file=sys.stderr)
        return 2
    max_images = None if args.max_images <= 0 else args.max_images
    check, tokens = check_file, token_report
    from data_formats.preference import is_preference_file

    if is_preference_file(args.data):  # rows with chosen/rejected: checked as preference pairs (DPO)
        from finetune.dpo_data import check_pair_file as check
        from finetune.dpo_data import pair_token_report as tokens
    convs, report = check(args.data, image_root=args.image_root, max_images=max_images,
                          check_images=not args.no_decode, allow_outside_images=args.allow_outside_images)
    lines: list[str] = []
    sampling = None
    if info.video:
        from finetune.models.cogvlm2_video.validation import video_report_lines
        from finetune.models.cogvlm2_video.video import FrameSampling

        sampling = FrameSampling.for_template(info.template_version, args.num_frames, args.fps)
        lines += video_report_lines(getattr(report, "videos", {}), sampling, info.image_tokens)
        if info.processor is not None:  # a video row's length depends on the frames the sampling keeps (§21)
            info.processor = info.processor.with_settings(num_frames=sampling.num_frames, fps=sampling.fps)
    if info.tokenizer is not None and convs:
        token_lines, encode_problems = tokens(convs, info, args.max_length, max_images)
        lines += token_lines
        report.problems.extend(encode_problems)
        report.valid -= sum(p.level == "error" for p in encode_problems)
    report.problems.sort(key=lambda p: _line_of(p.source))
    for problem in report.problems:
        print(problem)
    print(report.summary())
    with_images = sum(1 for c in convs if c.images)
    if info.video:
        print(f"model {info.name}: CogVLM2-Video layout, {info.image_tokens} tokens per frame; "
              f"{sum(1 for c in convs if c.videos)} valid rows carry a video")
    else:
        print(f"model {info.name}: CogVLM{'2' if info.version == 2 else ''} layout, {info.image_tokens} tokens per "
              f"image; {with_images} valid rows carry images")
    if info.tokenizer is None:
        print(f"token lengths need a tokenizer: {info.tokenizer_note}")
    for line in lines:
        print(line)
    return 1 if report.errors else 0


def _line_of(source: str) -> tuple[str, int]:
    head, _, tail = source.rpartition(":")
    return (head, int(tail)) if tail.isdigit() else (source, 0)


if __name__ == "__main__":
    raise SystemExit(main())
