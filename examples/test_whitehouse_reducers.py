"""How to test your reducers with fluxlite: the White House reducers, given / when / then.

Run with `python -m pytest examples/test_whitehouse_reducers.py`. Each test
builds an in-memory store from the schema and reducer, so there is nothing
to set up or clean; a failing `then` prints which change and which field
differ.
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the example module
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import fluxlite  # noqa: E402
from fluxlite import Change  # noqa: E402
from whitehouse import REDUCER, SCHEMA  # noqa: E402


@pytest.fixture
def white_house():
    """A scenario per test: the schema and reducer under test, nothing else."""
    with fluxlite.scenario(SCHEMA, REDUCER) as s:
        yield s


def test_adding_a_user_inserts_one_row(white_house):
    (white_house
        .when(("addUser", {"name": "Barack"}))
        .then(Change("insert", "users", None, {"name": "Barack", "since": "2000-01-01"}))
        .then_state("users", [{"name": "Barack", "since": "2000-01-01"}]))


def test_a_user_cannot_be_added_twice(white_house):
    (white_house
        .given(("addUser", {"name": "Barack"}))
        .when(("addUser", {"name": "Barack"}))
        .then_rejected(match="already a user"))


def test_access_needs_an_existing_user(white_house):
    white_house.when(("grantAccess", {"user": "Bo", "role": "Dog"})).then_rejected("no such user")


def test_there_is_only_one_president(white_house):
    (white_house
        .given(("addUser", {"name": "Barack"}), ("addUser", {"name": "Trump"}),
               ("grantAccess", {"user": "Barack", "role": "President"}))
        .when(("grantAccess", {"user": "Trump", "role": "President"}))
        .then_rejected("already a President"))


def test_the_handover_upserts_the_rights(white_house):
    (white_house
        .given(("addUser", {"name": "Barack"}),
               ("grantAccess", {"user": "Barack", "role": "President"}))
        .when(("grantAccess", {"user": "Barack", "role": "Ex-President"}))
        .then(Change("upsert", "user_rights", None, {"user": "Barack", "role": "Ex-President"}))
        .then_state("user_rights", [{"user": "Barack", "role": "Ex-President"}]))


def test_removing_a_user_takes_their_rights_along(white_house):
    (white_house
        .given(("addUser", {"name": "Barack"}),
               ("grantAccess", {"user": "Barack", "role": "President"}))
        .when(("removeUser", {"name": "Barack"}))
        .then(Change("delete", "user_rights", "Barack"), Change("delete", "users", "Barack"))
        .then_state("users", [])
        .then_state("user_rights", []))


def test_a_dry_run_shows_what_would_change_without_writing():
    """preview() on a real store: what-if, with nothing written."""
    with fluxlite.open(":memory:", schema=SCHEMA, reducer=REDUCER) as store:
        store.dispatch("addUser", {"name": "Barack"})
        event, changes = store.preview("removeUser", {"name": "Barack"})
        assert [c.op for c in changes] == ["delete"] and event.seq == 2
        assert store.head == 1 and "Barack" in store.view.users
