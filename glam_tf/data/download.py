"""Downloads GLDv2 and the retrieval test sets from their hosts: resumable, verified, safe.

Where the files come from (the datasets' own pages and scripts):
  - GLDv2 train: cvdfoundation/google-landmark README.md and download-dataset.sh:
    https://s3.amazonaws.com/google-landmark/metadata/{train.csv,train_clean.csv},
    .../train/images_000.tar ... images_499.tar (~1 GB each), and one published md5 per tar
    at .../md5sum/train/md5.images_NNN.txt ("<md5>  images_NNN.tar"). The README does not
    say which tar holds which id: every tar is fetched for either csv, and the members of
    each extracted tar are recorded (`archive_members/`) so the converter can name the tar
    of a missing image.
  - Revisited Oxford/Paris and the 1M distractors: filipradenovic/revisitop python/download.py:
    https://www.robots.ox.ac.uk/~vgg/data/oxbuildings/oxbuild_images-v1.tgz,
    https://www.robots.ox.ac.uk/~vgg/data/parisbuildings/paris_{1,2}-v1.tgz (extracted flat
    into jpg/), http://cmp.felk.cvut.cz/revisitop/data/datasets/<name>/gnd_<name>.pkl,
    http://ptak.felk.cvut.cz/revisitop/revisitop1m/jpg/revisitop1m.{1..100}.tar.gz and
    .../revisitop1m/revisitop1m.txt.
  - Original Oxford5k/Paris6k ground truth, from the same VGG pages: gt_files_170407.tgz
    (oxbuildings) and paris_120310.tgz (parisbuildings).

Output (`output_dir`, any tf.io.gfile path), the layouts glam_tf.data.gldv2 and
glam_tf.data.testsets read:
  gldv2/train_clean.csv, gldv2/train.csv, gldv2/train/<a>/<b>/<c>/<id>.jpg,
  gldv2/archive_members/images_NNN.tar.txt      (one extracted member path per line)
  roxford5k/{jpg/, gnd_roxford5k.pkl}, rparis6k/{jpg/, gnd_rparis6k.pkl},
  revisitop1m/{jpg/, revisitop1m.txt}, oxford5k/{jpg/, gt_files/}, paris6k/{jpg/, gt_files/}
  download_manifest.json   per fetched file: url, size, sha256, md5 (when published), how
                           it was checked and where it was installed.

Every file is fetched into a local download folder under `<name>.partial` and continued
with an HTTP Range request after an interruption; transient errors (5xx, 408, 429, a cut
connection, a stall past `timeout_s`) are retried with exponential backoff, `tries` times
without progress. A file is checked against its published md5 (GLDv2), otherwise read whole
(an archive: every member listed, gzip's CRC checked) and its size and sha256 recorded in the
manifest; a recorded file that no longer matches is fetched again. Only then is it renamed
to its final name and installed: an archive is checked member by member before anything is
written (absolute paths, `..`, links, devices and members over `max_member_bytes` are
refused, naming archive and member), then each member is written under a temporary name and
renamed. A rerun skips what the manifest records as installed and still present.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import hashlib
import http.client
import re
import socket
import tarfile
import threading
import time
import urllib.error
import urllib.request
from typing import Optional

from absl import logging

from glam_tf import files
from glam_tf.data import progress
from glam_tf.refusal import Refused

DATASETS = ("gldv2_train_clean", "gldv2_train_full", "roxford5k", "rparis6k", "revisitop1m",
            "oxford5k", "paris6k")
# Host key -> base URL (cited in the module docstring). `--base_url=U` serves every key
# from U/<key>/...; `--mirror=key=U` replaces one.
HOSTS = {
    "gldv2": "https://s3.amazonaws.com/google-landmark",
    "oxbuildings": "https://www.robots.ox.ac.uk/~vgg/data/oxbuildings",
    "parisbuildings": "https://www.robots.ox.ac.uk/~vgg/data/parisbuildings",
    "revisitop": "http://cmp.felk.cvut.cz/revisitop/data/datasets",
    "revisitop1m": "http://ptak.felk.cvut.cz/revisitop/revisitop1m",
}
GLDV2_TARS = 500
REVISITOP1M_TARS = 100
MANIFEST_NAME = "download_manifest.json"
MEMBERS_DIR = "archive_members"
PARTIAL_SUFFIX = ".partial"
DEFAULT_MAX_MEMBER_BYTES = 256 * 2**20  # the largest GLDv2 or Oxford photo is a few MB
CHUNK_BYTES = 2**20
_RETRY_STATUS = (408, 429, 500, 502, 503, 504)
_MD5_RE = re.compile(r"^\s*([0-9a-fA-F]{32})\b")


@dataclasses.dataclass(frozen=True)
class Install:
    """Where a fetched file goes: `target` (relative to the output folder) is the file
    itself, or for an archive the folder it is extracted into (`flatten`: members by base
    name only, as revisitop's script moves Oxford/Paris photos into one folder)."""

    target: str
    archive: bool = False
    flatten: bool = False
    members_list: str = ""  # where an archive's member list goes (relative), "" for none


@dataclasses.dataclass(frozen=True)
class Remote:
    """One file on a host: `host` key, `path` under its base URL, the published md5's path
    (None when the host publishes none) and where it is installed."""

    host: str
    path: str
    md5_path: Optional[str]
    installs: tuple

    @property
    def key(self) -> str:
        """Its name in the manifest and in the download folder: `<host>/<path>`."""
        return f"{self.host}/{self.path}"


@dataclasses.dataclass(frozen=True)
class DownloadConfig:
    """What `download` fetches and how.

    Attributes:
      datasets: names from DATASETS.
      output_dir: where the datasets go (any tf.io.gfile path).
      download_dir: a local folder for the archives while they are fetched ("" =
        `<output_dir>/downloads` for a local output, a private scratch folder otherwise).
      parallel: files fetched at once (threads).
      tries: attempts per file without progress (and md5 checks) before refusing it.
      backoff_s: first wait before a retry, doubled each time (capped at 60 s).
      timeout_s: a connection silent this long is a transient error.
      max_member_bytes: largest archive member extracted.
      keep_archives: keep the archives after extraction (else deleted once installed).
      base_url: serve every host from `<base_url>/<host key>` ("" = the hosts of HOSTS).
      mirrors: host key -> base URL, overriding one host.
      gldv2_tars: indices of the GLDv2 train tars (default all 500).
      revisitop1m_tars: numbers of the revisitop1m tars (default 1..100).
      log_every_s: seconds between progress lines.
    """

    datasets: tuple
    output_dir: str
    download_dir: str = ""
    parallel: int = 4
    tries: int = 5
    backoff_s: float = 2.0
    timeout_s: float = 60.0
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
    keep_archives: bool = False
    base_url: str = ""
    mirrors: tuple = ()
    gldv2_tars: tuple = tuple(range(GLDV2_TARS))
    revisitop1m_tars: tuple = tuple(range(1, REVISITOP1M_TARS + 1))
    log_every_s: float = 10.0

    def validate(self) -> None:
        """Raises ValueError naming the flag that breaks its rule."""
        unknown = [d for d in self.datasets if d not in DATASETS]
        if not self.datasets or unknown:
            raise ValueError(f"--datasets must name some of {', '.join(DATASETS)}; received "
                             f"{','.join(self.datasets) or 'nothing'}")
        if not self.output_dir:
            raise ValueError("--output_dir must not be empty")
        if self.download_dir and not files.is_local(self.download_dir):
            raise ValueError(f"--download_dir must be a local folder; received "
                             f"{self.download_dir}")
        for name, value, low in (("parallel", self.parallel, 1), ("tries", self.tries, 1),
                                 ("max_member_bytes", self.max_member_bytes, 1)):
            if value < low:
                raise ValueError(f"--{name} must be >= {low}; received {value}")
        for name, value in (("backoff_s", self.backoff_s), ("timeout_s", self.timeout_s),
                            ("log_every_s", self.log_every_s)):
            if not value >= 0:
                raise ValueError(f"--{name} must be >= 0; received {value}")
        for host, url in self.mirrors:
            if host not in HOSTS:
                raise ValueError(f"--mirror {host}={url}: unknown host key {host!r} (known: "
                                 f"{', '.join(HOSTS)})")
        for url in [self.base_url] + [u for _, u in self.mirrors]:
            if url and not url.startswith(("http://", "https://")):
                raise ValueError(f"--base_url/--mirror {url!r} must start with http:// or "
                                 "https://")
        for name, values, count, first in (("gldv2_tars", self.gldv2_tars, GLDV2_TARS, 0),
                                           ("revisitop1m_tars", self.revisitop1m_tars,
                                            REVISITOP1M_TARS, 1)):
            bad = [v for v in values if not first <= v < first + count]
            if not values or bad:
                raise ValueError(f"--{name} must be numbers in [{first}, "
                                 f"{first + count - 1}]; received {bad or 'none'}")

    def url(self, remote_host: str, path: str) -> str:
        """The URL of `path` on host `remote_host`, mirrors and base URL applied."""
        base = dict(self.mirrors).get(remote_host)
        if base is None:
            base = f"{self.base_url.rstrip('/')}/{remote_host}" if self.base_url else (
                HOSTS[remote_host])
        return f"{base.rstrip('/')}/{path}"


def parse_ranges(text: str) -> tuple:
    """`0-9,42` -> (0, 1, ..., 9, 42); raises ValueError on anything else."""
    out = []
    for part in text.split(","):
        part = part.strip()
        low, sep, high = part.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"{text!r} is not a list of numbers and ranges such as 0-9,42")
        out.extend(range(int(low), int(high if sep else low) + 1))
    return tuple(sorted(set(out)))


def remotes(config: DownloadConfig) -> list:
    """The files `config.datasets` need, each once (Oxford's images serve two datasets)."""
    wanted = []
    sets = set(config.datasets)
    for name, csv in (("gldv2_train_clean", "train_clean.csv"), ("gldv2_train_full", "train.csv")):
        if name in sets:
            wanted.append(Remote("gldv2", f"metadata/{csv}", None, (Install(f"gldv2/{csv}"),)))
    if sets & {"gldv2_train_clean", "gldv2_train_full"}:
        for i in config.gldv2_tars:
            tar = f"images_{i:03d}.tar"
            wanted.append(Remote("gldv2", f"train/{tar}", f"md5sum/train/md5.images_{i:03d}.txt",
                                 (Install("gldv2/train", archive=True,
                                          members_list=f"gldv2/{MEMBERS_DIR}/{tar}.txt"),)))
    archives = {
        "roxford5k": [("oxbuildings", "oxbuild_images-v1.tgz", "roxford5k/jpg", True)],
        "rparis6k": [("parisbuildings", f"paris_{k}-v1.tgz", "rparis6k/jpg", True)
                     for k in (1, 2)],
        "oxford5k": [("oxbuildings", "oxbuild_images-v1.tgz", "oxford5k/jpg", False),
                     ("oxbuildings", "gt_files_170407.tgz", "oxford5k/gt_files", True)],
        "paris6k": [("parisbuildings", f"paris_{k}-v1.tgz", "paris6k/jpg", False)
                    for k in (1, 2)] + [("parisbuildings", "paris_120310.tgz",
                                         "paris6k/gt_files", True)],
        "revisitop1m": [("revisitop1m", f"jpg/revisitop1m.{i}.tar.gz", "revisitop1m/jpg",
                         False) for i in config.revisitop1m_tars],
    }
    by_key = {}
    for name in DATASETS:
        if name not in sets:
            continue
        for host, path, target, flatten in archives.get(name, []):
            listing = f"{target.split('/')[0]}/{MEMBERS_DIR}/{files.basename(path)}.txt"
            by_key.setdefault((host, path), []).append(
                Install(target, archive=True, flatten=flatten, members_list=listing))
        if name in ("roxford5k", "rparis6k"):
            by_key.setdefault(("revisitop", f"{name}/gnd_{name}.pkl"), []).append(
                Install(f"{name}/gnd_{name}.pkl"))
        if name == "revisitop1m":
            by_key.setdefault(("revisitop1m", "revisitop1m.txt"), []).append(
                Install("revisitop1m/revisitop1m.txt"))
    wanted.extend(Remote(host, path, None, tuple(installs))
                  for (host, path), installs in by_key.items())
    return wanted


# ---------------------------------------------------------------------------- progress


class ByteProgress:
    """Bytes fetched by every thread: logs `fetched X of ~Y (k/n files) R/s ETA` lines.

    The total is the sum of the sizes the hosts announced, files not started yet counted at
    the mean announced size. `log_every_s=None` keeps it silent.
    """

    def __init__(self, num_files: int, *, log_every_s: Optional[float]):
        self._lock = threading.Lock()
        self._num_files = num_files
        self._sizes = {}
        self._fetched = 0
        self._present = {}  # key -> bytes there before this run (a resumed or kept file)
        self._done = 0
        self._start = time.monotonic()
        self._log_every_s = log_every_s
        self._last = -float("inf")

    def expect(self, key: str, size: int, present: int = 0) -> None:
        """File `key` is `size` bytes, `present` of them there before this run."""
        with self._lock:
            self._sizes[key] = size
            self._present.setdefault(key, present)

    def add(self, count: int) -> None:
        with self._lock:
            self._fetched += count
        self._maybe_log()

    @property
    def fetched(self) -> int:
        """Bytes fetched so far by every thread."""
        with self._lock:
            return self._fetched

    def file_done(self, key: str, fetched_before: int = 0) -> None:
        """A file needs no more bytes (`fetched_before`: bytes of it present already)."""
        with self._lock:
            self._done += 1
            self._present.setdefault(key, fetched_before)
            self._sizes.setdefault(key, fetched_before)
        self._maybe_log(force=self._done == self._num_files)

    def line(self) -> str:
        with self._lock:
            known = list(self._sizes.values())
            estimate = sum(known) + (self._num_files - len(known)) * (
                sum(known) / len(known) if known else 0)
            fetched, done, present = self._fetched, self._done, sum(self._present.values())
        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = fetched / elapsed
        left = max(estimate - present - fetched, 0)
        eta = progress.format_seconds(left / rate) if rate > 0 and done < self._num_files else (
            "0:00:00" if done == self._num_files else "?")
        return (f"download: fetched {_size(fetched)} of ~{_size(estimate)} ({done}/"
                f"{self._num_files} files done) {_size(rate)}/s ETA {eta}")

    def _maybe_log(self, force: bool = False) -> None:
        if self._log_every_s is None:
            return
        now = time.monotonic()
        with self._lock:
            if not force and now - self._last < self._log_every_s:
                return
            self._last = now
        logging.info("%s", self.line())


def _size(n: float) -> str:
    """`n` bytes in B, KiB, ... TiB."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"


# ---------------------------------------------------------------------------- fetching


class _Transient(Exception):
    """A failure worth another try (5xx, a cut connection, a stall)."""


def _full_disk(error: OSError, path: str) -> OSError:
    """`error` with the path named when it is a full disk or quota (a one-line refusal)."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT) and error.filename is None:
        return OSError(error.errno, error.strerror or "No space left on device", path)
    return error


def _install_file(final: str, write) -> None:
    """`write(tmp)` fills a temporary name beside `final`, then it is renamed to `final`:
    nothing incomplete under a final name; a full disk is a refusal naming `final`."""
    tmp = files.temporary_path(final)
    try:
        write(tmp)
        files.rename(tmp, final)
    except BaseException as e:
        if files.exists(tmp):
            files.remove(tmp)
        if isinstance(e, OSError):
            raise _full_disk(e, final) from e
        raise


def _request(url: str, offset: int, timeout_s: float):
    """Opens `url` from byte `offset`; returns (response, start) with start the offset the
    body begins at (0 when the host ignored the Range), or (None, offset) when the host says
    the range is past the end (the partial file is complete)."""
    headers = {"User-Agent": "glam-tf-download"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                          timeout=timeout_s)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            return None, offset
        if e.code in _RETRY_STATUS:
            raise _Transient(f"HTTP {e.code} {e.reason}") from e
        raise Refused(url, f"HTTP {e.code} {e.reason}",
                      "check --base_url/--mirror, or the host's page for a new address") from e
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        raise _Transient(f"{type(e).__name__}: {getattr(e, 'reason', e)}") from e
    if response.status == 206:
        match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
        start = int(match.group(1)) if match else offset
        if start != offset:
            response.close()
            raise _Transient(f"the host answered a Range from {offset} with one from {start}")
        return response, offset
    return response, 0


def fetch(url: str, dest: str, *, config: DownloadConfig, meter: ByteProgress,
          key: str, name: str) -> int:
    """Fetches `url` into the local file `dest` (resuming `dest`; the caller renames it);
    `name` is the file's name in messages.

    Returns the file's size. A try is spent on each failure that brought no new bytes.

    Raises:
      Refused: an HTTP error that is not transient, or `tries` failures in a row.
    """
    failures, wait = 0, config.backoff_s
    while True:
        offset = files.getsize(dest) if files.exists(dest) else 0
        received = 0
        try:
            response, start = _request(url, offset, config.timeout_s)
            if response is None:
                return offset
            with response:
                length = response.headers.get("Content-Length")
                total = start + int(length) if length is not None else None
                if total is not None:
                    meter.expect(key, total, present=start)
                try:
                    with files.open_file(dest, "ab" if start else "wb") as out:
                        while True:
                            chunk = response.read(CHUNK_BYTES)
                            if not chunk:
                                break
                            out.write(chunk)
                            received += len(chunk)
                            meter.add(len(chunk))
                except OSError as e:
                    if isinstance(e, (ConnectionError, TimeoutError)):
                        raise
                    raise _full_disk(e, dest) from e
            size = files.getsize(dest)
            if total is not None and size < total:
                raise _Transient(f"connection closed at byte {size} of {total}")
            return size
        except (_Transient, ConnectionError, TimeoutError, socket.timeout,
                http.client.HTTPException) as e:
            failures = 0 if received else failures + 1
            if failures >= config.tries:
                raise Refused(name, f"{url} failed {failures} times in a row (last: "
                              f"{_reason(e)})",
                              "check the network and rerun the same command (it resumes)"
                              ) from e
            logging.warning("%s: %s; retrying in %.1f s", url, _reason(e), wait)
            time.sleep(wait)
            wait = min(max(wait * 2, 1e-3), 60.0)


def _reason(error: Exception) -> str:
    text = " ".join(str(error).split())
    if isinstance(error, (TimeoutError, socket.timeout)):
        return f"no data for the timeout ({text or 'timed out'})"
    if isinstance(error, http.client.IncompleteRead):
        return "connection closed mid-file"
    return f"{type(error).__name__}: {text}" if not isinstance(error, _Transient) else text


def _digests(path: str) -> tuple:
    """(md5, sha256) hex digests of the file `path`."""
    md5, sha = hashlib.md5(), hashlib.sha256()
    with files.open_file(path, "rb") as f:
        while True:
            chunk = f.read(8 * CHUNK_BYTES)
            if not chunk:
                break
            md5.update(chunk)
            sha.update(chunk)
    return md5.hexdigest(), sha.hexdigest()


def published_md5(url: str, *, config: DownloadConfig, scratch: str) -> str:
    """The md5 a host publishes in a `<md5>  <name>` text file at `url`."""
    path = files.join(scratch, "md5-" + hashlib.sha1(url.encode()).hexdigest() + ".txt")
    if files.exists(path):
        files.remove(path)
    fetch(url, path, config=config, meter=ByteProgress(1, log_every_s=None), key=url,
          name=url.rsplit("/", 1)[-1])
    text = files.read_bytes(path).decode("utf-8", "replace")
    files.remove(path)
    match = _MD5_RE.match(text)
    if not match:
        raise Refused(url, "holds no md5 (expected '<32 hex digits>  <file name>')",
                      "check --base_url/--mirror")
    return match.group(1).lower()


# ---------------------------------------------------------------------------- archives


def _member_problem(member: tarfile.TarInfo, max_bytes: int) -> Optional[str]:
    """Why `member` must not be extracted, or None."""
    name = member.name
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "has an absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "has '..' in its path"
    if member.issym() or member.islnk():
        return f"is a link (to {member.linkname!r})"
    if member.ischr() or member.isblk() or member.isfifo():
        return "is a device or pipe"
    if not (member.isfile() or member.isdir()):
        return "is not a regular file or folder"
    if member.isfile() and member.size > max_bytes:
        return f"is {member.size} bytes, over the cap of {max_bytes} (--max_member_bytes)"
    return None


def check_archive(path: str, *, max_member_bytes: int, name: str) -> list:
    """Reads the whole archive `path` once and checks every member.

    The stream is read to its end, so a gzip archive's CRC and length are verified too.

    Returns:
      The regular members (TarInfo), in order.

    Raises:
      Refused: a member that must not be extracted (names archive and member).
      tarfile.TarError / EOFError / OSError (zlib, gzip): a damaged archive.
    """
    regular = []
    with files.open_file(path, "rb") as f, tarfile.open(fileobj=f, mode="r:*") as tar:
        for member in tar:
            problem = _member_problem(member, max_member_bytes)
            if problem:
                raise Refused(name, f"archive member {member.name!r} {problem}",
                              "nothing was extracted from it; get the archive from its "
                              "publisher")
            if member.isfile():
                regular.append(member)
        while tar.fileobj.read(8 * CHUNK_BYTES):
            pass
    return regular


def _member_target(member: tarfile.TarInfo, install: Install) -> str:
    parts = [p for p in re.split(r"[/\\]", member.name) if p not in ("", ".")]
    return parts[-1] if install.flatten else "/".join(parts)


def extract(path: str, members: list, install: Install, output_dir: str) -> list:
    """Writes the checked regular `members` of archive `path` under
    `<output_dir>/<install.target>`, each under a temporary name then renamed; returns the
    relative paths written."""
    root = files.join(output_dir, install.target)
    made, written = set(), []
    wanted = {m.name for m in members}
    with files.open_file(path, "rb") as f, tarfile.open(fileobj=f, mode="r:*") as tar:
        for member in tar:
            if member.name not in wanted or not member.isfile():
                continue
            relative = _member_target(member, install)
            final = files.join(root, *relative.split("/"))
            folder = files.dirname(final)
            if folder not in made:
                files.makedirs(folder)
                made.add(folder)
            source = tar.extractfile(member)

            def write(tmp, source=source):
                with files.open_file(tmp, "wb") as out:
                    out.write(b"")
                    while True:
                        chunk = source.read(CHUNK_BYTES)
                        if not chunk:
                            break
                        out.write(chunk)

            _install_file(final, write)
            written.append(relative)
    return written


# ---------------------------------------------------------------------------- the driver


class _Manifest:
    """download_manifest.json, updated by every thread (under a lock, written atomically)."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self.entries = files.read_json(path) if files.exists(path) else {}

    def get(self, key: str) -> Optional[dict]:
        with self._lock:
            return self.entries.get(key)

    def put(self, key: str, entry: dict) -> None:
        with self._lock:
            self.entries[key] = entry
            files.write_json_atomic(self.path, self.entries)


def _installed(entry: Optional[dict], remote: Remote, output_dir: str) -> bool:
    """Whether the manifest says `remote` is installed and its files are all there (every
    member of an archive on a local disk; on an object store, where each check is a
    request, the member list and the first and last member)."""
    if not entry or sorted(entry.get("installed", [])) != sorted(i.target for i in
                                                                 remote.installs):
        return False
    for install in remote.installs:
        if not install.archive:
            path = files.join(output_dir, install.target)
            if not files.exists(path) or files.getsize(path) != entry["size"]:
                return False
            continue
        listing = files.join(output_dir, install.members_list)
        if not files.exists(listing):
            return False
        root = files.join(output_dir, install.target)
        members = [line for line in files.read_text(listing).splitlines() if line]
        if not files.is_local(output_dir):
            members = members[:1] + members[-1:]
        for line in members:
            if not files.exists(files.join(root, *line.split("/"))):
                logging.info("%s: %s is gone; fetching the archive again", remote.key, line)
                return False
    return True


@dataclasses.dataclass
class DownloadSummary:
    """What `download` did: files fetched now, files already there, bytes fetched."""

    fetched: list
    skipped: list
    bytes_fetched: int
    manifest_path: str


def _process(remote: Remote, *, config: DownloadConfig, download_dir: str,
             manifest: _Manifest, meter: ByteProgress) -> bool:
    """Fetches, verifies and installs one file; returns whether bytes were fetched."""
    entry = manifest.get(remote.key)
    if _installed(entry, remote, config.output_dir):
        meter.file_done(remote.key, entry["size"])
        return False
    url = config.url(remote.host, remote.path)
    local = files.join(download_dir, remote.host, *remote.path.split("/"))
    partial = local + PARTIAL_SUFFIX
    files.makedirs(files.dirname(local))
    md5 = (published_md5(config.url(remote.host, remote.md5_path), config=config,
                         scratch=files.dirname(local)) if remote.md5_path else None)
    is_archive = any(i.archive for i in remote.installs)
    fetched_any = False
    for attempt in range(1, config.tries + 1):
        if files.exists(local) and not files.exists(partial):
            files.rename(local, partial)  # checked again below, as a fetched file is
        if not (files.exists(partial) and entry and "sha256" in entry and md5 is None
                and files.getsize(partial) == entry["size"]):
            before = files.getsize(partial) if files.exists(partial) else 0
            size = fetch(url, partial, config=config, meter=meter, key=remote.key,
                         name=files.basename(local))
            fetched_any = fetched_any or size > before
        got_md5, got_sha = _digests(partial)
        problem = None
        if md5 is not None and got_md5 != md5:
            problem = f"md5 {got_md5} differs from the published {md5}"
        elif md5 is None and entry and entry.get("sha256") not in (None, got_sha):
            problem = f"sha256 {got_sha} differs from the one recorded before"
        members = None
        if problem is None and is_archive:
            try:
                members = check_archive(partial, max_member_bytes=config.max_member_bytes,
                                        name=files.basename(local))
            except (tarfile.TarError, EOFError, OSError, ValueError) as e:
                problem = f"not a readable archive ({type(e).__name__}: {e})"
        if problem is None:
            break
        logging.warning("%s (try %d of %d): %s; fetching it again", remote.key, attempt,
                        config.tries, problem)
        files.remove(partial)
        entry = None
    else:
        raise Refused(files.basename(local), f"{problem} after {config.tries} tries ({url})",
                      "the host serves a damaged copy: rerun later or use --mirror")
    files.rename(partial, local)
    record = {"url": url, "size": files.getsize(local), "sha256": got_sha, "md5": md5,
              "check": "published md5" if md5 else "read whole, size and sha256 recorded",
              "installed": []}
    for install in remote.installs:
        if install.archive:
            written = extract(local, members, install, config.output_dir)
            listing = files.join(config.output_dir, install.members_list)
            files.makedirs(files.dirname(listing))
            files.write_text_atomic(listing, "".join(w + "\n" for w in written))
            record["members"] = len(written)
        else:
            target = files.join(config.output_dir, install.target)
            files.makedirs(files.dirname(target))
            _install_file(target, lambda tmp: files.copy(local, tmp))
        record["installed"].append(install.target)
    if not config.keep_archives:
        files.remove(local)
    manifest.put(remote.key, record)
    meter.file_done(remote.key)
    logging.info("%s: %s (%d bytes, %s)", remote.key, "installed", record["size"],
                 record["check"])
    return fetched_any


def download(config: DownloadConfig) -> DownloadSummary:
    """Fetches, verifies and installs everything `config.datasets` needs (see module doc).

    Args:
      config: what and how (validated here).

    Returns:
      A `DownloadSummary`.

    Raises:
      ValueError: a bad setting.
      Refused: a file that cannot be fetched or verified, a hostile archive, a full disk.
    """
    config.validate()
    wanted = remotes(config)
    files.makedirs(config.output_dir)
    download_dir = config.download_dir or (
        files.join(config.output_dir, "downloads") if files.is_local(config.output_dir)
        else files.scratch_dir("glam_tf_download_"))
    files.makedirs(download_dir)
    manifest = _Manifest(files.join(config.output_dir, MANIFEST_NAME))
    meter = ByteProgress(len(wanted), log_every_s=config.log_every_s)
    logging.info("download: %d files for %s into %s (archives fetched in %s)", len(wanted),
                 ", ".join(config.datasets), config.output_dir, download_dir)
    fetched, skipped = [], []
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=config.parallel)
    futures = {pool.submit(_process, r, config=config, download_dir=download_dir,
                           manifest=manifest, meter=meter): r for r in wanted}
    try:
        for future in concurrent.futures.as_completed(futures):
            (fetched if future.result() else skipped).append(futures[future].key)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    logging.info("%s", meter.line())
    return DownloadSummary(fetched=sorted(fetched), skipped=sorted(skipped),
                           bytes_fetched=meter.fetched, manifest_path=manifest.path)
