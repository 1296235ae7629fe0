"""Sentence splitting with NLTK's Punkt, without downloading anything at run time.

Punkt is unsupervised: ``train_punkt`` trains it on the document itself (a sample of it
for big books, so training stays well under a second), seeded with a built-in list of
common abbreviations. If NLTK's pretrained ``punkt_tab`` data for the language happens
to be installed, its abbreviations, collocations and sentence starters are added too;
nothing needs it.

On top of Punkt, a few rules (English only) fix what statistics on one book get wrong:

* a sentence never ends on a title before a name: ``Mr.``, ``Dr.``, ``Prof.`` ...
  (``Dr. No`` stays one piece);
* ``No. 5``, ``p. 12``, ``Vol. 3``, ``Fig. 2``: an abbreviation before a number does not
  end a sentence;
* an ellipsis (``...`` or ``…``) followed by a capitalised word ends a sentence.

Splitting never drops or reorders text: the sentences are the spans between Punkt's
boundaries, stripped of surrounding whitespace, so joining them gives back the input
modulo whitespace.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
import threading
import types
from functools import lru_cache

from ..config import TextOptions

__all__ = ["split_sentences", "sentence_spans", "train_punkt", "ABBREVIATIONS"]

# Abbreviations as Punkt stores them: lowercase, no final period, inner periods kept.
# Left out on purpose: words that often end sentences for real ("no", "sat", "sun", "wed",
# "may", "am", "in").
_ENGLISH_ABBREVIATIONS = frozenset(
    """
    mr mrs ms mx messrs mme mlle dr prof sr jr st esq rev hon fr
    capt cpt sgt lt col gen gov sen rep pres maj cpl pvt cmdr adm supt insp det
    vs etc e.g i.e cf viz al ca approx dept est inc ltd co corp bros assn univ govt intl
    misc ref tel ext ed eds trans
    mt ft ave blvd rd hwy
    fig figs vol vols ch chap pp p art sec para eq op pt nos
    jan feb mar apr jun jul aug sep sept oct nov dec
    mon tue tues thu thur thurs fri
    a.m p.m u.s u.s.a u.k u.n d.c ph.d b.a m.a b.sc m.sc m.d
    oz lb lbs yr yrs hr hrs mins
    """.split()
)
ABBREVIATIONS: dict[str, frozenset[str]] = {"english": _ENGLISH_ABBREVIATIONS}

# Titles that come before a name: a sentence never ends on one of these.
_TITLES = frozenset(
    "mr mrs ms mx messrs mme mlle dr prof rev hon fr capt cpt sgt lt col gen gov sen rep "
    "pres maj cpl pvt cmdr adm supt insp det".split()
)
# Abbreviations that come before a number: "No. 5" does not end a sentence.
_NUMBERED = frozenset("no nos vol vols p pp fig figs ch chap art sec para eq op pt".split())

_LAST_WORD_RE = re.compile(r"[\"'(“‘\[]*([A-Za-z]+)\.$")
_ELLIPSIS_BREAK_RE = re.compile(r"(?:\.{3,}|…)[\"'”’)\]]*(?=\s+[\"'“‘(\[]?[A-Z])")

# Training on a whole 1 MB book takes seconds; a sample of this many characters, taken
# from ten evenly spaced places in the book, learns nearly the same statistics.
_TRAIN_BUDGET = 200_000
_TRAIN_WINDOWS = 10


def _training_sample(text: str, budget: int = _TRAIN_BUDGET) -> str:
    if len(text) <= budget:
        return text
    width = budget // _TRAIN_WINDOWS
    step = len(text) // _TRAIN_WINDOWS
    parts = []
    for i in range(_TRAIN_WINDOWS):
        start = i * step
        if i:
            j = text.find("\n\n", start, start + width)
            start = j + 2 if j != -1 else start
        end = text.rfind("\n\n", start, start + width)
        if end <= start:
            end = start + width
        parts.append(text[start:end])
    return "\n\n".join(parts)


def _load_punkt_quietly() -> types.ModuleType:
    """``nltk.tokenize.punkt`` without running ``nltk/__init__.py``.

    ``import nltk`` imports scipy, sklearn and most of NLTK (about 5 s); Punkt's trainer
    and tokenizer need a handful of small modules. They are loaded under empty stand-ins
    for the ``nltk`` and ``nltk.tokenize`` packages, and every ``nltk*`` entry this adds to
    ``sys.modules`` is removed again afterwards, so this private copy is invisible to the
    rest of the process: a later ``import nltk`` anywhere is a normal, complete import.
    (The copy's own load/save helpers import more of NLTK lazily; they are not used.)
    If NLTK is already imported, or the trick fails, NLTK is imported the normal way.
    """
    if "nltk" in sys.modules:
        import nltk.tokenize.punkt

        return nltk.tokenize.punkt
    before = set(sys.modules)

    def forget_added() -> None:
        for name in set(sys.modules) - before:
            if name == "nltk" or name.startswith("nltk."):
                del sys.modules[name]

    try:
        for name in ("nltk", "nltk.tokenize"):
            spec = importlib.util.find_spec(name)
            if spec is None or spec.submodule_search_locations is None:
                raise ImportError(name)
            stub = types.ModuleType(name)
            stub.__path__ = list(spec.submodule_search_locations)
            sys.modules[name] = stub
        punkt = importlib.import_module("nltk.tokenize.punkt")
        punkt.PunktTrainer, punkt.PunktSentenceTokenizer, punkt.PunktParameters  # noqa: B018
    except Exception:  # a future NLTK that needs its package init: import it the normal way
        forget_added()
        import nltk.tokenize.punkt

        return nltk.tokenize.punkt
    forget_added()
    return punkt


_PUNKT_LOCK = threading.Lock()
_PUNKT: types.ModuleType | None = None


def _punkt() -> types.ModuleType:
    global _PUNKT
    with _PUNKT_LOCK:
        if _PUNKT is None:
            _PUNKT = _load_punkt_quietly()
        return _PUNKT


def _nltk_data_dirs() -> list[str]:
    """NLTK's default data search path (``nltk.data.path``), without importing NLTK."""
    dirs = [os.path.expanduser(d) for d in os.environ.get("NLTK_DATA", "").split(os.pathsep) if d]
    dirs.append(os.path.expanduser("~/nltk_data"))
    dirs += [os.path.join(sys.prefix, *p) for p in (("nltk_data",), ("share", "nltk_data"), ("lib", "nltk_data"))]
    dirs += ["/usr/share/nltk_data", "/usr/local/share/nltk_data", "/usr/lib/nltk_data", "/usr/local/lib/nltk_data"]
    return dirs


def _punkt_tab_installed(language: str) -> bool:
    """Is NLTK's pretrained ``punkt_tab`` data for ``language`` anywhere NLTK looks?"""
    for d in _nltk_data_dirs():
        if os.path.isdir(os.path.join(d, "tokenizers", "punkt_tab", language)):
            return True
        if os.path.isfile(os.path.join(d, "tokenizers", "punkt_tab.zip")):
            return True
    return False


@lru_cache(maxsize=8)
def _pretrained(language: str):
    """NLTK's pretrained Punkt parameters if ``punkt_tab`` is installed, else None.

    Only when the data is there is NLTK imported in full (its loader needs ``nltk.data``).
    """
    if not re.fullmatch(r"[a-z_]+", language) or not _punkt_tab_installed(language):
        return None
    try:
        import nltk.data
        import nltk.tokenize.punkt

        return nltk.tokenize.punkt.load_punkt_params(nltk.data.find(f"tokenizers/punkt_tab/{language}/"))
    except (LookupError, ValueError, OSError):
        return None


def train_punkt(document_text: str, language: str):
    """A Punkt tokenizer (``PunktSentenceTokenizer``) trained on ``document_text``, no download."""
    punkt = _punkt()
    language = language.lower()
    seeds = ABBREVIATIONS.get(language, frozenset())
    trainer = punkt.PunktTrainer()
    # Seeded before training so the first pass (and the orthographic statistics that
    # depend on it) knows them; added again afterwards because training may drop a seed
    # it saw too rarely.
    trainer._params.abbrev_types.update(seeds)
    trainer.train(_training_sample(document_text), finalize=True)
    params = trainer.get_params()
    pretrained = _pretrained(language)
    if pretrained is not None:
        params.abbrev_types |= pretrained.abbrev_types
        params.collocations |= pretrained.collocations
        params.sent_starters |= pretrained.sent_starters
    params.abbrev_types |= seeds
    return punkt.PunktSentenceTokenizer(params)


def _as_tokenizer(trained, text: str, language: str):
    if trained is None:
        return train_punkt(text, language)
    if hasattr(trained, "span_tokenize"):
        return trained
    if hasattr(trained, "abbrev_types"):  # PunktParameters (NLTK's own or this module's copy)
        return _punkt().PunktSentenceTokenizer(trained)
    raise TypeError(f"expected a Punkt tokenizer or PunktParameters, got {type(trained).__name__}")


def _strip_span(text: str, start: int, end: int) -> tuple[int, int] | None:
    seg = text[start:end]
    lead = len(seg) - len(seg.lstrip())
    trail = len(seg) - len(seg.rstrip())
    if lead == len(seg):
        return None
    return start + lead, end - trail


def _joins_next(prev: str, nxt: str) -> bool:
    """English rules: does the sentence ``prev`` really continue into ``nxt``?"""
    m = _LAST_WORD_RE.search(prev[-40:])
    if not m:
        return False
    word = m.group(1).lower()
    if word in _TITLES and nxt[:1].isalpha():
        return True
    return word in _NUMBERED and nxt[:1].isdigit()


def sentence_spans(text: str, tokenizer, language: str = "english") -> list[tuple[int, int]]:
    """``(start, end)`` of each sentence of ``text``; they cover all of its non-space text."""
    if not text.strip():
        return []
    starts = sorted({0} | {s for s, _ in tokenizer.span_tokenize(text)})
    spans: list[tuple[int, int]] = []
    for i, start in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(text)
        span = _strip_span(text, start, end)
        if span is not None:
            spans.append(span)
    if language.lower() != "english":
        return spans
    merged: list[tuple[int, int]] = []
    for span in spans:
        if merged and _joins_next(text[merged[-1][0] : merged[-1][1]], text[span[0] : span[1]]):
            merged[-1] = (merged[-1][0], span[1])
        else:
            merged.append(span)
    out: list[tuple[int, int]] = []
    for start, end in merged:
        for m in _ELLIPSIS_BREAK_RE.finditer(text, start, end):
            out.append((start, m.end()))
            start = _strip_span(text, m.end(), end)[0]
        out.append((start, end))
    return out


def split_sentences(text: str, opts: TextOptions, trained=None) -> list[str]:
    """The sentences of ``text``.

    ``trained`` is a tokenizer from ``train_punkt`` or NLTK ``PunktParameters``; without
    it Punkt is trained on ``text`` itself.
    """
    tokenizer = _as_tokenizer(trained, text, opts.language)
    return [text[s:e] for s, e in sentence_spans(text, tokenizer, opts.language)]
