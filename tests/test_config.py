"""Typed YAML configuration: every error names the file, the field, expected and found."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from medmeta_common.config import load_config
from medmeta_common.config.deploy import load_any_config
from medmeta_common.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SITES = "sites:\n  - name: a\n    data: {path: builtin:demo/site-0}\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "federation.yaml"
    path.write_text(text)
    return path


def test_misspelled_key_names_file_key_and_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, SITES + "image:\n  sise: 64\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "image.sise" in message
    assert "did you mean 'size'?" in message


def test_misspelled_key_inside_a_list_item(tmp_path: Path) -> None:
    text = "sites:\n  - name: a\n    data: {path: x.npz, splt: train}\n"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    assert info.value.field == "sites[0].data.splt"
    assert "did you mean 'split'?" in str(info.value)


def test_wrong_type_says_expected_and_found(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, SITES + "image:\n  size: large\n"))
    assert info.value.field == "image.size"
    assert info.value.expected == "an integer"
    assert "str 'large'" in info.value.found


def test_bool_is_not_an_integer(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"image\.size"):
        load_config(write(tmp_path, SITES + "image:\n  size: true\n"))


def test_literal_choice_suggests_the_close_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, SITES + "image:\n  intensity: z-score\n"))
    assert info.value.field == "image.intensity"
    assert "did you mean 'zscore'?" in str(info.value)


def test_range_check_in_nested_section_has_full_path(tmp_path: Path) -> None:
    text = "sites:\n  - name: a\n    data: {path: x.npz, partition: {parts: 2, index: 5}}\n"
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.field == "sites[0].data.partition.index"
    assert info.value.source == str(path)


def test_cross_field_check(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, SITES + "server: {min_sites: 3}\n"))
    assert info.value.field == "server.min_sites"


def test_protonet_is_refused_under_dp(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="couples the records"):
        load_config(write(tmp_path, SITES + "train: {loss: protonet}\n"))
    config = load_config(write(tmp_path, SITES + "train: {loss: protonet}\n"
                                                 "privacy: {enabled: false}\n"))
    assert config.train.loss == "protonet"


def test_missing_required_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "rounds: 3\n"))
    assert info.value.field == "sites"
    assert "missing" in info.value.found


def test_bad_yaml_reports_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="line 2, column 11"):
        load_config(write(tmp_path, "image:\n  size: 32: 4\n"))


def test_yaml_tags_are_not_executed(tmp_path: Path) -> None:
    text = "image: !!python/object/apply:os.system ['echo hacked']\n"
    with pytest.raises(ConfigError, match="valid YAML"):
        load_config(write(tmp_path, text))


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_relative_paths_resolve_against_the_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "c.yaml"
    path.write_text("sites:\n  - name: a\n    data: {path: ../site.npz}\n")
    config = load_config(path)
    assert config.sites[0].data.path == str(tmp_path / "site.npz")


def test_config_is_frozen_and_hash_ignores_rounds(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, SITES))
    with pytest.raises(FrozenInstanceError):
        config.rounds = 3  # type: ignore[misc]
    other = load_config(write(tmp_path, SITES + "rounds: 99\n"))
    assert other.hash() == config.hash()
    changed = load_config(write(tmp_path, SITES + "seed: 1\n"))
    assert changed.hash() != config.hash()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path: Path) -> None:
    config = load_any_config(path)
    assert config.name


def test_config_check_command(tmp_path: Path) -> None:
    bad = write(tmp_path, SITES + "image:\n  chanels: 3\n")
    result = subprocess.run(
        [sys.executable, "-m", "medmeta.cli", "config", "check", str(bad)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 2
    assert "image.chanels" in result.stderr and "did you mean 'channels'?" in result.stderr
    assert "Traceback" not in result.stderr
