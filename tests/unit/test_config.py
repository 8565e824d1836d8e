"""Configuration: every rule, every problem reported at once, each naming its key."""

from __future__ import annotations

import contextlib
import copy
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from agent.config import (
    CloudSettings,
    ConfigError,
    Settings,
    load_config,
    parse_config,
    parse_duration,
    parse_size,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "conf.example.yaml"
JARGON = ("Input should", "type=", "pydantic", "errors.pydantic.dev", "Value error")


def minimal(**overrides: object) -> dict[str, Any]:
    """Return the smallest valid configuration, with dotted keys (`dicom.port`) overridden."""
    data: dict[str, Any] = {"site": "hospital-a", "cloud": {"upload_url": "https://x.example/"}}
    for dotted, value in overrides.items():
        *parents, key = dotted.split("__")
        node = data
        for parent in parents:
            node = node.setdefault(parent, {})
        node[key] = value
    return data


def problems(data: object) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    return caught.value.problems


def only_problem(data: object) -> str:
    found = problems(data)
    assert len(found) == 1, found
    return found[0]


def write(tmp_path: Path, text: str, name: str = "dirigo.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def model_paths(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Yield the key path of every field of `model` and of the models inside it."""
    for name, field in model.model_fields.items():
        path = (*prefix, name)
        yield path
        for candidate in (field.annotation, *get_args(field.annotation)):
            is_class = isinstance(candidate, type) and get_origin(candidate) is None
            if is_class and issubclass(candidate, BaseModel):
                yield from model_paths(candidate, path)


def lookup(data: Any, path: tuple[str, ...]) -> Any:
    """Follow `path` through mappings, taking the first item of any list on the way."""
    for key in path:
        if isinstance(data, list):
            data = data[0]
        assert isinstance(data, dict) and key in data, ".".join(path)
        data = data[key]
    return data


# --- the example file -----------------------------------------------------------------------------


def test_example_config_is_valid() -> None:
    settings = load_config(EXAMPLE)
    assert settings.site == "hospital-a"
    assert settings.data_dir == Path("/var/lib/dirigo")
    assert settings.cloud.upload_url == "https://exchange.example/files/"
    assert settings.dicom.peers[0].ae_title == "PACS"
    assert (settings.dicom.peers[0].host, settings.dicom.peers[0].port) == ("127.0.0.1", 4242)


def test_example_config_sets_every_key_of_every_model() -> None:
    data = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    for path in model_paths(Settings):
        lookup(data, path)


def test_example_config_comments_every_key() -> None:
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines):
        if re.match(r"\s*(- )?\w+:", line):
            assert lines[number - 1].strip().startswith("#"), f"line {number + 1}: {line}"


def test_defaults_apply_when_sections_are_left_out() -> None:
    settings = parse_config(minimal())
    assert settings.data_dir == Path("/var/lib/dirigo")
    assert settings.log_level == "info"
    assert settings.dicom.ae_title == "DIRIGO"
    assert (settings.dicom.bind, settings.dicom.port) == ("0.0.0.0", 11112)
    assert settings.dicom.max_associations == 10
    assert settings.dicom.max_pdu == 1024 * 1024
    assert (settings.dicom.acse_timeout, settings.dicom.dimse_timeout) == (30.0, 60.0)
    assert settings.dicom.network_timeout == 120.0
    assert settings.dicom.peers == ()
    assert settings.dicom.accept_unknown_peers is False
    assert settings.study.stable_after == 60.0
    assert settings.spool.high_water == 90.0
    assert settings.cloud.dicomweb_url is None


def test_a_section_with_every_line_commented_out_means_defaults() -> None:
    emptied = parse_config(minimal(dicom=None, study=None, spool=None))
    assert emptied == parse_config(minimal())


def test_settings_are_frozen() -> None:
    settings = parse_config(minimal())
    with pytest.raises(ValidationError):
        settings.site = "other"


# --- problems, reported all at once ---------------------------------------------------------------


def test_port_out_of_range_names_the_key() -> None:
    message = only_problem(minimal(dicom__port=70000))
    assert message == "At 'dicom.port': 70000 is not a valid port (1-65535)"


def test_several_problems_in_one_file_are_all_reported_at_once() -> None:
    data = minimal(
        dicom__port=0,
        dicom__prot=1,
        dicom__peers=[{"ae_title": "PACS"}, {"ae_title": "PACS", "port": "x"}],
        study__stable_after="5 minutes",
        spool__high_water=0,
    )
    del data["site"]
    found = problems(data)
    assert found == [
        "At 'site': required",
        "At 'dicom.port': 0 is not a valid port (1-65535)",
        "At 'dicom.peers[1].port': 'x' is not a valid port (1-65535)",
        "At 'dicom.peers[1].ae_title': duplicate AE title 'PACS'",
        "At 'dicom.prot': unknown key (did you mean 'port'?)",
        "At 'study.stable_after': '5 minutes' is not a duration (use e.g. 90s, 5m, 2h)",
        "At 'spool.high_water': 0 is not a valid percentage (1% to 100%)",
    ]


def test_unknown_key_suggests_the_closest_known_key() -> None:
    message = only_problem(minimal(dicom__prot=11112))
    assert message == "At 'dicom.prot': unknown key (did you mean 'port'?)"


def test_unknown_key_in_the_wrong_section_names_where_it_belongs() -> None:
    message = only_problem(minimal(stable_after="60s"))
    assert message == "At 'stable_after': unknown key (did you mean 'study.stable_after'?)"


def test_unknown_dotted_key_asks_for_nesting() -> None:
    message = only_problem(minimal(**{"dicom.port": 11112}))
    assert (
        message == "At 'dicom.port': unknown key (write 'dicom.port' as nested keys, one per line)"
    )


def test_unknown_key_without_a_close_match_says_only_unknown() -> None:
    assert only_problem(minimal(timezone="UTC")) == "At 'timezone': unknown key"


def test_a_key_that_is_not_text_is_unknown() -> None:
    data: dict[object, object] = {1: "x", None: "y"}
    data.update(minimal())
    assert problems(data) == ["At '1': unknown key", "At 'null': unknown key"]


@pytest.mark.parametrize("key", ["site", "cloud"])
def test_missing_required_key_says_required(key: str) -> None:
    data = minimal()
    del data[key]
    assert only_problem(data) == f"At '{key}': required"


def test_missing_upload_url_names_its_full_path() -> None:
    assert only_problem(minimal(cloud={})) == "At 'cloud.upload_url': required"


def test_an_empty_value_says_no_value_given() -> None:
    assert only_problem(minimal(dicom__port=None)) == "At 'dicom.port': no value given"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (minimal(dicom=5), "At 'dicom': expected a mapping of keys, not 5"),
        (minimal(study=["60s"]), "At 'study': expected a mapping of keys, not a list"),
        (minimal(dicom__peers="PACS"), "At 'dicom.peers': expected a list, not 'PACS'"),
        (
            minimal(dicom__peers=["PACS"]),
            "At 'dicom.peers[0]': expected a mapping of keys, not 'PACS'",
        ),
    ],
)
def test_wrong_shape_names_the_key(data: dict[str, Any], expected: str) -> None:
    assert only_problem(data) == expected


def test_problems_name_a_key_once_each_on_one_line() -> None:
    message = only_problem(minimal(**{"bad\nkey": 1}))
    assert message == "At 'bad\\nkey': unknown key"


def test_str_of_the_error_prefixes_every_problem_with_the_source() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(minimal(dicom__port=0, spool__high_water=0), source="site.yaml")
    lines = str(caught.value).splitlines()
    assert len(lines) == 2
    assert all(line.startswith("site.yaml: At '") for line in lines)


# --- each value's rules ---------------------------------------------------------------------------


@pytest.mark.parametrize("site", ["hospital-a", "h", "st.mary_1", "a" * 64, "0day"])
def test_site_accepts_lowercase_ids(site: str) -> None:
    assert parse_config(minimal(site=site)).site == site


@pytest.mark.parametrize("site", ["", "a" * 65, "has space", "-lead", ".hidden", "é", "a/b"])
def test_site_rejects_other_ids(site: str) -> None:
    message = only_problem(minimal(site=site))
    assert message.startswith("At 'site': '") and "is not a valid site id" in message


def test_site_with_capitals_suggests_the_lowercase_id() -> None:
    assert only_problem(minimal(site="Hospital-A")).endswith("; did you mean 'hospital-a'?)")


def test_site_read_as_a_number_asks_for_quotes() -> None:
    assert only_problem(minimal(site=2024)) == "At 'site': 2024 is not a site id (put it in quotes)"


@pytest.mark.parametrize(
    ("given", "kept"),
    [("DIRIGO", "DIRIGO"), ("  PACS  ", "PACS"), ("A" * 16, "A" * 16), ("MY AE-1.x", "MY AE-1.x")],
)
def test_ae_title_is_kept_without_surrounding_spaces(given: str, kept: str) -> None:
    assert parse_config(minimal(dicom__ae_title=given)).dicom.ae_title == kept


@pytest.mark.parametrize(
    ("title", "reason"),
    [
        ("", "an AE title must not be empty or only spaces"),
        ("    ", "an AE title must not be empty or only spaces"),
        ("A" * 17, "'AAAAAAAAAAAAAAAAA' is too long for an AE title (17 > 16 characters)"),
        ("BACK\\SLASH", "'BACK\\\\SLASH' is not a valid AE title (printable ASCII, no backslash)"),
        ("TAB\tAE", "'TAB\\tAE' is not a valid AE title (printable ASCII, no backslash)"),
        ("ÉCOLE", "'ÉCOLE' is not a valid AE title (printable ASCII, no backslash)"),
    ],
)
def test_ae_title_rules_name_the_key(title: str, reason: str) -> None:
    assert only_problem(minimal(dicom__ae_title=title)) == f"At 'dicom.ae_title': {reason}"


def test_ae_title_that_yaml_read_as_a_boolean_explains_the_quotes() -> None:
    message = only_problem(
        yaml.safe_load("site: a\ncloud: {upload_url: 'http://x'}\ndicom: {ae_title: NO}")
    )
    assert message == (
        "At 'dicom.ae_title': false is not an AE title "
        "(YAML reads yes/no/on/off as true/false; put the value in quotes)"
    )


@pytest.mark.parametrize(
    ("given", "kept"), [("0.0.0.0", "0.0.0.0"), ("::", "::"), ("0:0::1", "::1")]
)
def test_bind_accepts_ip_address_literals(given: str, kept: str) -> None:
    assert parse_config(minimal(dicom__bind=given)).dicom.bind == kept


@pytest.mark.parametrize("bind", ["localhost", "256.0.0.1", "", "0.0.0.0:11112"])
def test_bind_rejects_anything_but_an_ip_address(bind: str) -> None:
    assert only_problem(minimal(dicom__bind=bind)).startswith(
        f"At 'dicom.bind': {bind!r} is not an IP address"
    )


@pytest.mark.parametrize("port", [1, 11112, 65535, "104"])
def test_port_accepts_1_to_65535(port: int | str) -> None:
    assert parse_config(minimal(dicom__port=port)).dicom.port == int(port)


@pytest.mark.parametrize("port", [0, -1, 65536, True, 104.5, "http", [104]])
def test_port_rejects_anything_else(port: object) -> None:
    assert only_problem(minimal(dicom__port=port)).endswith("is not a valid port (1-65535)")


@pytest.mark.parametrize(("count", "valid"), [(1, True), (1000, True), (0, False), (1001, False)])
def test_max_associations_is_1_to_1000(count: int, valid: bool) -> None:
    data = minimal(dicom__max_associations=count)
    if valid:
        assert parse_config(data).dicom.max_associations == count
    else:
        expected = (
            f"At 'dicom.max_associations': {count} is not a valid number of associations (1-1000)"
        )
        assert only_problem(data) == expected


@pytest.mark.parametrize(
    ("size", "expected"),
    [(0, 0), (4096, 4096), ("16KiB", 16384), ("4GiB", None), (2**32 - 1, 2**32 - 1)],
)
def test_max_pdu_is_unlimited_or_4096_to_32_bits(size: object, expected: int | None) -> None:
    data = minimal(dicom__max_pdu=size)
    if expected is None:
        assert "is not a valid PDU size (0 for unlimited" in only_problem(data)
    else:
        assert parse_config(data).dicom.max_pdu == expected


@pytest.mark.parametrize("size", [4095, "1KiB", 2**32])
def test_max_pdu_out_of_range_names_the_key(size: object) -> None:
    assert only_problem(minimal(dicom__max_pdu=size)).startswith("At 'dicom.max_pdu': ")


@pytest.mark.parametrize("key", ["acse_timeout", "dimse_timeout", "network_timeout"])
def test_timeouts_must_be_more_than_zero(key: str) -> None:
    message = only_problem(minimal(**{f"dicom__{key}": "0s"}))
    assert message == f"At 'dicom.{key}': '0s' is too short (more than 0s)"


def test_timeouts_accept_fractions_of_a_second() -> None:
    assert parse_config(minimal(dicom__acse_timeout="250ms")).dicom.acse_timeout == 0.25


def test_durations_longer_than_a_year_are_rejected() -> None:
    message = only_problem(minimal(dicom__network_timeout="366d"))
    assert message == "At 'dicom.network_timeout': '366d' is too long (at most 1y)"


def test_stable_after_must_be_at_least_one_second() -> None:
    assert parse_config(minimal(study__stable_after="1s")).study.stable_after == 1.0
    message = only_problem(minimal(study__stable_after="999ms"))
    assert message == "At 'study.stable_after': '999ms' is too short (at least 1s)"


def test_bad_duration_names_the_key_and_the_forms() -> None:
    message = only_problem(minimal(study__stable_after="5 minutes"))
    assert (
        message == "At 'study.stable_after': '5 minutes' is not a duration (use e.g. 90s, 5m, 2h)"
    )


@pytest.mark.parametrize(
    ("given", "percent"), [("90%", 90.0), (90, 90.0), ("85.5 %", 85.5), (100, 100.0), ("1", 1.0)]
)
def test_high_water_accepts_a_percentage(given: object, percent: float) -> None:
    assert parse_config(minimal(spool__high_water=given)).spool.high_water == percent


@pytest.mark.parametrize("given", [0, "0%", 0.5, 101, "101%", "ninety", "-5%", True, float("nan")])
def test_high_water_rejects_anything_outside_1_to_100(given: object) -> None:
    assert only_problem(minimal(spool__high_water=given)).endswith(
        "is not a valid percentage (1% to 100%)"
    )


@pytest.mark.parametrize("flag", [True, False])
def test_accept_unknown_peers_takes_a_yaml_boolean(flag: bool) -> None:
    assert (
        parse_config(minimal(dicom__accept_unknown_peers=flag)).dicom.accept_unknown_peers is flag
    )


@pytest.mark.parametrize(
    ("given", "reason"),
    [
        ("yes please", "'yes please' is not true or false"),
        ("true", "'true' is not true or false (write it without quotes)"),
        (1, "1 is not true or false"),
    ],
)
def test_accept_unknown_peers_rejects_anything_but_a_boolean(given: object, reason: str) -> None:
    assert (
        only_problem(minimal(dicom__accept_unknown_peers=given))
        == f"At 'dicom.accept_unknown_peers': {reason}"
    )


@pytest.mark.parametrize(
    ("given", "level"), [("debug", "debug"), ("WARNING", "warning"), ("error", "error")]
)
def test_log_level_accepts_the_four_levels(given: str, level: str) -> None:
    assert parse_config(minimal(log_level=given)).log_level == level


def test_log_level_typo_suggests_the_level() -> None:
    message = only_problem(minimal(log_level="warn"))
    assert message == (
        "At 'log_level': 'warn' is not a log level "
        "(debug, info, warning or error; did you mean 'warning'?)"
    )


@pytest.mark.parametrize(
    "url", ["https://exchange.example/files/", "http://127.0.0.1:1080/files", "https://[::1]/x"]
)
def test_cloud_urls_accept_http_and_https(url: str) -> None:
    cloud = parse_config(minimal(cloud={"upload_url": url, "dicomweb_url": url})).cloud
    assert (cloud.upload_url, cloud.dicomweb_url) == (url, url)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://exchange.example/",
        "exchange.example/files",
        "https://",
        "https:///path",
        "http://a b/",
        "http://[::1/",
    ],
)
@pytest.mark.parametrize("key", ["upload_url", "dicomweb_url"])
def test_cloud_urls_reject_other_urls(url: str, key: str) -> None:
    message = only_problem(minimal(**{f"cloud__{key}": url}))
    assert message == f"At 'cloud.{key}': {url!r} is not an http:// or https:// URL with a host"


def test_cloud_url_with_a_bad_port_says_so() -> None:
    message = only_problem(minimal(cloud__upload_url="https://x.example:99999/"))
    assert (
        message == "At 'cloud.upload_url': 'https://x.example:99999/' has an invalid port (1-65535)"
    )


def test_dicomweb_url_is_optional() -> None:
    assert parse_config(minimal(cloud__dicomweb_url=None)).cloud.dicomweb_url is None


def test_a_plain_http_cloud_url_is_a_warning_naming_its_key_and_https_is_none() -> None:
    settings = parse_config(
        minimal(cloud={"upload_url": "http://u:pw@x.example/files/", "dicomweb_url": "https://y/"})
    )
    (warning,) = settings.warnings()
    assert warning.startswith("At 'cloud.upload_url': http://u:***@x.example/files/ is plain http")
    secure = parse_config(minimal(cloud__dicomweb_url="https://y.example/dicom-web"))
    assert secure.warnings() == []


# --- peers ----------------------------------------------------------------------------------------


def test_peers_keep_host_and_port() -> None:
    peers = [{"ae_title": "PACS", "host": "pacs.hospital.local", "port": 104}, {"ae_title": "CT1"}]
    found = parse_config(minimal(dicom__peers=peers)).dicom.peers
    assert [(p.ae_title, p.host, p.port) for p in found] == [
        ("PACS", "pacs.hospital.local", 104),
        ("CT1", None, None),
    ]


def test_peer_services_default_to_all_with_a_host_and_to_store_and_echo_without() -> None:
    peers = [{"ae_title": "PACS", "host": "pacs.hospital.local"}, {"ae_title": "CT1"}]
    found = parse_config(minimal(dicom__peers=peers)).dicom.peers
    assert [p.services for p in found] == [
        ("store", "echo", "find", "get", "move"),
        ("store", "echo"),
    ]


def test_peer_services_are_kept_as_given_without_repeats_and_may_be_empty() -> None:
    peers = [
        {"ae_title": "VIEWER", "services": ["Find", "get", "find"]},
        {"ae_title": "DEST", "host": "10.0.0.9", "services": []},
    ]
    found = parse_config(minimal(dicom__peers=peers)).dicom.peers
    assert [p.services for p in found] == [("find", "get"), ()]


@pytest.mark.parametrize(
    ("given", "reason"),
    [
        (["store", "stor"], "'stor' is not a service (store, echo, find, get, move; did you mean"),
        ("store", "'store' is not a list of services"),
        ([1], "1 is not a service (put it in quotes)"),
    ],
)
def test_peer_services_name_the_bad_one(given: object, reason: str) -> None:
    message = only_problem(minimal(dicom__peers=[{"ae_title": "PACS", "services": given}]))
    assert message.startswith(f"At 'dicom.peers[0].services': {reason}")


def test_peers_admitted_on_their_ae_title_alone_are_warnings_naming_their_keys() -> None:
    peers = [{"ae_title": "PACS", "host": "10.0.0.9"}, {"ae_title": "CT1"}]
    settings = parse_config(minimal(dicom__peers=peers, dicom__accept_unknown_peers=True))
    assert settings.warnings() == [
        "At 'dicom.peers[1]': 'CT1' has no host, so any machine calling as this AE title is"
        " admitted (to store, echo); set its host",
        "At 'dicom.accept_unknown_peers': any AE title from any address is admitted (to store,"
        " echo); list the senders in dicom.peers instead",
    ]
    assert parse_config(minimal(dicom__peers=peers[:1])).warnings() == []


# --- DICOM TLS ------------------------------------------------------------------------------------

TLS = {"port": 2762, "cert": "/etc/dirigo/dicom.pem", "key": "/etc/dirigo/dicom.key"}


def test_tls_is_off_by_default_and_peers_are_plain() -> None:
    settings = parse_config(minimal(dicom__peers=[{"ae_title": "PACS"}]))
    assert settings.dicom.tls is None
    assert settings.dicom.peers[0].tls is False


def test_tls_keeps_its_files_and_requires_client_certificates_by_default() -> None:
    tls = {**TLS, "ca": "/etc/dirigo/ca.pem"}
    peers = [{"ae_title": "PACS", "host": "10.0.0.9", "port": 104, "tls": True}]
    settings = parse_config(minimal(dicom__tls=tls, dicom__peers=peers))
    assert settings.dicom.tls is not None
    assert settings.dicom.tls.port == 2762
    assert settings.dicom.tls.cert == Path("/etc/dirigo/dicom.pem")
    assert settings.dicom.tls.ca == Path("/etc/dirigo/ca.pem")
    assert settings.dicom.tls.require_client_cert is True
    assert settings.dicom.peers[0].tls is True
    assert parse_config(settings.redacted()) == settings


def test_tls_files_are_taken_from_the_config_files_directory(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    tls = {"port": 2762, "cert": "dicom.pem", "require_client_cert": False}
    config.write_text(yaml.safe_dump(minimal(dicom__tls=tls)))
    found = load_config(config).dicom.tls
    assert found is not None and found.cert == tmp_path / "dicom.pem"


def test_tls_problems_are_reported_together_each_at_its_key() -> None:
    peers = [{"ae_title": "PACS", "tls": True}, {"ae_title": "CT1", "tls": "yes"}]
    tls = {"port": 11112, "cert": "/etc/dirigo/dicom.pem"}
    assert problems(minimal(dicom__tls=tls, dicom__peers=peers)) == [
        "At 'dicom.peers[1].tls': 'yes' is not true or false",
        "At 'dicom.tls.ca': required while 'require_client_cert' is true: client certificates"
        " are checked against it (set require_client_cert: false to admit TLS clients without"
        " one)",
        "At 'dicom.peers[0].tls': the peer is marked tls but dicom.tls.ca is not set: it is what"
        " the peer's certificate is checked against",
        "At 'dicom.tls.port': 11112 is dicom.port too; the TLS port needs a port of its own",
    ]


def test_a_peer_marked_tls_needs_the_tls_section() -> None:
    message = only_problem(minimal(dicom__peers=[{"ae_title": "PACS", "tls": True}]))
    assert message.startswith("At 'dicom.peers[0].tls': the peer is marked tls but dicom.tls is")


def test_tls_needs_its_port_and_certificate() -> None:
    assert problems(minimal(dicom__tls={"require_client_cert": False})) == [
        "At 'dicom.tls.port': required",
        "At 'dicom.tls.cert': required",
    ]


def test_the_tls_private_key_is_a_secret_file(tmp_path: Path) -> None:
    key = tmp_path / "dicom.key"
    key.write_text("secret")
    key.chmod(0o644)
    tls = {"port": 2762, "cert": str(tmp_path / "dicom.pem"), "key": str(key), "ca": "/c.pem"}
    (finding,) = parse_config(minimal(dicom__tls=tls)).exposed_secret_files()
    assert finding.startswith(f"At 'dicom.tls.key': {key} is readable by its group or by others")


def test_duplicate_peer_ae_title_names_the_second_entry() -> None:
    message = only_problem(minimal(dicom__peers=[{"ae_title": "PACS"}, {"ae_title": "PACS "}]))
    assert message == "At 'dicom.peers[1].ae_title': duplicate AE title 'PACS'"


def test_every_duplicate_peer_ae_title_is_reported() -> None:
    peers = [{"ae_title": title} for title in ("A", "B", "A", "B", "A")]
    assert [p.split(":")[0] for p in problems(minimal(dicom__peers=peers))] == [
        "At 'dicom.peers[2].ae_title'",
        "At 'dicom.peers[3].ae_title'",
        "At 'dicom.peers[4].ae_title'",
    ]


def test_peer_ae_titles_differing_in_case_are_distinct() -> None:
    peers = [{"ae_title": "pacs"}, {"ae_title": "PACS"}]
    assert len(parse_config(minimal(dicom__peers=peers)).dicom.peers) == 2


def test_peer_without_ae_title_is_required() -> None:
    assert (
        only_problem(minimal(dicom__peers=[{"host": "10.0.0.1"}]))
        == "At 'dicom.peers[0].ae_title': required"
    )


@pytest.mark.parametrize(
    ("host", "kept"),
    [("10.1.2.3", "10.1.2.3"), ("pacs-1.example", "pacs-1.example"), ("::1", "::1")],
)
def test_peer_host_accepts_names_and_addresses(host: str, kept: str) -> None:
    peers = [{"ae_title": "PACS", "host": host}]
    assert parse_config(minimal(dicom__peers=peers)).dicom.peers[0].host == kept


@pytest.mark.parametrize("host", ["", "bad host", "-lead.example", "a..b", "x" * 64 + ".example"])
def test_peer_host_rejects_other_text(host: str) -> None:
    message = only_problem(minimal(dicom__peers=[{"ae_title": "PACS", "host": host}]))
    assert message.startswith("At 'dicom.peers[0].host': '")
    assert message.endswith("' is not a host name or IP address")


def test_peer_host_with_a_port_points_to_the_port_key() -> None:
    message = only_problem(minimal(dicom__peers=[{"ae_title": "PACS", "host": "10.0.0.1:104"}]))
    assert message.endswith("(give the port in 'port')")


def test_peer_port_out_of_range_names_the_peer() -> None:
    message = only_problem(minimal(dicom__peers=[{"ae_title": "PACS", "port": 0}]))
    assert message == "At 'dicom.peers[0].port': 0 is not a valid port (1-65535)"


def test_empty_peers_means_none() -> None:
    assert parse_config(minimal(dicom__peers=None)).dicom.peers == ()


# --- data_dir -------------------------------------------------------------------------------------


def test_relative_data_dir_is_taken_from_the_config_files_directory(tmp_path: Path) -> None:
    path = write(tmp_path, "site: a\ndata_dir: spool/../data\ncloud: {upload_url: 'https://x/'}\n")
    assert load_config(path).data_dir == tmp_path / "data"


def test_relative_data_dir_without_a_file_is_rejected() -> None:
    message = only_problem(minimal(data_dir="data"))
    assert message == "At 'data_dir': 'data' is relative; give an absolute path"


def test_data_dir_with_a_tilde_is_rejected() -> None:
    message = only_problem(minimal(data_dir="~/dirigo"))
    assert message == "At 'data_dir': '~/dirigo': '~' is not expanded here; give an absolute path"


# --- reading the file -----------------------------------------------------------------------------


def test_missing_file_gives_one_clear_message(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "absent.yaml")
    assert caught.value.problems == ["the file does not exist"]
    assert str(caught.value) == f"{tmp_path / 'absent.yaml'}: the file does not exist"


def test_directory_instead_of_a_file_gives_one_clear_message(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert caught.value.problems == ["this is a directory, not a file"]


def test_unreadable_file_gives_one_clear_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # chmod does not stop root, so the refusal is simulated where the file is read
    def refuse(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "dirigo.yaml")
    assert caught.value.problems == ["cannot read the file: Permission denied"]


def test_file_that_is_not_utf8_gives_one_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "dirigo.yaml"
    path.write_bytes(b"site: h\xf4pital\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == ["not UTF-8 text (byte 0xf4 at offset 7)"]


@pytest.mark.parametrize("text", ["", "\n\n", "# nothing but comments\n", "---\n"])
def test_empty_file_gives_one_clear_message(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert caught.value.problems == [
        "the configuration is empty; it needs at least 'site' and 'cloud'"
    ]


@pytest.mark.parametrize(
    ("text", "shown"), [("- site: a\n", "a list"), ("hospital-a\n", "'hospital-a'"), ("42\n", "42")]
)
def test_top_level_that_is_not_a_mapping_gives_one_clear_message(
    tmp_path: Path, text: str, shown: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert caught.value.problems == [
        f"the top level must be a mapping of keys such as 'site:', not {shown}"
    ]


def test_yaml_syntax_error_names_the_file_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "site: a\ncloud:\n  upload_url: https://x/\n   dicomweb_url: oops: no\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [
        "At line 4, column 16: YAML syntax error: mapping values are not allowed here"
    ]
    assert str(caught.value).startswith(f"{path}: At line 4, column 16: YAML syntax error")


def test_yaml_syntax_error_points_back_at_the_line_that_started_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, "site: a\ndicom\nport: 5\n"))
    (message,) = caught.value.problems
    assert message.startswith("At line 3, column 1: YAML syntax error: could not find expected ':'")
    assert message.endswith("(while scanning a simple key at line 2, column 1)")


def test_tab_indentation_says_yaml_wants_spaces(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, "site: a\ndicom:\n\tport: 5\n"))
    (message,) = caught.value.problems
    assert message.endswith("; YAML indents with spaces, never tabs")


def test_a_key_given_twice_is_reported_with_both_lines(tmp_path: Path) -> None:
    text = "site: a\ncloud: {upload_url: 'https://x/'}\ndicom:\n  port: 104\n  port: 11112\n"
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert caught.value.problems == ["At 'dicom.port': given twice (lines 4 and 5); keep one"]


def test_a_key_given_twice_is_reported_with_the_other_problems(tmp_path: Path) -> None:
    text = "site: a\nsite: b\ncloud: {upload_url: 'https://x/'}\ndicom: {port: 0}\n"
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert caught.value.problems == [
        "At 'site': given twice (lines 1 and 2); keep one",
        "At 'dicom.port': 0 is not a valid port (1-65535)",
    ]


def test_problems_in_a_file_are_all_reported_at_once(tmp_path: Path) -> None:
    text = "site: Hospital A\ndicom:\n  prot: 104\n  max_pdu: 8 megabytes\ncloud: {}\n"
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    assert [problem.split(":")[0] for problem in caught.value.problems] == [
        "At 'site'",
        "At 'dicom.max_pdu'",
        "At 'dicom.prot'",
        "At 'cloud.upload_url'",
    ]


# --- durations and sizes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("7d", 604800.0),
        ("500ms", 0.5),
        ("1.5h", 5400.0),
        (" 5m ", 300.0),
        ("10 s", 10.0),
        ("90", 90.0),
        ("0s", 0.0),
        (90, 90.0),
        (2.5, 2.5),
    ],
)
def test_parse_duration_accepts(text: str | int | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        "5 minutes",
        "",
        "m",
        "-5s",
        "5M",
        "1h30m",
        "1e3s",
        ".5s",
        "5sec",
        "٣s",
        True,
        float("nan"),
        float("inf"),
        -1,
    ],
)
def test_parse_duration_rejects(text: str | int | float) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("8MiB", 8 * 2**20),
        ("512KiB", 512 * 2**10),
        ("1GiB", 2**30),
        ("8MB", 8_000_000),
        ("10kB", 10_000),
        ("1.5MiB", 1_572_864),
        ("8mib", 8 * 2**20),
        ("64 B", 64),
        ("4096", 4096),
        (4096, 4096),
        (0, 0),
    ],
)
def test_parse_size_accepts(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text", ["8 megabytes", "", "MiB", "-1", -1, "1.5B", "0.1KiB", "8MiBs", True, 1.5]
)
def test_parse_size_rejects(text: str | int) -> None:
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)


@given(st.one_of(st.text(max_size=20), st.integers(), st.floats()))
def test_parse_duration_raises_only_value_error(text: str | int | float) -> None:
    with contextlib.suppress(ValueError):
        assert parse_duration(text) >= 0


@given(st.one_of(st.text(max_size=20), st.integers()))
def test_parse_size_raises_only_value_error(text: str | int) -> None:
    with contextlib.suppress(ValueError):
        assert parse_size(text) >= 0


# --- any input at all -----------------------------------------------------------------------------

KNOWN_KEYS = sorted({name for path in model_paths(Settings) for name in path})
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(["90s", "8MiB", "90%", "PACS", "https://x/", "127.0.0.1", "/srv/d"]),
)
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=8))
nested = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=6),
    max_leaves=30,
)


@given(st.one_of(nested, st.dictionaries(keys, nested, max_size=8)))
def test_parse_config_raises_only_config_error_with_plain_sentences(data: object) -> None:
    try:
        assert isinstance(parse_config(data), Settings)
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert "\n" not in problem
            assert not any(word in problem for word in JARGON), problem


yaml_pieces = st.sampled_from(
    [*"abc:-[]{}&*!|>'\"#%@`,?.0123456789 \t\n", "site", "dicom", "port", "peers", "<<", "é"]
)


@given(st.lists(yaml_pieces, max_size=60).map("".join))
def test_load_config_raises_only_config_error_for_any_text(text: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = write(Path(directory), text)
        try:
            assert isinstance(load_config(path), Settings)
        except ConfigError as exc:
            assert exc.problems
            assert all("\n" not in problem for problem in exc.problems)


@given(
    st.fixed_dictionaries(
        {
            "dicom": st.fixed_dictionaries(
                {"peers": st.lists(st.fixed_dictionaries({"ae_title": nested}))}
            )
        }
    )
)
def test_peers_of_any_shape_raise_only_config_error(data: dict[str, Any]) -> None:
    try:
        parse_config({**minimal(), **data})
    except ConfigError as exc:
        assert all(problem.startswith("At 'dicom.peers[") for problem in exc.problems)


# --- the effective configuration ------------------------------------------------------------------


def test_redacted_example_round_trips_to_equal_settings() -> None:
    settings = load_config(EXAMPLE)
    dumped = yaml.safe_dump(settings.redacted(), sort_keys=False)
    assert parse_config(yaml.safe_load(dumped)) == settings


def test_redacted_uses_the_yaml_forms() -> None:
    dumped = parse_config(minimal(dicom__acse_timeout="1.5s", study__stable_after="2h")).redacted()
    assert dumped["data_dir"] == "/var/lib/dirigo"
    assert dumped["dicom"] == {
        "ae_title": "DIRIGO",
        "bind": "0.0.0.0",
        "port": 11112,
        "max_associations": 10,
        "max_pdu": "1MiB",
        "acse_timeout": "1500ms",
        "dimse_timeout": "1m",
        "network_timeout": "2m",
        "peers": [],
        "accept_unknown_peers": False,
        "tls": None,
    }
    assert dumped["study"] == {"stable_after": "2h"}
    assert dumped["spool"] == {
        "high_water": "90%",
        "keep_sent_for": "7d",
        "quarantine_keep": "30d",
        "quarantine_max": "1GiB",
        "purge_unconfirmed": False,
    }
    assert dumped["upload"]["chunk_size"] == "8MiB"
    assert dumped["upload"]["retry_max"] == "15m"


@given(
    timeout=st.floats(min_value=0.001, max_value=365 * 86400, allow_nan=False),
    quiet=st.integers(min_value=1, max_value=365 * 86400),
    pdu=st.integers(min_value=4096, max_value=2**32 - 1),
    high_water=st.floats(min_value=1, max_value=100),
)
def test_redacted_round_trips_any_valid_values(
    timeout: float, quiet: int, pdu: int, high_water: float
) -> None:
    settings = parse_config(
        minimal(
            dicom__acse_timeout=timeout,
            dicom__max_pdu=pdu,
            study__stable_after=quiet,
            spool__high_water=high_water,
        )
    )
    assert parse_config(yaml.safe_load(yaml.safe_dump(settings.redacted()))) == settings


SECRET_URLS = [
    ("https://agent:s3cret@exchange.example/files/", "https://agent:***@exchange.example/files/"),
    ("https://t0ken-value@exchange.example/files/", "https://***@exchange.example/files/"),
    ("https://x.example/f?access_token=s3cret&a=1", "https://x.example/f?access_token=***&a=1"),
    (
        "https://x.example/f?X-Amz-Signature=s3cret#part",
        "https://x.example/f?X-Amz-Signature=***#part",
    ),
]


@pytest.mark.parametrize(("url", "shown"), SECRET_URLS)
def test_redacted_hides_url_secrets_and_still_parses(url: str, shown: str) -> None:
    settings = parse_config(minimal(cloud={"upload_url": url, "dicomweb_url": url}))
    dumped = yaml.safe_dump(settings.redacted())
    assert "s3cret" not in dumped and "t0ken-value" not in dumped
    reparsed = parse_config(yaml.safe_load(dumped))
    assert reparsed.cloud == CloudSettings(upload_url=shown, dicomweb_url=shown)
    assert settings.cloud.upload_url == url  # the agent itself still has the secret


def test_redacted_leaves_urls_without_secrets_unchanged() -> None:
    url = "https://exchange.example/files/?site=a&empty=&flag#"
    cloud = parse_config(minimal(cloud__upload_url=url)).redacted()["cloud"]
    assert isinstance(cloud, dict)
    assert (cloud["upload_url"], cloud["dicomweb_url"]) == (url, None)


def test_a_settings_copy_is_equal() -> None:
    settings = load_config(EXAMPLE)
    assert copy.deepcopy(settings) == settings


def test_upload_values_are_checked_and_all_reported() -> None:
    data = minimal(upload__chunk_size="1KiB", upload__compression="gzip", upload__concurrency=0)
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert caught.value.problems == [
        "At 'upload.chunk_size': '1KiB' is not a valid chunk size (64KiB to 1GiB)",
        "At 'upload.concurrency': 0 is not a valid number of uploads (1-64)",
        "At 'upload.compression': 'gzip' is not one of zstd, none",
    ]


def test_client_key_without_client_cert_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(minimal(cloud__client_key="/etc/dirigo/client.key"))
    assert caught.value.problems == ["At 'cloud': 'client_key' is set without 'client_cert'"]


def test_cloud_files_are_taken_from_the_config_file_directory(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "site: a\ncloud:\n  upload_url: https://x.example/files/\n  token_file: token\n",
        encoding="utf-8",
    )
    assert load_config(path).cloud.token_file == tmp_path / "token"


# --- the upload protocol -------------------------------------------------------------------------


def test_stow_rs_needs_no_upload_url_but_a_dicomweb_url() -> None:
    settings = parse_config(
        minimal(cloud={"dicomweb_url": "https://x.example/dicom-web"}, upload__protocol="stow-rs")
    )
    assert (settings.upload.protocol, settings.cloud.upload_url) == ("stow-rs", "")
    assert settings.upload.stow_batch == 16 * 2**20
    assert parse_config(yaml.safe_load(yaml.safe_dump(settings.redacted()))) == settings
    message = only_problem(minimal(upload__protocol="stow-rs"))
    assert message.startswith("At 'upload.protocol': 'stow-rs' needs 'cloud.dicomweb_url'")


def test_tus_without_upload_url_is_reported_with_the_other_problems() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(minimal(cloud={"dicomweb_url": "https://x/"}, dicom__port=0))
    assert "At 'cloud.upload_url': required" in caught.value.problems
    assert any(p.startswith("At 'dicom.port'") for p in caught.value.problems)


def test_an_unknown_upload_protocol_is_named() -> None:
    assert only_problem(minimal(upload__protocol="ftp")) == (
        "At 'upload.protocol': 'ftp' is not one of tus, stow-rs"
    )


def test_secret_files_others_may_read_are_named_with_their_mode(tmp_path: Path) -> None:
    files = {name: tmp_path / name for name in ("token", "cert", "key", "ca")}
    for path in files.values():
        path.write_text("x")
        path.chmod(0o644)
    files["key"].chmod(0o600)

    def exposed(**cloud: object) -> list[str]:
        settings = parse_config(minimal(**{f"cloud__{k}": str(v) for k, v in cloud.items()}))
        return [problem.split(" is ")[0] for problem in settings.exposed_secret_files()]

    # A CA bundle and a certificate are public; a token, and a certificate file that holds
    # the private key (no client_key given), are not.
    assert exposed(ca_file=files["ca"], token_file=files["token"]) == [
        f"At 'cloud.token_file': {files['token']}"
    ]
    assert exposed(client_cert=files["cert"], client_key=files["key"]) == []
    assert exposed(client_cert=files["cert"]) == [f"At 'cloud.client_cert': {files['cert']}"]
    assert exposed(token_file=tmp_path / "missing") == []


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("127.0.0.1:9100", "127.0.0.1:9100"),
        ("[::1]:8080", "[::1]:8080"),
        ("off", "off"),
        (False, "off"),  # YAML reads a bare `off` as false
    ],
)
def test_health_listen_accepts_an_address_and_port_or_off(given: object, kept: str) -> None:
    assert parse_config(minimal(health__listen=given)).health.listen == kept


@pytest.mark.parametrize("listen", ["localhost:8080", "127.0.0.1", "127.0.0.1:0", "8080"])
def test_health_listen_rejects_anything_but_ip_and_port(listen: str) -> None:
    assert only_problem(minimal(health__listen=listen)).startswith("At 'health.listen': ")


def test_health_beyond_loopback_without_a_token_is_refused() -> None:
    problem = only_problem(minimal(health__listen="0.0.0.0:8080"))
    assert problem.startswith("At 'health': 'token_file' is required when 'listen'")


def test_health_beyond_loopback_with_a_token_is_accepted(tmp_path: Path) -> None:
    token = tmp_path / "token"
    settings = parse_config(minimal(health__listen="0.0.0.0:8080", health__token_file=str(token)))
    assert settings.health.token_file == token


# --- watch folders ----------------------------------------------------------------------------


def test_watch_folders_default_to_none_settling_for_5s_with_inotify() -> None:
    watch = parse_config(minimal()).watch
    assert (watch.dirs, watch.settle, watch.poll) == ((), 5.0, False)


def test_a_watch_folder_takes_three_paths_and_the_settle_time() -> None:
    folder = {"path": "/srv/in", "done": "/srv/done", "rejected": "/srv/rejected"}
    watch = parse_config(minimal(watch={"dirs": [folder], "settle": "2s", "poll": True})).watch
    assert watch.dirs[0].path == Path("/srv/in")
    assert (watch.dirs[0].done, watch.dirs[0].rejected) == (
        Path("/srv/done"),
        Path("/srv/rejected"),
    )
    assert (watch.settle, watch.poll) == (2.0, True)


def test_watch_folders_that_overlap_or_lack_a_path_are_each_reported() -> None:
    inside = {"path": "/srv/in", "done": "/srv/in/done", "rejected": "/srv/rejected"}
    same = {"path": "/srv/a", "done": "/srv/b", "rejected": "/srv/b"}
    found = problems(minimal(watch={"dirs": [inside, same, {"path": "/srv/c"}], "settle": "0s"}))
    assert any(p.startswith("At 'watch.dirs[0]'") and "lies inside 'path'" in p for p in found)
    assert any(p.startswith("At 'watch.dirs[1]'") and "'rejected' is 'done'" in p for p in found)
    assert "At 'watch.dirs[2].done': required" in found
    assert "At 'watch.dirs[2].rejected': required" in found
    assert any(p.startswith("At 'watch.settle'") for p in found)


def test_health_beyond_loopback_over_plain_http_is_warned_about(tmp_path: Path) -> None:
    token = str(tmp_path / "token")
    plain = parse_config(minimal(health__listen="0.0.0.0:8080", health__token_file=token))
    assert any(w.startswith("At 'health.listen': 0.0.0.0:8080") for w in plain.warnings())
    cert = str(tmp_path / "health.pem")
    tls = parse_config(
        minimal(health__listen="0.0.0.0:8080", health__token_file=token, health__cert=cert)
    )
    assert not any("health" in w for w in tls.warnings())
    assert not any("health" in w for w in parse_config(minimal()).warnings())


def test_a_health_token_others_may_read_is_an_exposed_secret(tmp_path: Path) -> None:
    token = tmp_path / "health-token"
    token.write_text("t0ken\n")
    token.chmod(0o644)
    settings = parse_config(minimal(health__token_file=str(token)))
    (found,) = settings.exposed_secret_files()
    assert found.startswith(f"At 'health.token_file': {token} is readable by its group")
    token.chmod(0o600)
    assert settings.exposed_secret_files() == []


def test_a_watched_folder_overlapping_another_entry_is_refused_but_done_may_be_shared() -> None:
    one = {"path": "/srv/a/in", "done": "/srv/done", "rejected": "/srv/rejected"}
    two = {"path": "/srv/b/in", "done": "/srv/done", "rejected": "/srv/rejected"}
    assert len(parse_config(minimal(watch={"dirs": [one, two]})).watch.dirs) == 2
    nested = {**two, "path": "/srv/a/in/cd"}
    problem = only_problem(minimal(watch={"dirs": [one, nested]}))
    assert problem.startswith("At 'watch': 'dirs[0].path' (/srv/a/in) overlaps /srv/a/in/cd")
