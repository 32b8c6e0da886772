"""Pure rules: integration settings, URL policy, header templates, slugs."""

from __future__ import annotations

from typing import Any

import pytest

from domain import settings as rules
from domain.errors import ValidationFailed
from domain.slugs import SLUG_MAX, is_valid_slug, slugify
from domain.templates import Template, TemplateError, parse_template, template_values
from domain.urls import URL_MAX, UrlPolicy

POLICY = UrlPolicy(allow_http_hosts=frozenset({"localhost", "127.0.0.1"}))
DEFAULTS = {
    "mode": "per-user",
    "auth_type": "none",
    "embedded": False,
    "type": "custom",
    "category": "",
    "description": "",
    "headers": {},
    "tags": [],
}
OAUTH2: dict[str, Any] = {
    "name": "Drive",
    "auth_type": "oauth2",
    "auth_uri": "https://accounts.example.com/auth",
    "token_uri": "https://oauth2.example.com/token",
    "client_id": "client-1",
    "scope": "drive",
    "api_base_uri": "https://api.example.com/v3",
}


def problems(settings: dict[str, Any], secrets: tuple[str, ...] = (), policy: UrlPolicy = POLICY) -> list[dict]:
    """The ``details`` of the ValidationFailed that check() raises on the normalised settings."""
    with pytest.raises(ValidationFailed) as raised:
        rules.check(rules.normalise(settings), secrets, policy)
    assert raised.value.message == "The integration is not valid."
    return raised.value.details


def fields(settings: dict[str, Any], secrets: tuple[str, ...] = ()) -> list[str]:
    return [d["field"] for d in problems(settings, secrets)]


def passes(settings: dict[str, Any], secrets: tuple[str, ...] = ()) -> None:
    rules.check(rules.normalise(settings), secrets, POLICY)


# === settings.normalise =======================================================================


def test_normalise_fills_the_defaults() -> None:
    assert rules.normalise({"name": "X"}) == {"name": "X", **DEFAULTS}


def test_normalise_gives_fresh_default_containers() -> None:
    a, b = rules.normalise({}), rules.normalise({})
    a["headers"]["X"] = "1"
    a["tags"].append("t")
    assert (b["headers"], b["tags"], rules.DEFAULTS["headers"], rules.DEFAULTS["tags"]) == ({}, [], {}, [])


def test_normalise_keeps_given_values_and_drops_nones() -> None:
    out = rules.normalise({"name": "X", "mode": "shared", "description": None, "scope": None, "tags": ["a"]})
    assert out == {"name": "X", **DEFAULTS, "mode": "shared", "tags": ["a"]}
    assert "scope" not in out


@pytest.mark.parametrize(
    ("given_type", "canonical"), [("apiKey", "apikey"), ("api_key", "apikey"), ("oauth", "oauth2")]
)
def test_normalise_maps_auth_type_aliases(given_type: str, canonical: str) -> None:
    assert rules.normalise({"auth_type": given_type})["auth_type"] == canonical


def test_normalise_leaves_an_unknown_auth_type_for_check() -> None:
    assert rules.normalise({"auth_type": "saml"})["auth_type"] == "saml"


def test_normalise_apikey_defaults() -> None:
    out = rules.normalise({"auth_type": "apiKey"})
    assert (out["api_key_name"], out["api_key_location"]) == ("X-API-Key", "header")
    assert "token_auth_method" not in out


def test_normalise_apikey_keeps_given_key_name_and_location() -> None:
    out = rules.normalise({"auth_type": "apikey", "api_key_name": "key", "api_key_location": "query"})
    assert (out["api_key_name"], out["api_key_location"]) == ("key", "query")


def test_normalise_oauth2_defaults_to_client_secret_basic() -> None:
    out = rules.normalise({"auth_type": "oauth"})
    assert out["token_auth_method"] == "client_secret_basic"
    assert "api_key_name" not in out


@pytest.mark.parametrize("auth_type", ["none", "basic", "bearer"])
def test_normalise_adds_no_auth_defaults_to_other_types(auth_type: str) -> None:
    assert rules.normalise({"auth_type": auth_type}) == {**DEFAULTS, "auth_type": auth_type}


@pytest.mark.parametrize(
    ("flag", "method"), [(True, "client_secret_basic"), (False, "client_secret_post"), (None, "client_secret_basic")]
)
def test_normalise_maps_basic_token_auth_to_the_token_auth_method(flag: bool | None, method: str) -> None:
    out = rules.normalise({"auth_type": "oauth2", "basic_token_auth": flag})
    assert out["token_auth_method"] == method
    assert "basic_token_auth" not in out


def test_normalise_is_idempotent() -> None:
    once = rules.normalise({**OAUTH2, "auth_type": "oauth", "basic_token_auth": False})
    assert rules.normalise(once) == once


# === settings.check: required fields ===========================================================


def test_a_complete_oauth2_integration_passes() -> None:
    passes(OAUTH2, ("client_secret",))


def test_oauth2_scope_may_be_empty_but_not_missing() -> None:
    passes(OAUTH2 | {"scope": ""}, ("client_secret",))
    assert fields({k: v for k, v in OAUTH2.items() if k != "scope"}, ("client_secret",)) == ["scope"]


@pytest.mark.parametrize(
    ("auth_type", "required"),
    [
        ("oauth2", ["authUri", "tokenUri", "clientId", "clientSecret", "scope", "apiBaseUri"]),
        ("apikey", ["apiBaseUri"]),  # key name and location have defaults
        ("basic", ["apiBaseUri"]),
        ("bearer", ["apiBaseUri"]),
    ],
)
def test_each_auth_type_names_its_missing_fields_in_camel_case(auth_type: str, required: list[str]) -> None:
    details = problems({"name": "X", "auth_type": auth_type})
    assert details == [{"field": f, "message": f"is required for authType {auth_type}"} for f in required]


def test_apikey_without_normalised_defaults_needs_key_name_and_location() -> None:
    with pytest.raises(ValidationFailed) as raised:
        rules.check({"name": "X", "auth_type": "apikey", "mode": "per-user"}, (), POLICY)
    assert [d["field"] for d in raised.value.details] == ["apiBaseUri", "apiKeyName", "apiKeyLocation"]


def test_auth_type_none_needs_nothing_but_a_name() -> None:
    passes({"name": "X"})


@pytest.mark.parametrize("key", ["auth_uri", "token_uri", "client_id", "api_base_uri"])
def test_an_empty_string_counts_as_missing(key: str) -> None:
    camel = {"auth_uri": "authUri", "token_uri": "tokenUri", "client_id": "clientId", "api_base_uri": "apiBaseUri"}
    assert fields(OAUTH2 | {key: ""}, ("client_secret",)) == [camel[key]]


def test_the_client_secret_is_checked_among_the_secrets_present() -> None:
    assert problems(OAUTH2) == [{"field": "clientSecret", "message": "is required for authType oauth2"}]
    assert fields(OAUTH2 | {"client_secret": "in settings does not count"}) == ["clientSecret"]


def test_unknown_auth_type_bad_mode_and_blank_name_are_each_reported() -> None:
    assert problems({"name": "  ", "auth_type": "saml", "mode": "team"}) == [
        {"field": "authType", "message": "must be one of oauth2, apikey, basic, bearer, none"},
        {"field": "mode", "message": "must be one of per-user, shared"},
        {"field": "name", "message": "is required"},
    ]


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"api_key_location": "body"}, "apiKeyLocation"),
        ({"token_auth_method": "private_key_jwt"}, "tokenAuthMethod"),
        ({"api_key_name": "X Key"}, "apiKeyName"),
        ({"api_key_name": ""}, "apiKeyName"),
    ],
)
def test_enumerations_and_the_key_name_are_checked(extra: dict[str, Any], field: str) -> None:
    assert fields({"name": "X"} | extra) == [field]


# === URL policy ===============================================================================


@pytest.mark.parametrize(
    "url",
    [
        "https://api.example.com",
        "https://api.example.com/v1/items?x=1",
        "https://api.example.com:8443/v1",
        "HTTPS://API.EXAMPLE.COM/",
        "https://[2001:db8::1]/v1",
        "http://localhost:8080/token",
        "http://127.0.0.1/x",
        "http://LOCALHOST/x",
        "https://" + "a" * (URL_MAX - len("https://")),
    ],
)
def test_acceptable_urls(url: str) -> None:
    assert POLICY.problem(url) is None


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (
            "http://api.example.com/x",
            "must use https (http is allowed only for hosts in INTEGRATIONS_ALLOW_HTTP_HOSTS)",
        ),
        (
            "http://localhost.example.com/x",
            "must use https (http is allowed only for hosts in INTEGRATIONS_ALLOW_HTTP_HOSTS)",
        ),
        ("https://user:pw@api.example.com/", "must not contain credentials"),
        ("https://user@api.example.com/", "must not contain credentials"),
        ("https://@api.example.com/", "must not contain credentials"),
        ("https://api.example.com/#frag", "must not contain a fragment"),
        ("/v1/items", "must be an absolute http(s) URL"),
        ("//api.example.com/v1", "must be an absolute http(s) URL"),
        ("api.example.com/v1", "must be an absolute http(s) URL"),
        ("https:///v1", "must be an absolute http(s) URL"),
        ("ftp://files.example.com/", "must be an absolute http(s) URL"),
        ("javascript:alert(1)", "must be an absolute http(s) URL"),
        ("", "must be an absolute http(s) URL"),
        ("https://api.example.com/a b", "must not contain whitespace or control characters"),
        (" https://api.example.com/", "must not contain whitespace or control characters"),
        ("https://api.example.com/\t", "must not contain whitespace or control characters"),
        ("https://api.example.com/\r\nX: 1", "must not contain whitespace or control characters"),
        ("https://api.example.com/\x00", "must not contain whitespace or control characters"),
        ("https://api.example.com:99999/", "is not a valid URL"),
        ("https://api.example.com:port/", "is not a valid URL"),
        ("https://[::1/", "is not a valid URL"),
        ("https://" + "a" * (URL_MAX - len("https://") + 1), f"must be at most {URL_MAX} characters"),
    ],
)
def test_rejected_urls(url: str, problem: str) -> None:
    assert POLICY.problem(url) == problem


def test_without_allowed_hosts_http_is_never_accepted() -> None:
    assert UrlPolicy().problem("http://localhost/x") is not None
    assert UrlPolicy().problem("https://localhost/x") is None


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        # DEL (0x7F) is a control character; urlsplit keeps it, in the path and even in the host name.
        ("https://api.example.com/a\x7fb", "DEL in the path"),
        ("https://api.example.com\x7f/v1", "DEL in the host"),
        # A bare '#' is an (empty) fragment: everything joined after it never reaches the upstream.
        ("https://api.example.com/v1/#", "empty fragment"),
    ],
)
def test_url_policy_rejects_what_its_messages_promise(url: str, reason: str) -> None:
    assert POLICY.problem(url) is not None, reason


@pytest.mark.parametrize(
    ("key", "field"),
    [
        ("auth_uri", "authUri"),
        ("token_uri", "tokenUri"),
        ("api_base_uri", "apiBaseUri"),
        ("revocation_uri", "revocationUri"),
    ],
)
def test_check_applies_the_url_policy_to_every_url_field(key: str, field: str) -> None:
    assert problems(OAUTH2 | {key: "http://api.example.com/x"}, ("client_secret",)) == [
        {"field": field, "message": POLICY.problem("http://api.example.com/x")}
    ]


def test_check_reports_every_bad_url() -> None:
    settings = OAUTH2 | {"auth_uri": "/relative", "token_uri": "https://u:p@x.example.com", "revocation_uri": "ftp://x"}
    assert fields(settings, ("client_secret",)) == ["authUri", "tokenUri", "revocationUri"]


# === headers ==================================================================================


def test_valid_templated_headers_pass() -> None:
    passes(
        {"name": "X", "headers": {"X-User": "${user.email}", "X-Tenant": "$tenant.id", "Accept": "application/json"}}
    )


@pytest.mark.parametrize("name", ["Bad Header", "X-Ä", "", "X:Y", "X\r\nY", "a" * 129])
def test_an_invalid_header_name_is_reported_under_its_name(name: str) -> None:
    assert problems({"name": "X", "headers": {name: "v"}}) == [
        {"field": f"headers.{name}", "message": "is not a valid header name"}
    ]


@pytest.mark.parametrize("name", ["Host", "host", "Content-Length", "Transfer-Encoding", "Connection", "Cookie", "TE"])
def test_a_reserved_header_is_rejected(name: str) -> None:
    assert problems({"name": "X", "headers": {name: "v"}}) == [
        {"field": f"headers.{name}", "message": "is set by the service and cannot be templated"}
    ]


@pytest.mark.parametrize("auth_type", ["oauth2", "bearer", "basic"])
def test_authorization_cannot_be_templated_when_the_auth_type_sets_it(auth_type: str) -> None:
    # security.md PX-8: header names must not be in the denylist, which includes
    # "Authorization unless the auth type says so"; oauth2, bearer and basic send their own.
    settings = OAUTH2 | {"auth_type": auth_type, "headers": {"Authorization": "Bearer ${user.custom.token}"}}
    with pytest.raises(ValidationFailed) as raised:
        rules.check(rules.normalise(settings), ("client_secret",), POLICY)
    assert "headers.Authorization" in [d["field"] for d in raised.value.details]


def test_duplicate_header_names_are_caught_case_insensitively() -> None:
    assert problems({"name": "X", "headers": {"X-Team": "a", "x-team": "b", "X-TEAM": "c"}}) == [
        {"field": "headers.x-team", "message": "is given twice (header names are case-insensitive)"},
        {"field": "headers.X-TEAM", "message": "is given twice (header names are case-insensitive)"},
    ]


def test_template_errors_are_surfaced_per_header() -> None:
    headers = {"X-A": "${user.__class__}", "X-B": "${user.email", "X-C": "ok ${user.id}", "X-D": "a\nb"}
    assert problems({"name": "X", "headers": headers}) == [
        {"field": "headers.X-A", "message": "unknown variable 'user.__class__'"},
        {"field": "headers.X-B", "message": "unterminated '${'"},
        {"field": "headers.X-D", "message": "control characters (CR, LF, NUL) are not allowed"},
    ]


def test_a_bad_name_and_a_bad_template_are_both_reported() -> None:
    assert problems({"name": "X", "headers": {"Host": "${nope}"}}) == [
        {"field": "headers.Host", "message": "is set by the service and cannot be templated"},
        {"field": "headers.Host", "message": "unknown variable 'nope'"},
    ]


def test_at_most_fifty_headers() -> None:
    passes({"name": "X", "headers": {f"X-{n}": "v" for n in range(rules.MAX_HEADERS)}})
    assert fields({"name": "X", "headers": {f"X-{n}": "v" for n in range(rules.MAX_HEADERS + 1)}}) == ["headers"]


# === slugs ====================================================================================


@pytest.mark.parametrize("slug", ["a", "0", "drive", "google-drive", "a1-b2-c3", "x" * SLUG_MAX, "a-b-c"])
def test_valid_slugs(slug: str) -> None:
    assert is_valid_slug(slug) is True


@pytest.mark.parametrize(
    "slug",
    ["", "-a", "a-", "a--b", "Drive", "google_drive", "a b", "a.b", "über", "x" * (SLUG_MAX + 1), "a\n", "a/b", "-"],
)
def test_invalid_slugs(slug: str) -> None:
    assert is_valid_slug(slug) is False


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        ("Google Drive (EU)", "google-drive-eu"),
        ("Café Münster", "cafe-munster"),
        ("  Ångström -- Lab!  ", "angstrom-lab"),
        ("Salesforce.com / CRM", "salesforce-com-crm"),
        ("ACME_API v2", "acme-api-v2"),
        ("東京 Drive", "drive"),
        ("東京", "integration"),
        ("---", "integration"),
        ("", "integration"),
        ("a" * 70, "a" * SLUG_MAX),
        ("x" * 63 + " y", "x" * 63),  # cut at 64 characters, trailing hyphen removed
    ],
)
def test_slugify(name: str, slug: str) -> None:
    assert slugify(name) == slug
    assert is_valid_slug(slugify(name))


# === templates ================================================================================


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("${user.email}", (("user.email",),)),
        ("$user.email", (("user.email",),)),
        ("Bearer ${tenant.id}:$user.id!", ("Bearer ", ("tenant.id",), ":", ("user.id",), "!")),
        ("$user.email.", (("user.email",), ".")),
        ("${user.displayName}", (("user.displayName",),)),
        ("$integration.slug-$integration.id", (("integration.slug",), "-", ("integration.id",))),
        ("${user.custom.team_code}", (("user.custom.team_code",),)),
        ("$user.custom.team_code", (("user.custom.team_code",),)),
        ("plain", ("plain",)),
        ("", ()),
        ("$5", ("$", "5")),
        ("costs $", ("costs ", "$")),
    ],
)
def test_parse_template(text: str, parts: tuple) -> None:
    assert parse_template(text).parts == parts


def test_template_variables() -> None:
    assert parse_template("${user.id} $tenant.id ${user.custom.x}").variables == (
        "user.id",
        "tenant.id",
        "user.custom.x",
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("${user.password}", "unknown variable 'user.password'"),
        ("$user.emails", "unknown variable 'user.emails'"),
        ("${user.__class__}", "unknown variable 'user.__class__'"),
        ("${user.__class__.__mro__}", "unknown variable 'user.__class__.__mro__'"),
        ("${user.custom}", "unknown variable 'user.custom'"),
        ("${user.custom.a.b}", "unknown variable 'user.custom.a.b'"),
        ("${}", "malformed variable '${}'"),
        ("${ user.email }", "malformed variable '${ user.email }'"),
        ("${user[0]}", "malformed variable '${user[0]}'"),
        ("${user.email", "unterminated '${'"),
        ("abc ${", "unterminated '${'"),
        ("$$", "a lone '$' must not be followed by '$'"),
        ("a\rb", "control characters (CR, LF, NUL) are not allowed"),
        ("a\nb", "control characters (CR, LF, NUL) are not allowed"),
        ("a\0b", "control characters (CR, LF, NUL) are not allowed"),
        ("${user.email}\r\nX-Evil: 1", "control characters (CR, LF, NUL) are not allowed"),
    ],
)
def test_parse_rejects(text: str, message: str) -> None:
    with pytest.raises(TemplateError) as raised:
        parse_template(text)
    assert str(raised.value) == message


VALUES = template_values(
    user={
        "id": "jane",
        "username": "jdoe",
        "email": "jane@example.com",
        "displayName": "Jane",
        "custom": {"team_code": "T-7", "motto": "${tenant.id}"},
    },
    tenant_id="acme",
    integration_id="i-1",
    integration_slug="drive",
)


def test_template_values_table() -> None:
    assert VALUES == {
        "user.id": "jane",
        "user.username": "jdoe",
        "user.email": "jane@example.com",
        "user.displayName": "Jane",
        "tenant.id": "acme",
        "integration.id": "i-1",
        "integration.slug": "drive",
        "user.custom.team_code": "T-7",
        "user.custom.motto": "${tenant.id}",
    }


@pytest.mark.parametrize(
    ("text", "expanded"),
    [
        ("${user.email}", "jane@example.com"),
        ("$user.email", "jane@example.com"),
        ("Bearer $tenant.id/${user.custom.team_code}", "Bearer acme/T-7"),
        ("${user.custom.motto}", "${tenant.id}"),  # single pass: a value is inserted literally
        ("${user.custom.missing}", ""),
        ("[${user.custom.missing}]", "[]"),
        ("$5 per ${integration.slug}", "$5 per drive"),
        ("plain", "plain"),
    ],
)
def test_expand(text: str, expanded: str) -> None:
    assert parse_template(text).expand(VALUES) == expanded


def test_expand_of_a_none_value_is_empty_and_other_values_are_strings() -> None:
    assert parse_template("${user.id}|${user.email}").expand({"user.id": 42, "user.email": None}) == "42|"


def test_expand_does_not_reparse_the_result() -> None:
    t = Template(parts=(("user.custom.x",),))
    assert t.expand({"user.custom.x": "$user.email", "user.email": "no"}) == "$user.email"


@pytest.mark.parametrize("value", ["jane@example.com\r\nX-Evil: 1", "a\nb", "a\rb", "a\0b"])
def test_expand_never_yields_cr_lf_or_nul(value: str) -> None:
    # security.md PX-8: expanded values must be valid header field values (reject CR, LF, NUL);
    # test plan item 17: never an extra header on the wire. Either a TemplateError or a clean value.
    template = parse_template("${user.email}")
    try:
        out = template.expand({"user.email": value})
    except TemplateError:
        return
    assert not any(c in out for c in "\r\n\0"), f"expanded to {out!r}"


# === secret header values =====================================================================


def test_a_secret_header_marker_needs_its_stored_value() -> None:
    headers = {"X-Token": dict(rules.SECRET_HEADER), "X-User": "${user.id}"}
    passes({"name": "X", "headers": headers}, ("header:x-token",))
    assert problems({"name": "X", "headers": headers}) == [
        {"field": "headers.X-Token", "message": 'has no stored secret value: send {"value": ..., "secret": true}'}
    ]
    assert rules.secret_header_fields(rules.normalise({"headers": headers})) == {"header:x-token"}


def test_a_secret_header_obeys_the_name_rules() -> None:
    assert problems({"name": "X", "headers": {"Cookie": {"secret": True}}}, ("header:cookie",)) == [
        {"field": "headers.Cookie", "message": "is set by the service and cannot be templated"}
    ]


@pytest.mark.parametrize("value", [1, None, ["a"], {"secret": False}, {"value": "v"}])
def test_a_header_value_is_a_template_or_the_secret_marker(value: Any) -> None:
    assert problems({"name": "X", "headers": {"X-A": value}}) == [
        {"field": "headers.X-A", "message": 'must be a template string or {"value": ..., "secret": true}'}
    ]


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("tok-$user.id-${x}", True),
        ("a\tb", True),
        ("~" * rules.MAX_HEADER_VALUE, True),
        ("~" * (rules.MAX_HEADER_VALUE + 1), False),
        ("a\r\nX-Evil: 1", False),
        ("a\x00", False),
        ("a\x7f", False),
        ("caf\u00e9", False),
    ],
)
def test_secret_header_values_are_printable_ascii_literals(value: str, ok: bool) -> None:
    assert (rules.secret_header_problem(value) is None) is ok
