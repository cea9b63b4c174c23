"""Datasets: ``load(name, split, *, seed=0, **knobs) -> datasets.Dataset``.

=================  ===========================================================  ==========
name               what                                                         splits
=================  ===========================================================  ==========
easyvqa            easy-VQA (package ``easy-vqa``): image + question -> 13        val: 10% of
                   answers; 38,575 train+val / 9,673 test questions             train images
movie_reviews      VADER movie-review snippets -> binary sentiment (0-score      80/10/10
                   rows dropped: 10,568)                                         stratified
bbc_news           BBC News, 2,225 articles, 5 topics (sorted class names)       80/10/10
shapes_nlvr        generated: two images + statement -> true/false (balanced)   6000/1000/1000
shapes_retrieval   generated: image, 5 captions, 5 one-attribute hard negatives  3000/100/100
shapes_captions    generated: image + caption corpus for pre-training           10000/1000/1000
shapes_count       generated: image -> how many objects (1-4, balanced)          2000/500/500
=================  ===========================================================  ==========

``default_knobs(name)`` lists a set's knobs; ``python -m vlkit.data`` materialises sets
(the DVC ``data`` stage). See :mod:`~vlkit.data.registry` for the on-disk layout,
:mod:`~vlkit.data.scenes` / :mod:`~vlkit.data.grammar` for the scene generator.
"""

from .assets import AssetError, MissingAssetError
from .registry import DATASETS, default_knobs, fingerprint, load, load_all, materialise, spec
from .splits import SPLITS

__all__ = ["DATASETS", "SPLITS", "AssetError", "MissingAssetError", "default_knobs", "fingerprint", "load",
           "load_all", "materialise", "spec"]
