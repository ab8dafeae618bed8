"""Email and group rules: strict addresses, exact domains, rules on the full claim, odd claim types."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.config import Config, build_config
from sidecar.errors import TokenValidationError
from sidecar.policy import email_domain, identity_from_claims, is_allowed
from tests.stack import free_port, sidecar_settings


def _config(**overrides: str) -> Config:
    return build_config(sidecar_settings("http://127.0.0.1:1", free_port(), **overrides))


CORP = _config(email_domain="corp.com")

HOSTILE_ADDRESSES = [
    "a@evil.com@corp.com",
    "a@corp.com@evil.com",
    '"a@evil.com"@corp.com',
    "a@evil.com\x00@corp.com",
    "a@corp.com\r\n",
    "a@corp.com\x00",
    "a\n@corp.com",
    "a @corp.com",
    "a@corp.com ",
    " a@corp.com",
    "a\u2028@corp.com",
    "a@corp.com.",
    "a@.corp.com",
    "a@corp..com",
    "a@-corp.com",
    "a@corp.com:443",
    "a@[127.0.0.1]",
    "a@corp.c\u043em",  # Cyrillic o
    "a@xn--corp.com\u200b",
    "@corp.com",
    "a@",
    "corp.com",
    "a,b@corp.com",
    "a<b>@corp.com",
    "x" * 300 + "@corp.com",
    "a@" + "b" * 250 + ".corp.com",
    ("a" * 230) + "@corp.com.attacker.example",
    "a@corp.com.attacker.example",
    "a@attacker-corp.com",
    "a@evilcorp.com",
    "a@sub.corp.com",  # subdomains only with ".corp.com"
]


@pytest.mark.parametrize("address", HOSTILE_ADDRESSES)
def test_hostile_addresses_never_pass_a_domain_rule(address: str) -> None:
    identity = identity_from_claims({"sub": "s", "email": address, "email_verified": True}, CORP)
    assert not is_allowed(identity, CORP), address


@pytest.mark.parametrize("address", ["ann@corp.com", "Ann.Lee+tag@CORP.COM", "a_b-c@Corp.Com"])
def test_plain_addresses_in_the_domain_pass_case_insensitively(address: str) -> None:
    identity = identity_from_claims({"sub": "s", "email": address, "email_verified": True}, CORP)
    assert identity.email == address and is_allowed(identity, CORP)


def test_subdomain_rules_take_only_subdomains() -> None:
    config = _config(email_domain=".corp.com")
    allowed = [f"a@{d}" for d in ("x.corp.com", "a.b.corp.com")]
    refused = [f"a@{d}" for d in ("corp.com", "xcorp.com", "corp.com.evil.org")]
    for address in allowed + refused:
        identity = identity_from_claims({"sub": "s", "email": address}, config)
        assert is_allowed(identity, config) == (address in allowed), address


def test_a_long_address_is_judged_whole_and_never_cut_to_look_allowed() -> None:
    # Cut at 256 characters, this would end in "corp.com"; judged whole, its domain is the attacker's.
    address = "a" * 60 + "@" + "b" * 176 + ".corp.com" + ".attacker.example"
    assert email_domain(address) is None or not email_domain(address).endswith("corp.com")  # type: ignore[union-attr]
    assert not is_allowed(identity_from_claims({"sub": "s", "email": address}, CORP), CORP)


@pytest.mark.parametrize("verified", ["false", "true", "False", 0, 1, None, [], {}, "yes"])
def test_only_the_json_boolean_true_verifies_an_email(verified: Any) -> None:
    identity = identity_from_claims({"sub": "s", "email": "a@corp.com", "email_verified": verified}, CORP)
    assert identity.email == "" and not is_allowed(identity, CORP)
    lenient = _config(email_domain="corp.com", insecure_oidc_allow_unverified_email="true")
    assert is_allowed(
        identity_from_claims({"sub": "s", "email": "a@corp.com", "email_verified": verified}, lenient), lenient
    )


def test_no_email_verified_claim_takes_the_email_as_asserted() -> None:
    identity = identity_from_claims({"sub": "s", "email": "a@corp.com"}, CORP)
    assert is_allowed(identity, CORP)


@pytest.mark.parametrize(
    "groups",
    [{"admins": True}, 42, 4.2, True, None, [["admins"]], [{"name": "admins"}], [None, 7], "", ["admins\r\n"]],
)
def test_groups_of_unexpected_types_give_no_groups_and_no_error(groups: Any) -> None:
    config = _config(allowed_group="admins")
    identity = identity_from_claims({"sub": "s", "email": "a@corp.com", "groups": groups}, config)
    assert "admins" not in identity.groups and not is_allowed(identity, config)


def test_group_rules_run_on_the_full_list() -> None:
    config = _config(allowed_group="needle")
    groups = [f"g{i}" for i in range(900)] + ["needle"]
    assert is_allowed(identity_from_claims({"sub": "s", "groups": groups}, config), config)
    long_name = "n" * 600
    config = _config(allowed_group=long_name)
    assert is_allowed(identity_from_claims({"sub": "s", "groups": [long_name]}, config), config)
    assert not is_allowed(identity_from_claims({"sub": "s", "groups": [long_name[:256]]}, config), config)


@pytest.mark.parametrize("sub", [None, "", 42, ["s"], {"s": 1}, "s\r\n", "s" * 300])
def test_an_unusable_sub_refuses_the_token(sub: Any) -> None:
    with pytest.raises(TokenValidationError):
        identity_from_claims({"sub": sub, "email": "a@corp.com"}, CORP)


@pytest.mark.parametrize("email", [42, ["a@corp.com"], {"a": "b"}, None, True])
def test_emails_of_unexpected_types_are_no_email(email: Any) -> None:
    identity = identity_from_claims({"sub": "s", "email": email}, CORP)
    assert identity.email == "" and not is_allowed(identity, CORP)


@pytest.mark.parametrize("address", ["victim@example.com\n", "victim@example.com\r", "victim@example.com\n\n"])
def test_a_trailing_newline_never_passes_for_an_address_even_with_any_domain(address: str) -> None:
    anyone = _config(email_domain="*")
    identity = identity_from_claims({"sub": "s", "email": address, "email_verified": True}, anyone)
    assert identity.email == "" and email_domain(address) is None
