"""Path confinement (PX-1) as a pure rule: examples, and a property over generated paths:
whatever the input, it is rejected or the joined URL stays under the base, as httpx parses it."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.errors import ValidationFailed
from domain.paths import Base, PathRejected, confine, within

BASE = Base.parse("https://api.example.com:8443/v1?tenant=t")


@pytest.mark.parametrize(
    ("relative", "path", "query"),
    [
        ("", "/v1/", "tenant=t"),
        ("files", "/v1/files", "tenant=t"),
        ("/files/a%20b", "/v1/files/a%20b", "tenant=t"),
        ("users/@me?x=1&y=%2F", "/v1/users/@me", "tenant=t&x=1&y=%2F"),
        ("projects/p:run", "/v1/projects/p:run", "tenant=t"),
        ("dir/", "/v1/dir/", "tenant=t"),
    ],
)
def test_confined_examples(relative: str, path: str, query: str) -> None:
    assert confine(BASE, relative) == (path, query)


def test_base_without_trailing_slash_is_a_prefix_with_one() -> None:
    assert Base.parse("http://h/api").prefix == "/api/"
    assert confine(Base.parse("http://h"), "x") == ("/x", "")


@pytest.mark.parametrize("uri", ["ftp://h/", "https://u:p@h/", "https://h/#f", "/relative", "https:///x"])
def test_bad_bases(uri: str) -> None:
    with pytest.raises(ValidationFailed):
        Base.parse(uri)


ALPHABET = st.sampled_from([*"abc./\\%:@?#&=2eEfFcC05 \r\n\t\x00~+-_", "%2e", "%2f", "%5c", "..", "//", "%25"])


@settings(max_examples=3000, deadline=None)
@given(st.lists(ALPHABET, max_size=24).map("".join))
def test_generated_paths_are_rejected_or_confined(relative: str) -> None:
    try:
        path, query = confine(BASE, relative)
    except PathRejected:
        return
    url = httpx.URL("https://api.example.com:8443").copy_with(raw_path=(path + ("?" + query if query else "")).encode())
    assert within(BASE, url.scheme, url.netloc.decode(), url.path)
    assert ".." not in url.path.split("/") and "." not in url.path.split("/")[1:-1]
    assert not url.userinfo and not url.fragment
