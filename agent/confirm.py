"""Confirmation by content: whether the archive holds what a study part sent, not only its UIDs.

A part is confirmed (and retention may then delete its spool files) only when the archive, asked
over DICOMweb, holds its content:

- QIDO-RS lists every one of the part's SOP Instance UIDs in the study;
- each instance that replaced an earlier version (the same SOP Instance UID received again with
  other content: a correction) is fetched by WADO-RS, as the archive holds it, and the sha256
  of its dataset (the bytes after the File Meta group) must be the one this part sent.

Why not only a listing: for a correction the UID was listed long before, from the old version,
and an archive that keeps the first copy of an instance (Orthanc does by default) would never
hold the new one. Why not QIDO attributes that change with content: no attribute is bound to
change (a corrected pixel or a fixed tag may leave every returned attribute as it was). Why
not a receipt from the ingest: tus ends when the bytes arrive, before anything is ingested,
and the receipt would prove what the ingest says, not what the archive serves. The fetch costs
one instance download per replaced instance; a part of new instances costs one listing.

The sha256 "this part sent" is the bundle's, as its manifest records it (after any lossless
transcoding), or, over STOW-RS or without a bundle, the one recorded at reception.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path

from agent.cloud import CloudError
from agent.dicomweb import DicomWeb
from agent.instance import InvalidInstance, dataset_offset

logger = logging.getLogger(__name__)

SOP_INSTANCE_UID = "00080018"
SERIES_INSTANCE_UID = "0020000E"
_BLOCK = 1024 * 1024


def check_held(
    archive: DicomWeb,
    study_uid: str,
    sent: Mapping[str, str],
    replaced: Collection[str],
    page_size: int,
    scratch: Path,
) -> None:
    """Return if the archive holds the part: it lists every instance of `sent` (SOP Instance
    UID → sha256 of the dataset sent) in the study, and serves each of the `replaced` ones with
    that sha256. Fetched instances go through an unnamed file in the directory `scratch`.

    Raise CloudError, retryable, saying what is missing or differs (the ingest may not have
    caught up yet); CloudError as `DicomWeb` raises it if a request fails.
    """
    series_of = _listed(archive, study_uid, page_size)
    missing = sent.keys() - series_of.keys()
    if missing:
        raise CloudError(
            f"the archive lists {len(sent) - len(missing)} of the part's {len(sent)}"
            " instances so far",
            retryable=True,
        )
    # The first difference settles it: the rest are not fetched again on every retry.
    for uid in sorted(set(replaced) & sent.keys()):
        if archived_sha256(archive, study_uid, series_of[uid], uid, scratch) != sent[uid]:
            raise CloudError(
                f"the archive holds other content than this part sent for {uid} (one of its"
                f" {len(replaced)} replaced instance(s)): the corrected version is not in the"
                " archive yet",
                retryable=True,
            )


def _listed(archive: DicomWeb, study_uid: str, page_size: int) -> dict[str, str]:
    """Return every instance the archive lists in the study: SOP Instance UID → Series UID."""
    found: dict[str, str] = {}
    for page in archive.pages(
        f"studies/{study_uid}/instances",
        [("includefield", SOP_INSTANCE_UID), ("includefield", SERIES_INSTANCE_UID)],
        page_size,
    ):
        for answer in page:
            series = next(iter(_values(answer, SERIES_INSTANCE_UID)), "")
            for uid in _values(answer, SOP_INSTANCE_UID):
                found[uid] = series
    return found


def _values(answer: Mapping[str, object], tag: str) -> list[str]:
    element = answer.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    # DICOM pads values to an even length; the pad is not part of the UID
    return [str(v).strip() for v in values] if isinstance(values, list) else []


def archived_sha256(
    archive: DicomWeb, study: str, series: str, instance: str, scratch: Path
) -> str:
    """Return the sha256 of the dataset of one instance as the archive serves it (WADO-RS, in
    its stored transfer syntax). Raise CloudError if it cannot be fetched or is not a Part-10
    file, OSError if the scratch file cannot be written."""
    with tempfile.TemporaryFile(dir=scratch) as f:
        size = archive.retrieve_instance(study, series, instance, f)
        f.seek(0)
        try:
            offset = dataset_offset(f, size)
        except InvalidInstance as exc:
            raise CloudError(
                f"the archive's copy of {instance} is not a Part-10 file: {exc}", retryable=True
            ) from None
        f.seek(offset)
        digest = hashlib.sha256()
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()
