"""A local stand-in for the Hugging Face Hub and helpers to run code against it in a subprocess.

huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE / HF_HOME at import, so code under test runs in
a fresh interpreter; the server runs in the test process.
"""
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional, Union
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]


class LocalHub:
    """Serves ``root/<org>/<name>/<path>`` with the Hub's resolve protocol:
    ``HEAD|GET /<org>/<name>/resolve/<revision>/<path>`` with X-Repo-Commit / ETag / Content-Length
    headers, and 404s carrying X-Error-Code (RepoNotFound, EntryNotFound) like the real Hub.
    ``failing``: repositories answered with a status (e.g. 503) instead. ``requests`` records every request."""

    def __init__(self, root: Path, failing: Optional[Dict[str, int]] = None):
        self.root = Path(root)
        self.failing = dict(failing or {})
        self.requests: List[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _serve(self, body: bool):
                hub.requests.append(f'{self.command} {self.path}')
                parts = unquote(self.path.split('?')[0]).lstrip('/').split('/')
                if len(parts) < 5 or parts[2] != 'resolve':
                    return self._error(404, 'RepoNotFound')
                repo, filename = '/'.join(parts[:2]), '/'.join(parts[4:])
                if repo in hub.failing:
                    return self._error(hub.failing[repo], 'ServiceUnavailable')
                repo_dir = hub.root / repo
                if not repo_dir.is_dir():
                    return self._error(404, 'RepoNotFound')
                path = repo_dir / filename
                if not path.is_file():
                    return self._error(404, 'EntryNotFound')
                data = path.read_bytes()
                self.send_response(200)
                self.send_header('X-Repo-Commit', hashlib.sha1(repo.encode()).hexdigest())
                self.send_header('ETag', f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header('Content-Length', str(len(data)))
                self.send_header('Content-Type', 'application/octet-stream')
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _error(self, status: int, code: str):
                self.send_response(status)
                self.send_header('X-Error-Code', code)
                self.send_header('X-Error-Message', code)
                self.send_header('Content-Length', '0')
                self.end_headers()

        self.server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f'http://127.0.0.1:{self.server.server_address[1]}'

    def add(self, repo_id: str, filename: str, data: Union[bytes, Path]) -> Path:
        path = self.root / repo_id / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else Path(data).read_bytes())
        return path

    def __enter__(self) -> 'LocalHub':
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


class HungServer:
    """Accepts connections and never answers: a hung Hub endpoint."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(('127.0.0.1', 0))
        self.sock.listen(16)
        self.connections = []
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections.append(conn)

    @property
    def endpoint(self) -> str:
        return f'http://127.0.0.1:{self.sock.getsockname()[1]}'

    def __enter__(self) -> 'HungServer':
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        for conn in self.connections:
            conn.close()
        self.sock.close()


def dead_endpoint() -> str:
    """An endpoint nothing listens on (connection refused)."""
    sock = socket.socket()
    sock.bind(('127.0.0.1', 0))
    port = sock.getsockname()[1]
    sock.close()
    return f'http://127.0.0.1:{port}'


def run_python(code: str, endpoint: str, hf_home: Path, extra_env: Optional[Dict[str, str]] = None,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter pointed at ``endpoint`` with its own HF cache."""
    env = dict(os.environ)
    for key in list(env):
        if key.startswith('HF_') or key.startswith('HUGGINGFACE'):
            del env[key]
    # This checkout's package first (not whichever piip_timm the interpreter has installed), then the test helpers.
    path = [str(ROOT / 'src'), str(ROOT / 'tests')] + [p for p in [env.get('PYTHONPATH')] if p]
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY='1',
               HF_HUB_DISABLE_PROGRESS_BARS='1', PYTHONPATH=os.pathsep.join(path))
    env.update(extra_env or {})
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=timeout)


def dump_json(obj) -> str:
    return json.dumps(obj)
