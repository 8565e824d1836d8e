"""Peer admission and the service each presentation context gives a peer."""

from __future__ import annotations

import pytest
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    Verification,
)

from agent.config import Peer
from agent.dicom import PeerPolicy, offered, service_of


def negotiated(sop_class: str, as_scu: bool, as_scp: bool) -> PresentationContext:
    context = build_context(sop_class)
    context._as_scu, context._as_scp = as_scu, as_scp  # as negotiation leaves them
    return context


def test_an_admitted_peer_gets_its_own_services_and_an_unknown_caller_store_and_echo() -> None:
    peers = [
        Peer(ae_title="PACS", host="127.0.0.1"),
        Peer(ae_title="VIEWER", host="127.0.0.1", services=["find", "get"]),
        Peer(ae_title="CT1"),
    ]
    policy = PeerPolicy(peers, accept_unknown=True)
    assert policy.admit("PACS ", "127.0.0.1").services == {"store", "echo", "find", "get", "move"}
    assert policy.admit("VIEWER", "127.0.0.1").services == {"find", "get"}
    assert policy.admit("CT1", "10.1.2.3").services == {"store", "echo"}
    assert policy.admit("STRANGER", "10.1.2.3").services == {"store", "echo"}
    refused = PeerPolicy(peers, accept_unknown=False).admit("VIEWER", "10.1.2.3")
    assert (refused.accepted, refused.services) == (False, frozenset())


@pytest.mark.parametrize(
    ("sop_class", "as_scu", "as_scp", "service"),
    [
        (Verification, False, True, "echo"),
        (StudyRootQueryRetrieveInformationModelFind, False, True, "find"),
        (PatientRootQueryRetrieveInformationModelMove, False, True, "move"),
        (StudyRootQueryRetrieveInformationModelGet, False, True, "get"),
        (CTImageStorage, True, True, "store"),  # no role selection: the peer sends to us
        (CTImageStorage, True, False, "get"),  # the peer took the SCP role: a C-GET's way back
        ("1.2.840.113619.4.2", True, True, "store"),  # a private storage class
    ],
)
def test_each_negotiated_context_gives_one_service(
    sop_class: str, as_scu: bool, as_scp: bool, service: str
) -> None:
    assert service_of(negotiated(sop_class, as_scu, as_scp)) == service


@pytest.mark.parametrize(
    ("abstract_syntax", "is_offered"),
    [
        (Verification, True),
        (StudyRootQueryRetrieveInformationModelFind, True),
        (CTImageStorage, True),
        ("1.2.840.10008.5.1.4.39.1", True),  # Color Palette Storage (a non-patient storage class)
        ("1.2.840.113619.4.2", True),  # a private storage class
        ("1.2.840.10008.5.1.4.1.1.9999", True),  # a standard UID pynetdicom does not know yet
        ("1.2.840.10008.5.1.4.31", False),  # Modality Worklist FIND
        ("1.2.840.10008.5.1.4.39.2", False),  # Color Palette Q/R FIND
        ("1.2.840.10008.5.1.4.39.4", False),  # Color Palette Q/R GET
        ("1.2.840.10008.1.20.1", False),  # Storage Commitment Push
    ],
)
def test_a_sop_class_of_a_service_dirigo_does_not_offer_is_not_offered_as_storage(
    abstract_syntax: str, is_offered: bool
) -> None:
    assert offered(abstract_syntax) is is_offered


def test_a_peer_marked_tls_is_admitted_over_tls_only_and_told_why_not() -> None:
    peers = [Peer(ae_title="PACS", host="127.0.0.1", tls=True), Peer(ae_title="CT1")]
    policy = PeerPolicy(peers, accept_unknown=True)
    assert policy.admit("PACS", "127.0.0.1", tls=True).accepted
    plain = policy.admit("PACS", "127.0.0.1", tls=False)
    assert not plain.accepted
    assert "marked tls in dicom.peers and called the plain port" in plain.reason
    # a peer without the mark, and an unknown caller, may use either port
    assert policy.admit("CT1", "10.1.2.3", tls=False).accepted
    assert policy.admit("CT1", "10.1.2.3", tls=True).accepted
    assert policy.admit("STRANGER", "10.1.2.3", tls=True).accepted
