"""Lean site updates: float16 / int8 deltas are small, faithful and screened like any update.

The fast tests check the codec on the real default encoder's layout; the slow test runs
a real Flower simulation on real images with ``update_encoding: int8`` and checks what
the sites sent and what the server made of it.
"""

from __future__ import annotations

import numpy as np
import pytest

from medmeta.simulate import run_simulation
from medmeta_common.config import ConfigError, ImageConfig, ModelConfig, load_config
from medmeta_common.models.factory import build_encoder
from medmeta_common.protocol import check_update, layout_of
from medmeta_common.update_codec import (
    SCALE_SUFFIX,
    decode_update,
    encode_update,
    encoded_layout,
    payload_bytes,
)
from medmeta_common.wire import arrays_to_numpy
from server.state import RunState
from tests.conftest import SHARED_DATA, shared_file

LAYOUT = layout_of(build_encoder(ModelConfig(), ImageConfig(), 0))


def _encoder_and_trained(seed: int = 0, step: float = 1e-2
                         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    encoder = build_encoder(ModelConfig(), ImageConfig(), seed)
    base = {k: v.numpy().copy() for k, v in encoder.state_dict().items()}
    rng = np.random.default_rng(seed)
    trained = {k: (v + step * rng.standard_normal(v.shape)).astype(np.float32)
               for k, v in base.items()}
    return base, trained


@pytest.mark.parametrize(("encoding", "most"), [("float16", 0.5), ("int8", 0.27)])
def test_lean_updates_are_small_and_decode_close_to_the_trained_encoder(
        encoding: str, most: float) -> None:
    base, trained = _encoder_and_trained()
    sent = encode_update(trained, base, encoding)
    assert check_update(sent, encoded_layout(LAYOUT, encoding)) is None
    assert payload_bytes(sent) <= most * payload_bytes(trained)
    decoded = decode_update(sent, base, encoding)
    for name, value in trained.items():
        delta = np.abs(value - base[name]).max()
        # float16 keeps ~3 significant digits of the delta; int8 is off by < one level.
        bound = 1e-3 * delta if encoding == "float16" else delta / 127
        assert np.abs(decoded[name] - value).max() <= bound + 1e-7, name
        assert decoded[name].dtype == np.float32


def test_int8_rounding_is_unbiased() -> None:
    base, trained = _encoder_and_trained(step=1e-3)
    rng = np.random.default_rng(1)
    name = max(base, key=lambda k: base[k].size)
    mean = np.mean([decode_update(encode_update(trained, base, "int8", rng), base, "int8")[name]
                    for _ in range(400)], axis=0)
    error = np.abs(mean - trained[name]).max()
    level = np.abs(trained[name] - base[name]).max() / 127
    assert error < 0.2 * level  # one sample is off by up to a level; the mean is not


def test_float32_is_the_encoder_unchanged() -> None:
    base, trained = _encoder_and_trained()
    sent = encode_update(trained, base, "float32")
    assert all(np.array_equal(sent[k], trained[k]) for k in trained)


def test_hostile_lean_updates_are_malformed() -> None:
    base, trained = _encoder_and_trained()
    layout = encoded_layout(LAYOUT, "int8")
    sent = encode_update(trained, base, "int8")
    name = next(iter(base))
    assert "infinite" in check_update({**sent, name + SCALE_SUFFIX:
                                       np.array([np.inf], np.float32)}, layout)
    assert "dtype" in check_update({**sent, name: sent[name].astype(np.int16)}, layout)
    assert "unexpected arrays" in check_update(
        {k: v for k, v in sent.items() if not k.endswith(SCALE_SUFFIX)}, layout)


def test_secure_aggregation_keeps_float32(tmp_path) -> None:
    path = tmp_path / "f.yaml"
    path.write_text("name: x\nserver: {secure_aggregation: {}, update_encoding: int8}\n"
                    "sites:\n  - {name: a, data: {path: 'builtin:demo/site-0'}}\n")
    with pytest.raises(ConfigError, match="update_encoding"):
        load_config(path)


CONFIG = """
name: lean
seed: 0
rounds: 2
image: {{size: 32, channels: 1}}
train: {{local_steps: 5, batch_size: 32}}
privacy: {{epsilon: 50.0, noise_multiplier: 1.0}}
server: {{min_sites: 2, update_encoding: int8, evaluate_every: 2}}
evaluation: {{ways: 2, shots: 3, queries: 5, episodes: 5}}
sites:
  - name: brain
    data: {{path: {data}/brain_tumor_mri/brain_tumor_mri_64.npz, partition: {{parts: 8, index: 0}}}}
  - name: blood
    data: {{path: {data}/pbc_blood/pbc_blood_5class_28.npz, partition: {{parts: 16, index: 0}}}}
"""


@pytest.mark.slow
def test_int8_federation_sends_a_quarter_and_moves_the_encoder(tmp_path) -> None:
    # Also: with evaluate_every 2, sites are asked for validation accuracy in round 2 only.
    shared_file("brain_tumor_mri/brain_tumor_mri_64.npz")
    path = tmp_path / "lean.yaml"
    path.write_text(CONFIG.format(data=SHARED_DATA))
    config = load_config(path)
    out = tmp_path / "run"
    replies = run_simulation(config, out).replies
    full = payload_bytes({k: np.zeros(s, np.float32) for k, (s, _) in
                          layout_of(build_encoder(config.model, config.image, 0)).items()})
    trained = [r for r in replies if r.metadata.message_type == "train"]
    assert len(trained) == 4
    for reply in trained:
        arrays = arrays_to_numpy(reply.content.array_records["arrays"])
        dtypes = {str(a.dtype) for k, a in arrays.items() if not k.endswith(SCALE_SUFFIX)}
        assert dtypes == {"int8"}
    assert sum(r.metadata.message_type == "evaluate" for r in replies) == 2
    records = RunState(out).read_metrics()
    assert [r["round"] for r in records if r["phase"] == "evaluate"] == [2]
    assert (out / "rounds.csv").exists()
    rounds = [r for r in records if r["phase"] == "train"]
    assert [r["accepted"] for r in rounds] == [2, 2]
    for record in rounds:
        assert record["update_norm"] > 0  # the decoded updates moved the encoder
        for site in record["sites"].values():
            assert site["update_bytes"] <= 0.27 * full
