"""Golden runs: two rounds of fixed, seeded, DP-off federations give a pinned encoder.

Written before the architecture refactor (one round loop, one site round with task
plugins, one privacy family) and kept after it: the refactor must not change a
single bit of what a federation learns. DP is off because DP-SGD draws its sampling
and noise from OS entropy (never reproducible, by design).

The pinned hashes are of the final checkpoint's encoder (every array's name, shape,
dtype and bytes). Floating-point results can differ between CPU instruction sets and
torch builds, so the exact hash is asserted on the reference platform the pins were
made on (``torch`` 2.13.0 on an x86_64 CPU with ``AVX512`` kernels, one thread per
site); elsewhere the test checks a coarse fingerprint (each array's sum and L2 norm
to 4 significant digits) instead, and says so.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from medmeta.simulate import run_simulation
from medmeta_common.checkpoint import load_checkpoint
from medmeta_common.config import load_config
from server.state import RunState
from tests.conftest import SHARED_DATA, shared_file

pytestmark = pytest.mark.slow

REFERENCE_TORCH = "2.13.0+cpu"
REFERENCE_CAPABILITY = "AVX512"

DEMO = """
name: golden-demo
seed: 3
rounds: 2
image: {size: 32, channels: 1}
train: {local_steps: 4, batch_size: 16, lr: 0.05, augment: true}
privacy: {enabled: false}
server: {min_sites: 2, optimizer: momentum, meta_lr: 0.7}
evaluation: {ways: 2, shots: 2, queries: 3, episodes: 3}
runtime: {device: cpu, cpus_per_site: 1}
sites:
  - name: a
    data: {path: "builtin:demo/site-0", split: null}
  - name: b
    data: {path: "builtin:demo/site-1", split: null}
    val_fraction: 0.3
"""

MULTITASK = """
name: golden-multitask
seed: 1
rounds: 2
image: {{size: 32, channels: 1}}
train: {{local_steps: 3, batch_size: 8, lr: 0.05, augment_multiplicity: 2,
         rotation_weight: 0.5}}
privacy: {{enabled: false}}
server: {{min_sites: 3}}
evaluation: {{ways: 2, shots: 2, queries: 3, episodes: 3}}
runtime: {{device: cpu, cpus_per_site: 1}}
sites:
  - name: brain
    data: {{path: {data}/brain_tumor_mri/brain_tumor_mri_64.npz, split: test,
            partition: {{parts: 4, index: 1}}}}
  - name: nuclei
    task: segmentation
    tile: 128
    data: {{path: {data}/segmentation/nuclei, split: null}}
  - name: mr
    task: segmentation
    data: {{path: {data}/segmentation/brain_breast_mr, split: null}}
"""

PINS = {
    "demo": ("a16229d749ec44ad537bc6b30426809a671c7a192cad157ef540800f8776c209",
             "39976a41f2182bbacc57197ed1174e26196531953bdb586498867c1690a3c645"),
    "multitask": ("641baf77159e833c2b25f6306f1d5cced7627362b5dd85c7a65ee9458974332a",
                  "0015b2fc800594e105007013307068a15a87629423634b5886824df345eb3d1c"),
}


def encoder_hash(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        array = state[name].detach().cpu().numpy()
        digest.update(f"{name}:{array.shape}:{array.dtype}:".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def coarse_fingerprint(state: dict[str, torch.Tensor]) -> str:
    parts = []
    for name in sorted(state):
        array = state[name].detach().double()
        parts.append(f"{name}:{float(array.sum()):.4g}:{float(array.norm()):.4g}")
    return hashlib.sha256(";".join(parts).encode()).hexdigest()


def on_reference_platform() -> bool:
    return (torch.__version__ == REFERENCE_TORCH
            and torch.backends.cpu.get_cpu_capability() == REFERENCE_CAPABILITY)


def run_golden(text: str, tmp_path: Path) -> dict[str, torch.Tensor]:
    path = tmp_path / "federation.yaml"
    path.write_text(text)
    out = tmp_path / "run"
    config = load_config(path)
    run_simulation(config, out)
    payload = load_checkpoint(out)
    assert payload["round"] == 2
    train = [r for r in RunState(out).read_metrics() if r["phase"] == "train"]
    assert [r["accepted"] for r in train] == [len(config.sites)] * 2  # every site trained
    return payload["encoder"]


def check(name: str, state: dict[str, torch.Tensor]) -> None:
    exact, coarse = PINS[name]
    found = (encoder_hash(state), coarse_fingerprint(state))
    print(f"golden {name}: {found}")
    if on_reference_platform():
        assert found[0] == exact, f"{name}: the encoder changed: {found}"
    else:
        assert found[1] == coarse, (
            f"{name}: not the reference platform ({torch.__version__}, "
            f"{torch.backends.cpu.get_cpu_capability()}), and the coarse fingerprint "
            f"changed: {found}")


def test_demo_federation_learns_the_pinned_encoder(tmp_path: Path) -> None:
    check("demo", run_golden(DEMO, tmp_path))


def test_multitask_federation_learns_the_pinned_encoder(tmp_path: Path) -> None:
    shared_file("segmentation/nuclei/img2d.tif")
    shared_file("brain_tumor_mri/brain_tumor_mri_64.npz")
    check("multitask", run_golden(MULTITASK.format(data=SHARED_DATA), tmp_path))
