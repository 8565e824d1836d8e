"""Which transfer syntax a retrieved instance goes in (agent.serve.syntax)."""

from __future__ import annotations

import warnings

import numpy as np
import pydicom
import pytest
from pydicom import uid
from pynetdicom.presentation import build_context

from agent.serve.syntax import MAX_CONTEXTS, Action, accepted_by, decompress, plan, proposals
from tests.support import datasets

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
PLAIN = {CT: frozenset({uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian})}
IMPLICIT_ONLY = {CT: frozenset({uid.ImplicitVRLittleEndian})}


def test_an_accepted_syntax_goes_as_it_is() -> None:
    accepted = {CT: frozenset({uid.JPEGLSLossless, uid.ExplicitVRLittleEndian})}
    assert plan(CT, uid.JPEGLSLossless, accepted).action is Action.AS_IS


@pytest.mark.parametrize("source", [uid.ExplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian])
def test_uncompressed_goes_in_any_accepted_uncompressed_syntax(source: str) -> None:
    assert plan(CT, source, IMPLICIT_ONLY).action is Action.AS_IS


@pytest.mark.parametrize(
    "source", [uid.JPEGLSLossless, uid.JPEG2000Lossless, uid.RLELossless, uid.HTJ2KLossless]
)
def test_lossless_is_decompressed_for_an_uncompressed_only_destination(source: str) -> None:
    assert plan(CT, source, PLAIN).action is Action.DECOMPRESS
    assert plan(CT, source, IMPLICIT_ONLY).action is Action.DECOMPRESS


@pytest.mark.parametrize("source", [uid.JPEGBaseline8Bit, uid.JPEG2000, uid.JPEGLSNearLossless])
def test_lossy_is_refused_rather_than_decoded(source: str) -> None:
    delivery = plan(CT, source, PLAIN)
    assert delivery.action is Action.REFUSE
    assert "lossy" in delivery.reason and "CT Image Storage" in delivery.reason


def test_a_class_the_destination_did_not_accept_is_refused() -> None:
    delivery = plan(MR, uid.ExplicitVRLittleEndian, PLAIN)
    assert delivery.action is Action.REFUSE and "did not accept MR Image Storage" in delivery.reason


def test_lossless_to_a_destination_taking_only_another_compression_is_refused() -> None:
    delivery = plan(CT, uid.JPEGLSLossless, {CT: frozenset({uid.JPEG2000Lossless})})
    assert delivery.action is Action.REFUSE and "neither" in delivery.reason


def test_big_endian_without_big_endian_accepted_is_refused() -> None:
    assert plan(CT, uid.ExplicitVRBigEndian, PLAIN).action is Action.REFUSE


def test_accepted_syntaxes_are_read_per_class_for_the_scu_role_only() -> None:
    ours = build_context(CT, uid.JPEGLSLossless)
    ours.result, ours._as_scu, ours._as_scp = 0, True, False
    theirs = build_context(MR, uid.ExplicitVRLittleEndian)
    theirs.result, theirs._as_scu, theirs._as_scp = 0, False, True
    assert accepted_by([ours, theirs]) == {CT: frozenset({uid.JPEGLSLossless})}


def test_proposals_put_known_syntaxes_in_their_own_contexts() -> None:
    contexts = proposals({CT: [uid.JPEGLSLossless, uid.ExplicitVRLittleEndian]})
    syntaxes = [c.transfer_syntax for c in contexts]
    assert syntaxes == [
        [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian],
        [uid.JPEGLSLossless],
    ]


def test_proposals_cover_common_compressions_when_a_syntax_is_unknown() -> None:
    contexts = proposals({CT: [None]})
    proposed = {c.transfer_syntax[0] for c in contexts}
    assert {uid.JPEGBaseline8Bit, uid.JPEGLSLossless, uid.JPEG2000, uid.RLELossless} <= proposed
    assert all(len(c.transfer_syntax) == 1 for c in contexts[1:])


def test_proposals_stay_within_128_contexts_and_give_every_class_uncompressed_first() -> None:
    classes = {f"1.2.840.10008.5.1.4.1.1.{n}": [None] for n in range(1, 60)}
    contexts = proposals(classes)
    assert len(contexts) == MAX_CONTEXTS
    uncompressed = {c.abstract_syntax for c in contexts if len(c.transfer_syntax) == 2}
    assert uncompressed == set(classes)


@pytest.mark.parametrize(
    ("compressed", "reference"),
    [
        ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm"),
        ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),
        ("emri_small_RLE.dcm", "emri_small.dcm"),
        ("US1_J2KR.dcm", "US1_UNCR.dcm"),
    ],
)
def test_decompression_gives_the_very_pixels_and_keeps_the_instance_uid(
    compressed: str, reference: str
) -> None:
    data = datasets.pydicom_data_dir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(data / compressed)
        original_uid = ds.SOPInstanceUID
        decompress(ds)
        expected = pydicom.dcmread(data / reference).pixel_array
    assert ds.file_meta.TransferSyntaxUID == uid.ExplicitVRLittleEndian
    assert ds.SOPInstanceUID == original_uid
    assert np.array_equal(ds.pixel_array, expected)


def test_implicit_vr_gets_a_context_of_its_own_where_an_instance_may_be_held_in_it() -> None:
    for known in ([uid.ImplicitVRLittleEndian], [None]):
        contexts = proposals({CT: known})
        assert [uid.ImplicitVRLittleEndian] in [c.transfer_syntax for c in contexts[1:]]
    explicit_only = proposals({CT: [uid.ExplicitVRLittleEndian]})
    assert [c.transfer_syntax for c in explicit_only] == [
        [uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian]
    ]
