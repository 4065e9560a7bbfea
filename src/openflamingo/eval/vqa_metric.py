"""VQA accuracy, in the three versions that published numbers use (selected by name, `--vqa-metric`).

All three score the same way once the answers are processed: for each of the human answer records, the
prediction scores min(1, matches among the *other* records / 3), and the question's accuracy is the mean of
these leave-one-out scores. "Other" is decided by comparing whole records (answer text, confidence, id),
exactly as the official script compares dicts: official files give every answer a distinct answer_id. They
differ in what is processed:

- `official` (default): GT-Vision-Lab/VQA `PythonEvaluationTools/vqaEvaluation/vqaEval.py` at its current
  commit a013f00 (2021-03-11, "Fixed processing answers bug"). The prediction and the human answers get
  newlines and tabs replaced by spaces and are stripped; then, only when the human answers are not all
  identical, all of them and the prediction get the punctuation and the digit/article/contraction steps. When
  the humans agree, answers must match exactly: one of the official authors explains on that repository's
  issue #14 that answers about text in the image (OCR) must not be normalised. So against ten `yes`, a
  prediction `Yes` or `yes.` scores 0.
- `official-2017`: the same file before a013f00 (as released with VQA v2 in 2017). The prediction is always
  normalised (whitespace, punctuation, digits/articles/contractions); the human answers get the punctuation
  step only, and only when they are not all identical (compared as given, without the whitespace step). Ground
  truth is therefore never lower-cased or digit-mapped: "two" in the annotations never matches.
- `openflamingo`: OpenFlamingo 2.0.1's copy (`open_flamingo/eval/vqa_metric.py`), used for its paper's tables:
  the prediction and every human answer get all steps, always.

The quirks shared by all three are kept on purpose, because they decide what numbers mean:
- `periodStrip` is written `(?!<=\\d)`, a lookahead, so any "." not followed by a digit is removed;
- the call `periodStrip.sub("", text, re.UNICODE)` passes re.UNICODE (32) as the *count*;
- whether a mark is deleted or replaced by a space depends on the *input* text, not on earlier replacements.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from ..errors import InputError

VQA_METRICS = ("official", "official-2017", "openflamingo")
DEFAULT_VQA_METRIC = "official"

# Verbatim tables from the official evaluation script (the same in all three versions).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # fmt: skip
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")  # fmt: skip
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
OFFICIAL_PERIOD_STRIP_COUNT = int(re.UNICODE)  # see the module docstring


def process_punctuation(text: str) -> str:
    out = text
    for mark in PUNCTUATION:
        # The official test looks at the *input* text, not at what earlier replacements left.
        if (mark + " " in text or " " + mark in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_STRIP.sub("", out, count=OFFICIAL_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """Every processing step of the official script: whitespace, punctuation, digits/articles/contractions."""
    return process_digit_article(process_punctuation(clean_whitespace(text)))


def check_vqa_metric(name: str) -> None:
    if name not in VQA_METRICS:
        raise InputError(f"unknown VQA metric {name!r}; known: {', '.join(VQA_METRICS)}")


def processed_answers(prediction: str, answers: list[str], metric: str) -> tuple[str, list[str]]:
    """The prediction and the human answers as the chosen version compares them."""
    check_vqa_metric(metric)
    if metric == "official":
        answers = [clean_whitespace(a) for a in answers]
        if len(set(answers)) > 1:
            return normalize_answer(prediction), [normalize_answer(a) for a in answers]
        return clean_whitespace(prediction), answers
    if metric == "official-2017":
        if len(set(answers)) > 1:
            answers = [process_punctuation(a) for a in answers]
        return normalize_answer(prediction), answers
    return normalize_answer(prediction), [normalize_answer(a) for a in answers]


def vqa_accuracy(prediction: str, answers: Sequence[dict | str], metric: str = DEFAULT_VQA_METRIC) -> float:
    """Accuracy in [0, 1] of one predicted answer against the annotation's answer records
    (`{"answer": ..., "answer_confidence": ..., "answer_id": ...}`; plain strings are accepted too)."""
    records = [dict(a) if isinstance(a, dict) else {"answer": a} for a in answers]
    if not records:
        raise InputError("a VQA question needs at least one ground-truth answer")
    predicted, texts = processed_answers(prediction, [r["answer"] for r in records], metric)
    for record, text in zip(records, texts, strict=True):
        record["answer"] = text
    scores = []
    for held_out in records:
        others = [r for r in records if r != held_out]
        matches = sum(1 for r in others if r["answer"] == predicted)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)
