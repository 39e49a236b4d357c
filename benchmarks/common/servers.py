"""Object-store stand-ins on 127.0.0.1, run in the benchmark's parent process (their memory is no child's).

* S3: moto's ``ThreadedMotoServer`` (objects in spooled temp files, ~60 MiB/s here, and it reads
  the whole object for every ranged GET);
* GCS: ``gcp-storage-emulator`` (single-threaded ``http.server``, objects in memory; a resumable
  upload re-copies everything received so far on every chunk, so big streamed saves get slower
  than linearly).

Each can be wrapped with server-side request counting (``counting.py``). Credentials are the fake
``testing`` keys; no real service is ever reached.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Any

from common.counting import CountingWSGI, RequestLog, counting_handler

S3_KEYS = {"key": "testing", "secret": "testing"}
GCSFS_FLAG = "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"  # read by gcsfs at import time


def use_test_credentials() -> None:
    """Put moto's fake credentials into this process's environment.

    An ``AWS_PROFILE`` would make botocore look for a real profile, so it is dropped.
    """
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    os.environ.pop("AWS_PROFILE", None)


def child_env() -> dict[str, str]:
    """An environment for children: this process's, with the test credentials and unbuffered output."""
    use_test_credentials()
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def start_moto(count: bool = True) -> tuple[Any, str, RequestLog | None]:
    """Start moto on a free port; returns (server, endpoint URL, request log if ``count``)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request (moto's 500s still show)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    log = None
    if count:
        log = RequestLog()
        wsgi = server._server  # werkzeug's server; its handler looks up .app for every request
        assert wsgi is not None
        wsgi.app = CountingWSGI(wsgi.app, log)
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}", log


def s3_options(endpoint: str) -> dict[str, Any]:
    """fsspec ``storage_options`` for the moto server at ``endpoint``."""
    return {"client_kwargs": {"endpoint_url": endpoint}, **S3_KEYS}


def s3_fs(endpoint: str, **options: Any) -> Any:
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True, **s3_options(endpoint), **options)


def start_gcs_emulator() -> tuple[Any, str, RequestLog]:
    """Start the GCS emulator (in memory) on a free port, with request counting.

    Sets ``STORAGE_EMULATOR_HOST`` and ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` in this process's
    environment (children inherit them). Without the flag, ``gs://`` resolves to gcsfs's extended
    filesystem, which asks the Storage Control gRPC API for each bucket's type and, against the
    emulator, waits 60 s before falling back. Returns (server, endpoint URL, request log).
    """
    if "gcsfs" in sys.modules and os.environ.get(GCSFS_FLAG) != "false":
        raise RuntimeError(f"gcsfs was imported before {GCSFS_FLAG}=false was set; the emulator would stall it")
    os.environ[GCSFS_FLAG] = "false"
    from gcp_storage_emulator.server import RequestHandler, create_server

    logging.getLogger("gcp_storage_emulator").setLevel(logging.ERROR)
    server = create_server("127.0.0.1", 0, in_memory=True)  # on disk, each upload chunk rewrites the whole file
    server.start()
    httpd = server._api._httpd  # the bound port and handler class are only reachable here
    log = RequestLog()
    handler = counting_handler(_without_move(RequestHandler), log)
    httpd.RequestHandlerClass = functools.partial(handler, server._storage)
    _quiet_disconnects(httpd)
    endpoint = f"http://127.0.0.1:{httpd.server_address[1]}"
    os.environ["STORAGE_EMULATOR_HOST"] = endpoint
    return server, endpoint, log


def gcs_options(endpoint: str) -> dict[str, Any]:
    """fsspec ``storage_options`` for the GCS emulator at ``endpoint``."""
    return {"endpoint_url": endpoint, "token": "anon"}


def gcs_fs(endpoint: str) -> Any:
    import gcsfs

    return gcsfs.GCSFileSystem(skip_instance_cache=True, **gcs_options(endpoint))


def _without_move(base: Any) -> Any:
    """Answer ``moveTo`` (which the emulator lacks) with 400 rather than its 501.

    gcsfs's ``mv`` tries the ``moveTo`` API first and falls back to copy + delete; a 501 counts as
    transient, so it would retry for ~31 s first (DCP renames its ``.metadata`` on every save).
    """

    class WithoutMove(base):
        def do_POST(self) -> None:
            if "/moveTo/" not in self.path:
                super().do_POST()
                return
            body = b'{"error": {"code": 400, "message": "moveTo is not supported by the emulator"}}'
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return WithoutMove


def _quiet_disconnects(httpd: Any) -> None:
    """The emulator prints a traceback whenever a client drops a connection early; keep other errors."""
    original = httpd.handle_error

    def handle_error(request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            return
        original(request, client_address)

    httpd.handle_error = handle_error
