"""Evaluation runs on a tiny random model: every task end to end through the CLI on fixtures in the official formats,
saved predictions scored back to the live numbers, bad input rejected before the model loads."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.eval import TASK_FILES, VQA_FILES, F, cli
from helpers.model import tiny_model

from openflamingo import (
    save_pretrained,
)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="CIDEr's PTB tokenizer needs Java")


@pytest.fixture(scope="module")
def checkpoint(tokenizer_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("eval") / "tiny-flamingo"
    save_pretrained(tiny_model(tokenizer_dir), directory)
    return directory


# What `eval score` needs: the evaluated split's references only.
SCORE_FILES = {t: [] for t in TASK_FILES}
for _task, _files in TASK_FILES.items():
    for _flag, _value in zip(_files[::2], _files[1::2], strict=True):
        if (
            _flag.startswith("--train")
            or _flag == "--num-samples"
            or (_flag == "--images" and _task != "imagenet")
        ):
            continue
        SCORE_FILES[_task] += [_flag, _value]


@pytest.fixture
def stub_okvqa_stemmer(monkeypatch):
    """nltk's data cannot be downloaded here; the stemming rules have their own test."""
    from openflamingo.eval import okvqa_stemming

    stub = okvqa_stemming.OkVqaStemmer(
        str.split, lambda ws: [(w, "NN") for w in ws], lambda w: w, lambda w: w
    )
    monkeypatch.setattr(okvqa_stemming, "nltk_stemmer", lambda: stub)


@pytest.mark.parametrize("task", list(TASK_FILES))
def test_every_task_runs_end_to_end_and_its_samples_score_back(
    task, checkpoint, tmp_path, capsys, stub_okvqa_stemmer
):
    if task in ("coco", "flickr30k") and shutil.which("java") is None:
        pytest.skip("CIDEr's PTB tokenizer needs Java")
    out = tmp_path / "out"
    trials = 2 if task in ("vqav2", "hateful_memes", "nlvr2", "imagenet") else 1
    # Beam search (the tasks' default) in two tasks only, and subsets for the VQAv2-format variants: time.
    fast = [] if task in ("vqav2", "coco") else ["--num-beams", 1]
    fast += ["--num-samples", 4] if task in ("okvqa", "textvqa", "vizwiz", "vqav2") else []
    cli("eval", "--checkpoint", checkpoint, "--task", task, "--shots", 0, 1, "--trials", trials,
        "--batch-size", 3, "--max-new-tokens", 4, "--output-dir", out, "--device", "cpu", "--no-progress",
        *fast, *TASK_FILES[task])  # fmt: skip
    table = capsys.readouterr().out
    assert f"| {task} " in table
    results = json.loads((out / f"results_{task}.json").read_text())
    metric = results["configs"][task]["task"]["metric"]
    entry = results["results"][f"{task}_1shot"]
    assert len(entry["trials"]) == trials and f"{metric},none" in entry
    assert results["versions"]["torch"] and results["n-shot"][f"{task}_0shot"] == 0

    samples = out / f"samples_{task}_1shot_trial0.jsonl"
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(records) == entry["num_evaluated"] and len({str(r["doc_id"]) for r in records}) == len(records)
    assert all(r["prompt"].count("<image>") == len(r["images"]) for r in records)
    cli("eval", "score", "--task", task, "--predictions", samples, *SCORE_FILES[task])
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scored[metric] == pytest.approx(entry["trials"][0], nan_ok=True)


def test_zero_shot_uses_two_text_only_demonstrations_or_none(checkpoint, tmp_path):
    base = ["eval", "--checkpoint", checkpoint, "--task", "vqav2", "--shots", 0, "--trials", 1,
            "--max-new-tokens", 2, "--num-beams", 1, "--device", "cpu", "--no-progress", *VQA_FILES]  # fmt: skip
    cli(*base, "--output-dir", tmp_path / "flamingo")
    cli(*base, "--output-dir", tmp_path / "none", "--zero-shot", "none")
    flamingo = json.loads(
        (tmp_path / "flamingo/samples_vqav2_0shot_trial0.jsonl").read_text().splitlines()[0]
    )
    none = json.loads((tmp_path / "none/samples_vqav2_0shot_trial0.jsonl").read_text().splitlines()[0])
    assert len(flamingo["demo_ids"]) == 2 and flamingo["prompt"].count("<|endofchunk|>") == 2
    assert flamingo["prompt"].count("<image>") == 1 and len(flamingo["images"]) == 1
    assert none["demo_ids"] == [] and none["prompt"].startswith("<image>Question:")


@pytest.fixture
def no_model_load(monkeypatch):
    import openflamingo.model.checkpoint as checkpoint_module

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(checkpoint_module, "load", refuse)


def write(path: Path, value) -> Path:
    path.write_text(json.dumps(value))
    return path


def test_bad_input_is_a_clear_error_before_the_model_loads(checkpoint, tmp_path, no_model_load):
    def run(*extra, task="vqav2", files=VQA_FILES):
        cli("eval", "--checkpoint", checkpoint, "--task", task, "--device", "cpu", *files, *extra)

    with pytest.raises(FileNotFoundError, match="missing.json not found"):
        run(files=[*VQA_FILES[:1], tmp_path / "missing.json", *VQA_FILES[2:]])
    annotations = json.loads((F / "vqa/val_annotations.json").read_text())
    annotations["annotations"][3]["question_id"] = 123
    bad = write(tmp_path / "annotations.json", annotations)
    with pytest.raises(ValueError, match="do not match: question_id 9006 has no annotation"):
        run(files=[*VQA_FILES[:3], bad, *VQA_FILES[4:]])
    shutil.copytree(F / "vqa/val", tmp_path / "images")
    (tmp_path / "images" / "5.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"image of example 9010 not found \(tried .*5.jpg"):
        run(files=[*VQA_FILES[:5], tmp_path / "images", *VQA_FILES[6:]])
    with pytest.raises(
        ValueError,
        match="4 demonstrations per prompt need at least 4 examples, but the demonstration query set has 3",
    ):
        run("--shots", "4")
    with pytest.raises(ValueError, match="task vqav2 needs --train-questions, --train-annotations"):
        run(files=VQA_FILES[:6])
    with pytest.raises(ValueError, match=r"uses \{caption\}"):
        run("--prompt", "<image>Output:{caption}{answer}")
    with pytest.raises(ValueError, match="num_samples=99, but the evaluated split has 10"):
        run("--num-samples", "99")
    with pytest.raises(FileNotFoundError, match="not an openflamingo checkpoint"):
        cli("eval", "--checkpoint", tmp_path, "--task", "easy_vqa")


def test_captioning_without_java_fails_before_the_model_loads(checkpoint, monkeypatch, no_model_load):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="CIDEr needs Java"):
        cli("eval", "--checkpoint", checkpoint, "--task", "coco", *TASK_FILES["coco"])


def test_bad_prediction_files_name_the_line(tmp_path):
    predictions = tmp_path / "p.jsonl"
    predictions.write_text(
        '{"question_id": 9003, "answer": "picture"}\n{"question_id": 9003, "answer": "x"}\n'
    )
    with pytest.raises(ValueError, match=r"p.jsonl:2: question_id 9003 predicted twice"):
        cli("eval", "score", "--task", "vqav2", "--predictions", predictions, *SCORE_FILES["vqav2"])
    predictions.write_text('{"id": 42004, "scores": {"maybe": -1.0}}\n')
    with pytest.raises(ValueError, match="names class 'maybe'"):
        cli(
            "eval",
            "score",
            "--task",
            "hateful_memes",
            "--predictions",
            predictions,
            *SCORE_FILES["hateful_memes"],
        )


@pytest.mark.parametrize(
    ("vqa_metric", "expected"),
    [(None, 0.0), ("official", 0.0), ("official-2017", 50.0), ("openflamingo", 50.0)],
)
def test_scoring_saved_vqa_predictions_with_each_vqa_metric(tmp_path, capsys, vqa_metric, expected):
    # 9003's ten human answers are all "picture": officially "A picture." must then match exactly (it does not);
    # the 2017 script and OpenFlamingo's port normalise it to "picture".
    predictions = tmp_path / "p.jsonl"
    predictions.write_text(
        '{"question_id": 9003, "answer": "A picture."}\n{"question_id": 9004, "answer": "no"}\n'
    )
    chosen = ["--vqa-metric", vqa_metric] if vqa_metric else []
    cli("eval", "score", "--task", "vqav2", "--predictions", predictions, *chosen, *SCORE_FILES["vqav2"])
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["vqa_metric"] == (vqa_metric or "official")
    assert metrics["vqa_accuracy"] == pytest.approx(expected) and metrics["num_scored"] == 2


def test_the_vqa_metric_of_a_run_is_used_and_recorded(checkpoint, tmp_path, capsys):
    cli("eval", "--checkpoint", checkpoint, "--task", "vqav2", "--shots", 0, "--trials", 1, "--num-samples", 2,
        "--max-new-tokens", 1, "--num-beams", 1, "--zero-shot", "none", "--device", "cpu", "--no-progress",
        "--vqa-metric", "openflamingo", "--output-dir", tmp_path, *VQA_FILES)  # fmt: skip
    results = json.loads((tmp_path / "results_vqav2.json").read_text())
    assert results["configs"]["vqav2"]["eval"]["vqa_metric"] == "openflamingo"
    samples = tmp_path / "samples_vqav2_0shot_trial0.jsonl"
    capsys.readouterr()
    cli("eval", "score", "--task", "vqav2", "--predictions", samples, "--vqa-metric", "openflamingo",
        *SCORE_FILES["vqav2"])  # fmt: skip
    scored = json.loads(capsys.readouterr().out)
    assert scored["vqa_accuracy"] == pytest.approx(results["results"]["vqav2_0shot"]["trials"][0])


def caption_predictions(path: Path, captions: dict) -> Path:
    path.write_text("".join(json.dumps({"image_id": k, "caption": v}) + "\n" for k, v in captions.items()))
    return path


@needs_java
@pytest.mark.parametrize(
    ("task", "captions"),
    [
        ("coco", {1000: "a page of text", 1004: "a photo of coins", 1006: "a horse"}),
        ("flickr30k", {"4945942737": "a woman sits by the water", 6338542128: "a man on a street"}),
    ],
)
def test_scoring_captions_without_a_karpathy_file_scores_the_predicted_images(
    task, captions, tmp_path, capsys
):
    predictions = caption_predictions(tmp_path / "p.jsonl", captions)
    references = SCORE_FILES[task][SCORE_FILES[task].index("--references") + 1]
    cli("eval", "score", "--task", task, "--predictions", predictions, "--references", references)
    without = json.loads(capsys.readouterr().out)
    assert without["num_scored"] == without["num_examples"] == len(captions)
    # the same images scored through the Karpathy split give the same CIDEr (document frequencies included)
    cli("eval", "score", "--task", task, "--predictions", predictions, *SCORE_FILES[task])
    within = json.loads(capsys.readouterr().out)
    assert without["cider"] == pytest.approx(within["cider"], rel=1e-12) and without["cider"] > 0
    assert "vqa_metric" not in without


def test_scoring_captions_for_an_image_without_references_names_it(tmp_path):
    predictions = caption_predictions(tmp_path / "p.jsonl", {1000: "a page", 999: "a cat"})
    references = F / "coco/captions_val2014.json"
    with pytest.raises(
        ValueError, match=r"captions_val2014.json: no reference captions for image_id 999 predicted"
    ):
        cli("eval", "score", "--task", "coco", "--predictions", predictions, "--references", references)
    with pytest.raises(ValueError, match="task coco needs --references"):
        cli("eval", "score", "--task", "coco", "--predictions", predictions)


def test_running_captioning_still_needs_the_karpathy_split(checkpoint, no_model_load):
    files = TASK_FILES["coco"][2:]  # --references and --images
    with pytest.raises(ValueError, match="task coco needs --karpathy-json"):
        cli("eval", "--checkpoint", checkpoint, "--task", "coco", "--device", "cpu", *files)


@pytest.mark.parametrize("family", ["llama", "gpt2", "mpt", "gpt_neox"])
def test_rank_classification_from_the_cached_prefix_equals_full_forward_passes(tokenizer_dir, family):
    from openflamingo.eval.inference import model_inputs, rank_classes, tokenize_class_names
    from openflamingo.eval.prompts import Prompt

    model = tiny_model(tokenizer_dir, family)
    images = sorted((F / "coco/images/val2014").glob("*.jpg"))
    prompts = [  # different lengths (left padding), text before the first image, two images
        Prompt("<image>Output:a cat<|endofchunk|>\n<image>Output:", images[:2]),
        Prompt("some words first <image>Output:", images[2:3]),
        Prompt("<image>a photo of the sky and a dog. Output:", images[3:4]),
    ]
    names = ["cat", "red car", "a small house on the lake", "dog", "the sky", "blue bird flies"]
    ids = tokenize_class_names(model.tokenizer, names)
    assert len({len(t) for t in ids}) > 2
    fast = rank_classes(model, prompts, ids, torch.device("cpu"), rows_per_call=4, length_normalize=False)
    for b, prompt in enumerate(prompts):
        inputs = model_inputs(model, [prompt], torch.device("cpu"))
        for c, tokens in enumerate(ids):
            full = torch.cat([inputs["input_ids"], torch.tensor([tokens])], dim=1)
            logits = model(input_ids=full, images=inputs["images"], num_images=inputs["num_images"]).logits
            logprobs = torch.log_softmax(logits[0, -len(tokens) - 1 : -1].float(), dim=-1)
            expected = logprobs.gather(-1, torch.tensor(tokens)[:, None]).sum()
            torch.testing.assert_close(fast[b, c], expected, atol=1e-5, rtol=1e-6)  # sums near -100 in fp32


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_ranking_each_prompts_own_choices_equals_full_forward_passes(tokenizer_dir, family):
    from openflamingo.eval.inference import model_inputs, rank_choices, tokenize_class_names
    from openflamingo.eval.prompts import Prompt

    model = tiny_model(tokenizer_dir, family)
    images = sorted((F / "coco/images/val2014").glob("*.jpg"))
    prompts = [
        Prompt("<image>This is a dax.<|endofchunk|><image>This is a", images[:2]),
        Prompt("<image>This is a", images[2:3]),
    ]
    choices = [[" dax", " blicket"], [" pusab", " wug"]]
    ids = [tokenize_class_names(model.tokenizer, c) for c in choices]
    assert any(len(t) > 1 for c in ids for t in c) and len({len(t) for c in ids for t in c}) > 1
    fast = rank_choices(model, prompts, ids, torch.device("cpu"), length_normalize=False)
    assert fast.shape == (2, 2)
    for b, prompt in enumerate(prompts):
        inputs = model_inputs(model, [prompt], torch.device("cpu"))
        for c, tokens in enumerate(ids[b]):
            full = torch.cat([inputs["input_ids"], torch.tensor([tokens])], dim=1)
            logits = model(input_ids=full, images=inputs["images"], num_images=inputs["num_images"]).logits
            logprobs = torch.log_softmax(logits[0, -len(tokens) - 1 : -1].float(), dim=-1)
            expected = logprobs.gather(-1, torch.tensor(tokens)[:, None]).sum()
            torch.testing.assert_close(fast[b, c], expected, atol=1e-5, rtol=1e-6)
    normalized = rank_choices(model, prompts, ids, torch.device("cpu"))
    lengths = torch.tensor([[len(t) for t in c] for c in ids], dtype=torch.float32)
    torch.testing.assert_close(normalized, fast / lengths)


def test_rices_puts_the_most_similar_demonstration_last_and_caches_features(tokenizer_dir, tmp_path):
    from openflamingo.eval.datasets import read_image_folder
    from openflamingo.eval.demos import RicesDemos

    model = tiny_model(tokenizer_dir)
    pool = read_image_folder(F / "imagenet/train", {f"n0000000{i}": str(i) for i in range(1, 5)})
    cache = tmp_path / "rices.safetensors"
    rices = RicesDemos(model, pool, 4, torch.device("cpu"), cache)
    query = pool[5]
    chosen = rices.select(query, 3)
    assert chosen[-1] is query  # the query itself is the most similar image in the pool
    similarity = rices.features @ rices.query_features[query.key]
    assert [similarity[pool.index(d)] for d in chosen] == sorted(similarity[pool.index(d)] for d in chosen)
    again = RicesDemos(model, pool, 4, torch.device("cpu"), cache)  # read back from the cache file
    torch.testing.assert_close(again.features, rices.features)
    with pytest.raises(ValueError, match="computed for another demonstration pool"):
        RicesDemos(model, pool[:4], 4, torch.device("cpu"), cache)


def test_prompt_ensembling_uses_distinct_demonstration_orders():
    from openflamingo.eval.runner import demo_orders

    orders = demo_orders(["a", "b", "c"], 6, "42/x")
    assert orders[0] == ["a", "b", "c"] and len({tuple(o) for o in orders}) == 6
    assert len(demo_orders(["a", "b"], 6, "42/x")) == 2 and demo_orders([], 6, "s") == [[]]


def test_rices_run_has_one_trial_and_writes_the_feature_cache(checkpoint, tmp_path):
    cache = tmp_path / "rices" / "imagenet.safetensors"
    cli("eval", "--checkpoint", checkpoint, "--task", "imagenet", "--shots", 2, "--trials", 3, "--demos", "rices",
        "--rices-cache", cache, "--output-dir", tmp_path, "--device", "cpu", "--no-progress",
        "--prompt-ensembles", 2, *TASK_FILES["imagenet"])  # fmt: skip
    results = json.loads((tmp_path / "results_imagenet.json").read_text())
    assert len(results["results"]["imagenet_2shot"]["trials"]) == 1 and cache.is_file()
    sample = json.loads((tmp_path / "samples_imagenet_2shot_trial0.jsonl").read_text().splitlines()[0])
    assert len(sample["demo_ids"]) == 2 and len(sample["images"]) == 3


def test_a_space_before_the_answer_moves_into_the_answer():
    from openflamingo.eval.prompts import answer_follows_space, build_prompt
    from openflamingo.eval.tasks import TaskPrompt

    class Query:
        id, fields, images, target = "q", {"question": "what colour?"}, [["img.png"]], "blue"

    spaced = TaskPrompt("<image>Question: {question} Short answer: {answer}", "")
    assert answer_follows_space(spaced.template) and not answer_follows_space("<image>Answer:{answer}")
    prompt = build_prompt(spaced, [], Query(), shots=0)
    assert prompt.text == "<image>Question: what colour? Short answer:"
