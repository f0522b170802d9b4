"""The README's "Rehearse on a tiny model" block, run verbatim from a folder outside the repository.

It is the newcomer's path: make-tiny, convert LLaVA data, validate, check, QLoRA training with evaluation
during training, merge, predict. The data imitates a user's: photo-like pictures from 56x147 to 1500x1300 px,
JPEG and PNG, multi-turn rows, and rows with grounding boxes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(56, 147), (640, 480), (1500, 1300), (300, 300), (147, 56), (800, 600), (224, 400), (1024, 768)]


def rehearsal_commands(readme: str) -> list[str]:
    """The shell commands of the README's rehearsal block, continuation lines joined."""
    section = readme.split("### Rehearse on a tiny model", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    joined = re.sub(r"\\\n\s*", "", block)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def photo(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like picture: smooth lighting, a few soft blobs of colour, sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.empty((height, width, 3), np.float32)
    for c, level in enumerate(rng.uniform(40, 200, 3)):
        img[..., c] = level + 50 * np.sin(x / width * rng.uniform(1, 4) + c) * np.cos(y / height * rng.uniform(1, 3))
    for _ in range(3):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.1, 0.4) * min(width, height)
        mask = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None]
        img = img * (1 - mask) + mask * rng.uniform(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def write_llava(folder: Path, n_train: int = 16, n_eval: int = 4) -> dict[str, list[dict]]:
    """my_llava.json / my_llava_eval.json in LLaVA layout, images in folder/photos (relative paths)."""
    (folder / "photos").mkdir(parents=True)
    rows = []
    for i in range(n_train + n_eval):
        w, h = SIZES[i % len(SIZES)]
        name = f"photos/img_{i:03d}." + ("png" if i % 3 == 0 else "jpg")
        photo(w, h, i).save(folder / name, **({} if name.endswith("png") else {"quality": 90}))
        tone = ["warm", "cool", "neutral"][i % 3]
        conv = [{"from": "human", "value": "<image>\nDescribe the light in this photo."},
                {"from": "gpt", "value": f"The light is {tone}."}]
        row = {"id": f"photo-{i}", "image": name, "conversations": conv}
        if i % 4 == 1:  # multi-turn
            conv += [{"from": "human", "value": "Is it indoors?"}, {"from": "gpt", "value": "No, outdoors."}]
        if i % 5 == 2:  # grounding: a box in pixels of the original picture
            conv[0]["value"] = "<image>\nWhere is the brightest area?"
            conv[1]["value"] = "It is here: <box>."
            row.update(boxes=[[w // 4, h // 4, w // 2, h // 2]], box_format="xyxy")
        rows.append(row)
    splits = {"my_llava.json": rows[:n_train], "my_llava_eval.json": rows[n_train:]}
    for file, part in splits.items():
        (folder / file).write_text(json.dumps(part, indent=1))
    return splits


def test_commands_are_extracted_as_written():
    cmds = rehearsal_commands((ROOT / "README.md").read_text())
    verbs = [c.split()[1] for c in cmds]
    assert verbs == ["make-tiny", "convert", "convert", "validate", "check", "train", "merge", "predict"]
    train = cmds[verbs.index("train")]
    assert "data.eval_path=" in train and "eval.eval_steps=" in train and "cogvlm2-qlora-24gb" in train


@pytest.mark.slow
def test_readme_rehearsal_runs_verbatim_from_the_users_folder(tmp_path):
    work = tmp_path / "my-project"
    work.mkdir()
    assert ROOT not in work.resolve().parents
    splits = write_llava(work)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
           f"{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1"}
    for cmd in rehearsal_commands((ROOT / "README.md").read_text()):
        res = subprocess.run(["bash", "-c", cmd], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"README command failed (exit {res.returncode}): {cmd}\n{res.stderr[-3000:]}"
        assert "Traceback" not in res.stderr, f"{cmd}\n{res.stderr[-3000:]}"
        if cmd.startswith("cogtune convert"):  # every row arrives, boxes included
            src, out = cmd.split()[4], cmd.split("--out")[1].split()[0]
            rows = [json.loads(line) for line in (work / out).read_text().splitlines()]
            assert len(rows) == len(splits[src]), f"{cmd}: {len(rows)} of {len(splits[src])} rows\n{res.stderr}"
            assert sum("boxes" in r for r in rows) == sum("boxes" in r for r in splits[src]), cmd

    # Every step left what the README says it leaves.
    run = work / "out/rehearsal"
    assert (run / "adapter" / "adapter_config.json").is_file() and (run / "run.json").is_file()
    assert "eval_predictions_step3.jsonl" in {p.name for p in run.glob("eval_predictions_step*.jsonl")}
    assert (work / "merged-rehearsal" / "config.json").is_file()
    preds = (work / "pred.jsonl").read_text().splitlines()
    assert len(preds) == len(splits["my_llava_eval.json"])
