"""Fixtures for the notes example's tests: the real server, in this process, on port 0."""
import importlib.util
import json
import os
import sys
import threading
import urllib.error
import urllib.request

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_server():
    """examples/notes/server.py as the module ``notes_server`` (a name nothing else uses)."""
    if "notes_server" not in sys.modules:
        spec = importlib.util.spec_from_file_location("notes_server", os.path.join(HERE, "server.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["notes_server"] = module
        spec.loader.exec_module(module)
    return sys.modules["notes_server"]


notes_server = _load_server()


class App:
    """A running notes server: its URL, its store, and a small JSON client."""

    def __init__(self, httpd, store):
        self.httpd, self.store = httpd, store
        self.port = httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def call(self, method, path, body=None, *, user=None, headers=None, data=None):
        """(status, decoded JSON body). ``body`` is sent as JSON; ``data`` as raw bytes.

        Either goes with ``Content-Type: application/json`` unless ``headers`` say
        otherwise (urllib would send a form's type).
        """
        headers = dict(headers or {})
        if user is not None:
            headers["X-User"] = user
        if body is not None:
            data = json.dumps(body).encode()
        if data is not None:
            headers.setdefault("Content-Type", "application/json")
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            with error:
                return error.code, json.loads(error.read())

    def command(self, name, body, user="alice", **kwargs):
        return self.call("POST", f"/api/command/{name}", body, user=user, **kwargs)


@pytest.fixture
def app(tmp_path):
    """The notes server on a real SQLite file, serving in a thread; closed afterwards."""
    httpd, store = notes_server.make_server(str(tmp_path / "notes.db"), port=0, heartbeat=0.2)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield App(httpd, store)
    finally:
        httpd.close()
        thread.join(5)
