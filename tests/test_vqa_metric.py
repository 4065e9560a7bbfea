"""VQA accuracy in its three versions: the official script as it is now (`official`, GT-Vision-Lab/VQA a013f00),
as released in 2017 (`official-2017`) and OpenFlamingo 2.0.1's port (`openflamingo`), on hand-computed cases."""

import json

import pytest

from openflamingo.eval.datasets import Example
from openflamingo.eval.metrics import score_task
from openflamingo.eval.tasks import get_task
from openflamingo.eval.vqa_metric import VQA_METRICS, normalize_answer, vqa_accuracy


def answers(*texts, ids=True):
    """VQA answer records as in the official annotations (distinct answer_ids unless ids=False)."""
    return [
        {"answer": t, "answer_confidence": "yes", **({"answer_id": i + 1} if ids else {})}
        for i, t in enumerate(texts)
    ]


# Leave-one-out means that come up below: k matching records out of 10, each held out in turn.
TWO_OF_TEN = (2 * (1 / 3) + 8 * (2 / 3)) / 10  # 0.6: held-out match sees 1 other, held-out non-match sees 2
THREE_OF_TEN = (3 * (2 / 3) + 7 * 1) / 10  # 0.9
ONE_OF_TEN = (1 * 0 + 9 * (1 / 3)) / 10  # 0.3

# (prediction, answer records, {metric: expected accuracy}), each computed by hand from the three scripts:
# official:      whitespace step on both; the rest on both only when the humans disagree;
# official-2017: prediction always fully normalised; humans get punctuation only, only when they disagree;
# openflamingo:  everything normalised, always.
CASES = [
    # unanimous ground truth: officially the prediction must match it exactly (after the whitespace step)
    ("yes", answers(*["yes"] * 10), (1.0, 1.0, 1.0)),
    ("Yes", answers(*["yes"] * 10), (0.0, 1.0, 1.0)),  # capitals
    ("yes.", answers(*["yes"] * 10), (0.0, 1.0, 1.0)),  # trailing period
    ("a dog", answers(*["dog"] * 10), (0.0, 1.0, 1.0)),  # article
    ("A Dog", answers(*["dog"] * 10), (0.0, 1.0, 1.0)),
    ("two", answers(*["2"] * 10), (0.0, 1.0, 1.0)),  # number word
    ("none", answers(*["0"] * 10), (0.0, 1.0, 1.0)),
    ("dont", answers(*["don't"] * 10), (0.0, 1.0, 1.0)),  # contraction
    ("1,000", answers(*["1000"] * 10), (0.0, 1.0, 1.0)),  # comma between digits
    ("red, white", answers(*["red white"] * 10), (0.0, 1.0, 1.0)),
    (" yes\n", answers(*["yes"] * 10), (1.0, 1.0, 1.0)),  # the whitespace step applies in all three
    ("1.5", answers(*["1.5"] * 10), (1.0, 1.0, 1.0)),  # a period before a digit is kept by all
    # unanimous ground truth that normalisation would change: 2017 normalises the prediction only
    ("two", answers(*["two"] * 10), (1.0, 0.0, 1.0)),
    ("the dog", answers(*["the dog"] * 10), (1.0, 0.0, 1.0)),
    ("Sailboats.", answers(*["Sailboats."] * 10), (1.0, 0.0, 1.0)),
    ("dog", answers(*["the dog"] * 10), (0.0, 0.0, 1.0)),
    ("the dog", answers(*["Dog"] * 10), (0.0, 0.0, 1.0)),
    # ground truth differing only by whitespace: unanimous once stripped, except in 2017 (no whitespace step)
    ("yes", answers("yes", "yes", *[" yes"] * 8), (1.0, TWO_OF_TEN, 1.0)),
    ("Yes", answers("yes", "yes", *[" yes"] * 8), (0.0, TWO_OF_TEN, 1.0)),
    ("yes", answers("yes", "yes", *["yes\n"] * 8), (1.0, TWO_OF_TEN, 1.0)),
    # ground truth differing only by case: not unanimous, so officially both sides are lower-cased; 2017 never
    # lower-cases the ground truth
    ("yes", answers("yes", "yes", *["Yes"] * 8), (1.0, TWO_OF_TEN, 1.0)),
    ("Yes", answers("yes", "yes", *["Yes"] * 8), (1.0, TWO_OF_TEN, 1.0)),
    ("YES.", answers("yes", "yes", *["Yes"] * 8), (1.0, TWO_OF_TEN, 1.0)),
    # disagreeing ground truth with number words: official maps them to digits, 2017 does not
    ("2", answers("2", "2", *["two"] * 8), (1.0, TWO_OF_TEN, 1.0)),
    # disagreeing ground truth: all three process both sides the same way
    ("T-shirt", answers(*["t-shirt"] * 5, *["tshirt"] * 5), (1.0, 1.0, 1.0)),  # "-" becomes a space
    ("isnt", answers(*["isn't"] * 9, "no"), (1.0, 1.0, 1.0)),
    ("Two", answers(*["2"] * 3, *["3"] * 7), (THREE_OF_TEN, THREE_OF_TEN, THREE_OF_TEN)),
    ("net", answers("net", "net", *["mesh"] * 8), (TWO_OF_TEN, TWO_OF_TEN, TWO_OF_TEN)),
    ("net", answers("net", "net", "net", *["mesh"] * 7), (THREE_OF_TEN, THREE_OF_TEN, THREE_OF_TEN)),
    ("net", answers("net", *["mesh"] * 9), (ONE_OF_TEN, ONE_OF_TEN, ONE_OF_TEN)),
    ("orange", answers("net", *["mesh"] * 9), (0.0, 0.0, 0.0)),
    # records without answer_id: the official dict comparison leaves out every equal record at once
    ("yes", answers(*["yes"] * 3, *["no"] * 7, ids=False), (0.7, 0.7, 0.7)),
    ("yes", answers(*["yes"] * 3, *["no"] * 7), (THREE_OF_TEN, THREE_OF_TEN, THREE_OF_TEN)),
]


@pytest.mark.parametrize(("prediction", "records", "expected"), CASES)
def test_vqa_accuracy_of_each_version_matches_the_hand_computed_value(prediction, records, expected):
    scores = tuple(vqa_accuracy(prediction, records, metric) for metric in VQA_METRICS)
    assert scores == pytest.approx(expected, abs=1e-12)


def test_the_versions_give_different_overall_accuracy_on_the_hand_made_cases():
    overall = {
        metric: 100 * sum(vqa_accuracy(p, r, metric) for p, r, _ in CASES) / len(CASES)
        for metric in VQA_METRICS
    }
    assert {metric: round(value, 2) for metric, value in overall.items()} == {
        "official": 55.45,
        "official-2017": 68.18,
        "openflamingo": 91.82,
    }


def test_the_default_is_the_current_official_script():
    assert vqa_accuracy("Yes", answers(*["yes"] * 10)) == 0.0


def test_an_unknown_version_is_a_clear_error():
    with pytest.raises(
        ValueError, match="unknown VQA metric 'vqa2'; known: official, official-2017, openflamingo"
    ):
        vqa_accuracy("yes", answers("yes"), "vqa2")


def test_answer_normalisation_steps():
    assert normalize_answer("The Two Dogs!") == "2 dogs"
    assert normalize_answer("it's a cat.") == "it's cat"
    assert normalize_answer("youre right") == "you're right"
    assert normalize_answer(" red,\twhite\n") == "red white"


def test_score_task_uses_the_chosen_version():
    records = [answers(*["yes"] * 10), answers("yes", "yes", *["Yes"] * 8)]
    examples = [Example(i, [], {}, "yes", r, {"answer_type": "yes/no"}) for i, r in enumerate(records)]
    predictions = {"0": "Yes", "1": "yes"}
    spec = get_task("vqav2")
    scored = {m: score_task(spec, examples, predictions, vqa_metric=m).metrics for m in VQA_METRICS}
    assert scored["official"]["vqa_accuracy"] == pytest.approx(50.0)  # (0 + 100) / 2
    assert scored["official-2017"]["vqa_accuracy"] == pytest.approx(80.0)  # (100 + 60) / 2
    assert scored["openflamingo"]["vqa_accuracy"] == pytest.approx(100.0)
    assert scored["official"]["accuracy_yes/no"] == pytest.approx(50.0)
    assert json.dumps(scored)  # plain numbers: printed as they are by `eval score`
