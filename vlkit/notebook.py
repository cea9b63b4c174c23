"""Run a notebook the way DVC stages and users do: jupytext source -> papermill.

Notebooks are committed as jupytext ``py:percent`` files (``notebooks/NN_name.py``) so that
diffs stay readable; this module turns one into a notebook in memory and executes it with
papermill, injecting the ``profile``, ``results_root`` (the committed ``results/`` folder: a DVC stage
writes there whatever its profile) and any extra parameters after the cell tagged
``parameters``. The executed notebook lands in ``runs/notebooks/`` (git-ignored: papermill
writes timings into it, so it changes every run); the deterministic outputs are the files
the notebook writes under ``results/``. Each run records its wall time in
``results/timings/<name>.<profile>.json`` (kept apart from the score tables, which stay
byte-identical across runs).

    python -m vlkit.notebook 00_tour --profile ci
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .config import check_profile, load_params
from .models.protocol import UnknownNameError
from .paths import RESULTS_DIR, ROOT, RUNS_DIR
from .results import stage_timer

NOTEBOOK_DIR = ROOT / "notebooks"


def available() -> list[str]:
    return sorted(p.stem for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))


def run(name: str, profile: str | None = None, output_dir: str | Path | None = None, **parameters) -> Path:
    """Execute ``notebooks/<name>.py`` with papermill; return the executed notebook's path."""
    import jupytext
    import papermill

    if name not in available():
        raise UnknownNameError("notebook", name, available())
    profile = check_profile(profile or load_params().get("profile", "default"))
    nb = jupytext.read(NOTEBOOK_DIR / f"{name}.py")
    out_dir = Path(output_dir) if output_dir else RUNS_DIR / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    src = out_dir / f"{name}.src.ipynb"
    jupytext.write(nb, src)
    out = out_dir / f"{name}.{profile}.ipynb"
    parameters = {"profile": profile, "results_root": str(RESULTS_DIR), **parameters}
    try:
        with stage_timer(name, profile):
            papermill.execute_notebook(str(src), str(out), parameters=parameters, kernel_name="python3",
                                       cwd=str(ROOT), progress_bar=False)
    finally:
        src.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", help=f"one of: {', '.join(available())}")
    ap.add_argument("--profile", default=None, help="ci | default | paper (default: params.yaml's)")
    args = ap.parse_args(argv)
    print(run(args.name, args.profile))


if __name__ == "__main__":
    main()
