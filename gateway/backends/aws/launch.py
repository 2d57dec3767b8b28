"""Launching attempts: budget, staging, user-data, then run_instances with fallbacks.

Idempotent twice over: ONE describe by attempt key for the whole batch comes first (what a
gateway killed between launch and record left running is adopted, not launched again),
and each run_instances carries a ClientToken derived from the attempt key and the launch
option, so a retried call cannot start a second instance at AWS either.

On a capacity error (InsufficientInstanceCapacity, MaxSpotInstanceCountExceeded,
SpotMaxPriceTooLow) the next option is tried: another type, another zone, then on demand.
Throttling after botocore's own retries, or an unreachable endpoint, stops the batch with
transient outcomes (the reconciler backs off); anything else refuses the one job.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from dataclasses import replace

from gateway.backends.aws import instances as tags
from gateway.backends.aws.bootstrap import (WORK_MARK, BootstrapPlan, ClusterPlan, RunUrls, Staged,
                                             render_bootstrap)
from gateway.backends.aws.catalog import Choice
from gateway.backends.aws.cluster import join_ref
from gateway.backends.aws.instances import InstanceView
from gateway.backends.base import SubmitOutcome, SubmitRequest
from gateway.errors import BackendError, BackendUnavailable, ConfigError, GatewayError
from gateway.node import read_json, write_json_atomic

if TYPE_CHECKING:
    from gateway.backends.aws.backend import AwsBackend

log = logging.getLogger(__name__)
Option = tuple[Choice, "str | None", "str | None"]


class NoCapacity(BackendError):
    """Every launch option met a capacity error; the job stays queued and is tried later."""


class Launcher:
    def __init__(self, backend: "AwsBackend") -> None:
        self.b = backend

    def submit(self, requests: Sequence[SubmitRequest]) -> list[SubmitOutcome]:
        outcomes: dict[str, SubmitOutcome] = {}
        ready: list[tuple[SubmitRequest, list[Option]]] = []
        for req in requests:
            try:
                self.b.capabilities().check(req.spec, self.b.name)
                ready.append((req, self.b.catalog.launch_plan(
                    req.spec, self.b.profile.spot, self.b.profile.placements(),
                    self.b.profile.fallback_types)))
            except GatewayError as exc:
                outcomes[req.key] = SubmitOutcome(req.key, error=str(exc))
        try:
            existing = self.b.node_sets([r.key for r, _ in ready]) if ready else {}
        except BackendUnavailable as exc:
            existing, ready = {}, []
            outcomes.update({r.key: SubmitOutcome(r.key, error=str(exc), transient=True) for r in requests
                             if r.key not in outcomes})
        down: str | None = None
        for req, options in ready:
            have = existing.get(req.key, {})
            if have and tags.complete(have):   # launched before a crash: adopt, never twice
                ids = [have[n].id for n in sorted(have)]
                for ref in ids:
                    self.b.remember(ref, req.key)
                outcomes[req.key] = SubmitOutcome(req.key, ref=join_ref(ids))
            elif down is not None:
                outcomes[req.key] = SubmitOutcome(req.key, error=down, transient=True)
            else:
                outcomes[req.key] = self._one(req, options, have)
                if outcomes[req.key].transient and "capacity" not in (outcomes[req.key].error or ""):
                    down = outcomes[req.key].error
        return [outcomes[r.key] for r in requests]

    def _one(self, req: SubmitRequest, options: list[Option],
             have: dict[int, InstanceView]) -> SubmitOutcome:
        try:
            if req.spec.resources.nodes > 1:
                return SubmitOutcome(req.key, ref=self.launch_nodes(req, options, have))
            return SubmitOutcome(req.key, ref=self.launch(req, options))
        except (BackendUnavailable, NoCapacity) as exc:
            return SubmitOutcome(req.key, error=str(exc), transient=True)
        except GatewayError as exc:
            return SubmitOutcome(req.key, error=str(exc))

    # -- one attempt --------------------------------------------------------------------
    def launch(self, req: SubmitRequest, options: list[Option]) -> str:
        options = self._within_budget(req, self.b.refine(options))
        user_data = render_bootstrap(self._plan(req))
        adir = Path(req.attempt_dir)
        adir.mkdir(parents=True, exist_ok=True)
        (adir / "user-data.sh").write_text(user_data)
        tried = []
        for index, (choice, zone, subnet) in enumerate(options):
            from gateway.backends.aws.backend import CapacityError, client_token

            params = self._params(req, choice, zone, subnet, user_data)
            try:
                answer = self.b.call("ec2", "run_instances", ClientToken=client_token(req.key, index),
                                     **params)
            except CapacityError as exc:
                tried.append(f"{_label(choice, zone)}: {exc.code}")
                log.info("%s: %s: %s; trying the next option", self.b.name, req.key, exc)
                continue
            inst = answer["Instances"][0]
            self.b.remember(inst["InstanceId"], req.key)
            self._record(adir, [str(inst["InstanceId"])], choice, zone, tried)
            return str(inst["InstanceId"])
        raise NoCapacity(f"no capacity for {req.key}: tried " + "; ".join(tried))

    def launch_nodes(self, req: SubmitRequest, options: list[Option],
                     have: dict[int, InstanceView]) -> str:
        """One instance per node, all of one option (type, zone, market), in the attempt's
        placement group. Nodes already launched (found by key and index) are kept when
        they match an option; a capacity error discards this option's nodes and tries the next."""
        from gateway.backends.aws.backend import CapacityError, client_token

        options = self._within_budget(req, self.b.refine(options))
        n = req.spec.resources.nodes
        group = self.b.groups.ensure(req.key) if self.b.profile.placement_group else None
        base = self._plan(req)
        adir = Path(req.attempt_dir)
        adir.mkdir(parents=True, exist_ok=True)
        datas = []
        for node in range(n):
            datas.append(render_bootstrap(self._node_plan(req, base, node)))
            (adir / ("user-data.sh" if node == 0 else f"user-data.{node}.sh")).write_text(datas[-1])
        if have and not any(_matches(have, o) for o in options):
            self.b.terminate([v.id for v in have.values()], tags.TAG_DISCARDED)
            have = {}
        tried: list[str] = []
        for index, (choice, zone, subnet) in enumerate(options):
            if have and not _matches(have, (choice, zone, subnet)):
                continue
            ids = {k: v.id for k, v in have.items()}
            try:
                for node in range(n):
                    if node not in ids:
                        params = self._params(req, choice, zone, subnet, datas[node], node, group)
                        answer = self.b.call("ec2", "run_instances", **params,
                                             ClientToken=client_token(f"{req.key}.n{node}", index))
                        ids[node] = str(answer["Instances"][0]["InstanceId"])
                        self.b.remember(ids[node], req.key)
            except CapacityError as exc:
                tried.append(f"{_label(choice, zone)}: {exc.code}")
                if ids:   # a cluster is one type in one zone: this option's nodes go
                    self.b.terminate(list(ids.values()), tags.TAG_DISCARDED)
                have = {}
                continue
            order = [ids[k] for k in range(n)]
            self._record(adir, order, choice, zone, tried, group)
            return join_ref(order)
        raise NoCapacity(f"no capacity for {req.key} ({n} nodes): tried " + "; ".join(tried))

    def _record(self, adir: Path, ids: list[str], choice: Choice, zone: str | None,
                tried: list[str], group: str | None = None) -> None:
        write_json_atomic(adir / "aws.json", {
            "instance_id": ids[0], "instance_ids": ids, "nodes": len(ids),
            "instance_type": choice.type.name, "market": "spot" if choice.spot else "on-demand",
            "zone": zone, "price_per_hour": choice.price, "price_source": choice.source,
            "placement_group": group, "fallbacks_taken": tried, "launched_at": self.b.clock()})

    def _node_plan(self, req: SubmitRequest, base: BootstrapPlan, node: int) -> BootstrapPlan:
        """Node ``node``'s bootstrap: rendezvous URLs; workers' results go to their own folder."""
        st, res = self.b.staging, req.spec.resources
        expires = int(self.b.max_hours(req.spec) * 3600) + 3600

        def url(method: str, name: str) -> str:
            return st.presign(method, st.run_key(req.key, name), expires)

        cluster = ClusterPlan(node=node, nodes=res.nodes, slots=res.tasks_per_node,
                              mpi=req.spec.mpi == "mpirun", wait_s=self.b.profile.boot_s)
        if node == 0:
            cluster = replace(cluster, done=url("PUT", "nodes/done"),
                              peers=[url("GET", f"nodes/{k}.addr") for k in range(1, res.nodes)])
            return replace(base, cluster=cluster)
        own = [url("PUT", f"node{node}/{name}") for name in ("stdout", "stderr", "status.json")]
        urls = RunUrls(stdout=own[0], stderr=own[1], outputs=own[2], status=own[2], inbox=own[2])
        return replace(base, urls=urls, cluster=replace(
            cluster, address=url("PUT", f"nodes/{node}.addr"), done=url("GET", "nodes/done")))

    def _within_budget(self, req: SubmitRequest, options: list[Option]) -> list[Option]:
        """Drop options the budget cannot pay for; reserve the most the rest may cost."""
        p = self.b.profile
        project = req.spec.labels.get("project")
        limits = [(p.budget, None, "the profile"),
                  (p.project_budgets.get(project) if project else None, project, f"project {project!r}")]
        hours = self.b.max_hours(req.spec) * req.spec.resources.nodes   # instance-hours
        headroom = min((limit - self.b.ledger.spent(proj) for limit, proj, _ in limits
                        if limit is not None), default=None)
        kept = [o for o in options if headroom is None or o[0].price * hours <= headroom]
        if not kept:
            scope = " and ".join(s for limit, _, s in limits if limit is not None)
            raise BackendError(f"budget of {scope} would be exceeded: {headroom:.2f} USD left, "
                               f"the cheapest option may cost {options[0][0].price * hours:.2f}")
        reason = self.b.ledger.reserve(req.key, max(o[0].price for o in kept) * hours, project,
                                       None, None)
        if reason:
            raise BackendError(reason)
        return kept

    def _params(self, req: SubmitRequest, choice: Choice, zone: str | None, subnet: str | None,
                user_data: str, node: int = 0, group: str | None = None) -> dict[str, Any]:
        p, now = self.b.profile, self.b.clock()
        expiry = now + self.b.max_hours(req.spec) * 3600 + 300
        tag_list = {tags.TAG_KEY: req.key, tags.TAG_JOB: req.job_id, tags.TAG_ATTEMPT: str(req.attempt),
                    tags.TAG_OWNER: p.owner, tags.TAG_PROFILE: p.name, tags.TAG_EXPIRY: f"{expiry:.0f}",
                    tags.TAG_PRICE: f"{choice.price:g}", tags.TAG_MARKET: "spot" if choice.spot else "on-demand",
                    "Name": req.key}
        nodes = req.spec.resources.nodes
        if nodes > 1:
            tag_list.update({tags.TAG_NODE: str(node), tags.TAG_NODES: str(nodes),
                             "Name": f"{req.key}.n{node}"})
        if req.spec.labels.get("project"):
            tag_list[tags.TAG_PROJECT] = req.spec.labels["project"][:256]
        params: dict[str, Any] = {
            "ImageId": p.ami, "InstanceType": choice.type.name, "MinCount": 1, "MaxCount": 1,
            "UserData": user_data, "InstanceInitiatedShutdownBehavior": "terminate",
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
            "TagSpecifications": [{"ResourceType": kind, "Tags": [{"Key": k, "Value": v}
                                                                  for k, v in tag_list.items()]}
                                  for kind in ("instance", "volume")]}
        if subnet:
            params["SubnetId"] = subnet
        elif zone:
            params["Placement"] = {"AvailabilityZone": zone}
        if group:
            params["Placement"] = {**params.get("Placement", {}), "GroupName": group}
        if p.security_groups:
            params["SecurityGroupIds"] = list(p.security_groups)
        if p.instance_profile:
            params["IamInstanceProfile"] = {"Name": p.instance_profile}
        if choice.spot:
            params["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": {
                "MaxPrice": f"{p.max_price or choice.type.on_demand:g}",
                "SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}}
        return params

    # -- the bootstrap's inputs ---------------------------------------------------------
    def _plan(self, req: SubmitRequest) -> BootstrapPlan:
        p, st = self.b.profile, self.b.staging
        spec = req.spec
        expires = int(self.b.max_hours(spec) * 3600) + 3600
        launch = read_json(Path(req.attempt_dir) / "launch.json") or {}
        runtime = str(launch.get("runtime") or spec.effective_runtime or "host")
        put = [st.presign("PUT", st.run_key(req.key, n), expires)
               for n in ("stdout", "stderr", "outputs.tar", "status.json")]
        urls = RunUrls(stdout=put[0], stderr=put[1], outputs=put[2], status=put[3],
                       inbox=st.presign("PUT", st.inbox_key(req.key), expires))
        image, digest, command, load_as = None, "", [], ""
        if spec.image and runtime != "host":
            image, digest = self._image(spec.image, launch, expires)
            load_as = str((launch.get("image") or {}).get("load_as") or "")
            command = container_argv(spec, req.env, image.name)
        cluster = None
        if spec.mpi == "mpirun" and spec.resources.nodes == 1:   # ranks on this one node
            cluster = ClusterPlan(node=0, nodes=1, slots=spec.resources.tasks_per_node, mpi=True)
        return BootstrapPlan(
            key=req.key, argv=list(spec.argv), env=dict(req.env), walltime=spec.resources.walltime,
            grace=p.grace_s, poweroff_after=p.boot_s + spec.resources.walltime + p.grace_s,
            urls=urls, runtime=runtime, image=image, image_digest=digest,
            inputs=[self._input(i.source, i.name, expires) for i in spec.inputs],
            outputs=list(spec.outputs), workdir=spec.workdir or "/work", spot=p.spot,
            log_interval=p.log_interval_s, node_root=p.node_root, command=command,
            image_load_as=load_as, cluster=cluster)

    def _input(self, source: str, name: str, expires: int) -> Staged:
        st = self.b.staging
        if source.startswith("s3://"):
            bucket, _, key = source[len("s3://"):].partition("/")
            if not bucket or not key:
                raise ConfigError(f"input {source!r}: write s3://BUCKET/KEY")
            return Staged(st.presign("GET", key, expires, bucket=bucket), "", name)
        key, sha, is_dir = st.stage_input(source)
        return Staged(st.presign("GET", key, expires), sha, name, is_dir)

    def _image(self, ref: str, launch: dict[str, Any], expires: int) -> tuple[Staged, str]:
        from gateway.images.store import ImageStore
        from gateway.images.transfer import export_archive

        digest = ref.rsplit("@", 1)[-1]
        cache = self.b.state_dir / "archives"
        cache.mkdir(parents=True, exist_ok=True)
        archive, sha_file = cache / f"{digest.split(':')[-1]}.tar", cache / f"{digest.split(':')[-1]}.sha256"
        if not (archive.exists() and sha_file.exists()):
            if self.b.images_store is None:
                raise ConfigError("aws: no image store configured to export the image from")
            store = ImageStore(self.b.images_store)
            sha = export_archive(store, store.resolve(ref), archive, ref.split("@")[0])
            sha_file.write_text(sha.split(":")[-1])
        sha = sha_file.read_text().strip()
        key = self.b.staging.stage_archive(archive, sha)
        podman_ref = str((launch.get("image") or {}).get("ref") or ref)
        return Staged(self.b.staging.presign("GET", key, expires), sha, podman_ref), digest


def container_argv(spec: Any, env: dict[str, str], image_ref: str) -> list[str]:
    """gateway.runtimes.podman's argv for the instance; WORK_MARK stands for its work folder.
    MPI starts one container per rank, so the fixed container name is left out there."""
    from gateway.runtimes.base import RunContext
    from gateway.runtimes.podman import PodmanRuntime

    ctx = RunContext(work_dir=WORK_MARK, attempt_dir="", env=dict(env), image_ref=image_ref,
                     container_workdir=spec.workdir or "/work")
    argv = PodmanRuntime().argv(spec, ctx)
    return [a for a in argv if not (spec.mpi and a.startswith("--name="))]


def _label(choice: Choice, zone: str | None) -> str:
    return f"{choice.type.name}/{'spot' if choice.spot else 'on-demand'}/{zone or 'any'}"


def _matches(have: dict[int, InstanceView], option: Option) -> bool:
    """Nodes launched before a crash fit ``option`` (same type, market and zone)."""
    choice, zone, _ = option
    market = "spot" if choice.spot else "on-demand"
    return all(v.type == choice.type.name and v.market == market and (zone is None or v.zone == zone)
               for v in have.values())


def describe_launch(adir: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((adir / "aws.json").read_text()))
    except (OSError, ValueError):
        return {}
