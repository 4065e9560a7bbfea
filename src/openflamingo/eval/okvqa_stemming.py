"""OK-VQA v1.1 answer stemming, applied to predictions (the released OK-VQA answers are already stemmed).

The rule, as in the OK-VQA release and OpenFlamingo's evaluation: tokenize and POS-tag the answer; a word in the
manual table maps to its entry; a word ending in "ing" becomes its WordNet verb lemma; a plural noun (NNS, NNPS) is
singularized with `inflection`; everything else is kept. The table is the OK-VQA authors' list of words their
automatic rules got wrong.

Needs `nltk` (with its data: wordnet, averaged_perceptron_tagger_eng, punkt_tab) and `inflection`; both optional
dependencies of openflamingo, checked before any model time is spent.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import MissingDependencyError

MANUAL_STEMS = {
    "police": "police", "las": "las", "vegas": "vegas", "yes": "yes", "jeans": "jean", "hell's": "hell",
    "domino's": "domino", "morning": "morn", "clothes": "cloth", "are": "are", "riding": "ride",
    "leaves": "leaf", "dangerous": "danger", "clothing": "cloth", "texting": "text", "kiting": "kite",
    "firefighters": "firefight", "ties": "tie", "married": "married", "teething": "teeth", "gloves": "glove",
    "tennis": "tennis", "dining": "dine", "directions": "direct", "waves": "wave", "controllers": "control",
    "weddings": "wed", "sometimes": "sometime", "earing": "ear",
}  # fmt: skip
INSTALL_HINT = (
    "OK-VQA answer stemming needs nltk and inflection with nltk's data: pip install nltk inflection && "
    "python -m nltk.downloader wordnet averaged_perceptron_tagger_eng punkt_tab"
)


class OkVqaStemmer:
    """`stem("two dogs running")` -> "two dog run". The language tools are injectable (tests, other taggers)."""

    def __init__(
        self,
        tokenize: Callable[[str], list[str]],
        pos_tag: Callable[[list[str]], list[tuple[str, str]]],
        verb_lemma: Callable[[str], str],
        singularize: Callable[[str], str],
    ):
        self.tokenize, self.pos_tag = tokenize, pos_tag
        self.verb_lemma, self.singularize = verb_lemma, singularize

    def stem(self, text: str) -> str:
        words = []
        for word, tag in self.pos_tag(self.tokenize(text)):
            if word in MANUAL_STEMS:
                word = MANUAL_STEMS[word]
            elif word.endswith("ing"):
                word = self.verb_lemma(word)
            elif tag.startswith("NNS") or tag.startswith("NNPS"):
                word = self.singularize(word)
            words.append(word)
        return " ".join(words)


def nltk_stemmer() -> OkVqaStemmer:
    """The stemmer OK-VQA and OpenFlamingo use; raises ImportError with install instructions when unavailable."""
    try:
        import inflection
        import nltk
        from nltk.stem import WordNetLemmatizer

        lemmatizer = WordNetLemmatizer()
        stemmer = OkVqaStemmer(
            nltk.word_tokenize, nltk.pos_tag, lambda w: lemmatizer.lemmatize(w, "v"), inflection.singularize
        )
        stemmer.stem("two dogs running")  # loads (and so checks) all three nltk data packages now
    except (ImportError, LookupError) as error:
        missing = "nltk data not found" if isinstance(error, LookupError) else str(error)
        raise MissingDependencyError(f"{INSTALL_HINT} ({missing})") from None
    return stemmer
