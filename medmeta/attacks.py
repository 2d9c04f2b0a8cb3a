"""Hostile and broken sites for simulated federations: ClientApp mods that tamper.

Each attack maps ``(global encoder, honest site encoder)`` to what a hostile site
sends instead; :func:`hostile_site` turns one into a Flower ClientApp mod, which
:func:`medmeta.simulate.run_simulation` attaches to chosen sites (``mods=``). The
site trains honestly, then the mod replaces the encoder in its train reply: the
server's real checks and aggregators see exactly what a hostile hospital would send.

- ``sign_flip``: ``theta - k (theta_i - theta)``, the honest update reversed and
  boosted (the "sign-flipping" attack of Damaskinos et al. 2018 / Allen-Zhu et al.
  2021; ``k = 4`` here).
- ``scale``: ``theta + 100 (theta_i - theta)``, a boosted update (Bagdasaryan et al.
  2020, "How to backdoor federated learning").
- ``nan``: every value NaN, as a broken site (a diverged optimiser) would send.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from flwr.app import Context, Message, MessageType

from medmeta.inprocess import Mod
from medmeta_common.protocol import ARRAYS_KEY, CONFIG_KEY
from medmeta_common.wire import arrays_to_numpy, numpy_to_arrays

Attack = Callable[[Mapping[str, np.ndarray], Mapping[str, np.ndarray]], dict[str, np.ndarray]]

SIGN_FLIP_BOOST = 4.0
SCALE_FACTOR = 100.0


def _along_update(factor: float) -> Attack:
    def attack(current: Mapping[str, np.ndarray],
               site: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: (current[k] + factor * (site[k] - current[k])).astype(site[k].dtype)
                for k in site}
    return attack


def nan_update(current: Mapping[str, np.ndarray],
               site: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every value NaN (shapes and dtypes kept)."""
    return {k: np.full_like(v, np.nan) for k, v in site.items()}


ATTACKS: dict[str, Attack] = {
    "sign_flip": _along_update(-SIGN_FLIP_BOOST),
    "scale": _along_update(SCALE_FACTOR),
    "nan": nan_update,
}


def hostile_site(attack: str) -> Mod:
    """A ClientApp mod that sends ``attack``'s output instead of the honest encoder.

    Raises
    ------
    KeyError
        For an unknown attack name.

    """
    if attack not in ATTACKS:
        raise KeyError(f"unknown attack {attack!r}; choose from {', '.join(ATTACKS)}")
    tamper = ATTACKS[attack]

    def mod(msg: Message, context: Context,
            call_next: Callable[[Message, Context], Message]) -> Message:
        reply = call_next(msg, context)
        if msg.metadata.message_type != MessageType.TRAIN or reply.has_error() or \
                ARRAYS_KEY not in reply.content.array_records:
            return reply
        encoding = msg.content.config_records[CONFIG_KEY].get("update-encoding", "float32")
        if encoding != "float32":
            raise ValueError(f"simulated attacks send float32 encoders, not {encoding!r} "
                             "updates")
        current = arrays_to_numpy(msg.content.array_records[ARRAYS_KEY])
        honest = arrays_to_numpy(reply.content.array_records[ARRAYS_KEY])
        reply.content.array_records[ARRAYS_KEY] = numpy_to_arrays(tamper(current, honest))
        return reply

    return mod
