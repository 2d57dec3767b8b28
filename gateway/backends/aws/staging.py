"""S3 staging: content-addressed inputs and image archives up, an attempt's results down.

Layout under the profile's bucket and prefix::

    PREFIX/images/<sha256>.tar          OCI archives (content-addressed: uploaded once)
    PREFIX/inputs/<sha256>[.tar]        input files (folders as a reproducible tar)
    PREFIX/runs/<key>/stdout|stderr|outputs.tar|status.json     one attempt's results
    PREFIX/inbox/<key>.json             the same status object, listed by ``poll``

Uploads go through boto3's managed transfer (multipart above ``multipart_mb``); an object
already present (``head_object``) is not uploaded again. Downloads are checked: the outputs
tar against the sha256 the instance computed, and the tar is unpacked only for plain
relative file names. The instance reads and writes through presigned URLs only.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.backends.aws.profile import AwsProfile
from gateway.errors import BackendError
from gateway.hashing import file_sha256
from gateway.node import write_json_atomic

Call = Callable[..., Any]   # (service, operation, **params) -> response, errors mapped


class StagingError(BackendError):
    """An object could not be staged or a download did not match its checksum."""


def tar_folder(folder: Path, dest: Path) -> None:
    """A reproducible tar of ``folder`` (sorted names, mtime 0, uid/gid 0)."""
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(folder.rglob("*")):
            info = tar.gettarinfo(str(path), arcname=path.relative_to(folder).as_posix())
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if info.isfile():
                with open(path, "rb") as fh:
                    tar.addfile(info, fh)
            elif info.isdir() or info.issym():
                tar.addfile(info)


class Staging:
    """Moves bytes between this machine and S3 for one profile. ``call`` maps errors."""

    def __init__(self, profile: AwsProfile, call: Call, transfer: Callable[[], Any],
                 scratch: Path) -> None:
        self.profile, self._call, self._transfer, self.scratch = profile, call, transfer, scratch
        self._present: set[str] = set()   # keys known to exist (content-addressed: forever)

    # -- up -----------------------------------------------------------------------------
    def put_file(self, path: Path, key: str) -> None:
        """Upload unless present; multipart above the profile's threshold."""
        if key in self._present or self._exists(key):
            self._present.add(key)
            return
        self._call("s3", "upload_file", Filename=str(path), Bucket=self.profile.bucket, Key=key,
                   Config=self._transfer())
        self._present.add(key)

    def _exists(self, key: str) -> bool:
        try:
            self._call("s3", "head_object", Bucket=self.profile.bucket, Key=key)
            return True
        except StagingError:
            return False

    def stage_input(self, source: str) -> tuple[str, str, bool]:
        """(key, sha256 hex, is_dir) of a local file or folder, uploaded content-addressed."""
        path = Path(source)
        if path.is_dir():
            self.scratch.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.scratch, suffix=".tar")
            os.close(fd)
            try:
                tar_folder(path, Path(tmp))
                sha = file_sha256(Path(tmp))
                key = self.profile.key("inputs", sha + ".tar")
                self.put_file(Path(tmp), key)
            finally:
                os.unlink(tmp)
            return key, sha, True
        sha = file_sha256(path)
        key = self.profile.key("inputs", sha)
        self.put_file(path, key)
        return key, sha, False

    def stage_archive(self, archive: Path, sha: str) -> str:
        key = self.profile.key("images", sha + ".tar")
        self.put_file(archive, key)
        return key

    def presign(self, method: str, key: str, expires: int, bucket: str | None = None) -> str:
        op = "get_object" if method == "GET" else "put_object"
        url: str = self._call("s3", "generate_presigned_url", ClientMethod=op,
                              Params={"Bucket": bucket or self.profile.bucket, "Key": key},
                              ExpiresIn=int(min(expires, 7 * 86400)))
        return url

    # -- down ---------------------------------------------------------------------------
    def run_key(self, key: str, name: str) -> str:
        return self.profile.key("runs", key, name)

    def inbox_key(self, key: str) -> str:
        return self.profile.key("inbox", key + ".json")

    def inbox(self) -> set[str]:
        """Attempt keys whose status object is waiting: ONE list (more only past 1000)."""
        prefix = self.profile.key("inbox") + "/"
        found: set[str] = set()
        token: str | None = None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            page = self._call("s3", "list_objects_v2", Bucket=self.profile.bucket, Prefix=prefix,
                              **extra)
            for item in page.get("Contents", []):
                name = item["Key"][len(prefix):]
                if name.endswith(".json"):
                    found.add(name[:-len(".json")])
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return found

    def collect(self, key: str, adir: Path) -> dict[str, Any]:
        """Fetch one finished attempt's status, logs and outputs into ``adir``; returns the
        status (the node runner's status.json fields, outputs listed from the tar)."""
        body = self._call("s3", "get_object", Bucket=self.profile.bucket,
                          Key=self.inbox_key(key))["Body"].read()
        try:
            status: dict[str, Any] = json.loads(body)
        except ValueError as exc:
            raise StagingError(f"{key}: the status object is not JSON: {exc}") from exc
        adir.mkdir(parents=True, exist_ok=True)
        for stream in ("stdout", "stderr"):
            self._download(self.run_key(key, stream), adir / stream, optional=True)
        outputs: list[str] = []
        if status.get("outputs_sha256"):
            tar = adir / ".outputs.tar"
            self._download(self.run_key(key, "outputs.tar"), tar)
            if file_sha256(tar) != status["outputs_sha256"]:
                raise StagingError(f"{key}: outputs.tar does not match the sha256 the instance sent")
            outputs = extract_outputs(tar, adir / "outputs")
            tar.unlink()
        status["outputs"] = outputs
        if status.get("image_digest") == "":
            status["image_digest"] = None
        write_json_atomic(adir / "status.json", status, durable=True)
        self._call("s3", "delete_object", Bucket=self.profile.bucket, Key=self.inbox_key(key))
        return status

    def _download(self, key: str, dest: Path, optional: bool = False) -> None:
        tmp = dest.with_name(f".{dest.name}.part")
        try:
            self._call("s3", "download_file", Bucket=self.profile.bucket, Key=key,
                       Filename=str(tmp), Config=self._transfer())
        except StagingError:
            if optional:
                return
            raise
        os.replace(tmp, dest)


def extract_outputs(tar_path: Path, dest: Path) -> list[str]:
    """Unpack regular files with safe relative names; returns their names (sorted)."""
    names: list[str] = []
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path) as tar:
        for member in tar.getmembers():
            name = os.path.normpath(member.name)
            if not member.isfile() or name.startswith(("/", "..")) or name == ".":
                continue
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            if src is None:
                continue
            with src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            names.append(name)
    return sorted(set(names))
