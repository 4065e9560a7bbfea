"""The official VQA accuracy (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py, master).

For each question: the prediction is normalised (punctuation, then digits/articles/contractions); the 10 human
answers get the punctuation step only, and only when they are not all identical; then for every human answer, the
prediction scores min(1, matches among the *other* answers / 3), and the question's accuracy is the mean of these
leave-one-out scores. "Other" is decided by comparing whole answer records (answer text, confidence, id), exactly as
the official script compares dicts: official files give every answer a distinct answer_id.

The quirks of the official script are kept on purpose, because they decide what numbers mean:
- ground-truth answers are never lower-cased or digit-mapped ("Two" in the annotations never matches);
- `periodStrip` is written `(?!<=\\d)`, a lookahead, so any "." not followed by a digit is removed;
- the official call `periodStrip.sub("", text, re.UNICODE)` passes re.UNICODE (32) as the *count*.
OpenFlamingo's copy differs: it normalises ground-truth answers fully and always; use that only for comparisons
with OpenFlamingo numbers on non-normalised annotations (official VQAv2/OK-VQA annotations are already normalised,
so both agree there).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# Verbatim tables from the official evaluation script.
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


def normalize_prediction(answer: str) -> str:
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def vqa_accuracy(prediction: str, answers: Sequence[dict]) -> float:
    """Accuracy in [0, 1] of one predicted answer against the annotation's answer records
    (`{"answer": ..., "answer_confidence": ..., "answer_id": ...}`; plain strings are accepted too)."""
    records = [dict(a) if isinstance(a, dict) else {"answer": a} for a in answers]
    if not records:
        raise ValueError("a VQA question needs at least one ground-truth answer")
    predicted = normalize_prediction(prediction)
    if len({r["answer"] for r in records}) > 1:
        for record in records:
            record["answer"] = process_punctuation(record["answer"])
    scores = []
    for held_out in records:
        others = [r for r in records if r != held_out]
        matches = sum(1 for r in others if r["answer"] == predicted)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)
