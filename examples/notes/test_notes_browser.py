"""Two headless Chromium pages on the running notes example: what one does, the other shows.

Needs the ``playwright`` package (``pip install ".[e2e]"``) and Debian's
``chromium`` on PATH (``apt-get install chromium``; never ``playwright
install``). Without them the test is skipped, unless FLUXLITE_REQUIRE_BROWSER=1
(as in .ci/run), which turns the skip into a failure.
"""
import os
import shutil

import pytest

pytestmark = pytest.mark.e2e

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
REQUIRED = os.environ.get("FLUXLITE_REQUIRE_BROWSER") == "1"


def unavailable(reason):
    if REQUIRED:
        pytest.fail(f"{reason}; FLUXLITE_REQUIRE_BROWSER=1 requires the browser tests to run",
                    pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium():
    sync_api, path, reason = None, shutil.which("chromium"), None
    try:
        sync_api = pytest.importorskip("playwright.sync_api")
    except pytest.skip.Exception as skipped:
        reason = str(skipped)
    if path is None:
        reason = "no chromium on PATH (apt-get install chromium)"
    if reason:
        unavailable(reason)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_page(chromium, app, user, errors):
    page = chromium.new_context().new_page()  # a context each: no shared storage
    page.on("pageerror", lambda error: errors.append(error))
    page.goto(f"{app.url}/?user={user}")
    return page


def test_what_one_page_does_the_other_shows(app, chromium):
    from playwright.sync_api import expect

    errors = []
    alice, bob = open_page(chromium, app, "alice", errors), open_page(chromium, app, "bob", errors)
    for page in (alice, bob):
        expect(page.locator("#status")).to_have_text("live")

    # Added in one page, it appears in the other.
    alice.fill("#add [name=title]", "Groceries")
    alice.fill("#add [name=text]", "milk")
    alice.click("#add button")
    expect(bob.locator("#notes .note")).to_have_count(1)
    expect(bob.locator(".note .title")).to_have_value("Groceries")
    expect(bob.locator(".note .text")).to_have_value("milk")

    # Inline edits travel both ways.
    bob.locator(".note .title").fill("Shopping")
    bob.locator(".note .title").press("Enter")
    expect(alice.locator(".note .title")).to_have_value("Shopping")
    alice.locator(".note .text").fill("milk, eggs")
    alice.locator(".note .text").blur()
    expect(bob.locator(".note .text")).to_have_value("milk, eggs")

    # A page opened now starts from the snapshot and the log.
    carol = open_page(chromium, app, "carol", errors)
    expect(carol.locator(".note .title")).to_have_value("Shopping")
    expect(carol.locator("#log li")).to_have_count(3)

    # Only the author (or admin) may remove: bob is refused, alice is not.
    bob.click(".note .remove")
    expect(bob.locator("#error")).to_contain_text("403")
    alice.click(".note .remove")
    for page in (bob, carol):
        expect(page.locator("#notes .note")).to_have_count(0)
    expect(bob.locator("#log li")).to_have_count(4)
    expect(bob.locator("#log li").first).to_contain_text("removeNote")

    assert [(e.type, e.actor) for e in app.store.events()] == [
        ("addNote", "alice"), ("editNoteTitle", "bob"), ("editNoteContent", "alice"),
        ("removeNote", "alice")]
    app.store.verify()
    assert errors == []


def add_note(page, title, text):
    page.fill("#add [name=title]", title)
    page.fill("#add [name=text]", text)
    page.click("#add button")


def test_an_edit_over_someone_elses_is_refused_and_the_field_shows_theirs(app, chromium):
    from playwright.sync_api import expect

    errors = []
    alice, bob = open_page(chromium, app, "alice", errors), open_page(chromium, app, "bob", errors)
    for page in (alice, bob):
        expect(page.locator("#status")).to_have_text("live")
    add_note(alice, "Groceries", "milk")
    expect(bob.locator(".note .title")).to_have_value("Groceries")

    # bob is in the title when alice renames the note: his field is left alone while
    # he is in it, and shows alice's title once he leaves it.
    bob.locator(".note .title").focus()
    alice.locator(".note .title").fill("Shopping")
    alice.locator(".note .title").press("Enter")
    expect(bob.locator("#log li").first).to_contain_text("editNoteTitle")
    expect(bob.locator(".note .title")).to_have_value("Groceries")
    bob.locator(".note .title").blur()
    expect(bob.locator(".note .title")).to_have_value("Shopping")

    # bob types in the text while alice saves hers: his edit, started from "milk", is
    # refused (409) instead of overwriting alice's; the page says so and keeps his version.
    bob.locator(".note .text").fill("milk, bread")
    alice.locator(".note .text").fill("milk, eggs")
    alice.locator(".note .text").blur()
    expect(bob.locator("#log li").first).to_contain_text("editNoteContent")
    bob.locator(".note .text").blur()
    expect(bob.locator("#error")).to_contain_text("409")
    expect(bob.locator("#error")).to_contain_text("changed meanwhile")
    expect(bob.locator("#error")).to_contain_text("milk, bread")
    expect(bob.locator(".note .text")).to_have_value("milk, eggs")
    expect(alice.locator(".note .text")).to_have_value("milk, eggs")

    # From there (base "milk, eggs"), bob's next edit applies.
    bob.locator(".note .text").fill("milk, eggs, bread")
    bob.locator(".note .text").blur()
    expect(alice.locator(".note .text")).to_have_value("milk, eggs, bread")
    expect(bob.locator("#error")).to_have_text("")
    assert [(e.type, e.actor) for e in app.store.events()] == [
        ("addNote", "alice"), ("editNoteTitle", "alice"), ("editNoteContent", "alice"),
        ("editNoteContent", "bob")]
    app.store.verify()
    assert errors == []


def test_a_refused_note_keeps_what_the_user_typed(app, chromium):
    from playwright.sync_api import expect

    errors = []
    page = open_page(chromium, app, "alice", errors)
    expect(page.locator("#status")).to_have_text("live")
    too_long = "x" * 20_001
    add_note(page, "Essay", too_long)
    expect(page.locator("#error")).to_contain_text("400")
    expect(page.locator("#error")).to_contain_text("longer than 20000")
    expect(page.locator("#notes .note")).to_have_count(0)
    expect(page.locator("#add [name=title]")).to_have_value("Essay")
    expect(page.locator("#add [name=text]")).to_have_value(too_long)

    # Shortened and sent again: added, and only now is the form cleared.
    page.fill("#add [name=text]", too_long[:20_000])
    page.click("#add button")
    expect(page.locator("#notes .note")).to_have_count(1)
    expect(page.locator("#add [name=title]")).to_have_value("")
    expect(page.locator("#add [name=text]")).to_have_value("")
    assert app.store.head == 1 and errors == []
