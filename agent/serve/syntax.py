"""The transfer syntax each retrieved instance goes in: what to propose to a destination, and,
given what it accepted, whether an instance goes as the archive holds it, decompressed, or not at
all.

The rule: an instance goes in its own syntax when the destination accepted that syntax for its
SOP class; an uncompressed little-endian instance goes in whichever uncompressed little-endian
syntax was accepted (pynetdicom re-encodes implicit/explicit VR on the way); a losslessly
compressed instance is decompressed to Explicit VR Little Endian when only uncompressed syntaxes
were accepted, which gives the very pixels the modality sent. A lossy one is refused rather than
decoded: its pixels are already not the modality's, and a copy without its compression would
hide that from the next reader. Dirigo never compresses on the way out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from pydicom import uid
from pydicom.dataset import Dataset
from pynetdicom.presentation import PresentationContext, build_context

from agent.serve import codecs

MAX_CONTEXTS = 128
"""Presentation contexts one association may propose (context ids are the odd numbers 1-255)."""

UNCOMPRESSED_LE = (uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian)
UNCOMPRESSED = frozenset(
    {*UNCOMPRESSED_LE, uid.DeflatedExplicitVRLittleEndian, uid.ExplicitVRBigEndian}
)
LOSSLESS = frozenset(
    {
        uid.JPEGLossless,
        uid.JPEGLosslessSV1,
        uid.JPEGLSLossless,
        uid.JPEG2000Lossless,
        uid.HTJ2KLossless,
        uid.HTJ2KLosslessRPCL,
        uid.RLELossless,
    }
)
"""Compressed syntaxes whose decoding gives back exactly the pixels that were encoded."""
LOSSY = frozenset(
    {
        uid.JPEGBaseline8Bit,
        uid.JPEGExtended12Bit,
        uid.JPEGLSNearLossless,
        uid.JPEG2000,
        uid.HTJ2K,
        uid.JPEG2000MC,
        *uid.MPEGTransferSyntaxes,
    }
)
COMMON_COMPRESSED = (
    uid.JPEGLSLossless,
    uid.HTJ2KLossless,
    uid.JPEG2000Lossless,
    uid.JPEGLosslessSV1,
    uid.RLELossless,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEG2000,
    uid.JPEGLossless,
    uid.JPEGLSNearLossless,
)
"""What archives hold most: proposed for each SOP class whose instances' syntaxes are not known
before the association, each in its own context, so that what comes back says exactly which
the destination takes."""

Accepted = Mapping[str, frozenset[str]]
"""The transfer syntaxes a destination accepted for each SOP class (us as the C-STORE SCU)."""


class Action(Enum):
    AS_IS = "as is"
    DECOMPRESS = "decompressed"
    REFUSE = "refused"


@dataclass(frozen=True)
class Delivery:
    """What to do with one instance; `reason` says why it is refused."""

    action: Action
    reason: str = ""


def plan(sop_class: str, source: str, accepted: Accepted) -> Delivery:
    """Return how an instance of `sop_class` held in syntax `source` goes to a destination that
    accepted `accepted`."""
    syntaxes = accepted.get(sop_class, frozenset())
    name = uid.UID(sop_class).name
    if not syntaxes:
        return Delivery(Action.REFUSE, f"the destination did not accept {name}")
    if source in syntaxes:
        return Delivery(Action.AS_IS)
    uncompressed = [s for s in UNCOMPRESSED_LE if s in syntaxes]
    if source in (*UNCOMPRESSED_LE, uid.DeflatedExplicitVRLittleEndian) and uncompressed:
        return Delivery(Action.AS_IS)  # pynetdicom re-encodes between these
    held = uid.UID(source).name
    if source in LOSSLESS and uncompressed:
        return Delivery(Action.DECOMPRESS)
    if source in LOSSY:
        return Delivery(
            Action.REFUSE,
            f"the archive holds it lossy ({held}) and the destination did not accept that for"
            f" {name}; lossy pixels are not re-encoded",
        )
    return Delivery(
        Action.REFUSE, f"the destination accepted neither {held} nor an uncompressed syntax"
    )


def accepted_by(contexts: Iterable[PresentationContext]) -> dict[str, frozenset[str]]:
    """Return the syntaxes accepted per SOP class in which we are the C-STORE SCU."""
    accepted: dict[str, set[str]] = {}
    for context in contexts:
        if context.as_scu and context.abstract_syntax and context.transfer_syntax:
            accepted.setdefault(context.abstract_syntax, set()).add(context.transfer_syntax[0])
    return {sop_class: frozenset(syntaxes) for sop_class, syntaxes in accepted.items()}


def proposals(known: Mapping[str, Sequence[str | None]]) -> list[PresentationContext]:
    """Return the presentation contexts to propose for instances of the SOP classes in `known`
    (each with the syntaxes of its instances, where known): per class one context of the
    uncompressed little-endian syntaxes, one of Implicit VR Little Endian alone where it is
    known or may be, then one context per compressed syntax, the known ones first, then the
    common ones while classes have unknown syntaxes. At most MAX_CONTEXTS: each class gets its
    uncompressed context first, then the rest in turns."""
    queues: list[list[PresentationContext]] = []
    for sop_class, syntaxes in known.items():
        named = [s for s in dict.fromkeys(syntaxes) if s is not None]
        wanted = [s for s in named if s not in UNCOMPRESSED_LE]
        unknown = len(named) < len(syntaxes)  # some instances' syntaxes are unknown
        if unknown:
            wanted += [s for s in COMMON_COMPRESSED if s not in wanted]
        queue = [build_context(sop_class, list(UNCOMPRESSED_LE))]
        if unknown or uid.ImplicitVRLittleEndian in named:
            # in a context of its own too, so that an implicit VR file goes as it is, from
            # its file, to a destination whose choice in the first context was explicit VR
            queue.append(build_context(sop_class, [uid.ImplicitVRLittleEndian]))
        queue += [build_context(sop_class, [syntax]) for syntax in wanted]
        queues.append(queue)
    chosen: list[PresentationContext] = []
    while any(queues) and len(chosen) < MAX_CONTEXTS:
        for queue in queues:
            if queue and len(chosen) < MAX_CONTEXTS:
                chosen.append(queue.pop(0))
    return chosen


def decompress(ds: Dataset) -> None:
    """Decompress `ds` in place to Explicit VR Little Endian, keeping its SOP Instance UID.
    Raise an exception (of pydicom's or a codec's) if no decoder here can."""
    codecs.register()
    ds.decompress(as_rgb=False, generate_instance_uid=False)
