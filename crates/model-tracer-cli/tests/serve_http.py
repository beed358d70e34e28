"""Raw HTTP against `model-tracer serve`: requests with any body, a
server-sent event stream read to its end, the server's /health. Every
call has a timeout; shared by the serve tests and benches/serve_*.py."""

import http.client
import json
import re
import socket
import threading
import time
import urllib.parse


class Reply:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body)


def split(url):
    u = urllib.parse.urlsplit(url)
    return u.hostname, u.port


def request(url, method, path, body=None, headers=None, timeout=120):
    """One request on its own connection; the reply read whole."""
    host, port = split(url)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        elif isinstance(body, str):
            body = body.encode()
        h = {"Content-Type": "application/json"}
        h.update(headers or {})
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        return Reply(r.status, dict(r.getheaders()), r.read())
    finally:
        conn.close()


def post(url, path, body, timeout=120):
    return request(url, "POST", path, body, timeout=timeout)


def health(url):
    return request(url, "GET", "/health", timeout=30).json()


def metrics(url):
    """The samples of GET /metrics: {(name, ((label, value), ...)): value},
    labels sorted (read line by line; the tests that check the format
    parse it with the Prometheus client)."""
    text = request(url, "GET", "/metrics", timeout=30).body.decode()
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)', line)
        if not m:
            raise ValueError(f"not a sample: {line!r}")
        labels = tuple(sorted(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(2) or "")))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def wait_health(url, pred, what, timeout=60):
    """Polls /health until `pred` holds of it."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        h = health(url)
        if pred(h):
            return h
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}: {health(url)}")


class Stream:
    """A streaming request, read on a thread of its own: its chunks, its
    end. `close()` hangs up on it (a client that goes away)."""

    def __init__(self, url, path, body, timeout=300):
        host, port = split(url)
        self.conn = http.client.HTTPConnection(host, port, timeout=timeout)
        self.chunks = []
        self.done = False
        self.status = None
        self.error = None
        self.body = dict(body, stream=True)
        self.path = path
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            self.conn.request(
                "POST", self.path, body=json.dumps(self.body).encode(),
                headers={"Content-Type": "application/json"})
            r = self.conn.getresponse()
            self.status = r.status
            self.started.set()
            if r.status != 200:
                self.error = r.read()
                return
            while True:
                line = r.readline()
                if not line:
                    return
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    self.done = True
                    return
                self.chunks.append(json.loads(data))
        except Exception as e:  # noqa: BLE001 - a hung-up stream fails in many ways
            self.error = e
        finally:
            self.started.set()

    def close(self):
        """Hangs up: the connection is shut down under the reader."""
        try:
            self.conn.sock and self.conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.conn.close()

    def join(self, timeout=300):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "a stream did not end in time"
        return self

    def text(self):
        out = []
        for c in self.chunks:
            for ch in c.get("choices", []):
                if "delta" in ch:
                    out.append(ch["delta"].get("content") or "")
                else:
                    out.append(ch.get("text") or "")
        return "".join(out)

    def finish_reason(self):
        reasons = [ch["finish_reason"] for c in self.chunks
                   for ch in c.get("choices", []) if ch.get("finish_reason")]
        return reasons[-1] if reasons else None

    def model_trace(self):
        return self.chunks[-1].get("model_trace") if self.chunks else None
