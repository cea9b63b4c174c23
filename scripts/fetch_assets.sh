#!/usr/bin/env bash
# Install-time download of the one data asset that no installed package ships:
# the vaderSentiment 3.3.2 *source* archive (its wheel lacks additional_resources/,
# which holds the movie-review snippets used by vlkit.data 'movie_reviews').
#
#   bash scripts/fetch_assets.sh            # -> cache/downloads/vaderSentiment-3.3.2.tar.gz
#
# Idempotent: skips the download when the archive is already there. The checksum is
# verified by vlkit.data.assets (recorded there) when the DVC `data` stage extracts it.
# Env: VLKIT_CACHE_DIR overrides the cache folder; PIP overrides the pip executable.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${VLKIT_CACHE_DIR:-$ROOT/cache}"
DEST="$CACHE/downloads"
PIP="${PIP:-$ROOT/.venv/bin/pip}"
FILE="vaderSentiment-3.3.2.tar.gz"

mkdir -p "$DEST"
if [[ -s "$DEST/$FILE" ]]; then
  echo "fetch_assets: $DEST/$FILE already present, skipping"
else
  "$PIP" download --no-deps --no-binary :all: vaderSentiment==3.3.2 -d "$DEST"
fi
if command -v sha256sum >/dev/null; then sha256sum "$DEST/$FILE"; fi
