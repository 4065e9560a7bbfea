"""Metrics of the evaluation: CIDEr equal to pycocoevalcap, ROC AUC, OK-VQA stemming rules, post-processing, and
scoring saved prediction files. VQA accuracy has its own file, test_vqa_metric.py."""

import json
import shutil
from pathlib import Path

import pytest

from openflamingo.eval.datasets import Example
from openflamingo.eval.metrics import cider, roc_auc, score_task
from openflamingo.eval.okvqa_stemming import OkVqaStemmer
from openflamingo.eval.prompts import postprocess_caption, postprocess_vqa
from openflamingo.eval.tasks import get_task

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="CIDEr's PTB tokenizer needs Java")


def test_vqa_and_caption_postprocessing_cut_where_openflamingo_cuts():
    assert postprocess_vqa("yes Question: is it") == "yes "
    assert postprocess_vqa("red, white and blue") == "red"
    assert postprocess_vqa("a cat Short answer: dog") == "a cat "
    assert postprocess_caption('a "small" cat Output: a dog') == "a small cat "


def test_okvqa_stemming_rules():
    tags = {"dogs": "NNS", "clothes": "NNS", "running": "VBG", "are": "VBP", "Vegas": "NNPS"}
    stemmer = OkVqaStemmer(
        tokenize=str.split,
        pos_tag=lambda words: [(w, tags.get(w, "NN")) for w in words],
        verb_lemma=lambda w: w[:-3] if not w.endswith("nning") else w[:-4],
        singularize=lambda w: w[:-1],
    )
    # manual table first ("clothes" -> "cloth", "are" kept), then -ing verbs, then plural nouns
    assert stemmer.stem("dogs running clothes are Vegas") == "dog run cloth are Vega"


def test_okvqa_stemming_with_nltk_when_its_data_is_installed():
    from openflamingo.eval.okvqa_stemming import nltk_stemmer

    try:
        stemmer = nltk_stemmer()
    except ImportError as error:
        assert "nltk.downloader" in str(error)
        pytest.skip("nltk or its data is not installed")
    assert stemmer.stem("two dogs running") == "two dog run"


def test_roc_auc_equals_the_mann_whitney_statistic():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(0.875)  # a tie counts half
    assert roc_auc([1, 1], [0.2, 0.3]) != roc_auc([1, 1], [0.2, 0.3])  # NaN with one class


def test_classification_scores_top1_top5_and_hard_predictions():
    spec = get_task("imagenet")
    examples = [Example(i, [], {}, name, name) for i, name in enumerate(["cat", "dog", "car"])]
    ranked = {"0": {"scores": {"cat": -1.0, "dog": -2.0}}, "1": {"scores": {"cat": -1.0, "dog": -2.0}}}
    metrics = score_task(spec, examples, ranked).metrics
    assert metrics["top1"] == pytest.approx(50.0) and metrics["top5"] == pytest.approx(100.0)
    hard = score_task(spec, examples, {"2": {"prediction": "car"}}).metrics
    assert hard["top1"] == 100.0 and "top5" not in hard and hard["num_scored"] == 1
    with pytest.raises(ValueError, match="prediction for id '7'"):
        score_task(spec, examples, {"7": {"prediction": "car"}})


@needs_java
def test_cider_equals_pycocoevalcap_run_directly(tmp_path, monkeypatch):
    import pycocoevalcap.eval as coco_eval_module
    from pycocoevalcap.eval import COCOEvalCap
    from pycocotools.coco import COCO

    references = FIXTURES / "coco" / "captions_val2014.json"
    annotations = json.loads(references.read_text())["annotations"]
    hypotheses = [
        "a cat",
        "A rocket on a launch pad.",
        "",
        "coins, coins and more coins!",
        "a red motorcycle",
    ]
    image_ids = sorted({a["image_id"] for a in annotations})[: len(hypotheses)]
    results = [{"image_id": i, "caption": h} for i, h in zip(image_ids, hypotheses, strict=True)]
    results_file = tmp_path / "results.json"
    results_file.write_text(json.dumps(results))

    class Skip:  # METEOR and SPICE are not what is compared (SPICE downloads models)
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "skipped"

    monkeypatch.setattr(coco_eval_module, "Meteor", Skip)
    monkeypatch.setattr(coco_eval_module, "Spice", Skip)
    coco = COCO(str(references))
    coco_result = coco.loadRes(str(results_file))
    evaluator = COCOEvalCap(coco, coco_result)
    evaluator.params["image_id"] = coco_result.getImgIds()
    evaluator.evaluate()

    by_id = {str(a["image_id"]): [] for a in annotations}
    for a in annotations:
        by_id[str(a["image_id"])].append(a["caption"])
    ours, per_image = cider({str(r["image_id"]): r["caption"] for r in results}, by_id)
    assert ours == pytest.approx(100 * evaluator.eval["CIDEr"], rel=1e-12)
    assert per_image[str(image_ids[2])] == 0.0  # the empty caption


def test_cider_without_java_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="CIDEr needs Java"):
        cider({"1": "a cat"}, {"1": ["a cat"]})
