"""Root conftest: the default selection, the options of the torture suite
(test_torture.py) and its table of figures.

``python -m pytest -q`` leaves out the tests marked ``slow`` (many processes,
crashes, big logs); ``python -m pytest -q -m slow`` runs just those. Any
``-m``, or a test named by its node id, selects as usual. .ci/run runs both.

``python -m pytest -q`` runs test_torture.py at CI scale (short runs);
``python -m pytest -m torture --torture-scale=full`` runs the long version.
Each torture test records the figures it measured (kills, throughput, busy
errors, fuzz examples, WAL size...); they are printed at the end of the run
as a Markdown table, and written to ``--torture-report=PATH`` if given.
"""

import pytest

TORTURE_FIGURES = pytest.StashKey[list]()


def pytest_addoption(parser):
    group = parser.getgroup("torture", "fluxlite torture suite (test_torture.py)")
    group.addoption(
        "--torture-scale", choices=("ci", "full"), default="ci",
        help="ci (default): a short run of each torture test; full: the long run "
             "(at least 200 kills, 8 processes, a 1,000,000-event soak).")
    group.addoption(
        "--torture-report", metavar="PATH", default=None,
        help="also write the torture figures as a Markdown table to PATH.")


def pytest_configure(config):
    config.stash[TORTURE_FIGURES] = []


def pytest_collection_modifyitems(config, items):
    """Without -m or -k (or a test named by node id), leave out the tests marked slow."""
    if config.option.markexpr or config.option.keyword or any("::" in arg for arg in config.args):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


@pytest.fixture(scope="session")
def torture_scale(pytestconfig):
    """'ci' or 'full', from --torture-scale."""
    return pytestconfig.getoption("--torture-scale")


@pytest.fixture
def figure(request):
    """record(what, value): one row of the figures table, with the command that reproduces it."""
    config = request.config
    scale = config.getoption("--torture-scale")
    node = request.node.nodeid
    command = (f"python -m pytest -q -m torture --torture-scale={scale} '{node}'"
               if scale == "full" else f"python -m pytest -q '{node}'")

    def record(what, value):
        config.stash[TORTURE_FIGURES].append((what, str(value), command))

    return record


def _table(rows):
    lines = ["| Figure | Value | Reproduce with |", "|---|---|---|"]
    lines += [f"| {what} | {value} | `{command}` |" for what, value, command in rows]
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter, config):
    rows = config.stash.get(TORTURE_FIGURES, [])
    if not rows:
        return
    scale = config.getoption("--torture-scale")
    terminalreporter.write_sep("-", f"torture figures ({scale} scale)")
    terminalreporter.write_line(_table(rows))
    path = config.getoption("--torture-report")
    if path:
        with open(path, "w", encoding="utf-8") as out:
            out.write(_table(rows) + "\n")
