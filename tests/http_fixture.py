"""A local HTTP file server for the download tests: Range requests and injectable faults.

`FileServer.files` maps a URL path to its bytes; `FileServer.faults` maps a path to a list of
faults, one taken per request (then the file is served normally):
  "cut"    headers announce the whole file, half of the body is sent, the connection closes;
  "wrong"  the whole body with its bytes changed (same length);
  "404"    / "500": that status;
  "stall"  headers and a few bytes, then silence for `stall_s` seconds.
`FileServer.requests` records (path, first byte asked) of every GET.
"""

import hashlib
import http.server
import io
import re
import tarfile
import threading
import time

from PIL import Image


class FileServer:
    def __init__(self, stall_s: float = 2.0):
        self.files, self.faults, self.requests = {}, {}, []
        self.stall_s = stall_s
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path
                match = re.match(r"bytes=(\d+)-$", self.headers.get("Range", ""))
                start = int(match.group(1)) if match else 0
                server.requests.append((path, start))
                queue = server.faults.get(path) or []
                fault = queue.pop(0) if queue else None
                if fault in ("404", "500") or path not in server.files:
                    self.send_error(int(fault or 404))
                    return
                data = server.files[path]
                if fault == "wrong":
                    data = bytes(b ^ 0x5A for b in data)
                if start >= len(data) and match:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.end_headers()
                    return
                body = data[start:]
                self.send_response(206 if match else 200)
                if match:
                    self.send_header("Content-Range",
                                     f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if fault == "cut":
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if fault == "stall":
                    self.wfile.write(body[:16])
                    self.wfile.flush()
                    time.sleep(server.stall_s)
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def add_gldv2_tar(self, index: int, data: bytes, md5: str = None):
        """Serves `data` as GLDv2 train tar `index`, with its md5 list."""
        name = f"images_{index:03d}.tar"
        self.files[f"/gldv2/train/{name}"] = data
        md5 = md5 or hashlib.md5(data).hexdigest()
        self.files[f"/gldv2/md5sum/train/md5.images_{index:03d}.txt"] = (
            f"{md5}  {name}\n".encode())


def jpeg(seed: int, size=(24, 16)) -> bytes:
    """A small decodable JPEG, different per seed."""
    image = Image.new("RGB", size, (seed * 37 % 256, seed * 91 % 256, seed * 13 % 256))
    out = io.BytesIO()
    image.save(out, format="JPEG")
    return out.getvalue()


def make_tar(members, *, gzip: bool = False) -> bytes:
    """A tar (gzip when asked) of `members`: (name, bytes) for files, or a ready TarInfo
    with None for links, devices and the like."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz" if gzip else "w") as tar:
        for name, data in members:
            if isinstance(name, tarfile.TarInfo):
                tar.addfile(name)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def gldv2_members(ids):
    """(a/b/c/<id>.jpg, JPEG bytes) for GLDv2 ids."""
    return [(f"{i[0]}/{i[1]}/{i[2]}/{i}.jpg", jpeg(k)) for k, i in enumerate(ids)]
