"""`cogtune convert --from FORMAT INPUT --out OUT.jsonl`: other dataset formats -> canonical JSONL.

Every converted row is checked with the same rules as `cogtune validate` (structure, images exist,
an answer is present; for the preference formats rlaif-v and sharegpt-pairs, prompt turns plus
`chosen` / `rejected`, data_formats/preference.py); rows that fail are skipped and each is reported
as `file:line: ...`, with a count per reason at the end, so nothing disappears silently. The output is
published atomically and only when complete and non-empty: a failure or zero rows leave an existing
output as it was (exit 1).
Image paths must lie under the input's folder (or `--image-root`) unless `--allow-outside-images`.
Image paths in the output are relative to the output's folder when the image lies under it, else
absolute.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Literal, get_args

from data_formats.common import Record
from data_formats.schema import parse_row, write_jsonl

Format = Literal["llava", "sharegpt", "cogvlm-sft", "swift", "openai", "glm", "hf", "mind2web", "rlaif-v",
                 "sharegpt-pairs", "llava-video", "video-folder"]
FORMATS: tuple[str, ...] = get_args(Format)
PREFERENCE_FORMATS = ("rlaif-v", "sharegpt-pairs")  # rows with chosen/rejected (data_formats/preference.py)


def records(fmt: Format, src: Path, args: argparse.Namespace) -> Iterator[Record]:
    """The converter for `fmt`; an explicit branch per format, no registry."""
    root = Path(args.image_root) if args.image_root else None
    if fmt == "llava":
        from data_formats import llava

        return llava.convert(src, image_root=root, role_map=args.role_map)
    if fmt == "sharegpt":
        from data_formats import sharegpt

        return sharegpt.convert(src, image_root=root, role_map=args.role_map)
    if fmt == "cogvlm-sft":
        from data_formats import cogvlm_sft

        return cogvlm_sft.convert(src, labels=args.labels)
    if fmt == "swift":
        from data_formats import swift

        return swift.convert(src, image_root=root)
    if fmt == "openai":
        from data_formats import openai

        return openai.convert(src, image_root=root)
    if fmt == "glm":
        from data_formats import glm

        return glm.convert(src, image_root=root)
    if fmt == "mind2web":  # GUI action steps -> CogAgent "Plan / Next Action / Grounded Operation" rows
        from data_formats import mind2web

        return mind2web.convert(src, image_root=root)
    if fmt == "hf":
        from data_formats import hf

        return hf.convert(src, out_path=Path(args.out), split=args.split, image_column=args.image_column,
                          messages_column=args.messages_column, question_column=args.question_column,
                          answer_column=args.answer_column, prompt=args.prompt)
    if fmt in ("llava-video", "video-folder"):
        from data_formats import video

        if fmt == "video-folder":
            return video.convert_video_folder(src, prompt=args.prompt)
        return video.convert_llava_video(src, image_root=root, role_map=args.role_map)
    if fmt in PREFERENCE_FORMATS:
        from data_formats import preference

        return preference.records(fmt, src, image_root=root, role_map=args.role_map)
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _portable(ref: str, out_dir: Path) -> str:
    if ref.startswith("data:"):
        return ref
    try:
        return Path(ref).relative_to(out_dir).as_posix()
    except ValueError:
        return ref


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cogtune convert", description=__doc__.split("\n")[0])
    p.add_argument("--from", dest="fmt", required=True, choices=FORMATS, help="input format")
    p.add_argument("input", help="input file (JSON/JSONL/parquet) or folder (cogvlm-sft, hf save_to_disk)")
    p.add_argument("--out", required=True, help="output JSONL path")
    p.add_argument("--image-root", help="folder that relative image paths in the input refer to "
                   "(default: the input file's folder)")
    p.add_argument("--role-map", help="sharegpt/llava/sharegpt-pairs: extra role names, e.g. "
                   "'human=user,bot=assistant'")
    p.add_argument("--labels", help="cogvlm-sft: labels folder name (default labels_en, else labels_zh)")
    p.add_argument("--split", help="hf: which split to convert (default: train, or the only one)")
    p.add_argument("--image-column", help="hf: column holding the image(s)")
    p.add_argument("--messages-column", help="hf: column holding role/content turns")
    p.add_argument("--question-column", help="hf: column holding the user turn")
    p.add_argument("--answer-column", help="hf: column holding the answer")
    p.add_argument("--prompt", help="hf, video-folder: fixed user turn when there is no question (captioning)")
    p.add_argument("--allow-outside-images", action="store_true",
                   help="accept image paths outside the input's folder / --image-root (refused by default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


class _Incomplete(Exception):
    """The input could not be read to the end: nothing is published."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    src, out = Path(args.input), Path(args.out)
    if not src.exists():
        print(f"cogtune convert: {src}: not found", file=sys.stderr)
        return 2
    out_dir = out.resolve().parent
    # Image paths must stay under the input's image folder (or the output's folder, where `hf` writes
    # images) unless --allow-outside-images: a row cannot make convert open /etc/shadow.
    # cogvlm-sft and hf read images next to the input whatever --image-root says; the others resolve
    # them against --image-root when given.
    in_root = Path(args.image_root) if args.image_root and args.fmt not in ("cogvlm-sft", "hf") else src.parent
    if args.fmt == "video-folder":  # the clips are inside the given folder
        in_root = src
    roots = (in_root, out_dir)
    if args.fmt in PREFERENCE_FORMATS:  # preference rows: prompt turns + chosen/rejected, checked as such
        from data_formats.preference import parse_pair as check_row
    else:
        check_row = parse_row
    skipped: Counter[str] = Counter()
    reports: list[str] = []
    outside = 0

    def rows() -> Iterator[dict]:
        nonlocal outside
        from tqdm import tqdm

        try:
            stream = records(args.fmt, src, args)
            for source, row, problems in tqdm(stream, desc=f"convert {args.fmt}", unit=" rows", disable=args.quiet,
                                              file=sys.stderr):
                if row is not None and not problems:
                    # Same rules as `cogtune validate`, minus image decoding and the per-model image limit.
                    conv, problems = check_row(row, source, Path("/"), default_id=row.get("id", ""), roots=roots,
                                               allow_outside_images=args.allow_outside_images, max_images=None)
                    if conv is not None:
                        canonical = conv.to_json()
                        canonical["images"] = [_portable(r, out_dir) for r in conv.images]
                        if getattr(conv, "videos", None):  # preference pairs carry no video
                            canonical["videos"] = [_portable(r, out_dir) for r in conv.videos]
                        outside += sum(1 for r in canonical["images"] if os.path.isabs(r))
                        if "boxes" in row:  # keep `<box>` markers and the boxes as given (pixel boxes stay exact)
                            canonical["messages"] = [dict(m) for m in row["messages"]]
                            canonical["boxes"] = row["boxes"]
                            canonical["box_format"] = row.get("box_format")
                        yield canonical
                        continue
                errors = [p for p in problems if p.level == "error"]
                skipped[errors[0].kind if errors else "skipped"] += 1
                reports.extend(str(p) for p in errors)
                if any(p.field == "file" for p in errors):  # the rest of the input is unreadable
                    raise _Incomplete()
        except ValueError as exc:  # a bad option (e.g. --role-map), not bad data
            reports.append(f"cogtune convert: {exc}")
            raise _Incomplete() from None

    try:
        n = write_jsonl(out, rows())
        failure = "" if n else "no row could be converted"
    except _Incomplete:
        n, failure = 0, "the input could not be read to the end"
    except OSError as exc:
        n, failure = 0, f"cannot write {out}: {exc.strerror or exc}"
    for line in reports:
        print(line, file=sys.stderr)
    total_skipped = sum(skipped.values())
    reasons = ", ".join(f"{kind}: {count}" for kind, count in skipped.most_common())
    if failure:
        kept = f"{out} was left as it was" if out.exists() else f"{out} was not written"
        print(f"cogtune convert: {failure}; {kept} (fix the problems above and run again)", file=sys.stderr)
        return 1
    print(f"{n} rows written to {out}, {total_skipped} skipped" + (f" ({reasons})" if reasons else ""))
    if outside:
        print(f"note: {outside} image paths lie outside {out_dir} and were written as absolute paths; "
              "validate and train with --image-root (data.image_root) set to their folder, or with "
              "--allow-outside-images (data.allow_outside_images: true)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
