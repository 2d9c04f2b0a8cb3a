"""Signed app releases: the Ed25519 release key, the signature statement, the bundle.

A *release* is one Flower app bundle (FAB, a zip of the app's code) and a signature
statement over its SHA-256 made with the consortium's release key. The operator (or
the consortium's release manager) makes both with ``medmeta release sign``; each
hospital's site checks them against its own policy (``app:`` in site.yaml) before it
imports anything from the bundle (:mod:`client.app_runner`).

- :mod:`.keys`: make, read and name Ed25519 release keys;
- :mod:`.statement`: what is signed, the ``.sig`` file, the run-config form;
- :mod:`.bundle`: build, read, stage a bundle without running any of its code.
"""

from medmeta_common.errors import MedmetaError


class ReleaseError(MedmetaError):
    """A release key, bundle or signature cannot be made, read or used."""

    exit_code = 8
