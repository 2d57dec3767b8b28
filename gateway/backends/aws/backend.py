"""The AWS backend: one short-lived EC2 instance per attempt, staged through S3.

How it spares the APIs: ``poll`` makes ONE describe_instances for all of this profile's
instances (filtered by the owner tag) and, only when some instance has ended, ONE S3 list of
the status inbox; ``adopt`` and the pre-launch lookup make ONE describe per 200 keys;
``cancel`` one create_tags and one terminate for all refs; the reaper reuses the last
describe. Launches are idempotent: a tag lookup by attempt key first (a restarted gateway
adopts what it launched), and a ClientToken per attempt and launch option.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from dataclasses import replace
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gateway.backends.aws import instances as inst_mod
from gateway.backends.aws import cluster
from gateway.backends.aws.catalog import Catalog, load_catalog
from gateway.backends.aws.cluster import Groups, join_ref, split_ref
from gateway.backends.aws.instances import InstanceView
from gateway.backends.aws.launch import Launcher
from gateway.backends.aws.ledger import Ledger
from gateway.backends.aws.pricing import SpotPrices
from gateway.backends.aws.profile import AwsProfile
from gateway.backends.aws.staging import Staging, StagingError
from gateway.backends.base import Capabilities, Capacity, Observation, SubmitOutcome, SubmitRequest
from gateway.backends.base import parse_attempt_key
from gateway.errors import BackendError, BackendUnavailable, ConfigError

log = logging.getLogger(__name__)

TRANSIENT = frozenset({"RequestLimitExceeded", "Throttling", "ThrottlingException",
                       "ServiceUnavailable", "Unavailable", "InternalError", "InternalFailure",
                       "SlowDown", "RequestTimeout", "RequestTimeTooSkewed"})
CAPACITY = frozenset({"InsufficientInstanceCapacity", "MaxSpotInstanceCountExceeded",
                      "SpotMaxPriceTooLow", "InsufficientCapacity", "InsufficientHostCapacity"})
NOT_FOUND = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchBucket"})
FILTER_MAX = 200   # values per EC2 filter


class AwsApiError(BackendError):
    """AWS refused an operation for good (not throttling, not capacity)."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class CapacityError(AwsApiError):
    """No capacity for this type/zone/market now: the launcher tries the next option."""


ClientFactory = Callable[[str], Any]


class AwsBackend:
    """Runs attempts on EC2. ``client_factory(service)`` replaces boto3 clients (tests)."""

    def __init__(self, profile: AwsProfile, *, jobs_root: Path, data_dir: Path,
                 images_store: Path | None = None, client_factory: ClientFactory | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.profile = profile
        self.name = f"aws:{profile.name}"
        self.jobs_root, self.images_store = Path(jobs_root), images_store
        self.state_dir = Path(data_dir) / "aws" / profile.name
        self.calls: Counter[str] = Counter()   # API calls by "service.Operation"
        self.clock = clock
        self._factory = client_factory
        self._clients: dict[str, Any] = {}
        self._catalog: Catalog | None = None
        self._snapshot: tuple[float, list[InstanceView]] | None = None
        self.ledger = Ledger(self.state_dir / "ledger.json")
        self.staging = Staging(profile, self.call, self._transfer_config, self.state_dir / "tmp")
        self._launcher = Launcher(self)
        self.groups = Groups(self, self.state_dir / "groups")
        self.spot_prices = SpotPrices(self)

    @property
    def default_runtime(self) -> str:
        return self.profile.runtime

    # -- clients and errors -------------------------------------------------------------
    def client(self, service: str) -> Any:
        if service not in self._clients:
            client = self._factory(service) if self._factory else self._boto_client(service)
            client.meta.events.register("before-call", self._count)
            self._clients[service] = client
        return self._clients[service]

    def _count(self, model: Any = None, **_: Any) -> None:
        if model is not None:
            self.calls[f"{model.service_model.service_name}.{model.name}"] += 1

    def _boto_client(self, service: str) -> Any:
        from botocore.config import Config as BotoConfig

        from gateway.backends.aws import boto3_module

        session = boto3_module().Session(profile_name=self.profile.aws_profile,
                                         region_name=self.profile.region)
        config = BotoConfig(retries={"mode": "standard", "max_attempts": self.profile.api_max_attempts},
                            signature_version="s3v4" if service == "s3" else None,
                            s3={"addressing_style": "path"} if service == "s3" else None)
        return session.client(service, endpoint_url=self.profile.endpoint_url, config=config)

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        size = self.profile.multipart_mb * (1 << 20)
        return TransferConfig(multipart_threshold=size, multipart_chunksize=size)

    def call(self, service: str, operation: str, **params: Any) -> Any:
        """One API call with AWS's errors mapped into the gateway's tree."""
        from botocore.exceptions import (BotoCoreError, ClientError, ConnectionError as BotoConnError,
                                         NoCredentialsError)
        from boto3.exceptions import S3UploadFailedError

        try:
            return getattr(self.client(service), operation)(**params)
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code, message = str(err.get("Code", "")), str(err.get("Message", ""))
            what = f"{service}.{operation}: {code}: {message}"
            if code in TRANSIENT:
                raise BackendUnavailable(what) from exc
            if code in CAPACITY:
                raise CapacityError(what, code) from exc
            if service == "s3" and code in NOT_FOUND:
                raise StagingError(what) from exc
            raise AwsApiError(what, code) from exc
        except NoCredentialsError as exc:
            raise ConfigError("no AWS credentials found (standard chain: AWS_* variables, "
                              "~/.aws/credentials and config, SSO, instance role)") from exc
        except (BotoConnError, S3UploadFailedError) as exc:
            raise BackendUnavailable(f"{service}.{operation}: {exc}") from exc
        except BotoCoreError as exc:
            raise AwsApiError(f"{service}.{operation}: {exc}") from exc

    # -- capabilities -------------------------------------------------------------------
    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            self._catalog = load_catalog(self.profile.catalog)
        return self._catalog

    def capabilities(self) -> Capabilities:
        runtimes = frozenset({"host", self.profile.runtime})
        return self.catalog.capabilities(max_walltime=self.profile.max_walltime, runtimes=runtimes,
                                         max_nodes=self.profile.max_nodes)

    def refine(self, options: list[Any]) -> list[Any]:
        """Launch options with spot prices from the API's history (when the profile asks)."""
        return self.spot_prices.refine(options)

    def capacity(self) -> Capacity | None:
        return None   # each job brings its own instance

    def plan(self, spec: Any) -> dict[str, Any]:
        """Where a job would run and what it would cost (``hpcgw submit --dry-run``)."""
        self.capabilities().check(spec, self.name)
        options = self.refine(self.catalog.launch_plan(
            spec, self.profile.spot, self.profile.placements(), self.profile.fallback_types))
        choice, zone, _ = options[0]
        nodes = spec.resources.nodes
        hours = spec.resources.walltime / 3600.0 * nodes     # instance-hours, all nodes
        return {"instance_type": choice.type.name, "market": "spot" if choice.spot else "on-demand",
                "zone": zone or "(any)", "nodes": nodes, "price_per_hour": choice.price,
                "price_source": choice.source, "estimated_cost": round(choice.price * hours, 4),
                "max_cost": round(choice.price * self.max_hours(spec) * nodes, 4),
                "fallbacks": [f"{c.type.name}/{'spot' if c.spot else 'on-demand'}/{z or 'any'}"
                              for c, z, _ in options[1:]]}

    def max_hours(self, spec: Any) -> float:
        p = self.profile
        return (p.boot_s + spec.resources.walltime + p.grace_s) / 3600.0

    # -- describe -----------------------------------------------------------------------
    def describe(self, filters: list[dict[str, Any]]) -> list[InstanceView]:
        """Instances of this owner and profile matching ``filters`` (all pages)."""
        base = [{"Name": f"tag:{inst_mod.TAG_OWNER}", "Values": [self.profile.owner]},
                {"Name": f"tag:{inst_mod.TAG_PROFILE}", "Values": [self.profile.name]}]
        pages, token = [], None
        while True:
            extra: dict[str, Any] = {"NextToken": token} if token else {}
            page = self.call("ec2", "describe_instances", Filters=base + filters, **extra)
            pages.append(page)
            token = page.get("NextToken")
            if not token:
                return inst_mod.views(pages)

    def snapshot(self, max_age: float) -> list[InstanceView]:
        """All of this profile's instances, reusing a describe younger than ``max_age``."""
        now = time.monotonic()
        if self._snapshot is None or now - self._snapshot[0] > max_age:
            self._snapshot = (now, self.describe([]))
        return self._snapshot[1]

    # -- submit / adopt -----------------------------------------------------------------
    def submit(self, requests: Sequence[SubmitRequest]) -> list[SubmitOutcome]:
        return self._launcher.submit(requests)

    def adopt(self, keys: Sequence[str]) -> dict[str, str]:
        """key -> instance id for attempts already launched: ONE describe per 200 keys."""
        if not keys:
            return {}
        out: dict[str, str] = {}
        for key, nodes in self.node_sets(keys).items():
            if inst_mod.complete(nodes):   # a partial set is launched again: missing nodes only
                ids = [nodes[n].id for n in sorted(nodes)]
                for ref in ids:
                    self.remember(ref, key)
                out[key] = join_ref(ids)
        return out

    def node_sets(self, keys: Sequence[str]) -> dict[str, dict[int, InstanceView]]:
        """key -> node index -> instance, for attempts already launched (ONE describe per 200)."""
        found: list[InstanceView] = []
        keys = list(dict.fromkeys(keys))
        for start in range(0, len(keys), FILTER_MAX):
            found += self.describe([{"Name": f"tag:{inst_mod.TAG_KEY}",
                                     "Values": keys[start:start + FILTER_MAX]}])
        return inst_mod.nodes_by_key(found)

    def remember(self, ref: str, key: str) -> None:
        index = self.state_dir / "refs"
        index.mkdir(parents=True, exist_ok=True)
        (index / ref).write_text(key)

    def key_of(self, ref: str) -> str | None:
        try:
            return (self.state_dir / "refs" / ref).read_text().strip() or None
        except OSError:
            return None

    def attempt_dir(self, key: str) -> Path | None:
        parsed = parse_attempt_key(key)
        return self.jobs_root / parsed[0] / str(parsed[1]) if parsed else None

    # -- poll ---------------------------------------------------------------------------
    def poll(self, refs: Sequence[str]) -> dict[str, Observation]:
        """ONE describe for all refs; ONE inbox list only when some instance has ended."""
        refs = list(dict.fromkeys(r for r in refs if r))
        if not refs:
            return {}
        now_mono = time.monotonic()
        found = {v.id: v for v in self.describe([])}
        self._snapshot = (now_mono, list(found.values()))
        out: dict[str, Observation] = {}
        ended: list[tuple[str, list[InstanceView]]] = []
        early: list[tuple[str, list[InstanceView], InstanceView]] = []
        doomed: list[str] = []
        for ref in refs:
            maybe = [found.get(i) or self._forgotten(i) for i in split_ref(ref)]
            known = [v for v in maybe if v is not None]
            if not maybe or len(known) < len(maybe):
                continue   # unknown: the reconciler counts misses
            head = known[0]
            live = [v for v in known if inst_mod.STATES.get(v.state) is not None]
            if len(live) == len(known):
                out[ref] = (inst_mod.live_observation(head) if len(known) == 1
                            else cluster.live(live))
            elif head in live:   # a worker ended first
                dead = [v for v in known if v not in live and v.state != "gone"]
                if not dead:
                    continue   # a worker not listed (yet): describe lags run_instances
                early.append((ref, known, dead[0]))
                doomed += [v.id for v in live]   # the attempt ends either way
            else:
                ended.append((ref, known))
                doomed += [v.id for v in live]   # workers still waiting for node 0
        waiting: set[str] | None = None
        if early:   # a worker powers off once node 0's status is in: did node 0 report?
            waiting = self.staging.inbox()
            for ref, known, first_dead in early:
                adir = self.attempt_dir(known[0].key)
                if known[0].key in waiting or (adir and (adir / "status.json").exists()):
                    # node 0 finished; it is powering off
                    ended.append((ref, known))
                    continue
                out[ref] = cluster.lost_node(ref, first_dead, known, self.clock())
                self.ledger.settle(known[0].key, float(out[ref].extra["cost"]))
        if doomed:
            self.terminate(doomed, inst_mod.TAG_REAPED)
        if ended:
            out.update(self._ended(ended, waiting))
        return out

    def _forgotten(self, ref: str) -> InstanceView | None:
        """An instance describe no longer shows, rebuilt from the launch record."""
        from gateway.backends.aws.launch import describe_launch

        key = self.key_of(ref)
        adir = self.attempt_dir(key) if key else None
        if key is None or adir is None:
            return None
        rec = describe_launch(adir)
        return InstanceView(id=ref, state="gone", key=key, type=str(rec.get("instance_type", "")),
                            zone=str(rec.get("zone") or ""), market=str(rec.get("market", "")),
                            price=float(rec.get("price_per_hour") or 0.0),
                            launched=float(rec.get("launched_at") or 0.0), expiry=0.0)

    def _ended(self, ended: list[tuple[str, list[InstanceView]]],
               waiting: set[str] | None = None) -> dict[str, Observation]:
        """Observations of ended attempts; ``waiting``: the inbox if already listed."""
        from gateway.node import read_json

        now = self.clock()
        out: dict[str, Observation] = {}
        leftovers = []
        for ref, nodes in ended:
            inst = nodes[0]
            adir = self.attempt_dir(inst.key)
            if adir is None:
                continue
            status = read_json(adir / "status.json")
            if status is None:
                if waiting is None:
                    waiting = self.staging.inbox()
                if inst.key in waiting:
                    try:
                        status = self.staging.collect(inst.key, adir)
                    except StagingError as exc:
                        log.warning("%s: collecting %s failed: %s", self.name, inst.key, exc)
                        continue
            if status is None and inst.state == "gone":
                continue   # no word from it: the reconciler counts misses, then LOST
            end = float(status["ended_at"]) if status and status.get("ended_at") else now
            cost = cluster.cost_of(nodes, end)   # sum over the nodes
            obs = (inst_mod.finished_observation(inst, status, cost) if status is not None
                   else inst_mod.silent_end(inst, now, cost))
            if len(nodes) > 1:
                obs = replace(obs, ref=ref, node=", ".join(f"{v.id} ({v.type})" for v in nodes),
                              extra={**obs.extra, "nodes": str(len(nodes))})
            out[ref] = obs
            self.ledger.settle(inst.key, cost)
            leftovers += [v.id for v in nodes if v.state in ("stopping", "stopped")]
        if leftovers:   # powered off but not terminated (shutdown behaviour changed?)
            self.call("ec2", "terminate_instances", InstanceIds=leftovers)
        return out

    # -- cancel / reap / logs -----------------------------------------------------------
    def cancel(self, refs: Sequence[str]) -> None:
        """Mark and terminate: ONE create_tags and ONE terminate_instances for all refs."""
        ids = [i for r in dict.fromkeys(refs) if r for i in split_ref(r)]
        if ids:
            self.terminate(ids, inst_mod.TAG_CANCELLED)

    def terminate(self, ids: list[str], mark: str) -> None:
        try:
            self.call("ec2", "create_tags", Resources=ids, Tags=[{"Key": mark, "Value": "1"}])
        except AwsApiError as exc:   # an id already gone: terminate the rest anyway
            log.warning("%s: tagging %s failed: %s", self.name, ids, exc)
        self.call("ec2", "terminate_instances", InstanceIds=ids)

    def reap(self, active_keys: set[str], *, max_age: float | None = None,
             dry_run: bool = False) -> list[InstanceView]:
        """Terminate live instances past their expiry or whose attempt is no longer active."""
        age = self.profile.reap_interval_s if max_age is None else max_age
        now = self.clock()
        doomed = [v for v in self.snapshot(age) if v.alive
                  and ((v.expiry and now >= v.expiry) or v.key not in active_keys)]
        if doomed and not dry_run:
            self.terminate([v.id for v in doomed], inst_mod.TAG_REAPED)
            self._snapshot = None
            log.warning("%s: reaped %s", self.name, ", ".join(f"{v.id} ({v.key})" for v in doomed))
        if self._snapshot is not None:   # placement groups whose attempt is over and empty
            self.groups.sweep(active_keys, self._snapshot[1], dry_run=dry_run)
        return doomed

    def log_paths(self, ref: str, attempt_dir: Path) -> dict[str, Path]:
        return {"stdout": Path(attempt_dir) / "stdout", "stderr": Path(attempt_dir) / "stderr"}

    def fetch_log(self, key: str, stream: str, dest: Path) -> bool:
        """A running attempt's log as the instance last uploaded it (every ``log_interval_s``):
        ONE GET, written atomically to ``dest``. False when there is none yet."""
        try:
            body = self.call("s3", "get_object", Bucket=self.profile.bucket,
                             Key=self.staging.run_key(key, stream))["Body"].read()
        except StagingError:
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.live")
        tmp.write_bytes(body)
        tmp.replace(dest)
        return True


def client_token(key: str, option: int) -> str:
    """At most 64 ASCII characters, one per attempt and launch option."""
    token = f"{key}.{option}"
    return token if len(token) <= 64 else hashlib.sha256(token.encode()).hexdigest()

