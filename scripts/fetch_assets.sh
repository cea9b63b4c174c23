#!/usr/bin/env bash
# Install-time download of the one data asset that no installed package ships:
# the vaderSentiment 3.3.2 *source* archive (its wheel lacks additional_resources/,
# which holds the movie-review snippets used by vlkit.data 'movie_reviews').
#
#   bash scripts/fetch_assets.sh            # -> cache/downloads/vaderSentiment-3.3.2.tar.gz
#
# Idempotent: skips the download when a file with the right SHA-256 is already there and
# replaces one with a wrong checksum. vlkit.data.assets checks the same SHA-256 again when
# the DVC `data` stage (or a first `vlkit.data.load`) reads it.
# Env: VLKIT_CACHE_DIR overrides the cache folder; PIP overrides the pip executable.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${VLKIT_CACHE_DIR:-$ROOT/cache}"
DEST="$CACHE/downloads"
PIP="${PIP:-$ROOT/.venv/bin/pip}"
FILE="vaderSentiment-3.3.2.tar.gz"
SHA256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"  # = vlkit.data.assets.VADER_SDIST_SHA256

sha() { sha256sum "$1" 2>/dev/null | cut -d' ' -f1 || shasum -a 256 "$1" | cut -d' ' -f1; }

mkdir -p "$DEST"
if [[ -s "$DEST/$FILE" && "$(sha "$DEST/$FILE")" == "$SHA256" ]]; then
  echo "fetch_assets: $DEST/$FILE present, sha256 ok"
  exit 0
fi
if [[ -e "$DEST/$FILE" ]]; then
  echo "fetch_assets: $DEST/$FILE has a wrong sha256, downloading it again"
  rm -f "$DEST/$FILE"
fi
"$PIP" download -q --no-deps --no-binary :all: vaderSentiment==3.3.2 -d "$DEST"
got="$(sha "$DEST/$FILE")"
if [[ "$got" != "$SHA256" ]]; then
  echo "fetch_assets: $DEST/$FILE sha256 $got != expected $SHA256" >&2
  exit 1
fi
echo "fetch_assets: downloaded $DEST/$FILE, sha256 ok"
