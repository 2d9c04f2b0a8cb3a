"""The per-site privacy ledger: what this site has spent, persisted across rounds and runs.

The ledger lives in the site's state directory (``privacy_ledger.json``) and holds the
accountant's full history — ``(noise_multiplier, sample_rate, steps)`` entries — plus
δ, the budget and one line per round. It is rewritten atomically after every round,
*before* the update leaves the site, so a crash can only over-count, never
under-count. A ledger that cannot be read stops training: resetting it would forget
spent privacy. A lock file stops two processes training on one state directory.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medmeta_common.checkpoint import atomic_write_json
from medmeta_common.errors import PrivacyBudgetError
from medmeta_common.privacy.accounting import CONVERSIONS, HistoryEntry, epsilon_of

log = logging.getLogger(__name__)

LEDGER_FILE = "privacy_ledger.json"
LOCK_FILE = "privacy_ledger.lock"
FORMAT_VERSION = 1


@dataclass
class RoundEntry:
    """One round of local training, as recorded in the ledger."""

    round: int
    steps: int
    noise_multiplier: float
    sample_rate: float
    epsilon: float
    time: float
    max_grad_norm: float | None = None


@dataclass
class PrivacyLedger:
    """A site's spent privacy budget. Open with :meth:`open`; never build one by hand.

    Attributes
    ----------
    site : str
        The site's name.
    delta : float
        δ of every ε this ledger reports; fixed when the ledger is created.
    epsilon_budget : float
        Training stops before ε would exceed this.
    unit : str
        The privacy unit (``image``: one record).
    history : list
        Accountant history: ``[noise_multiplier, sample_rate, steps]`` entries.
    rounds : list of RoundEntry
        One entry per round trained.

    """

    path: Path
    site: str
    delta: float
    epsilon_budget: float
    unit: str = "image"
    history: list[HistoryEntry] = field(default_factory=list)
    rounds: list[RoundEntry] = field(default_factory=list)
    calibrated_noise: float | None = None
    accountant: str = "rdp"

    @classmethod
    def open(
        cls, state_dir: Path, *, site: str, delta: float, epsilon_budget: float,
        unit: str = "image", accountant: str = "rdp",
    ) -> PrivacyLedger:
        """Load the ledger of ``state_dir``, or start an empty one.

        Raises
        ------
        PrivacyBudgetError
            When the ledger exists but is unreadable, belongs to another site, or was
            kept with another δ or privacy unit.

        """
        path = Path(state_dir) / LEDGER_FILE
        if not path.exists():
            return cls(path=path, site=site, delta=delta, epsilon_budget=epsilon_budget, unit=unit,
                       accountant=accountant)
        ledger = cls._load(path)
        if ledger.site != site:
            raise PrivacyBudgetError(f"{path}: this ledger belongs to site {ledger.site!r}, not "
                                     f"{site!r}; give each site its own state directory")
        if not math.isclose(ledger.delta, delta, rel_tol=1e-9) or ledger.unit != unit:
            raise PrivacyBudgetError(
                f"{path}: kept with delta={ledger.delta:g}, unit={ledger.unit!r}, but the site "
                f"is now configured with delta={delta:g}, unit={unit!r}. Spent privacy cannot "
                "be carried across these; keep the old settings or start a new state directory "
                "(the old budget stays spent).")
        ledger.epsilon_budget = epsilon_budget
        if ledger.accountant != accountant:
            # The history (σ, q, steps) is all either accountant needs, and both give valid
            # upper bounds: the whole history is accounted again with the one configured.
            log.warning("%s: kept with the %s accountant; from now on the whole history is "
                        "accounted with %s", path, ledger.accountant, accountant)
            ledger.accountant = accountant
        return ledger

    @classmethod
    def _load(cls, path: Path) -> PrivacyLedger:
        try:
            raw: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
            if raw.get("format") != FORMAT_VERSION:
                raise ValueError(f"unknown format {raw.get('format')!r}")
            return cls(
                path=path,
                site=str(raw["site"]),
                delta=float(raw["delta"]),
                epsilon_budget=float(raw["epsilon_budget"]),
                unit=str(raw["unit"]),
                history=[(float(s), float(q), int(n)) for s, q, n in raw["history"]],
                rounds=[RoundEntry(**r) for r in raw["rounds"]],
                calibrated_noise=raw.get("calibrated_noise"),
                # Ledgers of medmeta 0.1 name "rdp", the only accountant it had.
                accountant=str(raw.get("accountant", "rdp")),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PrivacyBudgetError(
                f"{path}: the privacy ledger cannot be read ({type(exc).__name__}: {exc}). "
                "Training is refused: resetting it would forget privacy already spent. "
                "Restore it from a backup.") from None

    @property
    def epsilon(self) -> float:
        """ε spent so far."""
        return epsilon_of(self.history, self.delta, self.accountant)

    @property
    def steps(self) -> int:
        """DP-SGD steps taken so far."""
        return sum(n for _, _, n in self.history)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """ε if ``steps`` more steps were taken with these settings."""
        return epsilon_of([*self.history, (noise_multiplier, sample_rate, steps)], self.delta,
                          self.accountant)

    def record(self, round_number: int, noise_multiplier: float, sample_rate: float,
               steps: int, max_grad_norm: float | None = None) -> float:
        """Add one round's steps, save atomically, and return the new ε."""
        last = self.history[-1] if self.history else None
        if last and last[0] == noise_multiplier and last[1] == sample_rate:
            self.history[-1] = (last[0], last[1], last[2] + steps)
        else:
            self.history.append((noise_multiplier, sample_rate, steps))
        epsilon = self.epsilon
        self.rounds.append(RoundEntry(round_number, steps, noise_multiplier, sample_rate,
                                      epsilon, time.time(), max_grad_norm))
        self.save()
        return epsilon

    def save(self) -> None:
        """Write the ledger atomically."""
        atomic_write_json(self.path, self.to_json())

    def to_json(self) -> dict[str, Any]:
        """The ledger as plain data (what the file holds)."""
        return {
            "format": FORMAT_VERSION,
            "site": self.site,
            "unit": self.unit,
            "accountant": self.accountant,
            "conversion": CONVERSIONS[self.accountant],
            "delta": self.delta,
            "epsilon_budget": self.epsilon_budget,
            "epsilon_spent": self.epsilon,
            "steps": self.steps,
            "history": [list(h) for h in self.history],
            "rounds": [asdict(r) for r in self.rounds],
            "calibrated_noise": self.calibrated_noise,
        }


def read_ledger(path: Path) -> PrivacyLedger:
    """Read a ledger file for reporting (no budget or δ checks)."""
    return PrivacyLedger._load(Path(path))


@contextmanager
def ledger_lock(state_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the site's ledger for the duration of a round."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    with (state_dir / LOCK_FILE).open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PrivacyBudgetError(
                f"{state_dir}: another process is training on this state directory; two "
                "processes must not share one privacy ledger") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
