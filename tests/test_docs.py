"""Every fenced block of README.md and docs/*.md runs, so that what the documentation says keeps working.

How a block runs, by its language label:
- `python`: as pasted, in a fresh directory, with this interpreter; the files it reads are made there first.
- `bash` / `sh` / `shell`: as pasted, with `bash -euo pipefail` in a fresh directory, this venv's bin/ first on PATH.
- `console`: each `$ ` command runs with bash; its output must be the lines shown (JSON lines compared as values).
- `toml`: parsed, and loaded as a recipe through the config loader (`openflamingo.train.load_config`).
- `text` (trees, output): not run.

The `openflamingo` these blocks find on PATH runs `openflamingo.cli.main`, the installed command's function, in
a fork of a process that imported the package once (tests/docs_cli.py): a fresh start spends ~5 s of 2 cores on
importing torch and transformers, and the blocks call it ~30 times. The server the serving blocks talk to is the
installed `openflamingo serve` itself.

Every block's directory holds `cat.jpg` and `shape.png`. A block that needs more (a saved model, data files), or
that would download, need a GPU or take minutes as pasted, has a marker on the line just above its fence,
`<!-- test: NAME -->`, and STAND_INS[NAME] says what runs instead and why: the block as pasted on tiny stand-in
inputs named as the block names them, with written substitutions (each must still match the block), or its
commands checked by the project's own parsers (`parse_only`). A block without a language or with one not listed
above, a marker without a stand-in and a stand-in without a block all fail: a new block is run or mapped, never
skipped unnoticed.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
EVAL = FIXTURES / "eval"
BIN = Path(sys.executable).parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = {"python", "bash", "sh", "shell", "console", "toml"}
NOT_RUN = {"text"}
TIMEOUT_S = 150  # a block slower than this on 2 CPU cores needs a stand-in

FENCE = re.compile(r"^```(\S*)\s*$")
MARKER = re.compile(r"^<!-- test: ([\w-]+) -->$")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    language: str
    text: str
    marker: str | None

    def __str__(self) -> str:
        first = next((line.strip() for line in self.text.splitlines() if line.strip()), "")
        return f"{self.page.relative_to(ROOT)}:{self.line}: {first[:60]}"


def collect(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"{page.relative_to(ROOT)}:{i + 1}: a code fence that is never closed"
        marker = MARKER.match(lines[i - 1]) if i else None
        text = "\n".join(lines[i + 1 : end]) + "\n"
        blocks.append(Block(page, i + 1, opening.group(1), text, marker.group(1) if marker else None))
        i = end + 1
    return blocks


BLOCKS = [block for page in PAGES for block in collect(page)]


# ---------------------------------------------------------------------------------------------------------------
# Running blocks


def base_env() -> dict[str, str]:
    path = os.pathsep.join([str(BIN), os.environ.get("PATH", "")])
    local = ",".join(
        filter(None, [os.environ.get("NO_PROXY", ""), "127.0.0.1,localhost"])
    )  # the test's server
    env = dict(os.environ, PATH=path, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return dict(env, NO_PROXY=local, no_proxy=local)


LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy


def block_env(resources: Resources) -> dict[str, str]:
    """This venv's bin/ first on PATH, and before it the warm `openflamingo` (docs_cli.py)."""
    env = base_env()
    env["PATH"] = os.pathsep.join([str(resources.tools), env["PATH"]])
    env["OPENFLAMINGO_DOCS_CLI"] = str(resources.cli_socket)
    return env


def run(argv: list[str], cwd: Path, resources: Resources, timeout: float = TIMEOUT_S) -> str:
    try:
        done = subprocess.run(
            argv, cwd=cwd, env=block_env(resources), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{shlex.join(argv)} ran over {timeout} s: give the block a stand-in (STAND_INS)")
    assert done.returncode == 0, (
        f"{shlex.join(argv)} exited {done.returncode}\n"
        f"--- stdout\n{done.stdout[-4000:]}\n--- stderr\n{done.stderr[-4000:]}"
    )
    return done.stdout


def run_python(text: str, work: Path, resources: Resources) -> str:
    (work / "block.py").write_text(text)
    return run([sys.executable, "block.py"], work, resources)


def run_bash(text: str, work: Path, resources: Resources) -> str:
    (work / "block.sh").write_text(text)
    return run(["bash", "-euo", "pipefail", "block.sh"], work, resources)


def console_sessions(text: str) -> list[tuple[str, list[str]]]:
    """`$ command` (continued by trailing backslashes) followed by the lines it prints."""
    sessions: list[tuple[str, list[str]]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        assert lines[i].startswith("$ "), f"console block: output {lines[i]!r} before any `$ ` command"
        command = [lines[i][2:]]
        while command[-1].endswith("\\"):
            i += 1
            command.append(lines[i])
        i += 1
        output = []
        while i < len(lines) and not lines[i].startswith("$ "):
            output.append(lines[i])
            i += 1
        sessions.append(("\n".join(command) + "\n", output))
    return sessions


def same_line(got: str, shown: str) -> bool:
    try:
        return json.loads(got) == json.loads(shown)
    except ValueError:
        return got.rstrip() == shown.rstrip()


def run_console(text: str, work: Path, resources: Resources) -> str:
    for command, shown in console_sessions(text):
        got = run_bash(command, work, resources).splitlines()
        assert len(got) == len(shown) and all(map(same_line, got, shown)), (
            f"{command}printed\n" + "\n".join(got) + "\nthe block shows\n" + "\n".join(shown)
        )
    return ""


@contextlib.contextmanager
def working_directory(path: Path):
    """contextlib.chdir (Python 3.11+): recipes name paths relative to where they run."""
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def run_toml(text: str, work: Path, resources: Resources) -> str:
    from openflamingo.train import load_config

    (work / "recipe.toml").write_text(text)
    with working_directory(work):
        load_config(work / "recipe.toml")
    return ""


RUNNERS: dict[str, Callable[[str, Path, Resources], str]] = {
    "python": run_python,
    "bash": run_bash,
    "sh": run_bash,
    "shell": run_bash,
    "console": run_console,
    "toml": run_toml,
}


# ---------------------------------------------------------------------------------------------------------------
# Checking commands without running them (parse_only)


def shell_commands(text: str) -> list[list[str]]:
    """The block's commands as argv lists: continuation lines joined, comments dropped, split at && ; || |."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        current: list[str] = []
        for token in shlex.split(line, comments=True):
            if token in ("&&", ";", "||", "|"):
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    return [command for command in commands if command]


def same_value(value, text: str) -> bool:
    try:
        return float(value) == float(text)
    except (TypeError, ValueError):
        return str(value) == text


def check_recipe(config: str | None, overrides: list[str], work: Path) -> None:
    """What `openflamingo train --config CONFIG OVERRIDES` would train: loaded and checked by the config loader, each
    override taking effect. Paths in the recipe are relative to the block's directory, the recipe to the checkout."""
    from openflamingo.train.cli import default_recipe
    from openflamingo.train.config import load_config, parse_overrides

    with working_directory(work):
        loaded = load_config(ROOT / config if config else default_recipe(), overrides).to_dict()
    for key, text in parse_overrides(overrides):
        value = loaded
        for part in key.split("."):
            value = value[part]
        assert same_value(value, text), f"--{key} {text}: the loaded recipe has {value!r}"


def check_openflamingo(argv: list[str], work: Path) -> None:
    from openflamingo.cli import build_parser

    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"`openflamingo {shlex.join(argv)}`: the CLI's parser refuses it (see stderr)")
    if args.command == "train":
        check_recipe(args.config, args.overrides, work)


def check_pip_install(argv: list[str]) -> None:
    """The requirement pins are the ones `make` installs, the extras exist, and this venv has those versions."""
    from packaging.requirements import Requirement

    makefile = (ROOT / "Makefile").read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert argv[:2] == ["pip", "install"], argv
    for spec in argv[2:]:
        if spec.startswith("-"):
            assert spec in ("-e", "--no-deps"), f"pip install {spec}: not a flag this test knows"
        elif spec.startswith(".["):
            named = set(spec[2:-1].split(","))
            assert named <= set(extras), f"{spec}: pyproject.toml has no extras {sorted(named - set(extras))}"
        else:
            requirement = Requirement(spec)
            assert spec in makefile, f"{spec}: not the version the Makefile installs"
            installed = importlib.metadata.version(requirement.name)
            assert requirement.specifier.contains(installed, prereleases=True), (spec, installed)


def check_make(argv: list[str], resources: Resources) -> None:
    """`make -n TARGET`: the rules exist and say what they run, without running them."""
    plan = run(["make", "-n", *argv[1:]], ROOT, resources)
    expected = {
        "demo": "openflamingo train",
        "test": "-m pytest",
        "finetune-demo": "openflamingo train --config",
    }
    for target in argv[1:]:
        assert expected[target] in plan, f"make -n {target} prints\n{plan}"


def parse_only(text: str, work: Path, resources: Resources) -> None:
    """Each command of the block checked by what would run it, nothing trained, served or installed."""
    for argv in shell_commands(text):
        program = argv[0]
        if program == "openflamingo":
            check_openflamingo(argv[1:], work)
        elif program == "torchrun":
            # `torchrun [its flags] -m openflamingo.train ARGS` runs `openflamingo train ARGS` per process
            assert (BIN / "torchrun").is_file()
            module = argv.index("-m")
            assert argv[module + 1] == "openflamingo.train", argv
            check_openflamingo(["train", *argv[module + 2 :]], work)
        elif program == "sbatch":
            # the script passes its first argument as --config and the rest as overrides
            script = ROOT / argv[1]
            run(["bash", "-n", str(script)], ROOT, resources)
            assert '-m openflamingo.train --config "$CONFIG" "$@"' in script.read_text()
            check_recipe(argv[2], argv[3:], work)
        elif program == "pip":
            check_pip_install(argv)
        elif program == "make":
            check_make(argv, resources)
        elif argv == ["python", "-m", "venv", ".venv"] or argv == [".", ".venv/bin/activate"]:
            pass  # a new venv: `make install` makes .venv the same way, and the suite runs in it
        else:
            pytest.fail(f"parse_only has no check for `{shlex.join(argv)}`")


# ---------------------------------------------------------------------------------------------------------------
# Stand-in inputs


def link(work: Path, name: str, target: Path) -> None:
    path = work / name
    if path.is_symlink() and path.readlink() == target:  # two setups share an input
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)


def write_lines(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def common_inputs(work: Path) -> None:
    """The images the blocks name: a photo-like `cat.jpg` and an easy-VQA-like `shape.png` (a triangle)."""
    cat = Image.new("RGB", (80, 60), (120, 90, 60))
    ImageDraw.Draw(cat).ellipse((20, 10, 60, 50), fill=(200, 160, 90))
    cat.save(work / "cat.jpg")
    shape = Image.new("RGB", (64, 64), (255, 255, 255))
    ImageDraw.Draw(shape).polygon([(32, 8), (56, 56), (8, 56)], fill=(200, 30, 30))
    shape.save(work / "shape.png")


def model_inputs(work: Path, resources: Resources) -> None:
    """A tiny random model (tiny llama + tiny CLIP) as the blocks' `my-flamingo` and the demo's `runs/demo/final`."""
    link(work, "my-flamingo", resources.model)
    link(work, "runs/demo/final", resources.model)


def demo_final_config(work: Path, resources: Resources) -> None:
    """`runs/demo/final/config.json` of a `make demo` model (the demo recipe's architecture, no weights): all that
    `[model] init_from` reads when a recipe is loaded."""
    from openflamingo.model.checkpoint import FORMAT, FORMAT_VERSION
    from openflamingo.train.config import load_config

    model = load_config(ROOT / "configs" / "demo.toml").model
    final = work / "runs" / "demo" / "final"
    final.mkdir(parents=True)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "flamingo": model.to_dict()}
    (final / "config.json").write_text(json.dumps(meta))


def vqa_inputs(work: Path, resources: Resources) -> None:
    """VQAv2 files under the release's names: the fixtures' 10 val questions, and their 3 train questions repeated
    under new ids to 33, so that 32-shot prompts find demonstrations; predictions P.jsonl of Q.json / A.json."""
    vqa = EVAL / "vqa"
    model_inputs(work, resources)
    link(work, "v2_OpenEnded_mscoco_val2014_questions.json", vqa / "val_questions.json")
    link(work, "v2_mscoco_val2014_annotations.json", vqa / "val_annotations.json")
    link(work, "Q.json", vqa / "val_questions.json")
    link(work, "A.json", vqa / "val_annotations.json")
    link(work, "val2014", vqa / "val")
    link(work, "train2014", vqa / "train2014")
    questions = json.loads((vqa / "train_questions.json").read_text())
    annotations = json.loads((vqa / "train_annotations.json").read_text())
    copies = range(11)
    for data, key in ((questions, "questions"), (annotations, "annotations")):
        data[key] = [dict(r, question_id=r["question_id"] * 100 + k) for k in copies for r in data[key]]
    (work / "v2_OpenEnded_mscoco_train2014_questions.json").write_text(json.dumps(questions))
    (work / "v2_mscoco_train2014_annotations.json").write_text(json.dumps(annotations))
    val = json.loads((vqa / "val_annotations.json").read_text())["annotations"]
    write_lines(
        work / "P.jsonl",
        [{"question_id": a["question_id"], "answer": a["answers"][0]["answer"]} for a in val],
    )


def coco_inputs(work: Path, resources: Resources) -> None:
    """The COCO fixtures under the release's names (8 test and 8 train images), and captions.jsonl predictions."""
    coco = EVAL / "coco"
    model_inputs(work, resources)
    link(work, "dataset_coco.json", coco / "dataset_coco.json")
    link(work, "captions_val2014.json", coco / "captions_val2014.json")
    link(work, "coco", coco / "images")
    references = json.loads((coco / "captions_val2014.json").read_text())["annotations"]
    ids = sorted({r["image_id"] for r in references})
    write_lines(work / "captions.jsonl", [{"image_id": i, "caption": "a photo of an object"} for i in ids])


def eval_inputs(work: Path, resources: Resources) -> None:
    vqa_inputs(work, resources)
    coco_inputs(work, resources)


def eval_examples_inputs(work: Path, resources: Resources) -> None:
    """Also ImageNet and Hateful Memes: the fixtures, and saved class scores for every evaluated example."""
    eval_inputs(work, resources)
    link(work, "imagenet", EVAL / "imagenet")
    files = sorted((EVAL / "imagenet" / "val").glob("*/*"))
    classes = sorted(path.name for path in (EVAL / "imagenet" / "val").iterdir())
    write_lines(
        work / "imagenet.jsonl",
        [
            {"id": f"val/{f.parent.name}/{f.name}", "scores": {c: -abs(i - k) for k, c in enumerate(classes)}}
            for i, f in enumerate(files)
        ],
    )
    link(work, "dev_seen.jsonl", EVAL / "hateful_memes" / "dev_seen.jsonl")
    memes = [
        json.loads(line) for line in (EVAL / "hateful_memes" / "dev_seen.jsonl").read_text().splitlines()
    ]
    write_lines(
        work / "memes.jsonl",
        [{"id": m["id"], "scores": {"no": -0.5, "yes": -0.1 * (i + 1)}} for i, m in enumerate(memes)],
    )


def vqa_score_inputs(work: Path, resources: Resources) -> None:
    """p.jsonl with the answers the page names (`picture`, `Yes`, `sailboats`); tests/ as in the checkout."""
    link(work, "tests", ROOT / "tests")
    answers = {9003: "picture", 9004: "Yes", 9005: "sailboats"}
    write_lines(work / "p.jsonl", [{"question_id": q, "answer": a} for q, a in answers.items()])


def convert_inputs(work: Path, resources: Resources) -> None:
    """A few samples in each public format, under the names the block uses (from tests/fixtures/data)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from helpers.data import ALLENNLP, PHOTOS, SKIMAGE, img2dataset_shard, mmc4_line

    link(work, "captions.jsonl", SKIMAGE / "captions.jsonl")
    link(work, "photos", SKIMAGE)  # its image paths are images/NAME
    (work / "laion-out").mkdir()
    img2dataset_shard(work / "laion-out" / "00000.tar", 0)
    images = [{"image_name": "horse.png"}, {"image_name": "page.png"}]
    sentences = ["A horse runs.", "A printed page.", "The end."]
    (work / "docs_0.jsonl").write_text(
        mmc4_line(images, sentences, [[0.3, 0.1, 0.1], [0.1, 0.3, 0.1]]) + "\n"
    )
    link(work, "mmc4-images", SKIMAGE / "images")
    table = pa.table({"texts": [["Intro.", None, "A horse."]], "images": [[None, PHOTOS["horse.png"], None]]})
    pq.write_table(table, work / "obelics-00000.parquet")
    link(work, "vqa.jsonl", ALLENNLP / "vqa.jsonl")
    link(work, "nlvr2.jsonl", ALLENNLP / "nlvr2.jsonl")
    link(work, "images", ALLENNLP / "images")  # their image paths are images/...
    (work / "coco").mkdir()
    (work / "coco" / "000000000001.jpg").write_bytes(PHOTOS["rocket.jpg"])
    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A rocket."}]
    (work / "llava_instruct_150k.json").write_text(
        json.dumps([{"id": "1", "image": "000000000001.jpg", "conversations": turns}])
    )


def loader_inputs(work: Path, resources: Resources) -> None:
    """laion/00000..00999.tar (4 pairs each) and mmc4/shard-000000..000099.tar (4 documents of 50-150 tokens: a
    packed row holds a few), as hard links of one small shard each, and the tiny model."""
    from helpers.data import image_bytes, pair, write_shards

    from openflamingo.data import ImageItem, InterleavedDocument, TextItem

    def document(i: int) -> InterleavedDocument:
        items = [TextItem(f"document {i} starts here.")]
        for j in range(1 + i % 3):
            items += [
                ImageItem(image_bytes(10 * i + j), f"{j}.png"),
                TextItem("the dog sits in the park. " * 6),
            ]
        return InterleavedDocument(f"doc{i:04d}", items)

    model_inputs(work, resources)
    for name, pattern, count, samples in (
        ("laion", "{:05d}.tar", 1000, [pair(i) for i in range(4)]),
        ("mmc4", "shard-{:06d}.tar", 100, [document(i) for i in range(4)]),
    ):
        (shard,) = write_shards(work / f"{name}-one", samples, samples_per_shard=len(samples))
        (work / name).mkdir()
        for i in range(count):
            os.link(shard, work / name / pattern.format(i))


def released_inputs(work: Path, resources: Resources) -> None:
    """/models/... as models/...: the reduced random stand-ins of the released files (tests/fixtures/released_e2e,
    written in the formats a user downloads), under the names the block gives them."""
    released = FIXTURES / "released_e2e"
    coco_inputs(work, resources)
    link(work, "checkpoint.pt", released / "openflamingo_3b" / "checkpoint.pt")
    link(work, "models/mpt-1b", released / "openflamingo_3b" / "lm")
    link(work, "models/open_clip_vit_l14.bin", released / "vit" / "open_clip_pytorch_model.bin")
    link(work, "models/open_clip_config.json", released / "vit" / "open_clip_config.json")
    link(work, "models/vit-l-14", released / "vit")
    for release, bundle, lm in (
        ("OpenFlamingo-3B-vitl-mpt1b", "openflamingo_3b", "mpt-1b-redpajama-200b"),
        ("OpenFlamingo-4B-vitl-rpj3b", "openflamingo_4b", "RedPajama-INCITE-Base-3B-v1"),
        ("OpenFlamingo-9B-vitl-mpt7b", "openflamingo_9b", "mpt-7b"),
    ):
        link(work, f"models/{release}", released / bundle)
        link(work, f"models/{lm}", released / bundle / "lm")


MY_LORA = """\
# LoRA on the converted model's LM (docs/fine-tuning.md), two steps on synthetic batches
[model]
init_from = "idefics-9b-instruct"

[model.lora]
rank = 2
alpha = 4.0
target_modules = ["q_proj", "v_proj"]

[datasets.pairs]
batch_size = 2
seq_len = 16

[data]
loader = "synthetic"

[train]
steps = 2
warmup_steps = 0
output_dir = "runs/idefics-lora"

[log]
progress = false
mfu = false
"""


def idefics_inputs(work: Path, resources: Resources) -> None:
    """models/idefics-9b-instruct: a tiny random IDEFICS in the Hub's layout (tests/idefics_reference.py), the COCO
    fixtures, and the user's my-lora.toml that the block's comment describes."""
    coco_inputs(work, resources)
    link(work, "models/idefics-9b-instruct", resources.idefics)
    (work / "my-lora.toml").write_text(MY_LORA)


def check_serve_commands(text: str, work: Path, resources: Resources) -> None:
    """`openflamingo serve` (the demo's runs/demo/final, here the tiny model) runs for real, on a free port instead
    of 8000; the other lines are parse_only: binding every interface on port 8080 is no test's business."""
    commands = shell_commands(text)
    assert ["openflamingo", "serve"] in commands
    page = LOCAL.open(f"http://127.0.0.1:{resources.server_port}/", timeout=30)
    assert page.status == 200 and "text/html" in page.headers["Content-Type"]
    models = json.load(LOCAL.open(f"http://127.0.0.1:{resources.server_port}/v1/models", timeout=30))
    assert [m["id"] for m in models["data"]] == ["final"]
    parse_only("\n".join(shlex.join(c) for c in commands if c != ["openflamingo", "serve"]), work, resources)


def check_chat_completion(output: str, work: Path) -> None:
    answer = json.loads(output)
    assert isinstance(answer["choices"][0]["message"]["content"], str), answer


def check_finetune_model_section(text: str, work: Path, resources: Resources) -> None:
    """The block is a recipe's [model] table: loaded as the model of configs/finetune-demo.toml, starting from the
    demo's runs/demo/final (its config.json, demo_final_config)."""
    from openflamingo.train.config import run_config

    section = tomllib.loads(text)
    assert set(section) == {"model"}, "a [model] table"
    recipe = tomllib.loads((ROOT / "configs" / "finetune-demo.toml").read_text())
    demo_final_config(work, resources)
    with working_directory(work):
        config = run_config({**recipe, "model": section["model"]})
    lora = section["model"]["lora"]
    assert list(config.model.lora.cross_attention_modules) == lora["cross_attention_modules"]
    assert list(config.model.train_language_model_layers) == section["model"]["train_language_model_layers"]


def check_make_finetune_demo(text: str, work: Path, resources: Resources) -> None:
    """`make -n finetune-demo` runs what the comment says, and the recipe loads (from a demo model's config)."""
    (command,) = [line for line in text.splitlines() if line.strip()]
    said = command.split("# = ", 1)[1].strip()
    assert said in run(["make", "-n", "finetune-demo"], ROOT, resources)
    demo_final_config(work, resources)
    parse_only(said.replace(".venv/bin/openflamingo", "openflamingo"), work, resources)


@dataclass(frozen=True)
class StandIn:
    why: str
    setup: Callable[[Path, Resources], None] | None = None  # the inputs the block reads, in its directory
    # (old, new) applied to the block before it runs; `new` may be made from the resources (a port)
    replace: tuple[tuple[str, str | Callable[[Resources], str]], ...] = ()
    check: Callable[[str, Path, Resources], None] | None = None  # runs instead of the block
    expect: Callable[[str, Path], None] | None = None  # on what the block printed
    needs: tuple[str, ...] = ()  # programs on PATH, else skipped


NEEDS_JAVA = ("java",)  # CIDEr's PTB tokenizer (pycocoevalcap) runs Stanford CoreNLP with java
COCO_FILES = (  # the `...` of an evaluation on COCO: the fixtures, 2 examples, one trial
    "--karpathy-json dataset_coco.json --references captions_val2014.json --images coco/ "
    "--num-samples 2 --trials 1"
)

STAND_INS: dict[str, StandIn] = {
    "make-targets": StandIn(
        "make demo trains for 19 minutes and make test runs the whole suite (this test included): `make -n` shows "
        "each rule runs what the comment says",
        check=parse_only,
    ),
    "install-by-hand": StandIn(
        "a new venv installs torch and the package (minutes, the package index): the pins are checked against "
        "the Makefile's and against what this venv has installed, the extras against pyproject.toml",
        check=parse_only,
    ),
    "train-commands": StandIn(
        "the recipes train for minutes (the demo) or need GPUs, several nodes and Slurm: every command is parsed by "
        "the CLI and its recipe with the overrides loaded by the config loader; sbatch's script is checked by bash -n",
        check=parse_only,
    ),
    "finetune-model-section": StandIn(
        "a [model] table, not a whole recipe: loaded as the model of configs/finetune-demo.toml",
        check=check_finetune_model_section,
    ),
    "make-finetune-demo": StandIn(
        "the fine-tuning demo trains for 10 minutes from `make demo`'s model: `make -n` and the recipe loaded",
        check=check_make_finetune_demo,
    ),
    "data-convert": StandIn(
        "as pasted, on a few samples of each format (the real sets are gigabytes); easy-VQA is the real package",
        setup=convert_inputs,
    ),
    "data-loading": StandIn(
        "as pasted, on small shards under the names it reads and the tiny model, with smaller shuffle buffers and "
        "packed rows: filling the default 1000 samples per worker (5 workers) and restoring them from the state "
        "take 20 s, and 4 rows of 2048 tokens 10 s more while the workers prefetch",
        setup=loader_inputs,
        replace=(
            ("batch_size=64, format=", "batch_size=64, shuffle_buffer=64, format="),
            ("num_workers=4,", "num_workers=4, shuffle_buffer=16,"),
            ("PackingConfig(row_tokens=2048)", "PackingConfig(row_tokens=512)"),
        ),
    ),
    "eval-commands": StandIn(
        "as pasted, on the VQAv2 / COCO fixtures under the official file names and the tiny model; one trial of 2 "
        "questions: 10 questions x 5 shot counts x 3 trials (prompts of up to 32 images) take minutes on 2 cores",
        setup=eval_inputs,
        replace=(("--shots 0 4 8 16 32 --trials 3", "--shots 0 4 8 16 32 --trials 1 --num-samples 2"),),
        needs=NEEDS_JAVA,
    ),
    "eval-python": StandIn(
        "as pasted on the tiny model, with 8 of easy-VQA's questions: all of them at 0 and 4 shots x 3 trials take "
        "many minutes on 2 cores",
        setup=model_inputs,
        replace=(("trials=3))", "trials=3, num_samples=8))"),),
    ),
    "vqa-score-console": StandIn(
        "runs as shown, on the predictions the page describes (p.jsonl, written here)", setup=vqa_score_inputs
    ),
    "eval-examples": StandIn(
        "as pasted, on the fixtures of each task under the official file names and the tiny model; the two runs "
        "on 2 examples, one trial (all of them, 3 trials: minutes on 2 cores)",
        setup=eval_examples_inputs,
        replace=(
            ("--shots 0 4 8 --trials 3", "--shots 0 4 8 --trials 1 --num-samples 2"),
            ("--task coco --shots 0 4 ", "--task coco --shots 0 4 --num-samples 2 --trials 1 "),
        ),
        needs=NEEDS_JAVA,
    ),
    "convert-open-flamingo": StandIn(
        "the released checkpoint and backbones are gigabytes from the Hub: their reduced random stand-ins "
        "(tests/fixtures/released_e2e, the downloaded formats) under the names the block uses, /models/ -> models/",
        setup=released_inputs,
        replace=(("/models/", "models/"),),
    ),
    "convert-released": StandIn(
        "as convert-open-flamingo, all three releases; `...` of the eval line is the COCO fixtures' files, "
        "2 examples, one trial",
        setup=released_inputs,
        replace=(
            ("/models/", "models/"),
            ("--task coco --shots 4 ...", f"--task coco --shots 4 {COCO_FILES}"),
        ),
        needs=NEEDS_JAVA,
    ),
    "idefics": StandIn(
        "IDEFICS is 18-160 GB from the Hub: a tiny random IDEFICS in the Hub's layout, /models/ -> models/; `...` "
        "is the COCO fixtures' files (2 examples, one trial); serve runs until stopped, so its line is "
        "parse_only; my-lora.toml trains 2 synthetic steps",
        setup=idefics_inputs,
        replace=(
            ("/models/", "models/"),
            ("--task coco --shots 4 ...", f"--task coco --shots 4 {COCO_FILES}"),
            ("openflamingo serve --checkpoint", "parse-only openflamingo serve --checkpoint"),
        ),
        needs=NEEDS_JAVA,
    ),
    "serve-commands": StandIn(
        "pip is checked as in install-by-hand; a server runs until stopped: the test's server is `openflamingo "
        "serve` on the tiny model (port from the OS), the other line parse_only",
        check=check_serve_commands,
    ),
    "serve-curl": StandIn(
        "as pasted, against the test's `openflamingo serve` on the tiny model, at its port instead of 8000",
        replace=(("127.0.0.1:8000", lambda r: f"127.0.0.1:{r.server_port}"),),
        expect=check_chat_completion,
        needs=("curl",),
    ),
    "serve-openai": StandIn(
        "as pasted, against the test's `openflamingo serve` on the tiny model, at its port instead of 8000",
        replace=(("127.0.0.1:8000", lambda r: f"127.0.0.1:{r.server_port}"),),
    ),
}


CLIENT = '''\
#!{python} -S
"""{doc} (tests/docs_cli.py)"""
import sys

sys.path.insert(0, {tests!r})
import docs_cli

docs_cli.client(parse_only={parse_only})
'''


class Resources:
    """What several blocks share, each made on first use: the tiny model, a tiny IDEFICS, the server."""

    def __init__(self, root: Path, tokenizer_dir: Path):
        self.root, self.tokenizer_dir = root, tokenizer_dir
        self.server: subprocess.Popen | None = None
        self.cli: subprocess.Popen | None = None

    @cached_property
    def tools(self) -> Path:
        """`openflamingo` and `parse-only openflamingo`, answered by the warm CLI."""
        tools = self.root / "tools"
        tools.mkdir()
        for name, doc, parse in (
            ("openflamingo", "openflamingo.cli.main(ARGS) in a fork of a warm process", False),
            (
                "parse-only",
                "`parse-only openflamingo ARGS`: ARGS parsed by the CLI's own parser, nothing run",
                True,
            ),
        ):
            script = tools / name
            script.write_text(
                CLIENT.format(python=sys.executable, doc=doc, tests=str(ROOT / "tests"), parse_only=parse)
            )
            script.chmod(0o755)
        return tools

    @cached_property
    def cli_socket(self) -> Path:
        """The warm CLI (tests/docs_cli.py), started once: it imports the package, then forks per command."""
        socket_path = (
            Path(tempfile.mkdtemp(prefix="of-docs-")) / "cli.sock"
        )  # AF_UNIX paths: 108 bytes at most
        self.cli = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "docs_cli.py"), "serve", str(socket_path)],
            env=base_env(),
            stdout=subprocess.PIPE,
            text=True,
        )
        ready = self.cli.stdout.readline()
        assert ready == "ready\n", f"tests/docs_cli.py did not start: {ready!r}"
        return socket_path

    @cached_property
    def model(self) -> Path:
        """Named `final`, as the demo's runs/demo/final: a server calls its model by the directory's name."""
        from helpers.model import tiny_config

        from openflamingo import build_flamingo, save_pretrained

        return save_pretrained(build_flamingo(tiny_config(self.tokenizer_dir), seed=0), self.root / "final")

    @cached_property
    def idefics(self) -> Path:
        from idefics_reference import build_idefics, idefics_config, make_idefics_tokenizer, save_hub_layout

        tokenizer = make_idefics_tokenizer(self.root / "idefics-tokenizer")
        model = build_idefics(idefics_config(tokenizer, cross_layer_interval=2), seed=0)
        return save_hub_layout(model, tokenizer, self.root / "idefics-9b-instruct")

    @cached_property
    def server_port(self) -> int:
        """`openflamingo serve` as the serving page runs it (runs/demo/final), on a port the OS gives."""
        work = self.root / "serve"
        work.mkdir()
        link(work, "runs/demo/final", self.model)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = open(work / "serve.log", "w")  # noqa: SIM115 - the server writes to it until close()
        self.server = subprocess.Popen(
            [str(BIN / "openflamingo"), "serve", "--port", str(port)],
            cwd=work,
            env=block_env(self),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.server.poll() is None, (work / "serve.log").read_text()
            with contextlib.suppress(OSError):
                if LOCAL.open(f"http://127.0.0.1:{port}/health", timeout=5).status == 200:
                    return port
            time.sleep(0.5)
        pytest.fail(
            "openflamingo serve did not answer /health within 120 s:\n" + (work / "serve.log").read_text()
        )

    def close(self) -> None:
        if "cli_socket" in self.__dict__:
            shutil.rmtree(self.cli_socket.parent, ignore_errors=True)
        for process in (self.server, self.cli):
            if process is not None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


@pytest.fixture(scope="module")
def resources(tmp_path_factory, tokenizer_dir):
    shared = Resources(tmp_path_factory.mktemp("docs"), tokenizer_dir)
    yield shared
    shared.close()


def substitute(block: Block, stand_in: StandIn, resources: Resources) -> str:
    text = block.text
    for old, new in stand_in.replace:
        assert old in text, (
            f"{block}: stand-in {block.marker}: {old!r} is no longer in the block; update STAND_INS"
        )
        text = text.replace(old, new if isinstance(new, str) else new(resources))
    return text


# ---------------------------------------------------------------------------------------------------------------
# Tests


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in BLOCKS if b.language not in NOT_RUN], ids=str)
def test_documented_block_runs(block, resources, tmp_path):
    assert block.language in RUN, (
        f"{block}: label the block with its language, {sorted(RUN)} (run by this test) or {sorted(NOT_RUN)} (output, "
        "trees: not run)"
    )
    assert block.marker is None or block.marker in STAND_INS, f"{block}: no STAND_INS[{block.marker!r}]"
    stand_in = STAND_INS[block.marker] if block.marker else StandIn("as pasted")
    missing = [program for program in stand_in.needs if shutil.which(program) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} on PATH")
    work = tmp_path / "work"
    work.mkdir()
    common_inputs(work)
    if stand_in.setup is not None:
        stand_in.setup(work, resources)
    text = substitute(block, stand_in, resources)
    if stand_in.check is not None:
        stand_in.check(text, work, resources)
        return
    output = RUNNERS[block.language](text, work, resources)
    if stand_in.expect is not None:
        stand_in.expect(output, work)


def test_the_warm_openflamingo_runs_what_the_installed_command_runs():
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="openflamingo")
    assert script.value == "openflamingo.cli:main"  # what docs_cli.py's children run


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    headings = re.findall(r"^#+ (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files_and_headings_that_exist(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.relative_to(ROOT)}: {target}: no such file"
        if anchor and linked.suffix == ".md":
            assert anchor in heading_anchors(linked), f"{page.relative_to(ROOT)}: {target}: no such heading"


def test_every_marker_names_a_stand_in_and_every_stand_in_one_block():
    for page in PAGES:
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.startswith("<!-- test"):
                assert MARKER.match(line) and i + 1 < len(lines) and FENCE.match(lines[i + 1]), (
                    f"{page.relative_to(ROOT)}:{i + 1}: a marker `<!-- test: NAME -->` goes on the line just above "
                    "a code fence"
                )
    markers = [block.marker for block in BLOCKS if block.marker]
    assert sorted(markers) == sorted(set(markers)), "one block per stand-in"
    assert set(markers) == set(STAND_INS), (
        f"stand-ins without a block: {sorted(set(STAND_INS) - set(markers))}; "
        f"markers without a stand-in: {sorted(set(markers) - set(STAND_INS))}"
    )
