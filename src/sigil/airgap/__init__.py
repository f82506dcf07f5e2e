"""Air-gapped mirrors: verified archives out (``sigil export``), verified archives in
(``sigil import``).

An archive is an OCI image layout (``oci-layout``, ``index.json``, ``blobs/sha256/``) that
``skopeo copy oci-archive:`` reads, plus one extra manifest in ``index.json`` that carries
sigil's material as blobs: the contents list (what is in the archive and how it hangs
together), the verification report, the policy file and the trust material it names. See
docs/airgap.md.
"""

from sigil.errors import SigilError


class ArchiveError(SigilError):
    """An archive (or its side file) is unusable: damaged, incomplete, unsafe or not ours.

    The message names the archive and the problem; nothing of it has been loaded."""
